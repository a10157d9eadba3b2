"""The outputs of one analysis run, built in memory first and written only at the end.

- :func:`build_document`  the ``layer_selection.json`` document (schema: :mod:`unip_analysis.selection`)
- :func:`layer_frame`     tidy per-layer table of a document (model, layer, nmi, CI, pattern, selected)
- :func:`stats_frame`     tidy per-head table (``layer_stats.csv``)
- :func:`render_figures`  the PNG figures, as bytes
- :func:`render_html`     one self-contained ``report.html`` from ``templates/report.html.j2`` (CSS
                          inlined, figures embedded as base64, no external files)
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
from .metrics import NMI_LABELS, SINK_DOMINATED
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
    "sink_share",
    "prefix_share",
    "sink_token",
    "sink_key_norm_ratio",
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
    """The whole ``layer_selection.json`` document (schema version 2), validated.

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
        sinks = sink_verdict(name, m)
        if sinks:
            lines.append("    " + sinks)
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


# --- HTML ----------------------------------------------------------------------------------

# The page's style, shipped as package data; unip-compare's page uses it too.
CSS = explorer.static_text("report.css")
REPORT_TEMPLATE = "report.html.j2"


def esc(value: object) -> str:
    """``value`` as text safe inside HTML."""
    return html.escape(str(value))


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded (the report stays one file that opens offline)."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{_base64(png)}">'


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None
) -> str:
    """HTML table; cells are pre-escaped HTML (unip-compare's page; report.html uses its template)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def td(value: object, num: bool = False) -> str:
    """One escaped cell; ``num`` right-aligns it."""
    return f'<td class="num">{esc(value)}</td>' if num else f"<td>{esc(value)}</td>"


def _base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


# A table for report.html's template: {header, rows: [[cell]], classes}; a cell {text, num, code,
# badge}. The template (templates/report_macros.html.j2) escapes every text.


def cell(value: object, num: bool = False, code: bool = False, badge: str = "") -> dict:
    """One table cell of report.html: its text, right-aligned (``num``), monospace (``code``) or a
    pattern badge of colour ``badge``."""
    return {"text": str(value), "num": num, "code": code, "badge": badge}


def table(header: Sequence[str], rows: Sequence[Sequence[dict]], classes: Sequence[str] = ()) -> dict:
    """A table for report.html's template (see :func:`cell`)."""
    return {"header": list(header), "rows": [list(r) for r in rows], "classes": list(classes)}


def sink_verdict(name: str, m: dict) -> str:
    """One line: whether model ``name``'s selected layer, or a layer the rule did not select, is
    sink-dominated (sink share at or above :data:`metrics.SINK_DOMINATED`: one token receives at
    least that share of the patch queries' attention). Empty for files without sink fields."""
    layers = m["layers"]
    if "sink_share" not in layers[0]:
        return ""
    edge, sel = SINK_DOMINATED, m["selected_layer"]
    heavy = [lay for lay in layers if lay["sink_share"] >= edge]
    said = []
    if sel is not None and layers[sel - 1]["sink_share"] >= edge:
        lay = layers[sel - 1]
        said.append(
            f"the selected layer {sel} is sink-dominated: its heads give on average "
            f"{lay['sink_share']:.0%} of their patch queries' attention to a single token (most often "
            f"{_token(lay['sink_token'])}), so its NMI measures that token more than how attention mixes content"
        )
    rejected = [lay for lay in heavy if lay["layer"] != sel]
    if rejected:
        shares = [lay["sink_share"] for lay in rejected]
        tokens = sorted({_token(lay["sink_token"]) for lay in rejected}, key=str)
        listing = ", ".join(f"{lay['layer']} ({lay['pattern']})" for lay in rejected)
        span = f"{min(shares):.2f}" + (f"-{max(shares):.2f}" if len(shares) > 1 else "")
        said.append(
            f"not selected and sink-dominated: layer{'s' if len(rejected) > 1 else ''} {listing} (sink share "
            f"{span}, {', '.join(tokens)})"
            + (
                "; where such a layer reads global, its low NMI may be attention to a sink rather than "
                "global mixing"
                if any(lay["pattern"] == "global" for lay in rejected)
                else ""
            )
        )
    if not said:
        top = max(layers, key=lambda lay: lay["sink_share"])
        return (
            f"{name}: no layer is sink-dominated (sink share below {edge:g} everywhere; "
            f"largest {top['sink_share']:.2f} at layer {top['layer']})"
        )
    return f"{name}: " + "; ".join(said)


