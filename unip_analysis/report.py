"""The outputs of one analysis run, built in memory first and written only at the end.

- :func:`build_document`  the ``layer_selection.json`` document (schema: :mod:`unip_analysis.selection`)
- :func:`layer_frame`     tidy per-layer table of a document (model, layer, nmi, CI, pattern, selected)
- :func:`stats_frame`     tidy per-head table (``layer_stats.csv``)
- :func:`render_figures`  the PNG figures, as bytes
- :func:`render_html`     one self-contained ``report.html`` (figures embedded as base64, no external files)
- :func:`write_report`    every file, each atomically, the JSON last

Notebook use::

    doc = report.build_document({"mae_b": analyze.model_entry(res, th)}, th, "imgs/", len(ds), 224, "infrared")
    report.layer_frame(doc)
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import __version__, explorer, plots, selection
from .analyze import ModelAnalysis
from .files import atomic_write_bytes, atomic_write_text
from .metrics import NMI_LABELS
from .patterns import Thresholds

GENERATOR = f"unip-analyze {__version__}"
STATS_FILENAME = "layer_stats.csv"
REPORT_FILENAME = "report.html"
FIGURES_DIR = "figures"
STATS_COLUMNS = [
    "model",
    "layer",
    "head",
    "nmi",
    "nmi_std",
    "attn_distance",
    "layer_nmi",
    "layer_pattern",
    "selected",
]


def build_document(
    entries: Mapping[str, dict],
    thresholds: Thresholds,
    images_dir: str | Path,
    image_count: int,
    img_size: int,
    norm: str,
    created: datetime | None = None,
    nmi_definition: str = selection.DEFAULT_NMI_DEFINITION,
) -> dict:
    """The whole ``layer_selection.json`` document (schema version 1), validated.

    ``entries`` maps model names to :func:`unip_analysis.analyze.model_entry` results, all
    measured with ``nmi_definition``.
    """
    created = created or datetime.now(timezone.utc)
    doc = {
        "schema_version": selection.SCHEMA_VERSION,
        "generator": GENERATOR,
        "created": created.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "nmi_definition": nmi_definition,
        "thresholds": {"global_max": float(thresholds.global_max), "local_min": float(thresholds.local_min)},
        "images": {
            "dir": str(Path(images_dir).resolve()),
            "count": int(image_count),
            "img_size": int(img_size),
            "norm": str(norm),
        },
        "models": dict(entries),
    }
    return selection.validate(doc, selection.FILENAME)


def layer_frame(doc: dict) -> pd.DataFrame:
    """One row per model x layer: model, layer, depth, heads, nmi, nmi_ci_lo/hi, attn_distance,
    pattern, selected (the input of :mod:`unip_analysis.plots`)."""
    rows = []
    for name, m in doc["models"].items():
        for lay in m["layers"]:
            rows.append(
                {
                    "model": name,
                    "layer": lay["layer"],
                    "depth": m["depth"],
                    "heads": m["heads_per_layer"][lay["layer"] - 1],
                    "nmi": lay["nmi"],
                    "nmi_ci_lo": lay["nmi_ci95"][0],
                    "nmi_ci_hi": lay["nmi_ci95"][1],
                    "attn_distance": lay["attn_distance"],
                    "pattern": lay["pattern"],
                    "selected": lay["layer"] == m["selected_layer"],
                }
            )
    return pd.DataFrame(rows)


def stats_frame(analyses: Sequence[ModelAnalysis], doc: dict) -> pd.DataFrame:
    """One row per model x layer x head (``layer_stats.csv``): head statistics over images,
    with the layer's NMI, pattern and whether it is the selected layer."""
    layers = layer_frame(doc)[["model", "layer", "nmi", "pattern", "selected"]].rename(
        columns={"nmi": "layer_nmi", "pattern": "layer_pattern"}
    )
    heads = pd.concat([res.head_table() for res in analyses], ignore_index=True)
    return heads.merge(layers, on=["model", "layer"], how="left", validate="many_to_one")[STATS_COLUMNS]


