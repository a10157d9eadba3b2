"""Every checkpoint family in the format its authors publish, built here with the real key sets:
it loads tensor for tensor into the timm model, and the analysis' NMI and distance equal an
independent computation from timm's own explicit attention of a reference model that timm
loaded itself (method.md section 6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from attention_reference import distance_reference, nmi_reference, timm_explicit_attention
from published_formats import (
    IMG,
    SMALL,
    crossmae_file,
    dinov2_release,
    hf_case,
    hub_cache,
    state,
    timm_model,
)
from safetensors.torch import save_file

from unip_analysis import analyze
from unip_analysis.checkpoints import beit_final_norm, build_vit, load_backbone
from unip_analysis.errors import CheckpointError, SpecError


def analyse_and_compare(bb, reference: torch.nn.Module, n_images: int = 3) -> None:
    """unip's NMI / distance per layer and head == the formulas on timm's explicit attention."""
    torch.manual_seed(1)
    images = [torch.randn(3, IMG, IMG) for _ in range(n_images)]
    res = analyze.analyze_backbone(bb, images, batch_size=2, progress=False, map_images=0)
    maps, *_ = timm_explicit_attention(reference, torch.stack(images))
    grid = tuple(reference.patch_embed.grid_size)
    npt = reference.num_prefix_tokens
    for layer in range(len(reference.blocks)):
        np.testing.assert_allclose(res.head_nmi[layer], nmi_reference(maps[layer], npt).numpy(), atol=1e-6)
        want = distance_reference(maps[layer], npt, grid, reference.patch_embed.patch_size[0]).numpy()
        np.testing.assert_allclose(res.head_distance[layer], want, rtol=1e-5)
    assert res.head_nmi[0].std() > 0  # distinct heads and images: a non-trivial comparison


def assert_loaded(bb, reference: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    got, want = bb.model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        if k not in skip:
            assert torch.allclose(got[k], v, atol=1e-7, rtol=0), k


# --- CrossMAE -----------------------------------------------------------------------------------


def test_crossmae_wfm_file_loads_without_an_encoder_norm(tmp_path):
    arch = f"vit_tiny_patch16_224({SMALL})"
    reference = timm_model(arch)
    sd = state(reference)
    path = crossmae_file(tmp_path / "crossmae_vitb_wfm.pth", sd)
    raw = torch.load(path, weights_only=False)["model"]
    assert "norm.weight" not in raw and "wfm.linear.weight" in raw and "dec_norms.0.weight" in raw
    bb = load_backbone("crossmae", arch, path, img_size=IMG)
    assert_loaded(bb, reference, skip=("norm.weight", "norm.bias"))
    norm = bb.model.norm
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    assert any("final norm absent (CrossMAE" in n for n in bb.notes)
    analyse_and_compare(bb, reference)  # the final norm plays no part in attention
    with pytest.raises(
        CheckpointError,
        match=r"missing 2 backbone keys \(norm.weight, norm.bias\); unexpected 5 keys \(dec_norms",
    ):
        load_backbone("mae", arch, path, img_size=IMG)  # the MAE reading would not take it
    missing_block = {k: v for k, v in raw.items() if not k.startswith("blocks.1.mlp")}
    torch.save({"model": missing_block}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"missing 4 backbone keys \(blocks\.1\.mlp"):
        load_backbone("crossmae", arch, tmp_path / "cut.pth", img_size=IMG)  # only the norm may be absent


# --- UNIP's released students -------------------------------------------------------------------


def test_released_unip_student_reads_last_heads_from_args(tmp_path):
    arch = f"vit_tiny_patch16_224({SMALL})"
    reference = timm_model(arch)
    reference.blocks[-1].attn.num_heads = 4  # as UNIP's Block(embed_dim, last_heads)
    reference.blocks[-1].attn.head_dim = 16
    reference.blocks[-1].attn.scale = 16**-0.5
    sd = state(reference)
    args = argparse.Namespace(
        model="unip_vit_small_patch16", last_heads=4, teacher_model="mae_vit_large_patch16"
    )
    path = tmp_path / "unip_vit_small_mae_l.pth"
    torch.save(
        {"model": sd, "optimizer": {"state": {}}, "epoch": 99, "scaler": {"scale": 1024.0}, "args": args},
        path,
    )
    bb = load_backbone("unip", arch, path, img_size=IMG)
    assert bb.heads_per_layer == [2, 4]
    assert any("args.last_heads" in n for n in bb.notes)
    assert_loaded(bb, reference)
    analyse_and_compare(bb, reference)
    torch.save({"model": sd}, tmp_path / "stripped.pth")  # a file that lost its args
    bare = load_backbone("unip", arch, tmp_path / "stripped.pth", img_size=IMG)
    assert bare.heads_per_layer == [2, 2] and any("records no head counts" in n for n in bare.notes)


# --- timm archs whose pooling module survives without a classifier -------------------------------


@pytest.mark.parametrize(
    "arch",
    [
        f"vit_base_patch16_siglip_224({SMALL})",  # attn_pool (MAP head), no cls token
        f"vit_small_patch16_224({SMALL},global_pool='avg',fc_norm=True)",  # fc_norm, average pooling
        f"beitv2_base_patch16_224({SMALL})",  # fc_norm (BEiT's default average pooling)
        f"eva02_tiny_patch14_224({SMALL})",  # fc_norm, rotary embedding
    ],
)
def test_timm_pooling_modules_load_from_their_own_weights(tmp_path, arch):
    reference = timm_model(arch)
    sd = state(reference)
    assert any(k.startswith(("attn_pool.", "fc_norm.")) for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    bb = load_backbone("timm", arch, tmp_path / "model.safetensors", img_size=IMG)
    assert_loaded(bb, reference)
    assert not any("absent" in n for n in bb.notes)
    analyse_and_compare(bb, reference)
    # a backbone-only file (no pooling weights) still loads: the module is unused, and said so
    save_file(
        {k: v.contiguous() for k, v in sd.items() if not k.startswith(("attn_pool.", "fc_norm."))},
        str(tmp_path / "backbone.safetensors"),
    )
    bb = load_backbone("timm", arch, tmp_path / "backbone.safetensors", img_size=IMG)
    assert any("left at initialisation" in n for n in bb.notes)


# --- DINOv2 (torch hub release) -------------------------------------------------------------------


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_release_with_and_without_registers(tmp_path, registers):
    arch = f"vit_small_patch14_reg4_dinov2({SMALL})" if registers else f"vit_small_patch14_dinov2({SMALL})"
    release = dinov2_release(state(timm_model(arch, img=48)), stored_grid=6, registers=registers)
    torch.save(release, tmp_path / "dinov2_vits14_pretrain.pth")
    bb = load_backbone("dinov2", arch, tmp_path / "dinov2_vits14_pretrain.pth", img_size=IMG)
    # reference: timm's own conversion of the same file (its checkpoint filter), at 32 px
    reference = timm.create_model(
        arch.split("(")[0], num_classes=0, img_size=IMG, depth=2, embed_dim=64, num_heads=2, patch_size=8
    )
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(dict(release), reference)
    reference.load_state_dict(filtered)
    assert_loaded(bb, reference.eval())
    assert bb.num_prefix_tokens == (5 if registers else 1)
    assert any("pos_embed resized from 6x6 to 4x4" in n for n in bb.notes)
    analyse_and_compare(bb, reference)


# --- BEiT (unilm) ---------------------------------------------------------------------------------


def test_beit_pretraining_file_with_shared_bias_and_finetuned_file(tmp_path):
    final_norm = ",".join(f"{k}={v!r}" for k, v in beit_final_norm().items())  # per timm version
    shared_arch = (
        f"beit_base_patch16_224({SMALL},use_shared_rel_pos_bias=True,use_rel_pos_bias=False,{final_norm})"
    )
    reference = timm_model(shared_arch)
    sd = state(reference)
    assert "rel_pos_bias.relative_position_bias_table" in sd and "norm.weight" in sd
    dim = 64
    pretrain = dict(
        sd,
        mask_token=torch.zeros(1, 1, dim),
        **{"lm_head.weight": torch.randn(8192, dim), "lm_head.bias": torch.zeros(8192)},
    )
    torch.save({"model": pretrain, "epoch": 799}, tmp_path / "beit_base_patch16_224_pt22k.pth")
    # the plain arch name: the family builds the layout the file has (shared bias, final norm)
    bb = load_backbone(
        "beit", f"beit_base_patch16_224({SMALL})", tmp_path / "beit_base_patch16_224_pt22k.pth", img_size=IMG
    )
    assert bb.model.rel_pos_bias is not None and bb.model.blocks[0].attn.relative_position_bias_table is None
    assert_loaded(bb, reference)
    analyse_and_compare(bb, reference)

    finetuned_ref = timm_model(f"beit_base_patch16_224({SMALL})")
    ft = state(finetuned_ref)
    ft |= {
        f"blocks.{i}.attn.relative_position_index": torch.zeros(17, 17, dtype=torch.long) for i in range(2)
    }
    ft |= {"head.weight": torch.randn(1000, dim), "head.bias": torch.zeros(1000)}
    torch.save({"model": ft}, tmp_path / "beit_base_patch16_224_pt22k_ft22kto1k.pth")
    bb = load_backbone(
        "beit",
        f"beit_base_patch16_224({SMALL})",
        tmp_path / "beit_base_patch16_224_pt22k_ft22kto1k.pth",
        img_size=IMG,
    )
    assert_loaded(bb, finetuned_ref)
    analyse_and_compare(bb, finetuned_ref)
    bb = load_backbone(
        "beit",
        f"beit_base_patch16_224({SMALL})",
        tmp_path / "beit_base_patch16_224_pt22k_ft22kto1k.pth",
        img_size=48,
    )
    assert bb.model.blocks[0].attn.relative_position_bias_table.shape == ((2 * 6 - 1) ** 2 + 3, 2)
    assert any("relative position bias tables resized to a 6x6 window" in n for n in bb.notes)


# --- transformers folders -------------------------------------------------------------------------


HF_KINDS = [
    "ViTModel",
    "ViTMAEForPreTraining",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_transformers_folders(tmp_path, kind):
    arch, folder, reference, eps = hf_case(kind, tmp_path)
    bb = load_backbone("hf", arch, folder, img_size=IMG)
    assert_loaded(bb, reference)
    assert bb.model.norm.eps == eps and bb.model.blocks[0].norm1.eps == eps  # from config.json
    assert len(bb.sha256) == 64 and bb.path == str(folder)
    analyse_and_compare(bb, reference)


def test_transformers_folder_that_does_not_fit_the_arch(tmp_path):
    arch, folder, _, _ = hf_case("ViTModel", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_attention_heads": 4}))
    with pytest.raises(SpecError, match="num_attention_heads 4 \\(arch: 2\\)"):
        load_backbone("hf", arch, folder, img_size=IMG)  # same tensor shapes: only config.json tells
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "swin"}))
    with pytest.raises(CheckpointError, match="model_type 'swin'"):
        load_backbone("hf", arch, folder, img_size=IMG)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_backbone("hf", arch, folder, img_size=IMG)


# --- timm pretrained tags from the Hugging Face cache ---------------------------------------------


def test_timm_pretrained_tag_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: no test reaches the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    arch = f"vit_base_patch16_224.mae({SMALL})"
    reference = timm_model(f"vit_base_patch16_224({SMALL})")
    with pytest.raises(CheckpointError, match=r"timm/vit_base_patch16_224\.mae is not in .*--allow-download"):
        load_backbone("timm", arch, None, img_size=IMG)
    cached = hub_cache(tmp_path / "hub", "timm/vit_base_patch16_224.mae", state(reference))
    bb = load_backbone("timm", arch, None, img_size=IMG)
    assert_loaded(bb, reference)
    assert Path(bb.path) == cached and any("from the Hugging Face cache" in n for n in bb.notes)
    analyse_and_compare(bb, reference)
    with pytest.raises(SpecError, match="Invalid pretrained tag"):
        load_backbone("timm", f"vit_base_patch16_224.nosuchtag({SMALL})", None, img_size=IMG)
    with pytest.raises(SpecError, match="needs a PATH"):
        load_backbone("mae", arch, None)


def test_beit_and_eva_load_through_timm_and_build_vit():
    """build_vit makes every supported family's timm model and nothing else."""
    assert type(build_vit(f"beit_base_patch16_224({SMALL})", img_size=IMG)).__name__ == "Beit"
    assert type(build_vit(f"eva02_tiny_patch14_224({SMALL})", img_size=IMG)).__name__ == "Eva"


