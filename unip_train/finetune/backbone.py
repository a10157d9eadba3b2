"""The ViT as fine-tuning sees it (method.md section 4; casiatao/UNIP ``backbone/mae.py`` and the
fine-tuning configs): LayerScale in every block, stochastic depth over the blocks, and optionally
BEiT-style relative position bias, added to a backbone whose pre-trained weights are loaded.

- LayerScale: ``x + DropPath(gamma * f(x))`` with ``gamma`` a per-channel vector initialised to
  ``init`` (1.0 in the configs) and trained. A checkpoint without LayerScale (MAE, DINO, iBOT,
  UNIP students) gets new gammas at ``init``; one that has it (DeiT III) keeps its trained gammas.
- Stochastic depth: block ``i`` of ``depth`` drops its residual branches with probability
  ``rate * i / (depth - 1)`` (the configs' ``drop_path_rate`` with the usual linear rule).
- Relative position bias: per block, a table of ``(2h - 1)(2w - 1) + 3`` learned biases per head
  (the 3 extra entries: prefix-to-patch, patch-to-prefix, prefix-to-prefix), initialised to 0, added
  to the attention logits; ``h x w`` is the patch grid of the training crop. New parameters, named
  ``blocks.N.attn.relative_position_bias_table`` as in BEiT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn


def relative_position_index(grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """[N, N] indices into the bias table for ``num_prefix`` prefix tokens then ``h x w`` patches.

    Patch pairs index their offset (dy, dx) as ``(dy + h - 1) * (2w - 1) + (dx + w - 1)``; pairs with
    a prefix token use the last three entries (prefix->patch, patch->prefix, prefix->prefix)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + h - 1
    dx = xs[:, None] - xs[None, :] + w - 1
    n_rel = (2 * h - 1) * (2 * w - 1)
    n = num_prefix + h * w
    index = torch.empty(n, n, dtype=torch.long)
    index[num_prefix:, num_prefix:] = dy * (2 * w - 1) + dx
    index[:num_prefix, :] = n_rel  # a prefix query attending to anything
    index[:, :num_prefix] = n_rel + 1  # anything attending to a prefix key
    index[:num_prefix, :num_prefix] = n_rel + 2
    return index


class RelPosBiasAttention(Attention):
    """timm's :class:`Attention` plus an additive relative position bias on the logits.

    Built by :func:`add_relative_position_bias` from a loaded attention module (its weights and key
    names stay as they are); the bias table starts at zero, so the module first computes exactly
    what it did before.
    """

    relative_position_bias_table: nn.Parameter
    relative_position_index: torch.Tensor

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] bias from the table."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b, n, _ = x.shape
        if n != self.relative_position_index.shape[0]:
            raise ValueError(
                f"relative position bias was built for {self.relative_position_index.shape[0]} tokens, "
                f"the input has {n}; fine-tune and evaluate at the crop size the bias was built for"
            )
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.position_bias().unsqueeze(0).to(q.dtype)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def add_relative_position_bias(attn: Attention, grid: tuple[int, int], num_prefix: int) -> None:
    """Give ``attn`` a zero-initialised relative position bias for a ``grid`` of patches."""
    if getattr(attn, "gate", None) is not None:
        raise ValueError("relative position bias is not supported for gated attention")
    index = relative_position_index(grid, num_prefix)
    n_table = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    device = attn.qkv.weight.device
    # The class swap keeps the loaded module, its weights and timm's key names; the subclass only
    # adds the bias to the logits.
    attn.__class__ = RelPosBiasAttention
    attn.relative_position_bias_table = nn.Parameter(torch.zeros(n_table, attn.num_heads, device=device))
    attn.register_buffer("relative_position_index", index.to(device), persistent=False)


def prepare_for_finetuning(
    model: VisionTransformer, drop_path: float, layer_scale: float, rel_pos_bias: bool
) -> list[str]:
    """Add the fine-tuning parts to a (loaded) timm ViT in place; returns notes on what was added.

    ``drop_path``: the last block's rate (linear from 0); ``layer_scale``: LayerScale init (0 = none,
    existing LayerScale kept); ``rel_pos_bias``: BEiT-style bias at the model's patch grid."""
    notes = []
    depth = len(model.blocks)
    dim = int(model.embed_dim)
    added = 0
    for i, blk in enumerate(model.blocks):
        rate = drop_path * i / max(1, depth - 1)
        blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        if layer_scale > 0:
            for name in ("ls1", "ls2"):
                if isinstance(getattr(blk, name), nn.Identity):
                    setattr(blk, name, LayerScale(dim, init_values=layer_scale).to(blk.norm1.weight.device))
                    added += 1
        if rel_pos_bias:
            add_relative_position_bias(blk.attn, tuple(model.patch_embed.grid_size), model.num_prefix_tokens)
    if added:
        notes.append(
            f"LayerScale added to {added // 2} blocks (new parameters, initialised to {layer_scale})"
        )
    elif layer_scale > 0:
        notes.append("LayerScale kept from the checkpoint")
    if rel_pos_bias:
        notes.append("relative position bias added to every block (new parameters, initialised to 0)")
    return notes