def figure_names(models: Sequence[str]) -> dict[str, str]:
    """File name of each model's attention-map figure: ``attention_maps_<model>.png``, made file-safe."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in models:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
        candidate, k = stem, 2
        while candidate.lower() in taken:
            candidate, k = f"{stem}_{k}", k + 1
        taken.add(candidate.lower())
        out[name] = f"attention_maps_{candidate}.png"
    return out


def render_figures(analyses: Sequence[ModelAnalysis], doc: dict, thresholds: Thresholds) -> dict[str, bytes]:
    """Figure file name -> PNG bytes: NMI curves, distance curves, pattern heat-map, attention maps."""
    table = layer_frame(doc)
    figs = {
        "nmi_curves.png": plots.png_bytes(
            plots.plot_nmi_curves(table, thresholds, nmi_definition=selection.nmi_definition(doc))
        ),
        "attn_distance.png": plots.png_bytes(plots.plot_attn_distance(table)),
        "pattern_heatmap.png": plots.png_bytes(plots.plot_pattern_heatmap(table)),
    }
    names = figure_names([res.name for res in analyses])
    for res in analyses:
        if not plots.has_maps(res):  # analysed with map_images=0
            continue
        selected = doc["models"][res.name]["selected_layer"]
        figs[names[res.name]] = plots.png_bytes(plots.plot_attention_maps(res, selected=selected))
    return figs


# --- text ----------------------------------------------------------------------------------


def selection_summary(doc: dict) -> list[str]:
    """Per model, one line with the selected layer and the rule; when no layer is hybrid, a
    second line says so and what the fallback did."""
    th = doc["thresholds"]
    lines = []
    for name, m in doc["models"].items():
        sel = m["selected_layer"]
        if sel is None:
            lines.append(f"{name}: no layer selected ({m['selection_rule']})")
        else:
            pattern = m["layers"][sel - 1]["pattern"]
            lines.append(
                f"{name}: layer {sel} of {m['depth']} ({m['selected_heads']} heads, {pattern}, "
                f"NMI {m['layers'][sel - 1]['nmi']:.4f}): {m['selection_rule']}"
            )
        if not any(lay["pattern"] == "hybrid" for lay in m["layers"]):
            nmis = [lay["nmi"] for lay in m["layers"]]
            what = (
                "pass --layer N to choose one, or --fallback nearest"
                if sel is None
                else (
                    "the user's --layer choice is used" if m["selection_rule"].startswith("override") else ""
                )
            )
            if not what:
                what = "the layer closest to the band is used instead (--fallback none to select nothing)"
            lines.append(
                f"  note: no layer of {name} is hybrid: layer NMI spans {min(nmis):.4f}..{max(nmis):.4f}, "
                f"the hybrid band is ({th['global_max']:.4f}, {th['local_min']:.4f}); {what}"
            )
    return lines


def robustness_rows(m: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """One model entry's ``robustness`` as text tables: (header, rows) of the rule's layer under
    moved bands, one row per global_max factor and one column per local_min factor ('-' where the
    moved edges cross), and per layer its margin to the nearest edge: [layer, edge, NMI - edge,
    95% interval, whether the interval contains the edge]. Empty for files without it."""
    rob = m.get("robustness")
    if rob is None:
        return [], [], []
    gmax = {c["global_max_factor"]: c["global_max"] for c in rob["moved_bands"]}
    lmin = {c["local_min_factor"]: c["local_min"] for c in rob["moved_bands"]}
    at = {(c["global_max_factor"], c["local_min_factor"]): c for c in rob["moved_bands"]}
    header = ["rule's layer", *(f"local_min x{g:g} ({v:.4g})" for g, v in lmin.items())]
    grid = []
    for f, v in gmax.items():
        cells = [at[f, g] for g in lmin]
        grid.append(
            [f"global_max x{f:g} ({v:.4g})"]
            + [("-" if not c["valid"] else str(c["selected_layer"] or "none")) for c in cells]
        )
    margins = [
        [
            str(mg["layer"]),
            mg["edge"],
            f"{mg['margin']:+.3g}",
            f"{mg['margin_ci95'][0]:+.3g} .. {mg['margin_ci95'][1]:+.3g}",
            "yes" if mg["edge_in_ci95"] else "",
        ]
        for mg in rob["margins"]
    ]
    return header, grid, margins


def robustness_verdict(name: str, m: dict) -> str:
    """One line: whether the rule's layer for model ``name`` survives the moved bands."""
    rob = m["robustness"]
    cells = rob["moved_bands"]
    gmax = [c["global_max_factor"] for c in cells]
    lmin = [c["local_min_factor"] for c in cells]
    span = f"global_max x{min(gmax):g}-{max(gmax):g}, local_min x{min(lmin):g}-{max(lmin):g}"
    rule = rob["rule_layer"] or "none"
    given = m["selected_layer"] != rob["rule_layer"] and m["selection_rule"].startswith("override")
    tail = f" (the selection itself, layer {m['selected_layer']}, was given with --layer)" if given else ""
    if not rob["fragile"]:
        return f"{name}: robust: the rule selects layer {rule} for every band in {span}{tail}"
    others = sorted({c["selected_layer"] or 0 for c in cells if c["valid"]} - {rob["rule_layer"] or 0})
    listing = ", ".join("none" if v == 0 else str(v) for v in others)
    return f"{name}: FRAGILE: the rule selects layer {rule}, but {listing} when the bands move within {span}{tail}"


