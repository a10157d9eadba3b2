"""A tiny timm ViT made to look trained by editing its weights: what random weights lack and code
that is exact on them can get wrong (style.md, "Test on data that looks like the real thing").

- outlier channels: in every block one channel per head of q and of k is 50-100x the others, as in
  trained ViTs (a large constant in q, a key channel that reads one residual dimension);
- logits in the tens: q and k scaled so each row has a few dominant keys (sharp rows);
- an attention sink: the cls token carries a large value in one residual dimension, the outlier key
  channel reads it, so in the first heads of every block but the first most queries attend to it;
- with ``positional=True``, a positional head: the position embedding carries each patch's row and
  column as two large (cos, sin) pairs in residual dimensions of their own, and the last head of
  every block reads only those, so its logits fall with the distance between query and key patch.

:func:`trained_like` builds one (any plain timm ViT with ``attn.qkv``); :func:`properties`
measures what makes it trained-like, for the test that checks the edits did their work.
"""

from __future__ import annotations

import torch

from unip_analysis import attention, checkpoints

TINY_TRAINED_ARCH = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"
TINY_TRAINED_IMG = 32
SINK_DIM = 0  # the residual dimension that marks the cls token
OUTLIER = 200.0  # q's outlier channel: 80x the others' typical entry (SHARP)
SHARP = 2.5  # q and k entries of the other channels, std: logits ~ SHARP^2 sqrt(d) / sqrt(d)
SINK_LOGIT = 25.0  # the cls key's outlier term in a sink head's logits (LayerNorm gives it ~sqrt(dim))
POS_DIMS = (1, 2, 3, 4)  # the residual dimensions holding (cos, sin) of the row and of the column
POS_SIZE = 12.0  # their amplitude in the position embedding: they dominate the token's LayerNorm
POS_GAIN = 3.0  # the positional head's q / k weight on them: logits ~ 25 at distance 0


def _positional(model: torch.nn.Module) -> None:
    """Row and column of every patch in the position embedding; the last head of every block reads them."""
    rows, cols = model.patch_embed.grid_size
    npt = model.num_prefix_tokens if not getattr(model, "no_embed_class", False) else 0
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    w = torch.pi / (2 * max(rows, cols))  # a quarter turn over the grid: cos and sin both monotone
    feats = torch.stack([(w * r).cos(), (w * r).sin(), (w * c).cos(), (w * c).sin()], -1).reshape(-1, 4)
    pos = model.pos_embed[0]
    pos[npt:, list(POS_DIMS)] = POS_SIZE * feats
    dim = model.embed_dim
    for blk in model.blocks:
        heads = blk.attn.num_heads
        d = dim // heads
        w_qkv = blk.attn.qkv.weight
        for part in (0, dim):  # q, then k: the last head reads the positional dimensions only
            head = slice(part + (heads - 1) * d, part + heads * d)
            w_qkv[head] = 0
            blk.attn.qkv.bias[head] = 0
            for j, src in enumerate(POS_DIMS):
                w_qkv[part + (heads - 1) * d + j, src] = POS_GAIN


def make_trained_like(model: torch.nn.Module, seed: int = 0, positional: bool = False) -> torch.nn.Module:
    """Edit a timm ViT in place (see the module docstring); returns it."""
    gen = torch.Generator().manual_seed(seed)
    dim = model.embed_dim
    with torch.no_grad():
        if getattr(model, "cls_token", None) is not None:
            model.cls_token[..., SINK_DIM] = 25.0  # after LayerNorm ~sqrt(dim) in that dimension
        for li, blk in enumerate(model.blocks):
            attn = blk.attn
            heads, d = attn.num_heads, dim // attn.num_heads
            w, b = attn.qkv.weight, attn.qkv.bias
            # q and k rows ~ N(0, 1/dim) * SHARP: each entry ~SHARP for a unit-variance LayerNorm output
            w[: 2 * dim] = torch.randn(2 * dim, dim, generator=gen) * (SHARP / dim**0.5)
            b[: 2 * dim] = 0
            sink_heads = max(1, heads // 3)
            # k_c(cls) ~ w * sqrt(dim), times q_c = OUTLIER and the head scale d^-0.5: SINK_LOGIT
            reads = SINK_LOGIT * d**0.5 / (OUTLIER * dim**0.5)
            for h in range(heads):
                c = h * d + (li + h) % d  # the outlier channel of this head
                # q: a large constant; k: reads SINK_DIM (large for the cls token only)
                w[c] = 0
                b[c] = OUTLIER
                w[dim + c] = 0
                w[dim + c, SINK_DIM] = reads if h < sink_heads and li > 0 else reads / 20
        if positional:
            _positional(model)
    return model


def trained_like(
    arch: str = TINY_TRAINED_ARCH, img_size: int = TINY_TRAINED_IMG, seed: int = 0, positional: bool = False
) -> checkpoints.LoadedBackbone:
    """A trained-like backbone (random weights, then :func:`make_trained_like`)."""
    torch.manual_seed(seed)
    model = make_trained_like(checkpoints.build_vit(arch, img_size=img_size).eval(), seed, positional)
    return checkpoints.LoadedBackbone(model, "timm", arch, "trained-like", "0" * 64, img_size)


def properties(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """What makes attention trained-like, over images ``x`` [B, 3, H, W]:

    - ``max_logit``: the largest |q . k / sqrt(d)| of any layer;
    - ``sink_share``: the largest mean attention one key receives from all queries (a head, a layer);
    - ``outlier_ratio``: the largest channel's root mean square of q (or k) over tokens, over the
      median channel's, per head and layer.
    """
    out = {"max_logit": 0.0, "sink_share": 0.0, "outlier_ratio": 0.0}
    captured: list[torch.Tensor] = []
    hooks = [blk.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in model.blocks]
    try:
        with torch.no_grad():
            model.forward_features(x)
            for layer in range(len(model.blocks)):
                logits = attention.layer_qk_logits(model, x, layer).double()
                out["max_logit"] = max(out["max_logit"], float(logits.abs().max()))
                share = logits.softmax(-1).mean(2).amax(-1)  # [B, H]: the most attended key's share
                out["sink_share"] = max(out["sink_share"], float(share.mean(0).max()))
    finally:
        for h in hooks:
            h.remove()
    for layer, qkv in enumerate(captured[: len(model.blocks)]):
        heads = model.blocks[layer].attn.num_heads
        b, n, three_dim = qkv.shape
        qk = qkv.reshape(b, n, 3, heads, -1)[:, :, :2].pow(2).mean((0, 1)).sqrt()  # [2, heads, d]
        ratio = qk.amax(-1) / qk.median(-1).values.clamp_min(1e-12)
        out["outlier_ratio"] = max(out["outlier_ratio"], float(ratio.max()))
    return out
