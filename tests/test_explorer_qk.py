"""The explorer's query-key view (AttentionViz) and "who looks here": the joint placement leaves
every softmax row unchanged, a positional head's queries and keys lie like the image's grid, the
page's column() is the stored rows' column and its qk() the points computed in Python, clicks on
the view move the explorer's query and key, and the view stays within its 2 MB at the budget case."""

from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest
import test_explorer
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from test_explorer import TensorImages, expected_rows, only, open_report, page_of
from trained_like import trained_like

from unip_analysis import analyze, explorer, explorer_widget

browser = test_explorer.browser  # the fixture: Debian's chromium, headless
ARCH = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=4,patch_size=8)"
SIZE = 48  # a 6 x 6 grid
POSITIONAL_HEAD = 3  # trained_like(positional=True): the last head of every block
SINK_HEAD = 0  # trained_like: the first head of every block but the first


def analysed(positional: bool = True, images: int = 3):
    bb = trained_like(ARCH, SIZE, positional=positional)
    data = TensorImages(images, (SIZE, SIZE), seed=1)
    res = analyze.analyze_backbone(
        bb, data, name="trained-like", batch_size=2, progress=False, explore_images=images
    )
    return bb, data, res


def q_and_k(bb, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (scaled by head_dim^-0.5) and k of every token [images, heads, tokens, d], from the block's qkv."""
    captured = []
    blk = bb.model.blocks[layer]
    hook = blk.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        bb.model.forward_features(x)
    hook.remove()
    heads = blk.attn.num_heads
    qkv = captured[0].reshape(x.shape[0], -1, 3, heads, bb.model.embed_dim // heads).permute(2, 0, 3, 1, 4)
    return qkv[0] * blk.attn.scale, qkv[1]


def test_joint_placement_leaves_every_softmax_row_unchanged():
    """Keys moved to the queries' centroid and both scaled to a common spread: on a trained-like
    model (outlier channels, logits in the tens) every row of every image's softmax is the same."""
    bb = trained_like(ARCH, SIZE)
    x = TensorImages(3, (SIZE, SIZE), seed=1).x
    worst, moved = 0.0, 0.0
    for layer in range(len(bb.model.blocks)):
        q, k = q_and_k(bb, x, layer)
        for h in range(q.shape[1]):
            qh, kh = q[:, h].double(), k[:, h].double()
            jq, jk = explorer.joint_qk(qh.reshape(-1, qh.shape[-1]), kh.reshape(-1, kh.shape[-1]))
            jq, jk = jq.reshape(qh.shape), jk.reshape(kh.shape)
            before = (qh @ kh.transpose(-1, -2)).softmax(-1)
            after = (jq @ jk.transpose(-1, -2)).softmax(-1)
            worst = max(worst, float((after - before).abs().max()))
            # what the placement is for: one centroid, one spread
            torch.testing.assert_close(
                jq.reshape(-1, jq.shape[-1]).mean(0), jk.reshape(-1, jk.shape[-1]).mean(0)
            )
            spread = [
                float((v - v.mean(0)).norm(dim=-1).mean()) for v in (jq.flatten(0, 1), jk.flatten(0, 1))
            ]
            assert spread[0] == pytest.approx(spread[1], rel=1e-9)
            moved = max(moved, float((kh.flatten(0, 1).mean(0) - jk.flatten(0, 1).mean(0)).norm()))
    assert worst < 1e-9, worst  # float64 rounding of logits in the hundreds
    assert moved > 10  # the outlier channels: the keys did move far


def grid_likeness(points: np.ndarray, grid: tuple[int, int]) -> float:
    """Rank correlation of the 2-D points' pairwise distances with their patches' distances in the grid."""
    cells = np.array([(p // grid[1], p % grid[1]) for p in range(grid[0] * grid[1])])
    return float(spearmanr(pdist(points), pdist(cells)).statistic)


def test_positional_head_lays_queries_and_keys_out_like_the_grid():
    _, _, pos = analysed(positional=True)
    _, _, plain = analysed(positional=False)
    for res in (pos, plain):
        ex, npt = res.explorer, res.num_prefix_tokens
        assert ex.qk.method == "pca" and ex.qk.stride == 1 and ex.qk.tokens == list(range(npt + 36))
        for layer in range(1, res.depth + 1):
            pts = explorer.qk_points(ex, layer, POSITIONAL_HEAD)
            for role in ("queries", "keys"):
                per_image = pts[role].reshape(3, -1, 2)[:, npt:]
                r = min(grid_likeness(p, res.grid) for p in per_image)
                if res is pos:
                    assert r > 0.9, (layer, role, r)
                else:  # the same head without the position embedding's rows and columns
                    assert abs(r) < 0.3, (layer, role, r)
    # PCA is deterministic: the same points again
    again = analysed(positional=True)[2]
    for a, b in zip(pos.explorer.qk.points, again.explorer.qk.points):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("encoding", ["rows-u8", "qk-f16"])
def test_column_and_points_in_the_browser_equal_python(encoding, browser, tmp_path, monkeypatch):
    """column() is the stored rows' column (the map beside the row view): equal to the page's own
    rows, to Python's computation, and to the exact attention within the measured error; qk()
    returns the points computed in Python."""
    only(monkeypatch, encoding)
    bb, data, res = analysed()
    ex, npt, name = res.explorer, res.num_prefix_tokens, res.name
    page, errors, outside = open_report(browser, page_of([res], tmp_path))
    assert page.evaluate("m => unipExplorer.queries(m)", name) == ex.queries
    for image, layer, head, key in [
        (0, 1, 0, 0),
        (1, 2, SINK_HEAD, 14),
        (2, 2, "mean", 35),
        (1, 2, POSITIONAL_HEAD, 20),
    ]:
        args = [name, image, layer, head, key]
        col = np.array(page.evaluate("a => unipExplorer.column(...a)", args))
        rows = page.evaluate(
            "a => unipExplorer.queries(a[0]).map(q => unipExplorer.row(a[0], a[1], a[2], a[3], q)[a[4]])",
            args,
        )
        np.testing.assert_array_equal(col, rows)
        np.testing.assert_allclose(col, explorer.column(ex, image, layer, head, key), rtol=1e-12, atol=1e-15)
        exact = expected_rows(bb, data, layer, image)
        exact = exact.mean(0) if head == "mean" else exact[head]
        exact = exact[npt:].numpy()  # [patch queries, tokens]
        tol = ex.layer_error(image, layer) * exact[:, npt:].max(-1) + 1e-6
        assert (np.abs(col - exact[:, npt + key]) <= tol).all()
        # the column sums to the attention the key receives from every stored query
        assert col.sum() == pytest.approx(exact[:, npt + key].sum(), abs=float(tol.sum()))
    assert page.evaluate("m => unipExplorer.qkTokens(m)", name) == ex.qk.tokens
    for layer, head in [(1, 0), (2, SINK_HEAD), (2, POSITIONAL_HEAD)]:
        got = page.evaluate("a => unipExplorer.qk(...a)", [name, layer, head])
        want = explorer.qk_points(ex, layer, head)
        for role in ("queries", "keys"):
            assert len(got[role]) == 3 * len(ex.qk.tokens)
            span = np.ptp(want[role], 0).max()
            np.testing.assert_allclose(np.array(got[role]), want[role], rtol=0, atol=1e-6 * span)
    assert not errors and not outside
    page.close()


def _client_point(page, role: str, index: int) -> tuple[float, float]:
    """Where point ``index`` of ``role`` is drawn on the big query-key canvas, in page pixels."""
    return tuple(
        page.evaluate(
            """([role, i]) => {
              const c = document.querySelector("canvas.ux-qk-big"), t = c.tx, r = c.getBoundingClientRect();
              const p = unipExplorer.qk(unipExplorer.models()[0], t.layer, t.head)[role][i];
              return [r.left + t.x(p[0]) * r.width / c.width, r.top + t.y(p[1]) * r.height / c.height];
            }""",
            [role, index],
        )
    )


def test_clicks_on_the_query_key_view_move_the_query_and_the_key(browser, tmp_path):
    _, _, res = analysed()
    ex, npt, name = res.explorer, res.num_prefix_tokens, res.name
    page, errors, outside = open_report(browser, page_of([res], tmp_path))
    page.evaluate("unipExplorer.set({layer: 2, head: 0, query: 0, key: 0})")
    pts = explorer.qk_points(ex, 2, SINK_HEAD)
    T = len(ex.qk.tokens)
    both = np.concatenate([pts["queries"], pts["keys"]])
    dist = np.linalg.norm(both[:, None] - both[None], axis=-1) + np.eye(len(both)) * 1e9
    for role, offset in (("queries", 0), ("keys", len(pts["queries"]))):
        # the most isolated patch point of this role: a click there hits it and nothing else
        cands = [i for i in range(len(pts[role])) if i % T >= npt]
        i = max(cands, key=lambda j: dist[offset + j].min())
        image, patch = i // T, ex.qk.tokens[i % T] - npt
        page.locator("canvas.ux-qk-big").scroll_into_view_if_needed()
        x, y = _client_point(page, role, i)
        page.mouse.click(x, y)
        state = page.evaluate("unipExplorer.state()")
        assert state["image"] == image
        assert state["query" if role == "queries" else "key"] == patch
        shown = page.evaluate("unipExplorer.displayed()")[name]
        if role == "keys":  # the map beside the row view follows: who looks at that key
            np.testing.assert_allclose(shown["column"], explorer.column(ex, image, 2, 0, patch), rtol=1e-12)
        else:
            np.testing.assert_allclose(shown["row"], explorer.row(ex, image, 2, 0, patch), rtol=1e-12)
    # the overview: every head of the layer as small multiples, ordered by NMI; a click picks the head
    cells = page.locator(".ux-qk-cell")
    assert cells.count() == res.heads_per_layer[1]
    nmi = res.head_nmi[1].mean(0)
    labels = [cells.nth(j).inner_text() for j in range(cells.count())]
    assert [int(t.split()[0][1:]) - 1 for t in labels] == list(np.argsort(nmi, kind="stable"))
    cells.nth(0).click()
    assert page.evaluate("unipExplorer.state().head") == int(np.argsort(nmi, kind="stable")[0])
    page.select_option("select.ux-qk-color", "row")
    assert page.evaluate("unipExplorer.state().qkColor") == "row"
    assert not errors and not outside
    page.close()


def test_view_within_2_mb_at_the_budget_case():
    """ViT-B/16, 224 px, 4 images: every layer, head, image and token (12 x 12 x 4 x 197, a query
    and a key point each) within QK_BUDGET_BYTES, measured on the encoded points; larger grids take
    a patch stride to stay within it."""
    base = explorer.ModelShape((12,) * 12, (64,) * 12, (14, 14), 1)
    assert base.qk_view_stride(4) == 1
    gen = torch.Generator().manual_seed(0)
    vectors = [(torch.randn(4, 12, 197, 64, generator=gen), torch.randn(4, 12, 197, 64, generator=gen))
               for _ in range(12)]  # fmt: skip
    view = explorer.qk_view(vectors, explorer.qk_view_tokens((14, 14), 1, 1), 1)
    measured = explorer.qk_view_bytes(types.SimpleNamespace(qk=view, _texts={}))
    assert measured <= explorer.QK_BUDGET_BYTES
    assert measured == pytest.approx(base.qk_view_bytes(4, 1), rel=0.1)  # the planner's estimate holds
    large = explorer.ModelShape((16,) * 24, (64,) * 24, (64, 64), 1)  # ViT-L/16 at 1,024 px
    s = large.qk_view_stride(4)
    assert s > 1 and large.qk_view_bytes(4, s) <= explorer.QK_BUDGET_BYTES < large.qk_view_bytes(4, s - 1)


def test_python_explorer_gives_the_same_column_and_points():
    _, _, res = analysed(images=2)
    ex = explorer_widget.explore(res, widget=False)
    np.testing.assert_array_equal(
        ex.column(res.name, 1, 2, "mean", 7), explorer.column(res.explorer, 1, 2, "mean", 7)
    )
    np.testing.assert_array_equal(
        ex.qk(res.name, 2, 1)["keys"], explorer.qk_points(res.explorer, 2, 1)["keys"]
    )


def test_qk_embedding_without_its_library_is_one_clear_error(
    tiny_timm_checkpoint, image_dir, tmp_path, capsys
):
    from unip_analysis import cli

    arch, path = tiny_timm_checkpoint
    argv = ["--checkpoint", f"t=timm:{arch}:{path}", "--images", str(image_dir), "--out", str(tmp_path / "o")]
    for method, module in (("tsne", "openTSNE"), ("umap", "umap")):
        if importlib.util.find_spec(module) is not None:
            continue  # installed: nothing to refuse
        assert cli.main([*argv, "--qk-embedding", method]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and module in err[0] and "unip-toolkit[embed]" in err[0] and "pca" in err[0]
        assert not (tmp_path / "o").exists()
    assert cli.main([*argv, "--qk-embedding", "mds"]) == 2
    assert "pca" in capsys.readouterr().err


@pytest.mark.parametrize("method,module", [("tsne", "openTSNE"), ("umap", "umap")])
def test_tsne_and_umap_embed_every_head_with_a_fixed_seed(method, module):
    """With the extra installed (pip install 'unip-toolkit[embed]'): 2-D points per head, the same twice."""
    pytest.importorskip(module, reason=f"{module} is not installed (the optional extra 'embed')")
    x = torch.randn(2, 60, 8, generator=torch.Generator().manual_seed(0))
    a, b = explorer.embed_2d(x, method), explorer.embed_2d(x, method)
    assert a.shape == (2, 60, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b)
