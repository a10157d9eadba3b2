"""The explorer on a trained-like model (tests/trained_like.py: outlier channels, logits in the
tens, an attention sink): every row the page shows is within 1% of its maximum of the exact
softmax, where int8 q / k with a scale per vector is far off."""

from __future__ import annotations

import torch
from trained_like import TINY_TRAINED_IMG, properties, trained_like

from unip_analysis import attention, checkpoints, explorer


def images(n: int = 3, size: int = TINY_TRAINED_IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_trained_like_model_has_outliers_large_logits_and_a_sink():
    bb = trained_like()
    p = properties(bb.model, images())
    assert p["max_logit"] > 20 and p["sink_share"] > 0.5 and 50 <= p["outlier_ratio"] <= 150, p
    # random weights have none of these
    plain = properties(checkpoints.build_vit(bb.arch, img_size=TINY_TRAINED_IMG).eval(), images())
    assert plain["max_logit"] < 5 and plain["sink_share"] < 0.5 and plain["outlier_ratio"] < 10, plain


def shown_error(p_true: torch.Tensor, p_got: torch.Tensor, npt: int) -> float:
    """Largest |got - exact| over the patch keys, in units of the exact row's patch maximum."""
    t, g = p_true[..., npt:], p_got[..., npt:]
    return float(((g - t).abs().amax(-1) / t.amax(-1)).max())


def test_int8_q_k_with_a_scale_per_vector_is_far_off_on_it():
    """What the explorer stored before: int8 q / k, one scale per (token, head) vector."""
    bb = trained_like()
    x = images(1)
    worst, captured = 0.0, []
    for layer in range(len(bb.model.blocks)):
        blk = bb.model.blocks[layer]
        h = blk.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o))
        with torch.no_grad():
            logits = attention.layer_qk_logits(bb.model, x, layer).double()
        h.remove()
        heads = blk.attn.num_heads
        qkv = captured[-1].reshape(1, -1, 3, heads, bb.model.embed_dim // heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0] * blk.attn.scale, qkv[1]
        dq, dk = (explorer.quantize_int8(t) for t in (q, k))
        got = (dq.double() @ dk.double().transpose(-1, -2)).softmax(-1)
        worst = max(worst, shown_error(logits.softmax(-1), got, 1))
    assert worst > 0.05, worst  # > 5% of the row maximum
