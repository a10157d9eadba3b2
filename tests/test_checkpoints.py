"""Each family's published format round-trips through the registry, tensor for tensor."""

import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from unip_analysis.checkpoints import (
    FAMILIES,
    build_vit,
    load_backbone,
    parse_arch,
    parse_spec,
)
from unip_analysis.errors import CheckpointError, SpecError

VIT = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
DEIT_DISTILLED = "deit_tiny_distilled_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
DEIT3 = "deit3_small_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
REG = "vit_small_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8,reg_tokens=4,no_embed_class=True)"
IMG = 32


def reference(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_vit(arch, img_size=IMG)
    # non-trivial values everywhere, so a tensor left at init would be caught
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def save(obj, path):
    torch.save(obj, path)
    return path


def test_mae_and_crossmae_pretrain_files(tmp_path):
    sd = reference(VIT)
    published = dict(sd)
    published.update(
        {
            "mask_token": torch.zeros(1, 1, 64),
            "decoder_embed.weight": torch.randn(32, 64),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
            "decoder_pos_embed": torch.randn(1, 17, 32),
            "decoder_pred.weight": torch.randn(192, 32),
        }
    )
    path = save(
        {"model": published, "optimizer": {"state": {}}, "epoch": 799, "args": argparse.Namespace(lr=1e-3)},
        tmp_path / "mae_pretrain.pth",
    )
    for family in ("mae", "crossmae"):
        bb = load_backbone(family, VIT, path, img_size=IMG)
        assert_same(bb.model, sd)
        assert len(bb.sha256) == 64


def test_dino_backbone_release_and_full_checkpoint(tmp_path):
    sd = reference(VIT)
    bb = load_backbone("dino", VIT, save(sd, tmp_path / "dino_backbone.pth"), img_size=IMG)
    assert_same(bb.model, sd)
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher.update(
        {"module.head.mlp.0.weight": torch.randn(8, 64), "module.head.last_layer.weight_g": torch.ones(8, 1)}
    )
    student = {k: torch.randn_like(v) for k, v in teacher.items()}
    full = {
        "teacher": teacher,
        "student": student,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small"),
    }
    bb = load_backbone("dino", VIT, save(full, tmp_path / "dino_full.pth"), img_size=IMG)
    assert_same(bb.model, sd)  # teacher weights, not the student's


def test_ibot_release_and_teacher(tmp_path):
    sd = reference(VIT)
    release = {"state_dict": dict(sd)}
    bb = load_backbone("ibot", VIT, save(release, tmp_path / "ibot.pth"), img_size=IMG)
    assert_same(bb.model, sd)
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["backbone.masked_embed"] = torch.zeros(64)
    teacher["head.mlp.0.weight"] = torch.randn(8, 64)
    bb = load_backbone("ibot", VIT, save({"teacher": teacher}, tmp_path / "ibot_full.pth"), img_size=IMG)
    assert_same(bb.model, sd)


def test_deit_distilled_keeps_dist_token(tmp_path):
    sd = reference(DEIT_DISTILLED)
    published = dict(
        sd,
        **{
            "head.weight": torch.randn(10, 64),
            "head.bias": torch.randn(10),
            "head_dist.weight": torch.randn(10, 64),
            "head_dist.bias": torch.randn(10),
        },
    )
    bb = load_backbone(
        "deit", DEIT_DISTILLED, save({"model": published}, tmp_path / "deit.pth"), img_size=IMG
    )
    assert_same(bb.model, sd)
    assert bb.num_prefix_tokens == 2 and "dist_token" in sd


def test_deit3_layerscale_names_and_pos_embed_without_cls(tmp_path):
    sd = reference(DEIT3)
    assert sd["pos_embed"].shape[1] == (IMG // 8) ** 2  # no cls position
    published = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in sd.items()}
    assert any(k.endswith("gamma_1") for k in published)
    bb = load_backbone("deit3", DEIT3, save({"model": published}, tmp_path / "deit3.pth"), img_size=IMG)
    assert_same(bb.model, sd)


def test_timm_safetensors_bin_and_registers(tmp_path):
    sd = reference(REG)
    save_file(sd, str(tmp_path / "reg.safetensors"))
    bb = load_backbone("timm", REG, tmp_path / "reg.safetensors", img_size=IMG)
    assert_same(bb.model, sd)
    assert bb.num_prefix_tokens == 5
    bb = load_backbone("timm", REG, save(sd, tmp_path / "pytorch_model.bin"), img_size=IMG)
    assert_same(bb.model, sd)


def test_unip_student_with_different_last_block_heads(tmp_path):
    heads = [2, 4]
    torch.manual_seed(1)
    model = build_vit(VIT, img_size=IMG, heads_per_layer=heads)
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "student.safetensors"), metadata={"heads_per_layer": json.dumps(heads)})
    bb = load_backbone("unip", VIT, tmp_path / "student.safetensors", img_size=IMG)
    assert_same(bb.model, sd)
    assert bb.heads_per_layer == heads
    # student.json beside the file is the other source of the head counts
    save_file(sd, str(tmp_path / "plain.safetensors"))
    (tmp_path / "student.json").write_text(json.dumps({"heads_per_layer": heads}))
    assert load_backbone("unip", VIT, tmp_path / "plain.safetensors", img_size=IMG).heads_per_layer == heads


