"""Captured attention is the model's real attention, and capture is streaming."""

import gc
import weakref

import numpy as np
import pytest
import torch

from unip_analysis import analyze
from unip_analysis.attention import layer_qk_logits, observe_attention, project_qkv, qk_logits
from unip_analysis.checkpoints import build_vit, load_backbone, set_attention_heads
from unip_analysis.metrics import nmi, patch_attention

ARCHS = [
    "vit_tiny_patch16_224(depth=3,embed_dim=64,num_heads=4,patch_size=8)",
    "vit_small_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8,reg_tokens=4,no_embed_class=True)",
    "vit_small_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8,qk_norm=True)",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_attention_reproduces_block_outputs(arch):
    torch.manual_seed(0)
    model = build_vit(arch, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[0], out  # returns None: the output is not replaced

        return hook

    hooks = [blk.attn.register_forward_hook(keep(i)) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(x)  # timm's own (fused) attention
    for h in hooks:
        h.remove()
    captured = {}
    with torch.no_grad(), observe_attention(model, lambda i, a: captured.__setitem__(i, a.clone())):
        model.forward_features(x)
    for i, blk in enumerate(model.blocks):
        attn = captured[i]
        assert torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5)
        _, _, v = project_qkv(blk.attn, inputs[i])
        out = (attn @ v).transpose(1, 2).reshape(2, -1, blk.attn.attn_dim)
        out = blk.attn.proj(blk.attn.norm(out))
        assert torch.allclose(out, outputs[i], atol=1e-5), (arch, i)
    assert "forward" not in vars(model.blocks[0].attn)  # the patch is removed afterwards


def test_qk_logits_and_truncated_forward_match_the_map():
    torch.manual_seed(0)
    model = build_vit(ARCHS[0], img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    with torch.no_grad(), observe_attention(model, lambda i, a: maps.__setitem__(i, a.clone())):
        model.forward_features(x)
        logits = layer_qk_logits(model, x, 2)
    assert torch.allclose(logits.softmax(-1), maps[2], atol=1e-6)


def test_blocks_with_different_head_counts():
    torch.manual_seed(0)
    model = build_vit(ARCHS[0], img_size=32, heads_per_layer=[4, 4, 8]).eval()
    shapes = {}
    with torch.no_grad(), observe_attention(model, lambda i, a: shapes.__setitem__(i, a.shape)):
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert shapes[0][1] == 4 and shapes[2][1] == 8
    set_attention_heads(model.blocks[2].attn, 2)
    blk = model.blocks[2]
    assert qk_logits(blk.attn, torch.randn(1, 17, 64)).shape == (1, 2, 17, 17)


def test_streaming_never_keeps_an_earlier_layers_map():
    """When layer i's map arrives, layer i-1's map has already been freed."""
    torch.manual_seed(0)
    model = build_vit(
        "vit_tiny_patch16_224(depth=6,embed_dim=64,num_heads=2,patch_size=8)", img_size=32
    ).eval()
    previous: list[weakref.ref] = []
    alive_when_next_arrived = []

    def observer(i, attn):
        gc.collect()
        alive_when_next_arrived.extend(ref() is not None for ref in previous)
        previous.clear()
        previous.append(weakref.ref(attn))
        nmi(patch_attention(attn, 1))

    with torch.no_grad(), observe_attention(model, observer):
        model.forward_features(torch.randn(2, 3, 32, 32))
    assert len(alive_when_next_arrived) == 5 and not any(alive_when_next_arrived)


def test_analysis_layer_nmi_equals_direct_computation(tiny_timm_checkpoint, image_dir):
    arch, path = tiny_timm_checkpoint
    bb = load_backbone("timm", arch, path, img_size=32)
    ds = analyze.image_dataset(image_dir, 32, "infrared")
    res = analyze.analyze_backbone(bb, ds, name="tiny", batch_size=4, progress=False, map_images=2)
    assert res.n_images == len(ds) == 6
    # direct: stack every layer's maps for all images at once (the straightforward way)
    x = torch.stack([ds[i] for i in range(len(ds))])
    maps = {}
    with torch.no_grad(), observe_attention(bb.model, lambda i, a: maps.__setitem__(i, a.clone())):
        bb.model.forward_features(x)
    for layer in range(bb.depth):
        direct = nmi(patch_attention(maps[layer], bb.num_prefix_tokens)).numpy()
        np.testing.assert_allclose(res.head_nmi[layer], direct, atol=1e-6)
    assert res.query_maps[0].shape == (2, 3, 2, 4, 4)  # images, points, heads, grid
    table = res.layer_table()
    assert list(table["layer"]) == [1, 2, 3, 4] and set(table["pattern"]) <= {"local", "hybrid", "global"}
    assert (table["nmi_ci_lo"] <= table["nmi"]).all() and (table["nmi"] <= table["nmi_ci_hi"]).all()
