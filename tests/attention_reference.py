"""Independent references for the attention tests: timm's own explicit attention (its non-fused
code path, read through a hook on the module's ``attn_drop``), and the published NMI and
distance formulas term by term. Nothing here uses unip_analysis' capture or statistics."""

from __future__ import annotations

import math

import torch

# One tiny architecture per supported attention class / layout (32 px images, 4x4 patches).
_SMALL = "depth=2,embed_dim=64,num_heads=2,patch_size=8"
ATTENTION_ARCHS = {
    "vit": f"vit_tiny_patch16_224({_SMALL})",
    "qk_norm": f"vit_small_patch16_224({_SMALL},qk_norm=True)",
    "registers": f"vit_small_patch16_224({_SMALL},reg_tokens=4,no_embed_class=True)",
    "deit_distilled": f"deit_tiny_distilled_patch16_224({_SMALL})",
    "dinov2_reg4": f"vit_small_patch14_reg4_dinov2({_SMALL})",
    "clip": f"vit_base_patch16_clip_224({_SMALL})",
    "siglip": f"vit_base_patch16_siglip_224({_SMALL})",
    "beit": f"beit_base_patch16_224({_SMALL})",
    "beit_shared": f"beit_base_patch16_224({_SMALL},use_shared_rel_pos_bias=True,use_rel_pos_bias=False)",
    "beitv2": f"beitv2_base_patch16_224({_SMALL})",
    "eva02_fused_qkv": f"eva02_tiny_patch14_224({_SMALL})",
    "eva02_separate_qkv": f"eva02_base_patch14_224({_SMALL})",
    "rope_mixed": f"vit_base_patch16_rope_mixed_224({_SMALL})",
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter random, so position tables and biases matter and maps are not uniform."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@torch.no_grad()
def timm_explicit_attention(model: torch.nn.Module, x: torch.Tensor):
    """timm's own forward with its explicit attention: (maps {layer: [B, H, N, N]}, output,
    attention inputs {layer: (x, kwargs)}, attention outputs {layer: tensor})."""
    maps, inputs, outputs, hooks, fused = {}, {}, {}, [], {}
    for i, blk in enumerate(model.blocks):
        fused[i] = blk.attn.fused_attn
        blk.attn.fused_attn = False

        def keep_map(module, args, out, i=i):
            maps[i] = args[0].clone()

        def keep_io(module, args, kwargs, out, i=i):
            inputs[i] = (args[0], dict(kwargs))
            outputs[i] = out

        hooks.append(blk.attn.attn_drop.register_forward_hook(keep_map))
        hooks.append(blk.attn.register_forward_hook(keep_io, with_kwargs=True))
    try:
        out = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        for i, blk in enumerate(model.blocks):
            blk.attn.fused_attn = fused[i]
    return maps, out, inputs, outputs


def patch_rows(attn: torch.Tensor, num_prefix_tokens: int, eps: float) -> torch.Tensor:
    """Prefix rows and columns dropped, ``(A + eps)`` renormalized over patch keys, float64."""
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].double() + eps
    return a / a.sum(-1, keepdim=True)


def nmi_reference(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """NMI term by term (Park et al.): p(q) = 1/N, p(k) = sum_q p(q) p(k|q),
    I = sum_qk p(q) p(k|q) log(p(k|q) / p(k)), NMI = I / sqrt(H(Q) H(K)); rows with eps 1e-8."""
    a = patch_rows(attn, num_prefix_tokens, 1e-8)
    n = a.shape[-2]
    pq = torch.full(a.shape[:-1], 1.0 / n, dtype=torch.float64, device=a.device)
    pk = (a * pq[..., None]).sum(-2)
    mi = (a * pq[..., None] * torch.log(a / pk[..., None, :])).sum((-2, -1))
    hq = -(pq * torch.log(pq)).sum(-1)
    hk = -(pk * torch.log(pk)).sum(-1)
    return mi / torch.sqrt(hq * hk)


def distance_reference(
    attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], patch: int
) -> torch.Tensor:
    """Mean attention distance in pixels with rows renormalized with 1e-32 (cl-vs-mim)."""
    a = patch_rows(attn, num_prefix_tokens, 1e-32)
    centres = [(r * patch, c * patch) for r in range(grid[0]) for c in range(grid[1])]
    d = torch.tensor(
        [[math.dist(p, q) for q in centres] for p in centres], dtype=torch.float64, device=a.device
    )
    return (a * d).sum((-2, -1)) / a.shape[-2]


def nmi_unip_published(attn: torch.Tensor) -> torch.Tensor:
    """UNIP's NMI as its authors published it (casiatao/UNIP issue 3), term by term, in float64:
    the whole map [B, H, L, L] as given; p(q) = row sum / sum of row sums, p(k) = column sum /
    sum of column sums; joint = A * p(q); log2 throughout, no epsilon (maps without zeros only).
    Returns [B, H]: the published function then takes the mean over heads."""
    a = attn.double()
    row_sum = a.sum(-1, keepdim=True)  # [B, H, L, 1]
    pq = row_sum / row_sum.sum(-2, keepdim=True)
    col_sum = a.sum(-2, keepdim=True)  # [B, H, 1, L]
    pk = col_sum / col_sum.sum(-1, keepdim=True)
    hq = -(pq * torch.log2(pq)).sum((-1, -2))
    hk = -(pk * torch.log2(pk)).sum((-1, -2))
    joint = a * pq
    mi = (joint * torch.log2(joint / (pq * pk))).sum((-1, -2))
    return mi / torch.sqrt(hq * hk)