def _token(token: str | int) -> str:
    return token if isinstance(token, str) else f"patch {token}"


def _selected_table(doc: dict) -> dict:
    """The "Selected layers" table: one row per model."""
    rows = []
    for name, m in doc["models"].items():
        sel = m["selected_layer"]
        rows.append(
            [
                cell(name),
                cell(m["family"]),
                cell(m["arch"], code=True),
                cell(m["depth"], num=True),
                cell("none" if sel is None else sel, num=True),
                cell("" if m["selected_heads"] is None else m["selected_heads"], num=True),
                cell("" if sel is None else m["layers"][sel - 1]["pattern"]),
                cell(m["selection_rule"]),
            ]
        )
    return table(["model", "family", "arch", "depth", "selected layer", "heads", "pattern", "rule"], rows)


def _thresholds_table(doc: dict, thresholds_source: str) -> dict:
    """The thresholds, the NMI definition, the sink threshold and the images the run analysed."""
    th, im = doc["thresholds"], doc["images"]
    sinks = (
        [[cell("sink-dominated (sink share at or above)"), cell(f"{SINK_DOMINATED:.2f}", num=True)]]
        if selection.has_sinks(doc)
        else []
    )
    return table(
        ["", "value"],
        [
            [cell("global_max (NMI at or below: global)"), cell(f"{th['global_max']:.4f}", num=True)],
            [cell("local_min (NMI at or above: local)"), cell(f"{th['local_min']:.4f}", num=True)],
            [cell("how they were set"), cell(thresholds_source or "not recorded")],
            [cell("NMI definition"), cell(NMI_LABELS[selection.nmi_definition(doc)])],
            *sinks,
            [cell("image folder"), cell(im["dir"], code=True)],
            [cell("images analysed"), cell(im["count"], num=True)],
            [cell("image size"), cell(f"{im['img_size']} px", num=True)],
            [cell("normalization"), cell(im["norm"])],
        ],
    )


def _checkpoint_table(m: dict, notes: Sequence[str]) -> dict:
    """One model's checkpoint: family, weights, shape, selection and the loader's notes."""
    sel = m["selected_layer"]
    return table(
        ["checkpoint", ""],
        [
            [cell("family"), cell(m["family"])],
            [cell("arch"), cell(m["arch"], code=True)],
            [cell("weights"), cell(m["weights"], code=True)],
            [cell("sha256"), cell(m["weights_sha256"], code=True)],
            [
                cell("depth / width / patch"),
                cell(f"{m['depth']} blocks, embed dim {m['embed_dim']}, patch {m['patch_size']}"),
            ],
            [cell("prefix tokens"), cell(m["num_prefix_tokens"])],
            [cell("selected layer"), cell("none" if sel is None else f"{sel} ({m['selected_heads']} heads)")],
            [cell("rule"), cell(m["selection_rule"])],
        ]
        + [[cell("note"), cell(n)] for n in notes],
    )


