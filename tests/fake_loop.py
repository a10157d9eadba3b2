"""A stand-in for the fine-tuning loop's side of the extension interface: the output record, a tiny conv
segmentor that returns it, and the context ``setup`` receives. Used by tests/test_pixl.py and
tests/test_semi.py; the real loop lives in unip_train/finetune/trainer.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from unip_train.distributed import DistInfo


@dataclass
class SegOutput:  # the loop's output record (unip_train/finetune/extensions.py), copied for the tests
    logits: torch.Tensor
    aux: torch.Tensor | None
    features: torch.Tensor | None


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class TinySegmentor(nn.Module):
    """A conv 'segmentor' at stride 2 with the loop's output record and ``features=True``."""

    def __init__(self, num_classes: int = 4, dim: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.decode_head = Classifier(dim, num_classes)
        self.aux_head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor, features: bool = False) -> SegOutput:
        f = self.body(x)
        aux = self.aux_head(f) if self.training else None
        return SegOutput(self.decode_head(f), aux, f if features else None)


def fake_context(
    model: nn.Module,
    iters: int = 6,
    mode: str = "ft",
    out: Path | None = None,
    train_set=None,
    batch_size: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
):
    """What the loop passes to ``Extension.setup`` (cfg, model, dist, device, out, train_set, seed)."""
    cfg = SimpleNamespace(
        img_size=16, iters=iters, batch_size=batch_size * world_size, workers=0, precision="fp32", mode=mode
    )
    cpu = torch.device("cpu")
    dist = DistInfo(rank, world_size, 0, cpu)
    return SimpleNamespace(
        cfg=cfg, model=model, dist=dist, device=cpu, out=out, train_set=train_set, seed=seed
    )