def robustness_summary(doc: dict) -> list[str]:
    """For the terminal, per model: the verdict line, the moved-bands table, and the margins of
    the rule's layer and of the layer nearest an edge."""
    lines = []
    for name, m in doc["models"].items():
        if "robustness" not in m:
            continue
        rob = m["robustness"]
        lines.append(robustness_verdict(name, m))
        header, grid, _ = robustness_rows(m)
        widths = [max(len(r[i]) for r in [header, *grid]) for i in range(len(header))]
        for row in [header, *grid]:
            lines.append(
                "    "
                + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            )
        margins = rob["margins"]
        shown = [margins[rob["rule_layer"] - 1]] if rob["rule_layer"] else []
        nearest = min(margins, key=lambda mg: abs(mg["margin"]))
        shown += [nearest] if nearest not in shown else []
        for mg in shown:
            what = "the rule's layer" if mg["layer"] == rob["rule_layer"] else "nearest an edge"
            lo, hi = mg["margin_ci95"]
            lines.append(
                f"    layer {mg['layer']} ({what}): NMI - {mg['edge']} = {mg['margin']:+.3g} "
                f"(95% CI {lo:+.3g} .. {hi:+.3g}{', contains the edge' if mg['edge_in_ci95'] else ''})"
            )
    return lines


def compare_profiles(doc: dict) -> list[str]:
    """For each pair of models, whether their NMI-vs-depth profiles differ, stated plainly.

    Two profiles differ at a layer when the layers' 95% bootstrap intervals do not overlap.
    Models of different depth are compared at matching relative depth (nearest layer).
    """
    names = list(doc["models"])
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ma, mb = doc["models"][a], doc["models"][b]
            differ, pattern_differ = [], []
            for la in ma["layers"]:
                j = round(la["layer"] / ma["depth"] * mb["depth"])
                lb = mb["layers"][min(max(j, 1), mb["depth"]) - 1]
                (alo, ahi), (blo, bhi) = la["nmi_ci95"], lb["nmi_ci95"]
                if ahi < blo or bhi < alo:
                    differ.append(la["layer"])
                if la["pattern"] != lb["pattern"]:
                    pattern_differ.append(la["layer"])
            if differ:
                lines.append(
                    f"{a} vs {b}: NMI profiles differ at {len(differ)} of {ma['depth']} layers "
                    f"(non-overlapping 95% intervals at layers {', '.join(map(str, differ))}); "
                    f"patterns differ at {len(pattern_differ)} layers; selected layers "
                    f"{ma['selected_layer']} and {mb['selected_layer']}"
                )
            else:
                lines.append(
                    f"{a} vs {b}: NMI profiles do NOT differ measurably: every layer's 95% interval overlaps "
                    f"(selected layers {ma['selected_layer']} and {mb['selected_layer']})"
                )
    return lines


