"""Half precision: under fp16 / bf16 autocast the statistics stay finite and equal (to 1e-5) to
the formulas evaluated in fp64 on the q and k the half-precision model produced; logits,
softmax and reductions run in fp32 / fp64 whatever the model's dtype. CUDA-marked copies run
the same checks on a GPU (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attention_reference import ATTENTION_ARCHS, distance_reference, nmi_reference, randomize

from unip_analysis import analyze
from unip_analysis.checkpoints import LoadedBackbone, build_vit
from unip_analysis.device import DTYPES

ARCHS = [ATTENTION_ARCHS["vit"], ATTENTION_ARCHS["registers"]]


def backbone(arch: str, device: str, scale: float = 0.3) -> LoadedBackbone:
    model = randomize(build_vit(arch, img_size=32).eval(), scale=scale).to(device)
    return LoadedBackbone(model, "timm", arch, "-", "0" * 64, 32)


class RecordQK:
    """q and k per layer after q/k norm, as the (half-precision) projections produced them, read
    through hooks on the attention's q_norm / k_norm modules while a forward runs."""

    def __init__(self, model: torch.nn.Module):
        self.q: dict[int, list] = {i: [] for i in range(len(model.blocks))}
        self.k: dict[int, list] = {i: [] for i in range(len(model.blocks))}
        self.hooks = []
        for i, blk in enumerate(model.blocks):
            self.hooks.append(blk.attn.q_norm.register_forward_hook(lambda m, a, o, i=i: self.q[i].append(o)))
            self.hooks.append(blk.attn.k_norm.register_forward_hook(lambda m, a, o, i=i: self.k[i].append(o)))

    def __enter__(self) -> RecordQK:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.q[i]), torch.cat(self.k[i])


def check_half_precision(
    arch: str, device: str, dtype: torch.dtype, precision: str, scale: float = 0.3
) -> None:
    bb = backbone(arch, device, scale)
    torch.manual_seed(3)
    images = [torch.randn(3, 32, 32) for _ in range(4)]
    with RecordQK(bb.model) as qk:
        res = analyze.analyze_backbone(
            bb, images, batch_size=2, device=device, progress=False, map_images=1, precision=precision
        )
    with (
        RecordQK(bb.model) as timm_qk,
        torch.no_grad(),
        torch.autocast(torch.device(device).type, dtype=dtype),
    ):
        bb.model.forward_features(torch.stack(images).to(device))  # timm's own forward, same autocast
    full = analyze.analyze_backbone(bb, images, batch_size=2, device=device, progress=False, map_images=0)
    grid, npt = tuple(bb.model.patch_embed.grid_size), bb.num_prefix_tokens
    assert torch.equal(qk.layer(0)[0], timm_qk.layer(0)[0])  # same first-layer q as timm's forward
    for layer in range(bb.depth):
        q, k = qk.layer(layer)
        assert q.dtype == dtype  # the model really ran in half precision
        attn = ((q.double() * bb.model.blocks[layer].attn.scale) @ k.double().transpose(-2, -1)).softmax(-1)
        assert np.isfinite(res.head_nmi[layer]).all() and np.isfinite(res.head_distance[layer]).all()
        np.testing.assert_allclose(res.head_nmi[layer], nmi_reference(attn, npt).cpu().numpy(), atol=1e-5)
        want = distance_reference(attn.cpu(), npt, grid, bb.patch_size).numpy()
        np.testing.assert_allclose(res.head_distance[layer], want, rtol=1e-5)
        # and close to the full-precision analysis: half precision moves q and k, not the method
        np.testing.assert_allclose(res.head_nmi[layer], full.head_nmi[layer], atol=2e-2)
    assert res.query_maps[0].dtype == np.float32 and np.isfinite(res.query_maps[0]).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_statistics_on_cpu(arch, precision):
    check_half_precision(arch, "cpu", DTYPES[precision], precision)


def test_fp16_logits_beyond_the_fp16_range_stay_finite():
    """q.k products above 65504 would be inf in fp16: the capture forms them in fp32."""
    arch = ATTENTION_ARCHS["vit"]
    bb = backbone(arch, "cpu", scale=3.0)
    x = torch.randn(2, 3, 32, 32)
    with RecordQK(bb.model) as qk, torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        bb.model.forward_features(x)
    q, k = qk.layer(0)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isinf(q @ k.transpose(-2, -1)).any()  # what a half-precision product gives
    res = analyze.analyze_backbone(bb, list(x), batch_size=2, progress=False, precision="fp16")
    assert all(np.isfinite(v).all() for v in res.head_nmi + res.head_distance)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_analysis(precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if precision == "fp32":  # the same numbers as on the CPU (TF32 off: it would round the inputs)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        images = [torch.randn(3, 32, 32) for _ in range(3)]
        cpu = analyze.analyze_backbone(backbone(ARCHS[1], "cpu"), images, progress=False)
        gpu = analyze.analyze_backbone(backbone(ARCHS[1], "cuda"), images, device="cuda", progress=False)
        for c, g in zip(cpu.head_nmi + cpu.head_distance, gpu.head_nmi + gpu.head_distance):
            np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)
        return
    check_half_precision(ARCHS[1], "cuda", DTYPES[precision], precision)
