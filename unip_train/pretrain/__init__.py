"""Pre-training (``unip-pretrain``): one training loop, several methods.

- :mod:`.cli` parses options and sets up a run; :mod:`.engine` is the loop.
- :mod:`.nmi_had` is UNIP's hybrid-attention distillation (method.md section 2).
- :mod:`.data` is the InfMix-style unlabelled image mix (method.md section 3).
"""

from .cli import main

__all__ = ["main"]
