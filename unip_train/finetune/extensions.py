"""Extensions: loss terms that plug into the one fine-tuning loop (PiXL, mean-teacher semi-supervision).

The loop (:func:`unip_train.finetune.engine.train`) stays one loop; an :class:`Extension` adds to it:

1. ``setup(ctx)`` once, before the first step; on ``--resume`` its ``load_state_dict`` follows.
2. ``modules()``: trainable modules (e.g. a projection head). The loop moves them to the device,
   puts their parameters in the optimizer (no layer decay, the base lr, the usual weight-decay
   rule), averages their gradients over processes, and saves them in ``checkpoint.pt``.
3. ``extra_images(it)``: images appended to this step's batch, so the segmentor runs ONE forward
   over labelled and extra images (BatchNorm statistics and DDP stay simple). Their outputs come
   back as ``extra``.
4. ``loss_terms(it, labels, out, extra)``: named, already weighted scalars added to the supervised
   loss (main cross-entropy + ``aux_weight`` x auxiliary cross-entropy); each is logged under its name.
5. ``after_step(it)`` after every optimizer step (e.g. an EMA update).
6. ``state_dict()`` / ``load_state_dict()``: everything exact resume needs (EMA weights, counters).

``it`` is the 0-based index of the iteration being run. With no extension the loop is exactly
the plain supervised loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .ll_fpn import SegOutput
from .pixl import PixlExtension
from .semi import MeanTeacherExtension, SemiData

if TYPE_CHECKING:  # imported for annotations only: the config and datasets import this module's users
    from ..distributed import DistInfo
    from .config import FinetuneConfig
    from .dataset import SegDataset
    from .ll_fpn import Segmentor

__all__ = ["Extension", "ExtensionContext", "SegOutput", "build_extensions", "check_names"]


@dataclass
class ExtensionContext:
    """What an extension may use in :meth:`Extension.setup`."""

    cfg: FinetuneConfig
    model: Segmentor  # the bare segmentor (not the DDP wrapper), on ``device``
    dist: DistInfo
    device: torch.device
    out: Path  # the run folder
    train_set: SegDataset
    seed: int


class Extension:
    """Adds loss terms to the fine-tuning loop. Every method's default does nothing."""

    name: str = "extension"
    needs_features: bool = False

    def setup(self, ctx: ExtensionContext) -> None:
        """Called once before the first step (before ``load_state_dict`` on resume)."""

    def modules(self) -> list[torch.nn.Module]:
        """Trainable modules to optimize and checkpoint with the segmentor."""
        return []

    def extra_images(self, it: int) -> torch.Tensor | None:
        """Images [b, 3, H, W] (normalized, crop size) appended to iteration ``it``'s batch."""
        return None

    def loss_terms(
        self, it: int, labels: torch.Tensor, out: SegOutput, extra: SegOutput | None
    ) -> dict[str, torch.Tensor]:
        """Named, already weighted scalar losses added to the total (each logged under its name)."""
        return {}

    def after_step(self, it: int) -> None:
        """Called after the optimizer step of iteration ``it``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs besides the modules' weights."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def build_extensions(cfg: FinetuneConfig, semi: SemiData | None = None) -> list[Extension]:
    """The extensions ``cfg`` asks for, in the order their loss terms are added: the mean teacher
    when ``semi`` has unlabelled images (``--label-fraction`` / ``--unlabelled``), then PiXL
    (``--pixel-loss pixl``), which takes the unlabelled images' classes from the teacher's confident
    pseudo-labels. :func:`unip_train.finetune.trainer.run` also accepts extensions built in Python."""
    exts: list[Extension] = []
    teacher = None
    if semi is not None and semi.files:
        teacher = MeanTeacherExtension(semi.files, semi.split, cfg.ema_decay, cfg.pseudo_threshold)
        exts.append(teacher)
    if cfg.pixel_loss == "pixl":
        pseudo = teacher.confident_pseudo_labels if teacher is not None else None
        exts.append(
            PixlExtension(
                cfg.pixl_weight,
                cfg.pixl_tau,
                cfg.pixl_eta,
                cfg.pixl_scales,
                cfg.pixl_scale_rule,
                pseudo_labels=pseudo,
            )  # fmt: skip
        )
    return exts


def check_names(extensions: list[Extension]) -> None:
    """Extension names key their checkpoint state and log fields: they must be unique."""
    names = [e.name for e in extensions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"extension names must be unique; repeated: {', '.join(dupes)}")