# HTML pieces shared by the offline reports (this one and unip-compare's).
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.sel td{background:#fff6d5;font-weight:600}
.pat{display:inline-block;padding:0 .45rem;border-radius:.6rem;color:#fff;font-size:.8rem}
code{font-size:.85rem;word-break:break-all}.muted{color:#666}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4rem 0}
"""


def esc(value: object) -> str:
    """``value`` as text safe inside HTML."""
    return html.escape(str(value))


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded (the report stays one file that opens offline)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None
) -> str:
    """HTML table; cells are pre-escaped HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def td(value: object, num: bool = False) -> str:
    """One escaped cell; ``num`` right-aligns it."""
    return f'<td class="num">{esc(value)}</td>' if num else f"<td>{esc(value)}</td>"


def _pattern_badge(pattern: str) -> str:
    color = plots.PATTERN_COLORS.get(pattern, "#888")
    return f'<td><span class="pat" style="background:{color}">{esc(pattern)}</span></td>'


def _page_head(doc: dict) -> list[str]:
    """The page's head, title and introduction."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Attention-pattern analysis: {esc(', '.join(doc['models']))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Attention-pattern analysis</h1>",
        f'<p class="muted">{esc(doc["generator"])}, created {esc(doc["created"])}. '
        "NMI between queries and keys per layer (mean over heads and images); local / hybrid / global "
        "patterns and the layer a distillation teacher should use (the deepest hybrid one, UNIP, ICLR 2025).</p>",
    ]


def _selected_layers_html(doc: dict) -> list[str]:
    """The "Selected layers" table (one row per model) and, for several models, whether their
    profiles differ."""
    summary_rows = []
    for name, m in doc["models"].items():
        sel = m["selected_layer"]
        summary_rows.append(
            [
                td(name),
                td(m["family"]),
                f"<td><code>{esc(m['arch'])}</code></td>",
                td(m["depth"], num=True),
                td("none" if sel is None else sel, num=True),
                td("" if m["selected_heads"] is None else m["selected_heads"], num=True),
                td("" if sel is None else m["layers"][sel - 1]["pattern"]),
                td(m["selection_rule"]),
            ]
        )
    parts = [
        "<h2>Selected layers</h2>",
        html_table(
            ["model", "family", "arch", "depth", "selected layer", "heads", "pattern", "rule"], summary_rows
        ),
    ]
    comparison = compare_profiles(doc)
    if comparison:
        parts.append("<h2>Do the profiles differ?</h2>")
        parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in comparison) + "</ul>")
    return parts


def _thresholds_html(doc: dict, thresholds_source: str) -> list[str]:
    """The thresholds, the NMI definition and the images the run analysed."""
    th, im = doc["thresholds"], doc["images"]
    return [
        "<h2>Thresholds and images</h2>",
        html_table(
            ["", "value"],
            [
                [td("global_max (NMI at or below: global)"), td(f"{th['global_max']:.4f}", num=True)],
                [td("local_min (NMI at or above: local)"), td(f"{th['local_min']:.4f}", num=True)],
                [td("how they were set"), td(thresholds_source or "not recorded")],
                [td("NMI definition"), td(NMI_LABELS[selection.nmi_definition(doc)])],
                [td("image folder"), f"<td><code>{esc(im['dir'])}</code></td>"],
                [td("images analysed"), td(im["count"], num=True)],
                [td("image size"), td(f"{im['img_size']} px", num=True)],
                [td("normalization"), td(im["norm"])],
            ],
        ),
    ]


def _figures_html(figures: Mapping[str, bytes], explorer_html: str) -> list[str]:
    """The run's three depth figures and, when there is one, the attention explorer."""
    parts = ["<h2>Figures</h2>"]
    for fname, alt in (
        ("nmi_curves.png", "NMI by depth"),
        ("attn_distance.png", "attention distance by depth"),
        ("pattern_heatmap.png", "pattern heat-map"),
    ):
        if fname in figures:
            parts.append(img_tag(figures[fname], alt))
    if explorer_html:
        parts += [
            "<h2>Attention explorer</h2>",
            '<p class="muted">Every layer, head and patch query of the same first images for every model, '
            "stored as the rows themselves or as queries and keys, whichever is more exact within the "
            "report's budget; the error of every shown row is measured against the exact attention and "
            'shown next to the map (docs/analysis.md, "Attention explorer").</p>',
            explorer_html,
        ]
    return parts


def _checkpoint_table(m: dict, notes: Sequence[str]) -> str:
    """One model's checkpoint: family, weights, shape, selection and the loader's notes."""
    sel = m["selected_layer"]
    return html_table(
        ["checkpoint", ""],
        [
            [td("family"), td(m["family"])],
            [td("arch"), f"<td><code>{esc(m['arch'])}</code></td>"],
            [td("weights"), f"<td><code>{esc(m['weights'])}</code></td>"],
            [td("sha256"), f"<td><code>{esc(m['weights_sha256'])}</code></td>"],
            [
                td("depth / width / patch"),
                td(f"{m['depth']} blocks, embed dim {m['embed_dim']}, patch {m['patch_size']}"),
            ],
            [td("prefix tokens"), td(m["num_prefix_tokens"])],
            [
                td("selected layer"),
                td("none" if sel is None else f"{sel} ({m['selected_heads']} heads)"),
            ],
            [td("rule"), td(m["selection_rule"])],
        ]
        + [[td("note"), td(n)] for n in notes],
    )


def _layer_table(m: dict) -> str:
    """One model's layers: pattern, NMI with its interval, attention distance; the selected one marked."""
    sel = m["selected_layer"]
    rows, classes = [], []
    for lay in m["layers"]:
        lo, hi = lay["nmi_ci95"]
        is_sel = lay["layer"] == sel
        rows.append(
            [
                td(lay["layer"], num=True),
                _pattern_badge(lay["pattern"]),
                td(f"{lay['nmi']:.4f}", num=True),
                td(f"{lo:.4f} – {hi:.4f}", num=True),
                td(f"{lay['attn_distance']:.1f}", num=True),
                td(len(lay["head_nmi"]), num=True),
                td("selected" if is_sel else ""),
            ]
        )
        classes.append("sel" if is_sel else "")
    return html_table(["layer", "pattern", "NMI", "95% CI", "distance (px)", "heads", ""], rows, classes)


def _robustness_html(name: str, m: dict) -> list[str]:
    """How the selection moves with the thresholds, and each layer's margin to the nearest edge."""
    header, grid, margins = robustness_rows(m)
    if not header:
        return []
    return [
        f"<h3>How robust the selection is</h3><p>{esc(robustness_verdict(name, m))}</p>",
        html_table(header, [[td(c) for c in row] for row in grid]),
        html_table(
            ["layer", "nearest edge", "NMI - edge", "95% CI", "CI contains the edge"],
            [[td(c, num=i in (0, 2, 3)) for i, c in enumerate(row)] for row in margins],
        ),
    ]


def render_html(
    doc: dict,
    figures: Mapping[str, bytes],
    thresholds_source: str = "",
    notes: Mapping[str, Sequence[str]] | None = None,
    explorer_html: str = "",
) -> str:
    """One self-contained HTML page: summary, thresholds, figures, the attention explorer (when
    ``explorer_html`` holds one, see :func:`unip_analysis.explorer.render_section`), and per model
    its checkpoint, selection and layer table. Opens offline: no external CSS, scripts or images."""
    notes = notes or {}
    names = figure_names(list(doc["models"]))
    parts = _page_head(doc)
    parts += _selected_layers_html(doc)
    parts += _thresholds_html(doc, thresholds_source)
    parts += _figures_html(figures, explorer_html)
    for name, m in doc["models"].items():
        parts.append(f"<h2>{esc(name)}</h2>")
        parts.append(_checkpoint_table(m, notes.get(name, [])))
        parts.append(_layer_table(m))
        parts += _robustness_html(name, m)
        if names[name] in figures:
            parts.append(img_tag(figures[names[name]], f"attention maps of {name}"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the run's outputs -------------------------------------------------------------------


@dataclass
class Report:
    """Everything one run writes, held in memory until :func:`write_report`."""

    doc: dict
    stats: pd.DataFrame
    figures: dict[str, bytes]
    html: str


def build_report(
    analyses: Sequence[ModelAnalysis],
    entries: Mapping[str, dict],
    thresholds: Thresholds,
    images_dir: str | Path,
    image_count: int,
    norm: str,
    created: datetime | None = None,
    explore_budget: int | None = None,
) -> Report:
    """Document, head table, figures and HTML of a run; nothing is written. The explorer's data of
    every model together take at most ``explore_budget`` bytes (:func:`explorer.choose_encodings`)."""
    img_size = analyses[0].img_size
    definitions = {res.nmi_definition for res in analyses}
    if len(definitions) > 1:
        raise ValueError(
            f"the analyses measured different NMI definitions ({', '.join(sorted(definitions))})"
        )
    doc = build_document(
        entries, thresholds, images_dir, image_count, img_size, norm, created, definitions.pop()
    )
    figures = render_figures(analyses, doc, thresholds)
    section = ""
    if any(res.explorer is not None for res in analyses):
        selected = {name: m["selected_layer"] for name, m in doc["models"].items()}
        section = explorer.render_section(*explorer.payload(analyses, thresholds, selected, explore_budget))
    page = render_html(doc, figures, thresholds.source, {res.name: res.notes for res in analyses}, section)
    return Report(doc=doc, stats=stats_frame(analyses, doc), figures=figures, html=page)


def write_report(rep: Report, out: str | Path) -> dict[str, Path]:
    """Write every output under ``out``, each atomically; ``layer_selection.json`` goes last,
    so its presence means the run finished. Returns what was written, by kind."""
    out = Path(out)
    written: dict[str, Path] = {}
    for fname, png in rep.figures.items():
        written[f"figure {fname}"] = atomic_write_bytes(out / FIGURES_DIR / fname, png)
    written["per-head statistics"] = atomic_write_text(out / STATS_FILENAME, rep.stats.to_csv(index=False))
    written["report"] = atomic_write_text(out / REPORT_FILENAME, rep.html)
    written["layer selection"] = selection.write(out / selection.FILENAME, rep.doc)
    return written
