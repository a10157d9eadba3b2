"""Optimizer parameter groups and per-iteration learning-rate schedules (MAE / BEiT conventions)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token")


def no_weight_decay(name: str, param: torch.nn.Parameter, names: tuple[str, ...] = NO_DECAY_NAMES) -> bool:
    """Biases, norm weights (1-D tensors) and parameters whose name contains one of ``names``
    (token / position embeddings by default) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or any(n in name for n in names)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    no_decay_names: tuple[str, ...] = NO_DECAY_NAMES,
) -> list[dict]:
    """AdamW groups: decay / no-decay, optionally split further by a per-parameter lr scale.

    Each group carries ``lr_scale``; schedules set ``group['lr'] = lr * group['lr_scale']``.
    ``no_decay_names=()`` is timm's ``param_groups_weight_decay`` rule (only 1-D tensors and biases
    undecayed), which the UNIP and PAD pre-training scripts use: their cls_token / mask_token decay.
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p, no_decay_names)
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        key = (decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, everything else depth + 1."""
    if name.startswith(("backbone.",)):
        name = name[len("backbone.") :]
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_scale(depth: int, decay: float, prefix: str = "backbone.") -> Callable[[str], float]:
    """lr scale ``decay ** (depth + 1 - layer_id)`` for backbone parameters; 1 for the rest (heads)."""

    def scale(name: str) -> float:
        if not name.startswith(prefix):
            return 1.0
        return decay ** (depth + 1 - vit_layer_id(name[len(prefix) :], depth))

    return scale


def cosine_lr(it: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` iterations, then half-cycle cosine to ``min_lr`` (per iteration)."""
    if it < warmup:
        return base_lr * it / max(1, warmup)
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def poly_lr(
    it: int,
    total: int,
    warmup: int,
    base_lr: float,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = 1e-6,
) -> float:
    """Poly decay with linear warm-up from ``warmup_ratio * base_lr`` (mmseg convention)."""
    decayed = (base_lr - min_lr) * (1.0 - min(it, total) / max(1, total)) ** power + min_lr
    if it < warmup:
        k = (1.0 - it / max(1, warmup)) * (1.0 - warmup_ratio)
        return decayed * (1.0 - k)
    return decayed


def lr_from_blr(blr: float, effective_batch: int) -> float:
    """MAE's linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel (one pass over all tensors; several times faster on CPU
    than the default per-tensor loop), falling back to the default where fused is unsupported."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
