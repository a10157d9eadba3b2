"""Captured attention is the model's real attention, for every supported attention class, and the
capture never holds a layer's whole map."""

import weakref

import numpy as np
import pytest
import torch
from attention_reference import ATTENTION_ARCHS, randomize, timm_explicit_attention

from unip_analysis import analyze
from unip_analysis.attention import (
    DEFAULT_BLOCK_BYTES,
    AttentionMaps,
    attention_output,
    block_context,
    forward_until,
    heads_per_block,
    layer_qk_logits,
    logit_bias,
    observe_attention,
    project_qkv,
    qk_logits,
    query_blocks,
    rows_per_block,
)
from unip_analysis.checkpoints import build_vit, load_backbone, set_attention_heads
from unip_analysis.errors import SpecError
from unip_analysis.metrics import map_statistics, nmi, patch_attention

TINY = ATTENTION_ARCHS["vit"]


@pytest.mark.parametrize("kind", list(ATTENTION_ARCHS))
def test_captured_attention_reproduces_block_outputs(kind):
    """For each attention class: the rows we capture equal timm's own explicit (non-fused)
    softmax, the model's output under capture equals timm's, and each block's output is
    reproduced from the captured map: proj(map @ v)."""
    model = randomize(build_vit(ATTENTION_ARCHS[kind], img_size=32).eval())
    x = torch.randn(2, 3, 32, 32)
    timm_maps, timm_out, inputs, outputs = timm_explicit_attention(model, x)
    collected = AttentionMaps()
    # 1-byte blocks: one query row per block, the most demanding split
    with torch.no_grad(), observe_attention(model, collected, block_bytes=1):
        ours = model.forward_features(x)
    assert torch.allclose(ours, timm_out, rtol=1e-5, atol=1e-5), kind
    assert set(collected.maps) == set(range(len(model.blocks)))
    for i, blk in enumerate(model.blocks):
        attn = collected.maps[i]
        assert torch.allclose(attn, timm_maps[i], atol=1e-6), (kind, i)
        assert torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5)
        x_in, context = inputs[i]
        _, _, v = project_qkv(blk.attn, x_in, **context)
        out = attention_output(blk.attn, attn @ v, x_in)
        assert torch.allclose(out, outputs[i], rtol=1e-5, atol=1e-5), (kind, i)
    assert "forward" not in vars(model.blocks[0].attn)  # the patch is removed afterwards


@pytest.mark.parametrize("kind", ["vit", "beit", "beit_shared", "eva02_separate_qkv", "rope_mixed"])
def test_qk_logits_are_what_the_block_computes_before_softmax(kind):
    """The distilled logits include the block's position terms (relative bias, rotary embedding):
    their softmax is the block's attention."""
    model = randomize(build_vit(ATTENTION_ARCHS[kind], img_size=32).eval())
    x = torch.randn(2, 3, 32, 32)
    timm_maps, *_ = timm_explicit_attention(model, x)
    with torch.no_grad():
        logits = layer_qk_logits(model, x, 1)
    assert torch.allclose(logits.softmax(-1), timm_maps[1], atol=1e-6)
    blk = model.blocks[1]
    if kind == "beit":  # the block's own table, as timm indexes it
        assert torch.equal(logit_bias(blk.attn, {}), blk.attn._get_rel_pos_bias())
    if kind in ("beit_shared", "eva02_separate_qkv", "rope_mixed"):
        # without what the model passes to the block the logits differ: the terms are really there
        with torch.no_grad():
            bare = qk_logits(blk.attn, blk.norm1(forward_until(model, x, 1)))
        assert not torch.allclose(bare.softmax(-1), timm_maps[1], atol=1e-4)


def test_block_context_gives_each_block_its_rotary_embedding():
    model = build_vit(ATTENTION_ARCHS["rope_mixed"], img_size=32).eval()
    context = block_context(model)
    assert not torch.equal(context(0)["rope"], context(1)["rope"])  # mixed RoPE: one per block


