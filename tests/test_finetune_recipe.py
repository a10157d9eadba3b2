"""Recipe parity of unip-finetune with casiatao/UNIP's fine-tuning configs (docs/parity.md): raw
block outputs, a one-conv linear probe, LayerScale / drop path / relative position bias on the
fine-tuning backbone, UperNet at the embed dim with a 256-wide auxiliary head, mmseg's head init,
and the per-dataset schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import LayerScale

from unip_analysis.checkpoints import build_vit, load_backbone
from unip_train.finetune.backbone import RelPosBiasAttention, relative_position_index
from unip_train.finetune.config import FinetuneConfig, resolve
from unip_train.finetune.heads import LinearProbeHead
from unip_train.finetune.ll_fpn import Segmentor
from unip_train.finetune.model_file import build_backbone, build_segmentor
from unip_train.finetune.trainer import build_optimizer, evaluate_saved
from unip_train.finetune.trainer import run as finetune_run
from unip_train.synthetic import generate

TINY = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"


def cfg_for(path: Path | str = "x.safetensors", arch: str = TINY, **kw) -> FinetuneConfig:
    base = dict(backbone=f"timm:{arch}:{path}", dataset="folder", data_root=".", out=".", img_size=32)
    base.update(kw)
    return FinetuneConfig(**base)


def raw_tokens(backbone, x: torch.Tensor, upto: int) -> torch.Tensor:
    """Block ``upto``'s output (1-based) computed by hand, prefix tokens dropped, as [B, D, h, w]."""
    t = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
    for blk in backbone.blocks[:upto]:
        t = blk(t)
    t = t[:, backbone.num_prefix_tokens :]
    side = int(math.isqrt(t.shape[1]))
    return t.transpose(1, 2).reshape(t.shape[0], -1, side, side)


def test_ll_fpn_and_linear_probe_read_raw_block_outputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for mode, layers in (("ft", None), ("lp", [2, 4])):
        backbone = build_vit(TINY, img_size=32).eval()
        with torch.no_grad():  # a final norm that is not the identity, to be sure it is not applied
            backbone.norm.weight.uniform_(0.5, 2.0)
            backbone.norm.bias.normal_()
        model = Segmentor(backbone, 5, mode=mode, layers=layers, head_channels=16).eval()
        with torch.no_grad():
            maps = model.layer_maps(x)
            for n, got in zip(model.layers, maps):
                want = raw_tokens(backbone, x, n)
                torch.testing.assert_close(got, want)
                normed = backbone.norm(want.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                assert not torch.allclose(got, normed)
        assert not any(p.requires_grad for p in model.backbone.norm.parameters())


def test_linear_probe_is_one_1x1_conv_on_the_concatenated_features():
    head = LinearProbeHead([8, 8], num_classes=3)
    assert [type(m).__name__ for m in head.modules()] == ["LinearProbeHead", "Conv2d"]  # no BatchNorm
    assert {n for n, _ in head.named_parameters()} == {"classifier.weight", "classifier.bias"}
    a, b = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)
    up = F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False)
    want = F.conv2d(torch.cat([a, up], 1), head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(head([a, b]), want)
    # mmseg's classifier init: N(0, 0.01), bias 0.
    model = Segmentor(build_vit(TINY, img_size=32), 21, mode="lp", layers=[1, 2, 3, 4])
    w = model.decode_head.classifier.weight.detach()
    assert abs(float(w.std()) - 0.01) < 0.001 and not model.decode_head.classifier.bias.any()


def test_finetuning_backbone_gains_layer_scale_and_drop_path(tiny_timm_checkpoint):
    arch, path = tiny_timm_checkpoint
    cfg = resolve(cfg_for(path, arch))
    assert cfg.drop_path == 0.1 and cfg.layer_scale == 1.0 and cfg.rel_pos_bias is False  # ll-fpn
    model, info = build_backbone(cfg)
    assert any("LayerScale added to 4 blocks" in n for n in info["notes"])
    rates = []
    for blk in model.blocks:
        for ls in (blk.ls1, blk.ls2):
            assert (
                isinstance(ls, LayerScale)
                and ls.gamma.requires_grad
                and torch.equal(ls.gamma, torch.ones(64))
            )
        rates.append(getattr(blk.drop_path1, "drop_prob", 0.0))
        assert getattr(blk.drop_path2, "drop_prob", 0.0) == rates[-1]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # linear from 0 to the rate
    # gamma = 1 and no drop path in eval: the loaded backbone computes exactly what it did.
    frozen = load_backbone("timm", arch, path, img_size=32).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), frozen(x))
    # The gammas are trained, without weight decay, at their block's layer-decay lr.
    seg = build_segmentor(cfg, model.train(), 6)
    groups = build_optimizer(cfg, seg).param_groups
    g = next(g for g in groups if any(p is seg.backbone.blocks[0].ls1.gamma for p in g["params"]))
    assert g["weight_decay"] == 0.0 and g["lr_scale"] == pytest.approx(0.85**4)


def test_a_checkpoint_with_layer_scale_keeps_its_gammas(tmp_path):
    arch = "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8,init_values=1e-5)"
    torch.manual_seed(1)
    model = build_vit(arch, img_size=32)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.1, 0.3)
    path = tmp_path / "ls.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    built, info = build_backbone(resolve(cfg_for(path, arch)))
    assert any("LayerScale kept" in n for n in info["notes"])
    for a, b in zip(built.blocks, model.blocks):
        assert torch.equal(a.ls1.gamma, b.ls1.gamma)


