"""Attention sinks as a statistic (issue 28, method.md section 10): the sink share, the prefix
share and the sink token of every layer and head, checked against a direct computation on timm's
own attention maps, on a model built to be a sink, and through layer_selection.json, the CSV and
report.html."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from attention_reference import ATTENTION_ARCHS, randomize, timm_explicit_attention
from trained_like import TINY_TRAINED_ARCH, TINY_TRAINED_IMG, trained_like

from unip_analysis import analyze, report, selection
from unip_analysis.checkpoints import LoadedBackbone, build_vit
from unip_analysis.errors import SelectionError
from unip_analysis.metrics import SINK_DOMINATED, StreamingStatistics, sink_statistics
from unip_analysis.patterns import default_thresholds

IMG = 32


class Images(torch.utils.data.Dataset):
    """``n`` fixed random images, [3, size, size]."""

    def __init__(self, n: int = 3, size: int = IMG):
        self.x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def backbone(model: torch.nn.Module, arch: str) -> LoadedBackbone:
    return LoadedBackbone(model.eval(), "timm", arch, "test", "0" * 64, IMG)


def direct_sinks(attn: torch.Tensor, npt: int) -> tuple[torch.Tensor, ...]:
    """The issue's definition, term by term: r_j = mean over patch queries of A[q, j] (full rows)."""
    r = attn[:, :, npt:, :].double().mean(dim=2)
    return r.max(-1).values, r[..., :npt].sum(-1), r.argmax(-1)


@pytest.mark.parametrize(
    "kind, names",
    [
        ("vit", ["cls"]),
        ("registers", ["cls", "reg0", "reg1", "reg2", "reg3"]),
        ("deit_distilled", ["cls", "dist"]),
    ],
)
def test_sink_statistics_equal_a_direct_computation_on_timm_maps(kind, names):
    """Through the analysis (3 images in batches of 2, rows in several blocks) against the maps
    timm's own explicit attention computes, per image, layer and head."""
    arch = ATTENTION_ARCHS[kind]
    model = randomize(build_vit(arch, img_size=IMG).eval(), seed=3)
    data = Images()
    res = analyze.analyze_backbone(backbone(model, arch), data, batch_size=2, progress=False, map_images=0)
    assert res.prefix_names == names and res.has_sinks()
    maps, _, inputs, _ = timm_explicit_attention(model, data.x)
    npt = model.num_prefix_tokens
    for layer, full in maps.items():
        share, prefix, token = direct_sinks(full, npt)
        assert np.allclose(res.head_sink_share[layer], share.numpy(), atol=1e-6, rtol=0)
        assert np.allclose(res.head_prefix_share[layer], prefix.numpy(), atol=1e-6, rtol=0)
        assert (res.head_sink_token[layer] == token.numpy()).all()
        # the sink token's key norm over the median key norm, from timm's own projection
        attn = model.blocks[layer].attn
        b, n, _ = inputs[layer][0].shape
        k = attn.qkv(inputs[layer][0]).reshape(b, n, 3, attn.num_heads, -1)[:, :, 1].transpose(1, 2)
        norms = k.detach().norm(dim=-1)
        ratio = norms.gather(-1, token.unsqueeze(-1)).squeeze(-1) / norms.median(-1).values
        assert np.allclose(res.head_sink_key_ratio[layer], ratio.numpy(), rtol=1e-5)
        # the layer's sink token: the most frequent argmax, named
        mode = int(np.bincount(token.flatten().numpy()).argmax())
        assert res.sink_token(layer) == (names[mode] if mode < npt else mode - npt)


def test_streaming_sums_equal_the_whole_map_in_any_blocks():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 21, 21, generator=g) * 3, dim=-1)  # 1 prefix + 20 patches
    attn[..., 0] += 2.0  # a sink: the cls key takes most of every row
    attn = attn / attn.sum(-1, keepdim=True)
    whole = sink_statistics(attn, 1)
    assert whole[0].min() > 0.5
    sums = StreamingStatistics(2, 3, (4, 5), 16, 1)
    for q0 in range(1, 21, 6):  # rows in blocks, heads in groups (0, 1) and (2,)
        sums.add_(q0, attn[:, :2, q0 : q0 + 6])
        sums.add_(q0, attn[:, 2:, q0 : q0 + 6], h0=2)
    for a, b in zip(sums.sinks(), whole):
        assert torch.equal(a, b) if a.dtype == torch.int64 else torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="saw 6 patch query rows of 20"):
        partial = StreamingStatistics(2, 3, (4, 5), 16, 1)
        partial.add_(1, attn[:, :, 1:7])
        partial.sinks()


