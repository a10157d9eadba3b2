"""Pre-training (``unip-pretrain``): one training run, several methods.

- :mod:`.cli` parses options (each method adds its own group and recipe defaults).
- :mod:`.trainer` is the method-agnostic run (data, optimizer, schedule, checkpoints, exact
  resume, logging, torchrun); :mod:`.engine` is its one-screen epoch loop.
- :mod:`.method` is what a method is to the run; :mod:`.nmi_had` is UNIP's hybrid-attention
  distillation (method.md section 2).
- :mod:`.data` is the InfMix-style unlabelled image mix (method.md section 3).
"""

from .cli import main

__all__ = ["main"]