def test_relative_position_bias_index_table_and_effect():
    index = relative_position_index((2, 2), num_prefix=1)
    # Patches (0,0) (0,1) (1,0) (1,1) after the cls token; offsets (dy, dx) index (dy+1)*3 + (dx+1).
    assert index[1, 4] == 0 and index[4, 1] == 8 and index[2, 3] == 0 * 3 + 2 and index[1, 1] == 4
    assert (index[0, 1:] == 9).all() and (index[1:, 0] == 10).all() and index[0, 0] == 11

    backbone = build_vit(TINY, img_size=32)
    cfg = cfg_for(neck="multi-layer")
    assert resolve(cfg).rel_pos_bias is True  # the configs' default; LL-FPN scripts switch it off
    from unip_train.finetune.backbone import prepare_for_finetuning

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = backbone.eval()(x)
    prepare_for_finetuning(backbone, 0.0, 0.0, rel_pos_bias=True)
    attn = backbone.blocks[0].attn
    assert isinstance(attn, RelPosBiasAttention) and attn.relative_position_bias_table.shape == (7 * 7 + 3, 2)
    assert "blocks.0.attn.relative_position_bias_table" in backbone.state_dict()
    assert "blocks.0.attn.relative_position_index" not in backbone.state_dict()  # rebuilt, not stored
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), before)  # zero-initialised: nothing changes at first
        attn.relative_position_bias_table.normal_()
        tokens = torch.randn(2, 17, 64)
        got = attn(tokens)
        q, k, v = attn.qkv(tokens).reshape(2, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * 32**-0.5 + attn.position_bias()
        want = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 64))
        torch.testing.assert_close(got, want)
    attn(tokens).sum().backward()
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


def test_head_widths_and_init_follow_the_configs():
    cfg = resolve(cfg_for())
    assert (cfg.head_channels, cfg.aux_channels, cfg.aux_weight) == (64, 256, 0.4)  # embed dim, 256
    model = build_segmentor(cfg, build_vit(TINY, img_size=32), 21)
    assert (
        model.decode_head.fuse[0].out_channels == 64
        and model.decode_head.ppm.stages[0][1][0].out_channels == 64
    )
    assert model.aux_head.convs[0][0].out_channels == 256 and len(model.aux_head.convs) == 1
    # mmseg: conv-BN-ReLU convs Kaiming normal (fan out, ReLU), classifiers N(0, 0.01).
    conv = model.aux_head.convs[0][0].weight.detach()  # 256 x 64 x 3 x 3
    assert abs(float(conv.std()) / math.sqrt(2 / (256 * 9)) - 1) < 0.05
    for head in (model.decode_head, model.aux_head):
        assert (
            abs(float(head.classifier.weight.detach().std()) - 0.01) < 0.002
            and not head.classifier.bias.any()
        )


@pytest.mark.parametrize(
    "dataset, iters, warmup", [("soda", 14_400, 1_500), ("mfnet", 9_800, 1_000), ("scut", 16_800, 1_700)]
)
def test_schedule_per_dataset(dataset, iters, warmup):
    for mode in ("ft", "lp"):
        cfg = resolve(cfg_for(dataset=dataset, mode=mode))
        assert (cfg.iters, cfg.warmup_iters, cfg.batch_size, cfg.lr) == (iters, warmup, 8, 1e-4)
    short = resolve(cfg_for(dataset=dataset, iters=100))
    assert short.warmup_iters == 20  # at most a fifth of a shortened run
    assert resolve(cfg_for(dataset=dataset)).layer_decay == 0.85
    assert resolve(cfg_for(dataset=dataset, neck="multi-layer")).layer_decay == 0.65


def test_vit_large_defaults():
    large = resolve(cfg_for(arch="vit_large_patch16_224"))
    assert (large.batch_size, large.drop_path, large.head_channels) == (4, 0.2, 1024)
    assert resolve(cfg_for(arch="vit_large_patch16_224", mode="lp")).batch_size == 8  # the LP configs keep 8
    small = resolve(cfg_for(arch="vit_small_patch16_224"))
    assert (small.batch_size, small.drop_path, small.head_channels) == (8, 0.1, 384)
    assert resolve(cfg_for(batch_size=2, drop_path=0.0)).batch_size == 2


def test_multi_layer_run_with_relative_position_bias_reevaluates_the_same(tiny_timm_checkpoint, tmp_path):
    """model.pt rebuilds the fine-tuning backbone (LayerScale, bias tables) to evaluate it again."""
    arch, path = tiny_timm_checkpoint
    data = generate(tmp_path / "data", "folder", n_train=4, n_test=2, size=40, seed=0)
    out = tmp_path / "run"
    cfg = cfg_for(
        path, arch, data_root=str(data), out=str(out), neck="multi-layer", iters=3, batch_size=2,
        head_channels=16, aux_channels=16, workers=0, progress=False, lr=1e-2,
    )  # fmt: skip
    metrics = finetune_run(cfg)
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    table = state["backbone.blocks.0.attn.relative_position_bias_table"]
    assert table.abs().sum() > 0  # trained away from zero
    assert "backbone.blocks.3.ls2.gamma" in state
    again = evaluate_saved(out / "model.pt", out=tmp_path / "re", progress=False)
    assert again["miou"] == metrics["miou"] and again["per_class_iou"] == metrics["per_class_iou"]


def test_cross_entropy_average_over_labelled_or_all_pixels():
    from unip_train.finetune.engine import seg_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 4, (2, 8, 8))
    label[:, :, 6:] = 255  # a quarter ignored (padding, borders)
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    torch.testing.assert_close(seg_loss(logits, label), per_pixel.sum() / (label != 255).sum())
    # The reference (mmseg 0.11) divided by every pixel, so ignored pixels shrank its loss.
    torch.testing.assert_close(seg_loss(logits, label, "all"), per_pixel.sum() / label.numel())
    assert resolve(cfg_for()).ce_average == "labelled"