def sink_model(arch: str = TINY_TRAINED_ARCH, logit: float = 12.0) -> torch.nn.Module:
    """A ViT whose every head attends to the cls token: q is a constant, every key channel reads
    residual dimension 0, where only the cls token is large (a register-free sink, Darcet et al.)."""
    torch.manual_seed(0)
    model = build_vit(arch, img_size=IMG).eval()
    dim = model.embed_dim
    with torch.no_grad():
        model.cls_token.zero_()
        model.cls_token[..., 0] = 25.0  # ~sqrt(dim) after LayerNorm; patches' dim 0 is ~N(0, 1)
        for blk in model.blocks:
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            w[: 2 * dim] = 0
            b[: 2 * dim] = 0
            b[:dim] = 1.0  # q: every channel 1
            w[dim : 2 * dim, 0] = logit / blk.attn.head_dim**0.5  # k: dimension 0, every channel
    return model


def test_a_sink_model_has_sink_share_one_and_names_its_token(tmp_path):
    model = sink_model()
    res = analyze.analyze_backbone(backbone(model, TINY_TRAINED_ARCH), Images(), progress=False, map_images=0)
    for layer in range(res.depth):
        assert res.head_sink_share[layer].min() > 0.999
        assert np.allclose(res.head_prefix_share[layer], res.head_sink_share[layer])
        assert (res.head_sink_token[layer] == 0).all() and res.sink_token(layer) == "cls"
        assert res.head_sink_key_ratio[layer].min() > 3  # the sink's key stands out
    th = default_thresholds(res.grid)
    entry = analyze.model_entry(res, th, n_boot=20)
    assert all(lay["sink_share"] > 0.999 and lay["sink_token"] == "cls" for lay in entry["layers"])
    doc = report.build_document({"sink": entry}, th, tmp_path, 3, IMG, "imagenet")
    line = report.sink_verdict("sink", doc["models"]["sink"])
    assert "sink-dominated" in line and "cls" in line and "no layer" not in line
    assert "    " + line in report.robustness_summary(doc)  # the terminal says it too
    stats = report.stats_frame([res], doc)
    assert (stats["sink_share"] > 0.999).all() and set(stats["sink_token"]) == {"cls"}


def test_trained_like_sink_heads_read_as_sinks():
    """tests/trained_like.py's sink heads (head 1 of every block but the first) send >= 90% of
    their attention to cls; the other heads far less."""
    res = analyze.analyze_backbone(
        trained_like(), Images(size=TINY_TRAINED_IMG), progress=False, map_images=0
    )
    for layer in range(1, res.depth):
        assert res.head_sink_share[layer][:, 0].min() > 0.9
        assert res.sink_token(layer, head=0) == "cls"
        assert res.head_sink_share[layer][:, 1].mean() < 0.5


def test_sink_verdict_uses_the_documented_threshold():
    layer = {"pattern": "global", "prefix_share": 0.0, "sink_token": 7, "sink_key_norm_ratio": 1.0}
    m = {
        "selected_layer": 1,
        "layers": [
            {**layer, "layer": 1, "pattern": "hybrid", "sink_share": SINK_DOMINATED - 0.01},
            {**layer, "layer": 2, "sink_share": SINK_DOMINATED - 0.01},
        ],
    }
    assert report.sink_verdict("m", m).startswith("m: no layer is sink-dominated")
    m["layers"][1]["sink_share"] = SINK_DOMINATED
    line = report.sink_verdict("m", m)
    assert "not selected and sink-dominated: layer 2 (global)" in line and "patch 7" in line
    assert "selected layer 1 is" not in line
    m["layers"][0].update(sink_share=0.8, sink_token="reg2")
    assert "the selected layer 1 is sink-dominated: its heads give on average 80%" in report.sink_verdict(
        "m", m
    )
    assert "(most often reg2)" in report.sink_verdict("m", m)
    del m["layers"][0]["sink_share"]
    assert report.sink_verdict("m", m) == ""  # a version 1 file: nothing to say


@pytest.fixture(scope="module")
def doc_v2(tmp_path_factory) -> dict:
    res = analyze.analyze_backbone(
        trained_like(), Images(size=TINY_TRAINED_IMG), progress=False, map_images=0
    )
    th = default_thresholds(res.grid)
    return report.build_document(
        {"t": analyze.model_entry(res, th, n_boot=20)},
        th,
        tmp_path_factory.mktemp("imgs"),
        3,
        IMG,
        "imagenet",
    )