def _layer_table(m: dict) -> dict:
    """One model's layers: pattern, NMI with its interval, attention distance, and where the file
    has them the attention sinks; the selected layer marked."""
    sel = m["selected_layer"]
    sinks = "sink_share" in m["layers"][0]
    rows, classes = [], []
    for lay in m["layers"]:
        lo, hi = lay["nmi_ci95"]
        is_sel = lay["layer"] == sel
        row = [
            cell(lay["layer"], num=True),
            cell(lay["pattern"], badge=plots.PATTERN_COLORS.get(lay["pattern"], "#888")),
            cell(f"{lay['nmi']:.4f}", num=True),
            cell(f"{lo:.4f} – {hi:.4f}", num=True),
            cell(f"{lay['attn_distance']:.1f}", num=True),
            cell(len(lay["head_nmi"]), num=True),
        ]
        if sinks:
            row += [
                cell(f"{lay['sink_share']:.3f}", num=True),
                cell(f"{lay['prefix_share']:.3f}", num=True),
                cell(lay["sink_token"], num=not isinstance(lay["sink_token"], str)),
                cell(f"{lay['sink_key_norm_ratio']:.2f}", num=True),
            ]
        rows.append([*row, cell("selected" if is_sel else "")])
        classes.append("sel" if is_sel else "")
    header = ["layer", "pattern", "NMI", "95% CI", "distance (px)", "heads"]
    if sinks:
        header += ["sink share", "prefix share", "sink token", "sink key / median key"]
    return table([*header, ""], rows, classes)


def _robustness(name: str, m: dict) -> dict | None:
    """How the selection moves with the thresholds, each layer's margin to the nearest edge, and
    whether the layers involved are sink-dominated."""
    header, grid, margins = robustness_rows(m)
    if not header:
        return None
    return {
        "verdict": robustness_verdict(name, m),
        "sinks": sink_verdict(name, m),
        "bands": table(header, [[cell(c) for c in row] for row in grid]),
        "margins": table(
            ["layer", "nearest edge", "NMI - edge", "95% CI", "CI contains the edge"],
            [[cell(c, num=i in (0, 2, 3)) for i, c in enumerate(row)] for row in margins],
        ),
    }


FIGURES = (
    ("nmi_curves.png", "NMI by depth"),
    ("attn_distance.png", "attention distance by depth"),
    ("pattern_heatmap.png", "pattern heat-map"),
)


def report_context(
    doc: dict,
    figures: Mapping[str, bytes],
    thresholds_source: str = "",
    notes: Mapping[str, Sequence[str]] | None = None,
    explorer_html: str = "",
) -> dict:
    """What report.html's template shows, every value already formatted as text."""
    notes = notes or {}
    names = figure_names(list(doc["models"]))
    models = []
    for name, m in doc["models"].items():
        png = figures.get(names[name])
        models.append(
            {
                "name": name,
                "checkpoint": _checkpoint_table(m, notes.get(name, [])),
                "layers": _layer_table(m),
                "robustness": _robustness(name, m),
                "maps": None if png is None else {"alt": f"attention maps of {name}", "data": _base64(png)},
            }
        )
    return {
        "model_names": list(doc["models"]),
        "css": CSS,
        "generator": doc["generator"],
        "created": doc["created"],
        "selected": _selected_table(doc),
        "comparison": compare_profiles(doc),
        "thresholds": _thresholds_table(doc, thresholds_source),
        "figures": [{"alt": alt, "data": _base64(figures[f])} for f, alt in FIGURES if f in figures],
        "explorer_html": explorer_html,
        "models": models,
    }


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("unip_analysis", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def render_html(
    doc: dict,
    figures: Mapping[str, bytes],
    thresholds_source: str = "",
    notes: Mapping[str, Sequence[str]] | None = None,
    explorer_html: str = "",
) -> str:
    """One self-contained HTML page from ``templates/report.html.j2``: summary, thresholds,
    figures, the attention explorer (when ``explorer_html`` holds one, see
    :func:`unip_analysis.explorer.render_section`), and per model its checkpoint, selection, layer
    table and robustness. Opens offline: no external CSS, scripts or images; the same inputs give
    the same bytes."""
    if "</style" in CSS.lower():
        raise ValueError("report.css must not contain '</style'")
    context = report_context(doc, figures, thresholds_source, notes, explorer_html)
    return _environment().get_template(REPORT_TEMPLATE).render(**context)


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
