"""The attention explorer: what report.html shows, read back through its JavaScript API in Debian's
chromium (headless, driven by playwright, no browser download), equals the attention computed in
Python within the documented quantisation; the page references nothing outside itself; the budget
planner reduces and says so; the Jupyter entry point returns the same rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from attention_reference import ATTENTION_ARCHS, randomize
from conftest import TINY_ARCH, TINY_IMG, write_images

from unip_analysis import analyze, attention, checkpoints, explorer, explorer_widget, report
from unip_analysis.patterns import default_thresholds

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
EXPLORE = 2


class TensorImages(torch.utils.data.Dataset):
    """Random normalised images of any shape (non-square grids), as an analysis dataset."""

    def __init__(self, n: int, shape: tuple[int, int], seed: int = 0):
        self.x = torch.randn(n, 3, *shape, generator=torch.Generator().manual_seed(seed))
        self.files = [f"random_{i}.png" for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def backbone(arch: str, img_size, seed: int = 0) -> checkpoints.LoadedBackbone:
    torch.manual_seed(seed)
    model = checkpoints.build_vit(arch, img_size=img_size).eval()
    with torch.no_grad():  # larger q and k than the initialisation: sharper, less uniform attention
        if arch in ATTENTION_ARCHS.values():
            randomize(model, seed, scale=0.15)  # position tables and biases random too
        else:
            for blk in model.blocks:
                blk.attn.qkv.weight.mul_(4.0)
    size = img_size if isinstance(img_size, int) else img_size[0]
    return checkpoints.LoadedBackbone(model, "timm", arch, "random", "0" * 64, size)


CASES = {
    # name: (arch, img_size)
    "plain": (TINY_ARCH, TINY_IMG),
    "registers": ("vit_tiny_patch16_224(depth=3,embed_dim=64,num_heads=2,patch_size=8,reg_tokens=2)", 32),
    "no_cls": (
        "vit_tiny_patch16_224(depth=3,embed_dim=64,num_heads=2,patch_size=8,class_token=False,global_pool='avg')",
        32,
    ),
    "wide": ("vit_tiny_patch16_224(depth=3,embed_dim=64,num_heads=2,patch_size=8)", (32, 64)),
    "beit": ("beit_base_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)", 32),
    # the other attention classes and position terms (tests/attention_reference.py)
    "beit_shared": (ATTENTION_ARCHS["beit_shared"], 32),
    "eva02": (ATTENTION_ARCHS["eva02_separate_qkv"], 32),
    "rope_mixed": (ATTENTION_ARCHS["rope_mixed"], 32),
    "deit_distilled": (ATTENTION_ARCHS["deit_distilled"], 32),
}


def analysed(case: str):
    arch, size = CASES[case]
    bb = backbone(arch, size)
    shape = (size, size) if isinstance(size, int) else size
    data = TensorImages(3, shape, seed=1)
    res = analyze.analyze_backbone(bb, data, name=case, batch_size=2, progress=False, explore_images=EXPLORE)
    return bb, data, res


def page_of(analyses: list, tmp_path: Path) -> Path:
    th = default_thresholds(analyses[0].grid)
    entries = {a.name: analyze.model_entry(a, th, n_boot=20) for a in analyses}
    rep = report.build_report(analyses, entries, th, tmp_path, 3, "imagenet")
    path = tmp_path / f"report_{'_'.join(a.name for a in analyses)}.html"
    path.write_text(rep.html)
    return path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_report(browser, path: Path):
    """The page, loaded with every non-file request refused and recorded; waits for the API."""
    page = browser.new_page()
    errors, outside = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(("file:", "data:"))
            else (
                outside.append(route.request.url),
                route.abort(),
            )
        ),
    )
    page.goto(path.as_uri())
    page.evaluate("window.unipExplorer.ready.then(() => true)")
    assert page.get_attribute("[data-unip-explorer]", "data-ready") == "true"
    return page, errors, outside


def expected_rows(bb, data, layer: int, image: int) -> torch.Tensor:
    """Python's attention of one image at ``layer`` (1-based): softmax of layer_qk_logits, fp64."""
    with torch.no_grad():
        logits = attention.layer_qk_logits(bb.model, data[image][None], layer - 1)
    return logits.double().softmax(-1)[0]  # [heads, tokens, tokens]