def test_pos_embed_resized_for_other_image_size(tmp_path):
    sd = reference(VIT)
    save_file(sd, str(tmp_path / "w.safetensors"))
    bb = load_backbone("timm", VIT, tmp_path / "w.safetensors", img_size=48)
    assert bb.model.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(bb.model.pos_embed[:, :1], sd["pos_embed"][:, :1])  # cls position untouched
    assert any("pos_embed resized from 4x4 to 6x6" in n for n in bb.notes)


def test_strict_missing_unexpected_and_shape_errors(tmp_path):
    sd = reference(VIT)
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp")}
    with pytest.raises(CheckpointError, match=r"missing 4 backbone keys \(blocks\.1\.mlp"):
        load_backbone("timm", VIT, save(partial, tmp_path / "partial.pth"), img_size=IMG)
    extra = dict(sd, **{"blocks.2.attn.qkv.weight": torch.randn(192, 64)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(blocks\.2\.attn\.qkv\.weight"):
        load_backbone("timm", VIT, save(extra, tmp_path / "deeper.pth"), img_size=IMG)
    wide = reference(VIT.replace("embed_dim=64", "embed_dim=32"))
    with pytest.raises(CheckpointError, match="has shape"):
        load_backbone("timm", VIT, save(wide, tmp_path / "wide.pth"), img_size=IMG)
    resnet = {"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        load_backbone("timm", VIT, save(resnet, tmp_path / "resnet.pth"), img_size=IMG)


class Evil:
    """Stands for any arbitrary object a malicious or careless checkpoint could carry."""


def test_refuses_pickled_objects_and_truncated_files(tmp_path):
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_backbone("mae", VIT, tmp_path / "evil.pth")
    good = save(reference(VIT), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_backbone("timm", VIT, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone("timm", VIT, tmp_path / "absent.pth")


@pytest.mark.parametrize("prefix", [b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04"])
def test_garbage_files_always_give_a_checkpoint_error(tmp_path, prefix):
    # Random bytes reach many different failure paths inside torch's unpickler (IndexError,
    # UnpicklingError, zip errors...): every one must surface as one clear CheckpointError.
    import random

    from unip_analysis.checkpoints import read_weights_file

    rng = random.Random(len(prefix))
    for i in range(150):
        bad = tmp_path / f"garbage{i}.pth"
        bad.write_bytes(prefix + rng.randbytes(rng.randint(0, 3000)))
        with pytest.raises(CheckpointError, match=f"garbage{i}.pth: (not a PyTorch|cannot read)"):
            read_weights_file(bad)


def test_specs_and_arch_parsing():
    s = parse_spec("mae_l=mae:vit_large_patch16_224:/ckpt/c:/x.pth")
    assert (s.name, s.family, s.arch, s.path) == ("mae_l", "mae", "vit_large_patch16_224", "/ckpt/c:/x.pth")
    for bad in ("foo", "a=b:c", "=mae:vit:p", "n=nope:vit_tiny_patch16_224:p"):
        with pytest.raises(SpecError):
            parse_spec(bad)
    assert parse_arch("vit_tiny_patch16_224(depth=2, qkv_bias=False)") == (
        "vit_tiny_patch16_224",
        {"depth": 2, "qkv_bias": False},
    )
    with pytest.raises(SpecError, match="not a timm model"):
        build_vit("no_such_model")
    with pytest.raises(
        SpecError, match="ResNet; attention analysis supports timm's VisionTransformer, Beit and Eva"
    ):
        build_vit("resnet18")
    assert set(FAMILIES) == {
        "mae",
        "crossmae",
        "dino",
        "dinov2",
        "ibot",
        "deit",
        "deit3",
        "beit",
        "timm",
        "unip",
        "hf",
        "pad",
    }
    hub = parse_spec("mae_b=timm:vit_base_patch16_224.mae")  # timm's pretrained weights: no PATH
    assert (hub.family, hub.arch, hub.path) == ("timm", "vit_base_patch16_224.mae", None)
    with pytest.raises(SpecError, match="NAME=timm:ARCH.TAG"):
        parse_spec("mae_b=mae:vit_base_patch16_224")
