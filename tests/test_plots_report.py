"""Figures and the report built from synthetic analyses (no model needed): shapes, contents, files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")

from unip_analysis import plots, report, selection  # noqa: E402
from unip_analysis.analyze import ModelAnalysis, model_entry  # noqa: E402
from unip_analysis.patterns import Thresholds  # noqa: E402

TH = Thresholds(0.05, 0.2, source="given for the test")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic(
    name: str,
    depth: int,
    heads: int = 3,
    n_images: int = 5,
    seed: int = 0,
    image: Path | None = None,
    curve=None,
) -> ModelAnalysis:
    """An analysis whose layer NMI falls from local (0.35) to global (0.01) over depth."""
    rng = np.random.default_rng(seed)
    grid = (4, 4)
    curve = np.linspace(0.35, 0.01, depth) if curve is None else np.asarray(curve, dtype=float)
    head_nmi = [np.clip(v + 0.01 * rng.standard_normal((n_images, heads)), 0.0, 1.0) for v in curve]
    head_dist = [
        np.full((n_images, heads), 4.0 + 20.0 * i / depth) + rng.random((n_images, heads))
        for i in range(depth)
    ]
    maps = [rng.dirichlet(np.ones(16), size=(1, 2, heads)).reshape(1, 2, heads, *grid) for _ in range(depth)]
    # sinks grow with depth, as in trained ViTs: the last layers send most attention to cls (token 0)
    sink = [np.clip(0.1 + 0.8 * i / max(depth - 1, 1) + 0.02 * rng.standard_normal((n_images, heads)), 0, 1)
            for i in range(depth)]  # fmt: skip
    tokens = [np.full((n_images, heads), 0 if s.mean() >= 0.5 else 1 + i % 16) for i, s in enumerate(sink)]
    return ModelAnalysis(
        name=name,
        family="timm",
        arch="vit_test",
        weights=str(image or "weights.safetensors"),
        weights_sha256="0" * 64,
        depth=depth,
        embed_dim=48,
        patch_size=8,
        num_prefix_tokens=1,
        heads_per_layer=[heads] * depth,
        img_size=32,
        grid=grid,
        head_nmi=head_nmi,
        head_distance=head_dist,
        query_points=[(0.5, 0.5), (0.25, 0.75)],
        query_tokens=[10, 7],
        query_maps=maps,
        map_images=[str(image)] if image else ["missing.png"],
        notes=["pos_embed resized from 14x14 to 4x4"],
        head_sink_share=sink,
        head_prefix_share=[np.where(t == 0, s, 0.05) for s, t in zip(sink, tokens)],
        head_sink_token=tokens,
        head_sink_key_ratio=[1.0 + 3.0 * s for s in sink],
        prefix_names=["cls"],
    )


@pytest.fixture
def analyses(tmp_path: Path) -> list[ModelAnalysis]:
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48), dtype=np.uint8)).save(img)
    return [synthetic("deep<12>", 12, image=img), synthetic("shallow_6", 6, heads=2, seed=1)]


def _doc(analyses: list[ModelAnalysis], layers: dict | None = None, fallback: str = "nearest") -> dict:
    layers = layers or {}
    entries = {a.name: model_entry(a, TH, layers.get(a.name), fallback, n_boot=50) for a in analyses}
    return report.build_document(entries, TH, "imgs", 5, 32, "infrared")


def test_document_validates_and_tables_are_tidy(analyses):
    doc = _doc(analyses)
    assert selection.validate(doc) is doc
    assert doc["generator"].startswith("unip-analyze ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])
    assert doc["images"] == {
        "dir": str(Path("imgs").resolve()),
        "count": 5,
        "img_size": 32,
        "norm": "infrared",
    }
    assert doc["thresholds"] == {"global_max": 0.05, "local_min": 0.2}

    layers = report.layer_frame(doc)
    assert len(layers) == 12 + 6
    assert layers.groupby("model")["selected"].sum().to_dict() == {"deep<12>": 1, "shallow_6": 1}
    sel = layers[layers["selected"]]
    assert set(sel["pattern"]) == {"hybrid"}  # the curves cross the hybrid band: deepest hybrid wins
    assert (layers["nmi_ci_lo"] <= layers["nmi"]).all() and (layers["nmi"] <= layers["nmi_ci_hi"]).all()

    stats = report.stats_frame(analyses, doc)
    assert list(stats.columns) == report.STATS_COLUMNS
    assert len(stats) == 12 * 3 + 6 * 2
    deep = stats[stats["model"] == "deep<12>"]
    assert deep.groupby("layer")["head"].apply(list).iloc[0] == [1, 2, 3]
    # per head, over images: the sink columns of layer_stats.csv
    last = deep[deep["layer"] == 12].sort_values("head")
    assert np.allclose(last["sink_share"], analyses[0].head_sink_share[11].mean(axis=0))
    assert np.allclose(last["prefix_share"], analyses[0].head_prefix_share[11].mean(axis=0))
    assert list(last["sink_token"]) == ["cls"] * 3
    assert doc["models"]["deep<12>"]["layers"][11]["sink_share"] == pytest.approx(last["sink_share"].mean())
    # The layer's NMI is the mean of its heads' NMI (over images and heads).
    np.testing.assert_allclose(
        deep.groupby("layer")["nmi"].mean(), deep.groupby("layer")["layer_nmi"].first()
    )
    chosen = doc["models"]["deep<12>"]["selected_layer"]
    assert set(deep.loc[deep["selected"], "layer"]) == {chosen}


def test_nmi_curves_relative_depth_bands_and_selected_marker(analyses):
    doc = _doc(analyses)
    fig = plots.plot_nmi_curves(report.layer_frame(doc), TH)
    ax = fig.axes[0]
    assert "relative depth" in ax.get_xlabel()  # depths 12 and 6 differ
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{a.name} (layer {doc['models'][a.name]['selected_layer']})" for a in analyses]
    band_texts = {t.get_text() for t in ax.texts}
    assert {"local", "hybrid", "global"} <= band_texts
    assert len(ax.collections) >= 2  # one CI band per model
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == 2
    x_sel = stars[0].get_xdata()[0]
    assert x_sel == pytest.approx(doc["models"]["deep<12>"]["selected_layer"] / 12)
    assert plots.png_bytes(fig).startswith(PNG_MAGIC)


def test_plots_accept_a_plain_layer_table_and_an_axes(analyses):
    import matplotlib.pyplot as plt

    one = analyses[0].layer_table(TH, n_boot=20)  # no depth / selected columns
    fig, ax = plt.subplots()
    assert plots.plot_nmi_curves(one, TH, ax=ax) is fig
    assert ax.get_xlabel().startswith("layer")
    assert (
        plots.plot_attn_distance({"renamed": one}).axes[0].get_legend().get_texts()[0].get_text() == "renamed"
    )
    plt.close("all")
    with pytest.raises(ValueError, match="x must be"):
        plots.plot_nmi_curves(one, TH, x="sideways")


def test_pattern_heatmap_blank_beyond_a_models_depth(analyses):
    doc = _doc(analyses)
    fig = plots.plot_pattern_heatmap(report.layer_frame(doc))
    ax = fig.axes[0]
    data = ax.images[0].get_array()
    assert data.shape == (2, 12)
    assert data.mask[1, 6:].all() and not data.mask[1, :6].any()
    codes = [int(v) for v in data[0]]
    assert codes[0] == 0 and codes[-1] == 2  # local first, global last
    assert len([t for t in ax.texts]) == 12 + 6  # NMI written in every real cell
    assert len(ax.patches) == 2  # a box around each selected layer


def test_attention_maps_grid(analyses):
    res = analyses[0]
    assert plots.map_layers(12, 9) == [1, 4, 8, 9, 12]
    assert plots.map_layers(4, None) == [1, 3, 4]
    fig = plots.plot_attention_maps(res, selected=9)
    axes = np.array(fig.axes).reshape(2, 5)  # 1 image x 2 points, 5 layers
    assert axes[0, 3].get_title() == "layer 9 (selected)"
    assert len(axes[0, 0].images) == 2  # image underneath, map on top
    # A missing image file still draws the maps, alone.
    fig2 = plots.plot_attention_maps(analyses[1])
    assert len(fig2.axes[0].images) == 1
    empty = synthetic("x", 3)
    empty.query_maps = [np.zeros((0,))] * 3
    with pytest.raises(ValueError, match="no attention maps"):
        plots.plot_attention_maps(empty)


def test_figure_names_are_file_safe_and_distinct():
    names = report.figure_names(["a/b", "a b", "ok-1.2", "..", "A_B"])
    assert names == {
        "a/b": "attention_maps_a_b.png",
        "a b": "attention_maps_a_b_2.png",
        "ok-1.2": "attention_maps_ok-1.2.png",
        "..": "attention_maps_model.png",
        "A_B": "attention_maps_A_B_3.png",
    }


def test_html_is_self_contained_and_complete(analyses):
    doc = _doc(analyses)
    figs = report.render_figures(analyses, doc, TH)
    assert set(figs) == {
        "nmi_curves.png",
        "attn_distance.png",
        "pattern_heatmap.png",
        "attention_maps_deep_12.png",
        "attention_maps_shallow_6.png",
    }
    page = report.render_html(doc, figs, TH.source, {"deep<12>": analyses[0].notes})
    assert page.count("data:image/png;base64,") == 5
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script" not in page and "<link" not in page
    assert "deep&lt;12&gt;" in page and "deep<12>" not in page  # names escaped
    assert "shallow_6" in page and "given for the test" in page and "pos_embed resized" in page
    assert "0" * 64 in page  # sha256
    chosen = doc["models"]["shallow_6"]["selected_layer"]
    assert f"{doc['models']['shallow_6']['layers'][chosen - 1]['nmi']:.4f}" in page


def test_summary_explains_fallback_and_override():
    flat = [
        synthetic("flat", 4, curve=[0.3, 0.28, 0.25, 0.24]),
        synthetic("pick", 4, curve=[0.3, 0.28, 0.25, 0.24]),
    ]
    doc = _doc(flat, layers={"pick": 2})
    lines = report.selection_summary(doc)
    text = "\n".join(lines)
    assert lines[0].startswith("flat: layer 4 of 4") and "fallback" in lines[0]
    assert "no layer of flat is hybrid" in text and "closest to the band" in text
    assert "pick: layer 2 of 4" in text and "override" in text and "--layer choice is used" in text
    none = report.selection_summary(_doc(flat[:1], fallback="none"))
    assert none[0].startswith("flat: no layer selected") and "pass --layer N" in none[1]


def test_write_report_writes_everything_atomically(analyses, tmp_path):
    rep = report.build_report(
        analyses, {a.name: model_entry(a, TH, n_boot=20) for a in analyses}, TH, "imgs", 5, "infmix"
    )
    out = tmp_path / "out"
    written = report.write_report(rep, out)
    assert list(written)[-1] == "layer selection"  # the JSON last: its presence marks a finished run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["layer_selection.json", "layer_stats.csv", "report.html"] + [f"figures/{f}" for f in rep.figures]
    )
    assert selection.read(out / "layer_selection.json")["images"]["norm"] == "infmix"
    assert json.loads((out / "layer_selection.json").read_text()) == rep.doc
    for f in rep.figures:
        assert (out / "figures" / f).read_bytes().startswith(PNG_MAGIC)


def test_compare_profiles_states_difference_or_its_absence():
    from unip_analysis.report import compare_profiles

    def model(nmis, width=0.01):
        layers = [
            {"layer": i + 1, "nmi": v, "nmi_ci95": [v - width, v + width], "pattern": "hybrid"}
            for i, v in enumerate(nmis)
        ]
        return {"depth": len(nmis), "layers": layers, "selected_layer": len(nmis)}

    doc = {"models": {"mim": model([0.3, 0.3, 0.3, 0.3]), "sup": model([0.3, 0.3, 0.1, 0.05])}}
    (line,) = compare_profiles(doc)
    assert "differ at 2 of 4 layers" in line and "layers 3, 4" in line
    doc = {"models": {"a": model([0.3, 0.2]), "b": model([0.305, 0.21])}}
    assert "do NOT differ" in compare_profiles(doc)[0]


def test_robustness_in_the_summary_the_html_and_the_json():
    th = Thresholds(0.015, 0.2, source="given for the test")
    near = synthetic("near", 4, curve=[0.3, 0.4, 0.135, 0.025])  # layer 4 just above global_max
    far = synthetic("far", 3, curve=[0.3, 0.4, 0.135], seed=2)  # layer 3 hybrid in every moved band
    entries = {a.name: model_entry(a, th, n_boot=50) for a in (near, far)}
    doc = report.build_document(entries, th, "imgs", 5, 32, "infrared", nmi_definition="unip")
    assert (
        doc["models"]["near"]["robustness"]["fragile"] and not doc["models"]["far"]["robustness"]["fragile"]
    )
    lines = report.robustness_summary(doc)
    verdicts = [line for line in lines if not line.startswith(" ")]
    assert verdicts == [
        "near: FRAGILE: the rule selects layer 4, but 3 when the bands move within "
        "global_max x0.5-8, local_min x0.75-1.25",
        "far: robust: the rule selects layer 3 for every band in global_max x0.5-8, local_min x0.75-1.25",
    ]
    text = "\n".join(lines)
    assert "global_max x2" in text and "local_min x1.25" in text
    assert "layer 4 (the rule's layer): NMI - global_max = +0.01" in text
    header, grid, margins = report.robustness_rows(doc["models"]["near"])
    assert header == [
        "rule's layer",
        "local_min x0.75 (0.15)",
        "local_min x1 (0.2)",
        "local_min x1.25 (0.25)",
    ]
    assert [row[0] for row in grid] == [f"global_max x{f:g} ({0.015 * f:.4g})" for f in (0.5, 1, 2, 4, 8)]
    assert grid[1][1:] == ["4", "4", "4"] and grid[2][1:] == ["3", "3", "3"]
    assert [row[:2] for row in margins] == [
        ["1", "local_min"],
        ["2", "local_min"],
        ["3", "local_min"],
        ["4", "global_max"],
    ]
    page = report.render_html(doc, {}, th.source)
    assert page.count("How robust the selection is") == 2
    assert "near: FRAGILE" in page and "far: robust" in page and "CI contains the edge" in page
    assert "published NMI (whole map, prefix tokens kept)" in page  # the recorded definition
    old = {k: v for k, v in doc.items() if k != "nmi_definition"}
    assert "NMI (patch tokens, rows renormalised)" in report.render_html(old, {}, th.source)


def test_report_names_the_nmi_definition_and_refuses_a_mixture(analyses, monkeypatch):
    table = report.layer_frame(_doc(analyses))
    ax = plots.plot_nmi_curves(table, TH, nmi_definition="unip").axes[0]
    assert "unip definition" in ax.get_ylabel()
    drawn = []
    plot = plots.plot_nmi_curves
    monkeypatch.setattr(plots, "plot_nmi_curves", lambda *a, **k: drawn.append(k) or plot(*a, **k))
    unip = synthetic("u", 4)
    unip.nmi_definition = "unip"
    rep = report.build_report([unip], {"u": model_entry(unip, TH, n_boot=20)}, TH, "imgs", 5, "infrared")
    assert rep.doc["nmi_definition"] == "unip" and drawn[-1]["nmi_definition"] == "unip"
    with pytest.raises(ValueError, match="different NMI definitions"):
        report.build_report(
            [analyses[0], unip], {a.name: model_entry(a, TH, n_boot=20) for a in (analyses[0], unip)},
            TH, "imgs", 5, "infrared",
        )  # fmt: skip


def test_report_comes_from_its_templates_byte_stable_and_offline(analyses):
    """report.html is rendered from unip_analysis/templates (report.html.j2 and its macros), with
    static/report.css inlined: the same inputs give the same bytes, and nothing is fetched."""
    from importlib import resources

    doc = _doc(analyses)
    figs = {"nmi_curves.png": PNG_MAGIC + b"a", "attention_maps_deep_12.png": PNG_MAGIC + b"b"}
    section = '<div class="unip-explorer">the explorer section</div>'
    first = report.render_html(doc, figs, TH.source, {"deep<12>": ["a note"]}, section)
    assert first == report.render_html(doc, figs, TH.source, {"deep<12>": ["a note"]}, section)
    assert not re.search(r"https?://", first)  # no CDN, no external anything
    assert "<link" not in first and "<script" not in first
    css = resources.files("unip_analysis").joinpath("static", "report.css").read_text()
    assert f"<style>\n{css}</style>" in first
    assert first.count("<table>") == 2 + 4 * len(analyses)  # selected, thresholds; per model 4
    assert section in first and first.index(section) < first.index("<h2>deep&lt;12&gt;</h2>")
    template = resources.files("unip_analysis").joinpath("templates", "report.html.j2").read_text()
    assert "Attention-pattern analysis" in template  # the page's text lives in the template