def test_blocks_with_different_head_counts():
    torch.manual_seed(0)
    model = build_vit(TINY, img_size=32, heads_per_layer=[4, 8]).eval()
    shapes = {}

    class Shapes:
        def start_layer(self, layer, shape):
            shapes[layer] = shape

        def rows(self, layer, q0, probs, h0=0):
            pass

        def end_layer(self, layer):
            pass

    with torch.no_grad(), observe_attention(model, Shapes()):
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert shapes[0][1] == 4 and shapes[1][1] == 8
    set_attention_heads(model.blocks[1].attn, 2)
    assert qk_logits(model.blocks[1].attn, torch.randn(1, 17, 64)).shape == (1, 2, 17, 17)
    beit = build_vit(ATTENTION_ARCHS["beit"], img_size=32)
    with pytest.raises(SpecError, match="ties its parameters"):
        set_attention_heads(beit.blocks[0].attn, 4)


def test_query_blocks_cover_every_row_once_and_never_a_whole_map():
    for tokens, prefix, rows in [(17, 1, 3), (21, 5, 4), (16, 0, 16), (197, 1, 99)]:
        blocks = list(query_blocks(tokens, prefix, rows))
        covered = [q for q0, q1 in blocks for q in range(q0, q1)]
        assert covered == list(range(tokens))
        assert all(q1 <= prefix or q0 >= prefix for q0, q1 in blocks)  # prefix rows never mixed in
    assert rows_per_block(8, 6, 197) <= 99  # at most half the rows, whatever the budget
    assert rows_per_block(1, 12, 4097) * 12 * 4097 * 4 <= 2 * 2**20  # 2 MiB of logits at 4,097 tokens


def test_blocks_hold_groups_of_heads_only_where_all_heads_leave_few_rows():
    four = 4 * 2**20
    assert heads_per_block(8, 6, 197, four) == 6  # ViT-S/16 at 224 px: 99 rows of every head fit 4 MiB
    assert heads_per_block(8, 6, 197) == 3 and rows_per_block(8, 3, 197) == 99  # and 3 heads fit 2 MiB
    assert heads_per_block(1, 12, 4097) == 1  # ViT-B/16 at 1,024 px: 127 rows of one head, not 10 of 12
    assert rows_per_block(1, 1, 4097) == 127
    assert heads_per_block(4, 12, 785) == 1 and rows_per_block(4, 1, 785) == 166  # ViT-B/16 at 448 px
    assert heads_per_block(2, 16, 785) == 2  # ViT-L/16 at 448 px: eight equal groups
    assert heads_per_block(8, 12, 197) == 3  # ViT-B/16 at 224 px: 99 rows of 3 heads, not 27 of 12


