"""The NMI-HAD teacher distils the layer the analysis measures: for every family and attention class
the registry accepts, its logits are ``attention.layer_qk_logits`` of the same layer (EVA's rotary
embedding and BEiT's relative position bias, shared or per block, included), and their softmax is
the block's own attention. A teacher whose logits cannot be reproduced is refused by class name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attention_reference import randomize, timm_explicit_attention
from published_formats import dinov2_release
from safetensors.torch import save_file

from unip_analysis.attention import block_context, forward_until, layer_qk_logits, qk_logits
from unip_analysis.checkpoints import build_vit, load_backbone
from unip_analysis.errors import SpecError
from unip_train.pretrain.nmi_had import Teacher

IMG = 32  # 4x4 patches of 8 px
SMALL = "depth=3,embed_dim=64,num_heads=2,patch_size=8"
LAYER = 1  # 0-based: a middle block, so the teacher both runs a block before it and drops one after
TEMPERATURE = 2.0


def _timm_file(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path.with_suffix(".safetensors")))
    return path.with_suffix(".safetensors")


def _model_dict(sd: dict, path: Path) -> Path:  # DeiT, BEiT (unilm): ckpt["model"]
    torch.save({"model": sd}, path)
    return path


def _deit3_file(sd: dict, path: Path) -> Path:  # LayerScale as gamma_1 / gamma_2
    renamed = {
        k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()
    }
    return _model_dict(renamed, path)


def _dinov2_file(sd: dict, path: Path) -> Path:  # torch hub release, stored at this grid
    torch.save(dinov2_release(sd, stored_grid=IMG // 8, registers=False), path)
    return path


# (family, arch, how its authors publish the weights): one per layout the teacher may meet.
CASES = {
    "vit": ("timm", f"vit_tiny_patch16_224({SMALL})", _timm_file),
    "registers": ("timm", f"vit_small_patch16_224({SMALL},reg_tokens=4,no_embed_class=True)", _timm_file),
    "deit_distilled": ("deit", f"deit_tiny_distilled_patch16_224({SMALL})", _model_dict),
    "deit3_layerscale": ("deit3", f"deit3_small_patch16_224({SMALL})", _deit3_file),
    "dinov2": ("dinov2", f"vit_small_patch14_dinov2({SMALL})", _dinov2_file),
    "beit_per_block_bias": ("beit", f"beit_base_patch16_224({SMALL})", _model_dict),
    "beit_shared_bias": (
        "beit",
        f"beit_base_patch16_224({SMALL},use_shared_rel_pos_bias=True,use_rel_pos_bias=False)",
        _model_dict,
    ),
    "eva02_rope": ("timm", f"eva02_tiny_patch14_224({SMALL})", _timm_file),
    "rope_mixed": ("timm", f"vit_base_patch16_rope_mixed_224({SMALL})", _timm_file),
}


def teacher_and_reference(kind: str, tmp_path: Path, temperature: float = 1.0):
    """A random timm model of ``kind``, and the teacher the registry builds from its published file."""
    family, arch, write = CASES[kind]
    reference = randomize(build_vit(arch, img_size=IMG).eval())
    path = write(reference.state_dict(), tmp_path / f"{kind}.pth")
    # The BEiT family reads the bias layout (shared or per block) from the file: the plain name.
    load_arch = arch.split(",use_shared")[0] + ")" if "use_shared" in arch else arch
    teacher = Teacher(load_backbone(family, load_arch, path, img_size=IMG), LAYER, temperature)
    return teacher, reference


IMAGES = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(CASES))
def test_teacher_logits_are_the_analysed_layers_logits(tmp_path, kind):
    teacher, reference = teacher_and_reference(kind, tmp_path, TEMPERATURE)
    if kind == "beit_shared_bias":
        assert teacher.model.rel_pos_bias is not None
        assert teacher.model.blocks[LAYER].attn.relative_position_bias_table is None
    assert len(teacher.model.blocks) == LAYER + 1  # the block after the distilled one is dropped
    got = teacher(IMAGES)
    with torch.no_grad():
        want = layer_qk_logits(reference, IMAGES, LAYER) / TEMPERATURE
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # ... and that is what the block attends with: timm's own explicit softmax at that layer.
    timm_maps, *_ = timm_explicit_attention(reference, IMAGES)
    torch.testing.assert_close((got * TEMPERATURE).softmax(-1), timm_maps[LAYER], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["eva02_rope", "beit_shared_bias"])
def test_teacher_logits_keep_position_terms_in_float32_under_bf16_autocast(tmp_path, kind):
    """The blocks before may run in bf16; the distilled layer, its rotary embedding or shared bias
    included, runs in fp32 on the tokens entering it (method.md section 2)."""
    teacher, reference = teacher_and_reference(kind, tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = teacher(IMAGES)
        tokens = forward_until(reference, IMAGES, LAYER)
    assert got.dtype == torch.float32
    blk = reference.blocks[LAYER]
    with torch.no_grad():
        want = qk_logits(blk.attn, blk.norm1(tokens.float()), **block_context(reference)(LAYER))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, teacher(IMAGES), rtol=0, atol=1e-4)  # the blocks before ran in bf16


def test_teacher_with_an_attention_class_the_analysis_cannot_reproduce_is_refused(tmp_path):
    family, arch, write = CASES["vit"]
    backbone = load_backbone(
        family, arch, write(build_vit(arch, img_size=IMG).state_dict(), tmp_path / "vit"), img_size=IMG
    )

    class MyAttention(torch.nn.Module):
        num_heads = 2

        def forward(self, x):
            return x

    backbone.model.blocks[LAYER].attn = MyAttention()
    with pytest.raises(SpecError, match=r"^teacher timm:.*block 2 uses .*MyAttention") as err:
        Teacher(backbone, LAYER)
    assert "\n" not in str(err.value)
