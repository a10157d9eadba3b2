"""Necks that turn ViT tokens into a four-scale pyramid, and the segmentor that puts backbone, neck and
heads together (method.md section 4).

- LL-FPN (``neck="ll-fpn"``): only the last layer's patch tokens (stride = patch size, 16 for /16
  models) feed all four scales: x4 = deconv2x -> BN -> GELU -> deconv2x, x2 = deconv2x, x1 = identity,
  x0.5 = maxpool 2x2 (strides 4, 8, 16, 32 for /16 models).
- Multi-layer (``neck="multi-layer"``): the same four transforms, each on a different intermediate
  layer (blocks 4, 6, 8, 12 for a depth-12 model), as in BEiT/MAE segmentation.
- Linear probing (``mode="lp"``): frozen backbone, chosen layers concatenated, one 1x1 conv.

Layer numbers are 1-based everywhere a user sees them. Every layer is read RAW, the last one
included: the backbone's final LayerNorm is never applied (as the reference's ``use_norm=False``);
it stays frozen and unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unip_analysis.errors import UnipError

from .heads import FCNHead, LinearProbeHead, UperHead, init_like_mmseg

NECKS = ("ll-fpn", "multi-layer")
MODES = ("ft", "lp")
AUX_INDEX = 2  # the stride-16 level (identity branch) feeds the auxiliary FCN head


class ModelConfigError(UnipError):
    """Segmentor options that do not fit the backbone (layer numbers, neck, mode)."""


@dataclass
class SegOutput:
    """What the segmentor computed for one set of images."""

    logits: torch.Tensor  # [B, C, h, w] main head logits (at the head's resolution)
    aux: torch.Tensor | None  # auxiliary FCN logits in training, else None
    # The decode head's fused map before dropout and classifier [B, D, h, w] (linear probing: the
    # concatenated features); only when an extension has needs_features=True, else None.
    features: torch.Tensor | None

    def split(self, n: int) -> tuple[SegOutput, SegOutput | None]:
        """The first ``n`` images' outputs and the rest's (None when there is no rest)."""
        if self.logits.shape[0] == n:
            return self, None

        def part(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
            return None if t is None else t[s]

        head, tail = slice(0, n), slice(n, None)
        return (
            SegOutput(self.logits[head], part(self.aux, head), part(self.features, head)),
            SegOutput(self.logits[tail], part(self.aux, tail), part(self.features, tail)),
        )


def default_layers(depth: int) -> list[int]:
    """Blocks 4, 6, 8, 12 of a depth-12 model, scaled to ``depth`` (1-based)."""
    return [max(1, round(depth * k / 12)) for k in (4, 6, 8, 12)]


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    bad = [n for n in layers if not 1 <= n <= depth]
    if bad or not layers:
        raise ModelConfigError(
            f"--layers {','.join(map(str, layers)) or '(empty)'}: layer numbers are 1-based and must lie in "
            f"1..{depth} for this {depth}-block backbone"
        )
    return [int(n) for n in layers]


class FourScaleNeck(nn.Module):
    """Four ViT maps at the patch stride -> strides x4, x2, x1, x0.5 finer/coarser (finest first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        branches = (self.up4, self.up2, self.same, self.down2)
        return [branch(f) for branch, f in zip(branches, feats)]


class Segmentor(nn.Module):
    """ViT backbone + neck + heads. ``forward(x)`` returns ``(logits, aux_logits)`` at the patch-grid
    pyramid's finest resolution; ``aux_logits`` is ``None`` in linear probing and in eval mode.
    ``forward(x, features=True)`` returns a :class:`~unip_train.finetune.extensions.SegOutput`
    that also holds the decode head's fused map (UperNet: before dropout and classifier; linear
    probing: the concatenated features).

    ``head_channels``: UperNet width (default: the backbone's embed dim, as the reference configs);
    ``aux_channels``: the auxiliary FCN head's width (256 in the reference).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        mode: str = "ft",
        neck: str = "ll-fpn",
        layers: Sequence[int] | None = None,
        head_channels: int | None = None,
        aux_channels: int = 256,
    ):
        super().__init__()
        if mode not in MODES:
            raise ModelConfigError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        if neck not in NECKS:
            raise ModelConfigError(f"--neck {neck!r}: expected one of {', '.join(NECKS)}")
        depth, dim = len(backbone.blocks), int(backbone.embed_dim)
        if layers is None:
            layers = [depth] if (mode == "ft" and neck == "ll-fpn") else default_layers(depth)
        layers = check_layers(layers, depth)
        if mode == "ft" and neck == "ll-fpn" and layers != [depth]:
            raise ModelConfigError(
                f"--layers {','.join(map(str, layers))}: LL-FPN uses the last layer only; "
                "use --neck multi-layer for intermediate layers"
            )
        if mode == "ft" and neck == "multi-layer" and len(layers) != 4:
            raise ModelConfigError(f"--neck multi-layer needs exactly 4 layers, got {len(layers)}")
        self.mode, self.neck_name, self.layers = mode, neck, layers
        self.num_classes = num_classes
        self.backbone = backbone
        if mode == "lp":
            self.backbone.eval().requires_grad_(False)
            self.neck = None
            self.decode_head = LinearProbeHead([dim] * len(layers), num_classes)
            self.aux_head = None
            init_like_mmseg(self.decode_head)
        else:
            # Blocks after the deepest used layer and the final norm (layers are read raw) never
            # see a gradient; freezing them keeps DDP from waiting for their gradients.
            for blk in self.backbone.blocks[max(layers) :]:
                blk.requires_grad_(False)
            self.backbone.norm.requires_grad_(False)
            self.neck = FourScaleNeck(dim)
            self.decode_head = UperHead([dim] * 4, head_channels or dim, num_classes)
            self.aux_head = FCNHead(dim, aux_channels, num_classes)
            init_like_mmseg(self.decode_head)
            init_like_mmseg(self.aux_head)

    def train(self, mode: bool = True) -> Segmentor:
        super().train(mode)
        if self.mode == "lp":
            self.backbone.eval()  # frozen: BN-free ViT, but dropout / drop path must stay off
        return self

    def layer_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw patch-token maps [B, dim, H/p, W/p] of ``self.layers`` (prefix tokens dropped, no
        final norm)."""
        idx = sorted(set(n - 1 for n in self.layers))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "ft"):
            maps = self.backbone.forward_intermediates(
                x, indices=idx, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
            )
        by_index = dict(zip(idx, maps))
        return [by_index[n - 1] for n in self.layers]

    def forward(
        self, x: torch.Tensor, features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | SegOutput:
        feats = self.layer_maps(x)
        aux = None
        if self.mode == "ft":
            if self.neck_name == "ll-fpn":
                feats = feats * 4
            feats = self.neck(feats)
            aux = self.aux_head(feats[AUX_INDEX]) if self.training else None
        fused = self.decode_head.fused(feats)
        logits = self.decode_head.classify(fused)
        if features:
            return SegOutput(logits, aux, fused)
        return logits, aux
