"""The segmentation cross-entropy every fine-tuning loss term uses (supervised and pseudo-labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layouts import IGNORE_INDEX


def seg_loss(logits: torch.Tensor, label: torch.Tensor, average: str = "labelled") -> torch.Tensor:
    """Cross-entropy of logits upsampled (bilinear) to the label's size; 255 ignored. ``average``:
    ``labelled`` = mean over labelled pixels; ``all`` = their sum over all pixels, ignored and
    padded ones included, as mmsegmentation 0.11 (the reference) reduced it."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    if not bool((label != IGNORE_INDEX).any()):
        return logits.sum() * 0.0  # nothing labelled (e.g. no confident pseudo-label): no loss, not NaN
    if average == "all":
        return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum") / label.numel()
    return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX)
