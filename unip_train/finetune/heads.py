"""Segmentation heads in plain PyTorch: UperNet (pyramid pooling + FPN), the auxiliary FCN head, and the
linear-probe head (one 1x1 conv). Each returns logits at the resolution of its finest input.

Initialised as mmsegmentation initialises them (the reference fine-tuning, method.md section 4):
conv-BN-ReLU convolutions Kaiming-normal (fan-out, ReLU gain), BatchNorm weight 1 and bias 0, the
final 1x1 classifier N(0, 0.01) with bias 0 (:func:`init_like_mmseg`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def init_like_mmseg(head: nn.Module) -> None:
    """Re-initialise ``head`` as mmsegmentation does: every conv-BN-ReLU conv Kaiming-normal with
    fan-out and ReLU gain, BatchNorm (1, 0), and ``head.classifier`` N(0, 0.01) with bias 0."""
    for m in head.modules():
        if isinstance(m, ConvBNReLU):
            nn.init.kaiming_normal_(m[0].weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(m[1].weight)
            nn.init.zeros_(m[1].bias)
    nn.init.normal_(head.classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.classifier.bias)


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet pooling module: average-pool to ``s x s`` for each scale, 1x1 conv, upsample back."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_upsample(stage(x), x.shape[-2:]) for stage in self.stages]


class UperHead(nn.Module):
    """UperNet decode head (Xiao et al. 2018) over a four-scale pyramid, finest first.

    The coarsest map goes through pyramid pooling (scales 1, 2, 3, 6); an FPN top-down path
    (1x1 lateral convs, 3x3 output convs) brings every level to ``channels``; all levels are
    upsampled to the finest, concatenated, fused by a 3x3 conv and classified by a 1x1 conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def fused(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused map [B, channels, h, w] (finest level's size) before dropout and classifier."""
        top = feats[-1]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        levels.append(self.ppm_bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: add the coarser level to the finer one
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.fuse(torch.cat([outs[0]] + [_upsample(o, size) for o in outs[1:]], dim=1))

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(fused))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.fused(feats))


class FCNHead(nn.Module):
    """Auxiliary FCN head: ``num_convs`` 3x3 conv-BN-ReLU layers, dropout, 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        layers = [ConvBNReLU(cin if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class LinearProbeHead(nn.Module):
    """Linear probing (method.md section 4): feature maps resized (bilinear) to the first's size,
    concatenated, one 1x1 conv. Nothing but a per-pixel linear classifier on the raw features: no
    normalization, no dropout (the reference's FCNHead with no convs, resize_concat)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(int(sum(in_channels)), num_classes, 1)

    def fused(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The concatenated features [B, sum(channels), h, w] the classifier reads."""
        size = feats[0].shape[-2:]
        return torch.cat([feats[0]] + [_upsample(f, size) for f in feats[1:]], dim=1)

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(fused)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.fused(feats))