def as_version_1(doc: dict) -> dict:
    """The same document as a version 1 file holds it: no sink fields."""
    old = copy.deepcopy(doc)
    old["schema_version"] = 1
    for m in old["models"].values():
        for lay in m["layers"]:
            for key in ("sink_share", "prefix_share", "sink_token", "sink_key_norm_ratio"):
                del lay[key]
    return old


def test_version_2_is_written_and_version_1_still_read(doc_v2, tmp_path):
    assert doc_v2["schema_version"] == selection.SCHEMA_VERSION == 2
    back = selection.read(selection.write(tmp_path / "v2.json", doc_v2))
    assert all(
        {"sink_share", "prefix_share", "sink_token"} <= set(lay) for lay in back["models"]["t"]["layers"]
    )
    old = as_version_1(doc_v2)
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert selection.read(tmp_path / "v1.json") == old and not selection.has_sinks(old)
    assert selection.resolve_teacher(old, "t", layer=2, check_sha=False)[1] == 2
    page = report.render_html(old, {})
    assert "sink share" not in page and "sink-dominated" not in page
    page = report.render_html(doc_v2, {})
    assert "<th>sink share</th><th>prefix share</th><th>sink token</th>" in page
    assert "sink-dominated (sink share at or above)" in page


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lay: lay.pop("sink_share"), "lacks 'sink_share'"),
        (lambda lay: lay.pop("sink_token"), "lacks 'sink_token'"),
        (lambda lay: lay.update(prefix_share=1.5), r"prefix_share should be a share in \[0, 1\]"),
        (lambda lay: lay.update(sink_share=float("nan")), "sink_share should be float"),
        (lambda lay: lay.update(sink_token="token"), "sink_token should be a patch index or 'cls'"),
        (lambda lay: lay.update(sink_token=-1), "sink_token should be a patch index"),
    ],
)
def test_validation_checks_the_sink_fields(doc_v2, tmp_path, mutate, message):
    bad = copy.deepcopy(doc_v2)
    mutate(bad["models"]["t"]["layers"][1])
    with pytest.raises(SelectionError, match=re.escape("layers[1]") + ".*" + message):
        selection.write(tmp_path / "sel.json", bad)
    assert not (tmp_path / "sel.json").exists()


def test_explorer_labels_carry_each_heads_sink_share_and_token():
    """The explorer's per-head labels (model_payload's headStats) hold the sink share and token the
    analysis measured; an analysis without sink statistics (built before them) still renders."""
    from unip_analysis import explorer

    model = sink_model()
    res = analyze.analyze_backbone(
        backbone(model, TINY_TRAINED_ARCH), Images(), progress=False, map_images=0, explore_images=2
    )
    th = default_thresholds(res.grid)
    payload, _ = explorer.model_payload(res, th)
    stats = payload["headStats"]
    assert len(stats) == res.depth
    for layer, heads in enumerate(stats):
        for h, st in enumerate(heads):
            assert st["sink"] == pytest.approx(res.head_sinks(layer, h)["sink_share"])
            assert st["sink"] > 0.999 and st["sinkToken"] == "cls"
    old = copy.copy(res)
    old.head_sink_share = []  # as an analysis made before the statistic
    payload, _ = explorer.model_payload(old, th)
    assert all("sink" not in st for heads in payload["headStats"] for st in heads)


def test_the_page_gives_each_heads_sink_share(tmp_path):
    """window.unipExplorer.sinkShare(model, layer, head) is the analysis' own sink share and token
    (head 0-based or "mean"), read through the page in chromium."""
    import test_explorer

    if not test_explorer.Path(test_explorer.CHROMIUM).exists():
        pytest.skip(f"{test_explorer.CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    res = analyze.analyze_backbone(
        trained_like(),
        Images(size=TINY_TRAINED_IMG),
        name="tl",
        progress=False,
        map_images=0,
        explore_images=2,
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=test_explorer.CHROMIUM, args=test_explorer.CHROMIUM_ARGS)
        try:
            page, errors, outside = test_explorer.open_report(b, test_explorer.page_of([res], tmp_path))
            for layer in range(res.depth):
                shown = page.evaluate("a => unipExplorer.sinkShare('tl', a[0], a[1])", [layer + 1, 0])
                want = res.head_sinks(layer, 0)
                assert shown["share"] == pytest.approx(want["sink_share"], rel=1e-9)
                assert shown["token"] == want["sink_token"]
                mean = page.evaluate("l => unipExplorer.sinkShare('tl', l, 'mean')", layer + 1)
                assert mean["share"] == pytest.approx(float(res.head_sink_share[layer].mean()), rel=1e-6)
            assert page.evaluate("() => unipExplorer.sinkShare('tl', 2, 0)")["token"] == "cls"  # a sink head
            assert not errors and not outside
        finally:
            b.close()