def classic_file(family: str, sd: dict, tmp_path: Path) -> Path:
    """MAE / DINO / iBOT / DeiT / DeiT III files as their repositories save them."""
    path = tmp_path / f"{family}.pth"
    if family == "mae":
        model = dict(sd, mask_token=torch.zeros(1, 1, 32), **{"decoder_embed.weight": torch.randn(32, 64)})
        torch.save(
            {"model": model, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path
        )
    elif family == "dino":
        teacher = {f"module.backbone.{k}": v for k, v in sd.items()} | {
            "module.head.mlp.0.weight": torch.randn(8, 64)
        }
        torch.save({"teacher": teacher, "student": teacher, "epoch": 100}, path)
    elif family == "ibot":
        teacher = {f"backbone.{k}": v for k, v in sd.items()} | {"backbone.masked_embed": torch.zeros(64)}
        torch.save({"state_dict": teacher}, path)
    elif family == "deit":
        torch.save(
            {"model": sd | {"head.weight": torch.randn(10, 64), "head_dist.weight": torch.randn(10, 64)}},
            path,
        )
    else:  # deit3: LayerScale as gamma_1 / gamma_2
        renamed = {
            k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()
        }
        torch.save({"model": renamed}, path)
    return path


@pytest.mark.parametrize(
    "family,arch",
    [
        ("mae", f"vit_base_patch16_224({SMALL})"),
        ("dino", f"vit_small_patch16_224({SMALL})"),
        ("ibot", f"vit_small_patch16_224({SMALL})"),
        ("deit", f"deit_tiny_distilled_patch16_224({SMALL})"),
        ("deit3", f"deit3_small_patch16_224({SMALL})"),
    ],
)
def test_classic_families_analysis_equals_timm_reference(tmp_path, family, arch):
    reference = timm_model(arch)
    bb = load_backbone(family, arch, classic_file(family, state(reference), tmp_path), img_size=IMG)
    assert_loaded(bb, reference)
    analyse_and_compare(bb, reference)


def test_finetuned_transformers_backbone_is_rebuilt_with_its_config(tmp_path):
    """A fine-tuned model.pt of an hf backbone rebuilds with config.json's LayerNorm eps (1e-12 for
    ViTModel, not timm's 1e-6), without the transformers folder."""
    from unip_train import synthetic
    from unip_train.finetune import cli as finetune_cli
    from unip_train.finetune.model_file import load_model

    arch, folder, _, eps = hf_case("ViTModel", tmp_path)
    data = synthetic.generate(tmp_path / "soda", "soda", 4, 2, size=IMG, seed=0)
    out = tmp_path / "ft"
    argv = ["--backbone", f"hf:{arch}:{folder}", "--dataset", "soda", "--data-root", str(data), "--iters", "1",
            "--crop", str(IMG), "--batch-size", "2", "--num-workers", "0", "--no-progress", "--out", str(out)]  # fmt: skip
    assert finetune_cli.main(argv) == 0
    model, _, ckpt = load_model(out / "model.pt")
    assert ckpt["backbone"]["hf_build"] == {"layer_norm_eps": eps, "hidden_act": "gelu"}
    assert model.backbone.blocks[0].norm1.eps == eps
