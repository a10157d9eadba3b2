"""Streaming attention out of timm ViTs.

:func:`observe_attention` swaps each block's attention forward for an explicit one that hands
the post-softmax map of that block to a callback, then carries on with the same arithmetic as
timm's ``Attention``. The callback reduces the map to statistics straight away, so only one
layer's maps are alive at any time: peak memory does not grow with depth.

:func:`qk_logits` is the pre-softmax query-key product that NMI-HAD distils (method.md
section 2); the analysis, the teacher and the student all compute it here.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from timm.models.vision_transformer import Attention

AttentionObserver = Callable[[int, torch.Tensor], None]


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, heads, N, head_dim], after q/k norm (as timm's Attention computes them)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def qk_logits(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Scaled query-key logits before softmax, ``(q @ k^T) * head_dim^-0.5``: [B, heads, N, N].

    ``x`` is the attention module's input (the block's ``norm1`` output).
    """
    q, k, _ = project_qkv(attn, x)
    return (q * attn.scale) @ k.transpose(-2, -1)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax computed in place: no second [B, H, N, N] buffer."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def _recording_forward(layer: int, observer: AttentionObserver):
    def forward(self: Attention, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = project_qkv(self, x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            else:
                attn = attn + attn_mask
        attn = _softmax_(attn)
        out = self.attn_drop(attn) @ v
        # The block's output no longer needs the map: the observer owns it and may reduce it
        # in place, so only this one [B, H, N, N] buffer ever exists.
        observer(layer, attn)
        del attn
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    return forward


@contextmanager
def observe_attention(
    model: torch.nn.Module, observer: AttentionObserver, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Within the context, every forward of ``model`` calls ``observer(layer_index0, attn)``.

    ``attn`` is the post-softmax map [B, heads, N, N] of block ``layer_index0`` (0-based),
    prefix tokens included. The block's output is already computed when the observer runs, so
    the observer owns the map and may overwrite it (clone it to keep it). ``layers`` limits
    observation to some blocks (0-based).
    """
    blocks = list(model.blocks)
    chosen = range(len(blocks)) if layers is None else layers
    patched = []
    try:
        for i in chosen:
            attn = blocks[i].attn
            if not isinstance(attn, Attention):
                raise TypeError(f"block {i + 1} uses {type(attn).__name__}, not timm's Attention")
            attn.forward = types.MethodType(_recording_forward(i, observer), attn)
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            del attn.forward  # falls back to the class's forward


def forward_until(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Token sequence entering block ``layer`` (0-based): patch embed, prefix tokens, pos embed,
    then blocks ``0 .. layer-1``. Nothing after that block is computed."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:layer]:
        x = blk(x)
    return x


def layer_qk_logits(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Pre-softmax logits of block ``layer`` (0-based) for images ``x``, running only up to it."""
    tokens = forward_until(model, x, layer)
    blk = model.blocks[layer]
    return qk_logits(blk.attn, blk.norm1(tokens))