@pytest.mark.parametrize("kind", list(ATTENTION_ARCHS))
def test_one_head_a_block_gives_the_maps_of_whole_blocks(kind):
    """Every attention class (BEiT's position bias sliced per head, EVA's rotary q and k) gives the
    same maps when a block holds one head as when it holds them all."""
    model = randomize(build_vit(ATTENTION_ARCHS[kind], img_size=32).eval())
    x = torch.randn(2, 3, 32, 32)
    one_head = 2 * 17 * 4 * 9  # 2 images, 17 tokens: 9 rows (the most a block takes) of one head
    maps = []
    for block_bytes in (DEFAULT_BLOCK_BYTES, one_head):
        collector = AttentionMaps()
        with torch.no_grad(), observe_attention(model, collector, block_bytes=block_bytes):
            model.forward_features(x)
        maps.append(collector.maps)
    assert (
        heads_per_block(2, model.blocks[0].attn.num_heads, 17, one_head) == 1 < model.blocks[0].attn.num_heads
    )
    for layer in maps[0]:
        torch.testing.assert_close(maps[1][layer], maps[0][layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("definition", ["park", "unip"])
def test_blocks_of_head_groups_give_the_same_maps_and_statistics(definition):
    """A block budget that splits the 4 heads into 2 groups gives the maps and statistics that
    blocks of every head give, and the reference formulas on the whole maps."""
    torch.manual_seed(0)
    model = build_vit(
        "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=4,patch_size=8)", img_size=64
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    budget = 2 * 2 * 65 * 4 * 33  # 2 images, 65 tokens: 33 rows (the most a block takes) of 2 heads
    assert heads_per_block(2, 4, 65, budget) == 2
    maps, stats = {}, {}
    for name, block_bytes in (("whole", DEFAULT_BLOCK_BYTES), ("groups", budget)):
        collector = AttentionMaps()
        observer = analyze.LayerObserver(2, (8, 8), 8, 1, nmi_definition=definition)
        observer.start_batch(2)
        with torch.no_grad():
            with observe_attention(model, collector, block_bytes=block_bytes):
                model.forward_features(x)
            with observe_attention(model, observer, block_bytes=block_bytes):
                model.forward_features(x)
        maps[name] = collector.maps
        stats[name] = [(observer.nmi[i][0], observer.distance[i][0]) for i in range(2)]
    for layer in range(2):
        torch.testing.assert_close(maps["groups"][layer], maps["whole"][layer], atol=1e-6, rtol=1e-5)
        (nmi_g, dist_g), (nmi_w, dist_w) = stats["groups"][layer], stats["whole"][layer]
        torch.testing.assert_close(nmi_g, nmi_w, atol=1e-6, rtol=0)
        torch.testing.assert_close(dist_g, dist_w, atol=0, rtol=1e-5)
        want = map_statistics(maps["whole"][layer].double(), 1, (8, 8), 8, nmi_definition=definition)
        torch.testing.assert_close(nmi_g, want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(dist_g, want[1], atol=0, rtol=1e-5)


def test_no_block_is_a_layers_whole_map_and_blocks_are_freed():
    """The largest buffer the observer ever sees is a block of rows, and the previous block is
    gone (freed, not merely unreferenced by us) when the next arrives."""
    model = build_vit(
        "vit_tiny_patch16_224(depth=3,embed_dim=64,num_heads=2,patch_size=8)", img_size=32
    ).eval()
    seen_rows, seen_heads, alive = [], [], []
    previous: list[weakref.ref] = []

    class Watch:
        def start_layer(self, layer, shape):
            pass

        def rows(self, layer, q0, probs, h0=0):
            alive.extend(ref() is not None for ref in previous)
            previous[:] = [weakref.ref(probs)]
            seen_rows.append(probs.shape[2])
            seen_heads.append(probs.shape[1])

        def end_layer(self, layer):
            pass

    with torch.no_grad(), observe_attention(model, Watch(), block_bytes=2 * 2 * 17 * 4 * 4):
        model.forward_features(torch.randn(2, 3, 32, 32))
    # a budget of 4 rows of both heads: one head a block, 8 rows (the prefix row, then 16 in 2)
    assert max(seen_rows) == 8 < 17 and set(seen_heads) == {1} and len(seen_rows) == 3 * 2 * (1 + 2)
    assert not any(alive)


def test_unsupported_attention_is_refused_by_name():
    model = build_vit(TINY, img_size=32)

    class MyAttention(torch.nn.Module):
        def forward(self, x):
            return x

    model.blocks[1].attn = MyAttention()
    with pytest.raises(SpecError, match=r"block 2 uses .*MyAttention"):
        with observe_attention(model, AttentionMaps()):
            pass
    with pytest.raises(SpecError, match="ResPostBlock"):
        build_vit(
            "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8,block_fn='ResPostBlock')"
        )


def test_analysis_layer_nmi_equals_direct_computation(tiny_timm_checkpoint, image_dir):
    arch, path = tiny_timm_checkpoint
    bb = load_backbone("timm", arch, path, img_size=32)
    ds = analyze.image_dataset(image_dir, 32, "infrared")
    res = analyze.analyze_backbone(bb, ds, name="tiny", batch_size=4, progress=False, map_images=2)
    assert res.n_images == len(ds) == 6
    # direct: timm's own explicit attention for all images at once (the straightforward way)
    x = torch.stack([ds[i] for i in range(len(ds))])
    maps, *_ = timm_explicit_attention(bb.model, x)
    for layer in range(bb.depth):
        direct = nmi(patch_attention(maps[layer], bb.num_prefix_tokens)).numpy()
        np.testing.assert_allclose(res.head_nmi[layer], direct, atol=1e-6)
    assert res.query_maps[0].shape == (2, 3, 2, 4, 4)  # images, points, heads, grid
    # the figure rows are the maps' rows at the query tokens, renormalized over patches
    want = patch_attention(maps[0][:2], 1, query_rows=torch.tensor(res.query_tokens))  # [2, H, P, N]
    np.testing.assert_allclose(res.query_maps[0], want.permute(0, 2, 1, 3).reshape(2, 3, 2, 4, 4), atol=1e-6)
    table = res.layer_table()
    assert list(table["layer"]) == [1, 2, 3, 4] and set(table["pattern"]) <= {"local", "hybrid", "global"}
    assert (table["nmi_ci_lo"] <= table["nmi"]).all() and (table["nmi"] <= table["nmi_ci_hi"]).all()
