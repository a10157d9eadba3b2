"""PAD's ViT: a timm ViT whose blocks carry a patch-wise-scale adapter beside the MLP (Zhang et al.
2023, method.md section 7), and what the ``pad`` checkpoint family of :mod:`.checkpoints` reads
to load it for analysis and fine-tuning (the key names, the width, the metadata). This module
imports nothing of :mod:`.checkpoints`: the dependency goes one way.

Block (pre-norm; ``h`` is the stream after the attention residual)::

    h   = x + DropPath(Attn(LN1(x)))
    m   = MLP(LN2(h))
    a   = Up(Dropout_0.1(ReLU(Down(LN_a(h)))))
    s   = sigmoid(W_s [m ; a])          one scalar per token
    out = h + s * a + DropPath(m)       no drop path on the adapter term

Init: Down as PyTorch's Linear default with bias 0; Up weight and bias 0; W_s 0. So a freshly
wrapped model computes exactly what the base model computes, and every scale is 0.5.

The adapted block stays a timm ``Block`` (same attributes, same state-dict keys, ``block.attn``
still timm's ``Attention``), so attention capture, ``forward_intermediates`` and every tool that
walks ``model.blocks`` keep working; the adapter adds ``adapter.*`` and ``scale_pred.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import CheckpointError, SpecError

PAD_FORMAT = "unip-pad"
SCALE_MODE = "patch-wise: s = sigmoid(W_s [m; a]), one scalar per token"
DEFAULT_WIDTH = 64  # PAD's bottleneck r for every model size
ADAPTER_DROPOUT = 0.1
ADAPTER_LN_EPS = 1e-5  # PyTorch's LayerNorm default, as PAD's adapter uses


class Adapter(nn.Module):
    """``Up(Dropout(ReLU(Down(LN_a(h)))))``: the bottleneck branch beside the MLP."""

    def __init__(self, dim: int, width: int = DEFAULT_WIDTH, dropout: float = ADAPTER_DROPOUT):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=ADAPTER_LN_EPS)
        self.down = nn.Linear(dim, width)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(width, dim)
        with torch.no_grad():  # Down keeps PyTorch's default (kaiming-uniform) weight init
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(self.norm(h)))))


class PadBlock(Block):
    """A timm ``Block`` with PAD's adapter and per-token scale predictor (see the module docstring).

    Never constructed directly: :func:`add_adapters` turns existing blocks into it, so every timm
    attribute and key of the block is kept as it was.
    """

    adapter: Adapter
    scale_pred: nn.Linear

    def forward_with_scale(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        """(block output, per-token scale s [B, N, 1])."""
        h = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        m = self.ls2(self.mlp(self.norm2(h)))
        a = self.adapter(h)
        s = torch.sigmoid(self.scale_pred(torch.cat([m, a], dim=-1)))
        return h + s * a + self.drop_path2(m), s

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return self.forward_with_scale(x, attn_mask)[0]


def add_adapters(model: VisionTransformer, width: int = DEFAULT_WIDTH) -> VisionTransformer:
    """Give every block of ``model`` (in place) a PAD adapter of bottleneck ``width``, initialised so
    the model's output is unchanged and every scale is 0.5. Returns ``model``."""
    if width < 1:
        raise SpecError(f"adapter width must be at least 1, got {width}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise SpecError(
                f"block {i + 1} is a {type(blk).__name__}; PAD adapters need timm's pre-norm Block "
                "(a plain ViT such as MAE's)"
            )
        dim = blk.norm2.normalized_shape[0]
        param = next(blk.parameters())
        # Change the class, not the object: the block keeps its modules, keys and attention.
        blk.__class__ = PadBlock
        blk.adapter = Adapter(dim, width).to(param.device, param.dtype)
        blk.scale_pred = nn.Linear(2 * dim, 1, bias=False).to(param.device, param.dtype)
        nn.init.zeros_(blk.scale_pred.weight)
    return model


def drop_adapters(model: VisionTransformer) -> VisionTransformer:
    """Remove the adapters and scale predictors (in place): the plain ViT, for an ablation."""
    for blk in model.blocks:
        if isinstance(blk, PadBlock):
            del blk.adapter, blk.scale_pred
            blk.__class__ = Block
    return model


def adapter_width(model: nn.Module) -> int | None:
    """The bottleneck width of ``model``'s adapters, or None when it has none."""
    for blk in getattr(model, "blocks", []):
        if isinstance(blk, PadBlock):
            return int(blk.adapter.down.out_features)
    return None


def adapter_parameter_count(dim: int, width: int, depth: int) -> int:
    """Pre-trainable parameters PAD adds: per block 2D (LN_a) + (D r + r) (Down) + (r D + D) (Up)
    + 2D (W_s) (method.md section 7; ViT-B, r = 64: 1,226,496)."""
    return depth * (2 * dim + (dim * width + width) + (width * dim + dim) + 2 * dim)


def scale_predictors(model: nn.Module) -> list[nn.Parameter]:
    return [blk.scale_pred.weight for blk in model.blocks if isinstance(blk, PadBlock)]


# --- the file -----------------------------------------------------------------------------------


def backbone_metadata(arch: str, width: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """safetensors header of a PAD backbone: enough to rebuild it (``format``, ``arch``, width)."""
    meta = {"format": PAD_FORMAT, "arch": arch, "adapter_width": str(width), "scale_mode": SCALE_MODE}
    meta.update(extra or {})
    return meta


# PAD's own training checkpoints (casiatao/PAD models_mae.py) name the same tensors so.
_PAD_REFERENCE_NAMES = (
    (r"\.adaptmlp\.adapter_layer_norm_before\.", ".adapter.norm."),
    (r"\.adaptmlp\.down_proj\.", ".adapter.down."),
    (r"\.adaptmlp\.up_proj\.", ".adapter.up."),
    (r"\.scalar_pred\.", ".scale_pred."),
)


def extract(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``pad`` family: a ``backbone.safetensors`` written by ``unip-pretrain --method pad`` (timm
    keys + ``adapter.*`` + ``scale_pred``), or PAD's own pre-training ``.pth`` (``ckpt["model"]``,
    ``adaptmlp.*`` / ``scalar_pred`` names; its MAE decoder is dropped)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    sd = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor) or re.match(r"^(decoder_|decoder\.|mask_token$)", k):
            continue
        k = k.removeprefix("module.")
        for pattern, new in _PAD_REFERENCE_NAMES:
            k = re.sub(pattern, new, k)
        sd[k] = v
    if not any(k.endswith(".adapter.down.weight") for k in sd):
        raise CheckpointError(
            f"{path}: no PAD adapters (blocks.N.adapter.* or adaptmlp.*); the pad family loads backbones "
            "written by unip-pretrain --method pad; load a plain ViT with its own family (mae, timm, ...)"
        )
    return sd


def file_width(sd: Mapping[str, torch.Tensor]) -> int:
    """The adapter width r of a ``pad`` file's state dict (:func:`extract`'s)."""
    return next(int(v.shape[0]) for k, v in sd.items() if k.endswith(".adapter.down.weight"))


def check_metadata(meta: Mapping[str, str], path: Path) -> None:
    """A ``pad`` .safetensors file's metadata: our format, or none (a plain file of PAD's keys)."""
    if meta.get("format") not in (None, PAD_FORMAT):
        raise CheckpointError(f"{path}: format {meta['format']!r}, expected {PAD_FORMAT!r}")