def check_rows(page, bb, data, res, queries=None, goal: float | None = None) -> int:
    """Rows read back from the page equal Python's computation from the stored data, and are within
    the measured error (and ``goal``, when given) of the model's own attention, in units of the
    row's maximum over the patch keys. ``queries``: every stored one when "all"."""
    ex, npt = res.explorer, res.num_prefix_tokens
    if queries == "all":
        queries = ex.queries
    asked = [
        [res.name, image, layer, head, query]
        for image in range(len(ex.images))
        for layer in range(1, res.depth + 1)
        for query in queries or [0, len(ex.queries) // 2, ex.queries[-1]]
        for head in [*range(res.heads_per_layer[layer - 1]), "mean"]
    ]
    shown = page.evaluate(  # one call for every row: the page computes each as it would to draw it
        "asked => asked.map((a) => [unipExplorer.row(...a), unipExplorer.prefixShare(...a)])", asked
    )
    true = {}
    for (_, image, layer, head, query), (got, share) in zip(asked, shown):
        if (image, layer) not in true:
            true[image, layer] = expected_rows(bb, data, layer, image)
        t = true[image, layer]
        measured = float(ex.errors[ex.encoding][image, layer - 1, query])
        got = np.array(got)
        assert got.shape == (res.grid[0] * res.grid[1],)
        # exactly what Python computes from the stored values
        np.testing.assert_allclose(got, explorer.row(ex, image, layer, head, query), rtol=0, atol=1e-12)
        # stored rows: each patch value rounded to 1/255 of the row maximum
        rounding = 1e-12 if ex.encoding.startswith("qk") else got.size * got.max() / 510
        assert got.sum() + share == pytest.approx(1.0, abs=rounding + 1e-7)
        want = (t[:, npt + query].mean(0) if head == "mean" else t[head, npt + query]).numpy()
        err = np.abs(got - want[npt:]).max() / want[npt:].max()
        assert err <= measured * 1.01 + 1e-5, (case_name(res), layer, head, err, measured)
        if goal is not None:
            assert err <= goal, (case_name(res), image, layer, head, query, err)
        # the prefix share: fp32 as stored rows, else as exact as q and k
        assert abs(share - want[:npt].sum()) <= {"rows-u8": 1e-5, "qk-f16": 1e-4}.get(ex.encoding, 2e-2)
    return len(asked)


def case_name(res) -> str:
    return f"{res.name} ({res.explorer.encoding}, stride {res.explorer.query_stride})"


def only(monkeypatch, encoding: str, stride: int = 1) -> None:
    """Make ``encoding`` at ``stride`` the only option (to test each one's path through the page)."""
    monkeypatch.setattr(explorer, "option_order", lambda data: [(encoding, stride)])


ROWS_CASES = (
    "plain",
    "registers",
    "no_cls",
    "wide",
    "beit",
)  # stored rows do not depend on the attention class


@pytest.mark.parametrize(
    "case,encoding",
    [(c, "qk-f16") for c in CASES] + [(c, "rows-u8") for c in ROWS_CASES],
)
def test_rows_read_back_from_the_browser_equal_pythons_attention(
    case, encoding, browser, tmp_path, monkeypatch
):
    only(monkeypatch, encoding)
    bb, data, res = analysed(case)
    assert res.explorer.encoding == encoding and res.explorer.reductions == []
    assert sorted(res.explorer.layers) == sorted(explorer.ENCODINGS)  # every candidate recorded and measured
    expected_layout = (
        {"registers": 3, "no_cls": 0, "deit_distilled": 2}.get(case, 1),
        {"wide": (4, 8)}.get(case, (4, 4)),
    )
    assert (res.num_prefix_tokens, res.grid) == expected_layout
    if case in ("beit", "beit_shared"):  # the relative position bias is stored and used
        assert all(b is not None for b in res.explorer.bias)
    page, errors, outside = open_report(browser, page_of([res], tmp_path))
    api = page.evaluate(
        "m => [unipExplorer.models(), unipExplorer.images(m), unipExplorer.layers(m), unipExplorer.heads(m, 1), unipExplorer.grid(m)]",
        case,
    )
    assert api == [[case], EXPLORE, res.depth, res.heads_per_layer[0], list(res.grid)]
    assert check_rows(page, bb, data, res) > 0
    assert not errors and not outside
    page.close()


def test_int8_encoding_and_two_models_side_by_side(browser, tmp_path, monkeypatch):
    """int8 q and k (the last resort), said in the page with its measured error; two models on the
    same image, in sync."""
    only(monkeypatch, "qk-i8")
    bb, data, res = analysed("plain")
    assert res.explorer.encoding == "qk-i8" and res.explorer.query_stride == 1
    _, _, other = analysed("registers")
    page, errors, outside = open_report(browser, page_of([res, other], tmp_path))
    check_rows(page, bb, data, res)
    text = page.inner_text("[data-unip-explorer]")
    assert (
        f"q and k as int8 with a scale per token and head: every shown row within {explorer.percent(res.explorer.error())}"
        in text
    )
    assert "measured error at this layer and image" in text
    # a click on the first model's map moves both panels' query; the small maps are every layer x head
    page.evaluate("unipExplorer.set({layer: 2, head: 1, image: 1})")
    big = page.locator("canvas.ux-big").first
    box = big.bounding_box()
    big.click(position={"x": box["width"] * 0.9, "y": box["height"] * 0.1})
    state = page.evaluate("unipExplorer.state()")
    assert state["query"] == 3 and state["models"] == ["plain", "registers"]
    shown = page.evaluate("unipExplorer.displayed()")
    for name, a in (("plain", res), ("registers", other)):
        assert shown[name]["query"] == 3 and shown[name]["layer"] == 2 and shown[name]["image"] == 1
        np.testing.assert_allclose(shown[name]["row"], explorer.row(a.explorer, 1, 2, 1, 3), atol=1e-12)
    panels = page.locator(".ux-panel")
    assert panels.count() == 2
    assert panels.nth(0).locator(".ux-cell").count() == res.depth * 2
    assert panels.nth(0).locator(".ux-cell.ux-sel-layer").count() == 2  # layer 2's heads are marked
    page.locator("[data-unip-explorer]").press("ArrowDown")
    assert page.evaluate("unipExplorer.state().query") == 7
    page.locator("[data-unip-explorer]").press("Shift+ArrowDown")
    assert page.evaluate("unipExplorer.state().layer") == 3
    assert not errors and not outside
    page.close()


def test_report_references_nothing_outside_itself(tmp_path):
    _, _, res = analysed("plain")
    html = page_of([res], tmp_path).read_text()
    assert html.count("data-unip-explorer") >= 1
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:|//)""", html, re.I)
    assert not re.search(
        r"\bfetch\s*\(|XMLHttpRequest|WebSocket|import\s*\(|@import|require\s*\(|https?://", html
    )


def test_planner_keeps_every_image_unless_the_keys_alone_are_over():
    vit_b = explorer.ModelShape((12,) * 12, (64,) * 12, (14, 14), 1)
    plan = explorer.plan_explorer(vit_b, 4)
    assert plan.images == 4 and plan.encodings == explorer.ENCODINGS and plan.reductions == []
    assert plan.budget == explorer.BUDGET_BYTES == 60_000_000
    vit_l = explorer.ModelShape((16,) * 24, (64,) * 24, (14, 14), 1)
    assert explorer.plan_images([vit_l, vit_b], 4) == (4, [])  # ViT-L + ViT-B: the same 4 images
    hi = explorer.ModelShape((12,) * 12, (64,) * 12, (64, 64), 1)  # 1,024 px: the keys alone are 40 MB
    plan = explorer.plan_explorer(hi, 4)
    assert plan.images == 1 and "1 of the 4 images" in plan.reductions[0]
    assert plan.encodings == ("qk-f16", "qk-i8")  # 4,096^2 rows are out of reach
    n, notes = explorer.plan_images([hi, hi], 4)  # two such models: the images of both go together
    assert n == 1 and "over the 60 MB budget" in notes[-1]
    assert explorer.query_indices((4, 6), 2) == [0, 2, 4, 12, 14, 16]


def test_analysis_without_explorer_keeps_nothing(image_dir):
    bb = backbone(TINY_ARCH, TINY_IMG)
    res = analyze.analyze_backbone(bb, analyze.image_dataset(image_dir, TINY_IMG), progress=False)
    assert res.explorer is None


def test_explore_for_jupyter_returns_the_displayed_rows(tmp_path):
    """explore() from backbones and a folder: query settable from Python, rows back as numpy
    arrays, the same as the analysis' data; the widget carries the report's JS module."""
    images = write_images(tmp_path / "imgs", n=3)
    a, b = backbone(TINY_ARCH, TINY_IMG), backbone(CASES["registers"][0], 32, seed=3)
    w = explorer_widget.explore({"a": a, "b": b}, images, explore_images=2)
    assert "unipExplorerMount" in w._esm and "export default" in w._esm
    w.set(query=(1, 2), layer=3, head="mean", image=1)
    assert w.state["query"] == 6
    rows = w.displayed_rows()
    assert set(rows) == {"a", "b"} and all(
        isinstance(r, np.ndarray) and r.shape == (16,) for r in rows.values()
    )
    np.testing.assert_allclose(rows["b"], w.row("b", 1, 3, "mean", 6))
    with torch.no_grad():
        x = analyze.image_dataset(images, TINY_IMG)[1][None]
        true = attention.layer_qk_logits(a.model, x, 2).double().softmax(-1)[0, :, 1 + 6, 1:].mean(0)
    # stored rows: within half a uint8 step of the row's maximum
    np.testing.assert_allclose(rows["a"], true.numpy(), rtol=0, atol=float(true.max()) / 510 + 1e-7)
    bundle = w._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data and "<iframe srcdoc=" in data["text/html"]
    static = explorer_widget.explore([w.base.analyses["a"]], widget=False)
    assert isinstance(static, explorer_widget.Explorer) and "data-unip-explorer" in static.html()


def test_explore_refuses_an_analysis_without_explorer_data(image_dir):
    res = analyze.analyze_backbone(
        backbone(TINY_ARCH, TINY_IMG), analyze.image_dataset(image_dir, TINY_IMG), progress=False
    )
    with pytest.raises(ValueError, match="no explorer data"):
        explorer_widget.explore(res)


WIDGET_HOST = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><div id="el"></div>
<script type="application/json" id="state">__STATE__</script>
<script type="module">
// A minimal anywidget host: the model API the widget's ES module uses (get, set, on, save_changes).
const data = JSON.parse(document.getElementById("state").textContent), handlers = {};
const model = {
  get: (k) => data[k],
  set: (k, v) => { data[k] = v; },
  on: (ev, f) => { (handlers[ev] = handlers[ev] || []).push(f); },
  save_changes: () => { window.saves = (window.saves || 0) + 1; },
};
const url = URL.createObjectURL(new Blob([data._esm], {type: "text/javascript"}));
const mod = await import(url);
mod.default.render({model, el: document.getElementById("el")});
window.host = {data, handlers, fromPython(state) { data.state = state; handlers["change:state"].forEach((f) => f()); }};
</script></body></html>"""


def test_widget_module_renders_and_syncs_in_the_browser(browser, tmp_path):
    """The anywidget ES module (the report's JS plus render()) in chromium under a minimal host:
    the state set from Python moves the view, and the rows it sends back equal Python's."""
    images = write_images(tmp_path / "imgs", n=2)
    w = explorer_widget.explore({"a": backbone(TINY_ARCH, TINY_IMG)}, images, explore_images=2)
    w.set(query=5, layer=3, head=0, image=1)  # before the view opens: its first render shows it
    state = {"_esm": w._esm, "meta": w.meta, "blobs": w.blobs, "state": w.state, "displayed": {}}
    page_path = tmp_path / "host.html"
    page_path.write_text(WIDGET_HOST.replace("__STATE__", json.dumps(state).replace("</", "<\\/")))
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())
    page.wait_for_selector(".unip-explorer[data-ready='true']")
    page.wait_for_function("window.host && Object.keys(window.host.data.displayed).length > 0")
    first = page.evaluate("window.host.data")
    assert first["state"] == {"image": 1, "layer": 3, "head": 0, "query": 5}
    np.testing.assert_allclose(first["displayed"]["a"]["row"], w.displayed_rows()["a"], rtol=0, atol=1e-12)
    w.set(query=(3, 1), layer=2, head=1, image=1)
    page.evaluate("s => window.host.fromPython(s)", w.state)
    shown = page.evaluate("window.host.data.displayed")
    assert shown["a"]["query"] == 13 and shown["a"]["layer"] == 2 and shown["a"]["head"] == 1
    np.testing.assert_allclose(shown["a"]["row"], w.displayed_rows()["a"], rtol=0, atol=1e-12)
    # a click in the browser goes back to Python's side of the state
    big = page.locator("canvas.ux-big")
    box = big.bounding_box()
    big.click(position={"x": box["width"] * 0.1, "y": box["height"] * 0.1})
    assert page.evaluate("window.host.data.state.query") == 0
    assert not errors
    page.close()


def test_cli_explore_images_default_and_off(tiny_timm_checkpoint, image_dir, tmp_path, capsys):
    from unip_analysis import cli

    arch, path = tiny_timm_checkpoint
    common = [
        "--checkpoint",
        f"t=timm:{arch}:{path}",
        "--images",
        str(image_dir),
        "--img-size",
        str(TINY_IMG),
    ]
    common += ["--no-progress", "--bootstrap", "20"]
    assert cli.main([*common, "--out", str(tmp_path / "on")]) == 0
    page = (tmp_path / "on" / "report.html").read_text()
    assert "data-unip-explorer" in page and "Attention explorer" in page
    meta = re.search(r'<script type="application/json" class="ux-meta">(.*?)</script>', page, re.S).group(1)
    assert len(json.loads(meta)["models"][0]["images"]) == explorer.DEFAULT_EXPLORE_IMAGES
    assert cli.main([*common, "--out", str(tmp_path / "off"), "--explore-images", "0"]) == 0
    page = (tmp_path / "off" / "report.html").read_text()
    assert "data-unip-explorer" not in page and "<script" not in page
    capsys.readouterr()


def test_query_stride_stores_every_other_query_and_snaps(browser, tmp_path, monkeypatch):
    """Past the budget with a query stride: only those queries are stored, row() of another is
    null, a click snaps to the nearest stored query, and the page says what was reduced."""
    only(monkeypatch, "qk-i8", 2)
    bb, data, res = analysed("wide")
    assert res.explorer.queries == [0, 2, 4, 6, 16, 18, 20, 22]
    page, errors, outside = open_report(browser, page_of([res], tmp_path))
    assert page.evaluate("unipExplorer.row('wide', 0, 1, 0, 1)") is None
    check_rows(page, bb, data, res, queries=[0, 6, 18])
    big = page.locator("canvas.ux-big")
    box = big.bounding_box()
    big.click(position={"x": box["width"] * (3.2 / 8), "y": box["height"] * (1.2 / 4)})  # patch (1, 3)
    assert page.evaluate("unipExplorer.state().query") == 20  # (1, 3) -> (2, 4): halves round up
    assert explorer_widget._snap(res.explorer, 1, 3) == 20  # the same in Python (Explorer.displayed_rows)
    assert "reduced: query stride 2" in page.inner_text("[data-unip-explorer]")
    assert not errors and not outside
    page.close()
