"""Pre-training (``unip-pretrain``): one training run, several methods.

- :mod:`.cli` is the command: its options declared once, each method declaring its own (:mod:`unip_analysis.command`).
- :mod:`.trainer` is the method-agnostic run (data, optimizer, schedule, checkpoints, exact
  resume, logging, torchrun); :mod:`.engine` is its one-screen epoch loop.
- :mod:`.method` is what a method is to the run:
  :mod:`.nmi_had` is UNIP's hybrid-attention distillation (method.md section 2);
  :mod:`.pad` is PAD's adapter pre-training (method.md section 7), on the MAE objective of
  :mod:`.mae` (masking, decoder, loss, reading MAE / MMPretrain files).
- :mod:`.data` is the InfMix-style unlabelled image mix and its augmentation (method.md section 3).
- :mod:`.rois` is PAD's proposal files and RoI crop rule; :mod:`.proposals` computes proposals
  (selective search) for ``unip-rois`` (:mod:`.rois_cli`).
"""

from .cli import main

__all__ = ["main"]
