"""``report.html`` of a comparison: one page that opens offline (figures embedded; the only links are
to the cells' pictures) with the summary over seeds, the paired t-tests against the baseline and their
verdicts, the figures, per-class IoU per summary row, every seed's numbers with links to its run
folder's pictures (``curves.png``, ``confusion_matrix.png``, ``per_class_iou.png``, ``samples.png``:
relative links, so the results folder moves as a whole) and every cell's command. Styling and HTML
pieces are the analysis
report's (:mod:`unip_analysis.report`), so both reports read alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from unip_analysis import __version__
from unip_analysis.report import CSS, esc, html_table, img_tag, td

from ..finetune.pictures import RUN_PICTURES
from .cells import FINISHED, CellRun
from .statistics import class_columns, format_p

GENERATOR = f"unip-compare {__version__}"
_EXTRA_CSS = "pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}details{margin:.6rem 0}"


def _f(value: object, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(lo: object, hi: object, signed: bool = False) -> str:
    a, b = _f(lo, signed=signed), _f(hi, signed=signed)
    return f"{a} to {b}" if a and b else "n/a (1 seed)"


def _layer(value: object) -> str:
    return (
        ""
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
        else str(int(value))
    )


def summary_rows(summary: pd.DataFrame) -> list[list[str]]:
    rows = []
    for r in summary.itertuples(index=False):
        rows.append(
            [
                td(r.backbone), td(r.dataset), td(r.mode), td(_layer(r.layer), num=True),
                td(r.n_seeds, num=True), td(_f(r.miou_mean), num=True),
                td(_interval(r.miou_ci95_lo, r.miou_ci95_hi), num=True),
                td(_f(r.diff_mean, signed=True), num=True),
                td(_interval(r.diff_ci95_lo, r.diff_ci95_hi, signed=True) if r.n_paired else "", num=True),
                td(format_p(r.diff_p), num=True), f"<td><code>{esc(r.diff_per_seed)}</code></td>", td(r.verdict),
                td(r.test),
            ]
        )  # fmt: skip
    return rows


SUMMARY_HEADER = [
    "backbone", "dataset", "mode", "layer", "seeds", "mean mIoU", "95% t interval",
    "minus baseline", "95% t interval", "p", "per seed (seed:difference)", "verdict", "test",
]  # fmt: skip


def render_html(
    runs: Sequence[CellRun],
    results: pd.DataFrame,
    summary: pd.DataFrame,
    figures: Mapping[str, bytes],
    plan_text: str,
    plan_name: str,
    baseline: str | None,
    failures: Mapping[str, str] | None = None,
    created: datetime | None = None,
) -> str:
    """The page; ``failures``: cell label -> why its last attempt failed."""
    failures = dict(failures or {})
    created = (created or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    finished = [r for r in runs if r.status == FINISHED]
    missing = [r for r in runs if r.status != FINISHED]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Comparison: {esc(plan_name)}</title>",
        f"<style>{CSS}{_EXTRA_CSS}</style></head><body>",
        f"<h1>Comparison: {esc(plan_name)}</h1>",
        f'<p class="muted">{esc(GENERATOR)}, created {esc(created)}. Every cell is one unip-finetune run; '
        "a seed fixes the head's initialisation and the data order for every row, so differences at the same "
        "seed are paired. Intervals are Student-t 95% intervals over seeds (mean &plusmn; t<sub>0.975, n-1</sub> "
        "&middot; sd / &radic;n). Differences to the baseline: paired t-test over the seeds both rows share "
        "(95% interval of the per-seed differences, two-sided p-value); the verdict says higher or lower "
        "only when that interval excludes 0, and needs at least 3 paired seeds.</p>",
        f"<p><b>{len(finished)} of {len(runs)} cells finished.</b>"
        + (
            f" Baseline row: <b>{esc(baseline)}</b>."
            if baseline
            else " No baseline row: no paired differences."
        )
        + "</p>",
    ]
    if missing:
        items = "".join(
            f"<li><code>{esc(r.label)}</code>: {esc(failures.get(r.label, 'not run yet' if r.status == 'new' else 'interrupted; will resume'))}</li>"
            for r in missing
        )
        parts.append(f"<h2>Cells without results</h2><ul>{items}</ul>")
    whole = summary[summary["layer"].isna()] if len(summary) else summary
    layered = summary[summary["layer"].notna()] if len(summary) else summary
    if len(whole):
        parts += [
            "<h2>Summary over seeds</h2>",
            html_table(SUMMARY_HEADER, summary_rows(whole), _row_classes(whole, baseline)),
        ]
    if len(figures):
        parts.append("<h2>Figures</h2>")
        parts += [img_tag(png, name) for name, png in figures.items()]
    if len(layered):
        parts += [
            "<h2>Layer-wise probing</h2>",
            html_table(SUMMARY_HEADER, summary_rows(layered), _row_classes(layered, baseline)),
        ]
    if len(results):
        parts.append(_class_table(results))
        parts.append("<details open><summary>Every cell's numbers and pictures</summary>")
        header = [
            "backbone", "dataset", "mode", "layer", "seed", "mIoU", "pixel acc", "run folder", "pictures",
        ]  # fmt: skip
        folders = {r.run_dir.as_posix(): r.run_dir for r in runs}
        rows = [
            [td(r.backbone), td(r.dataset), td(r.mode), td(_layer(r.layer), num=True), td(r.seed, num=True),
             td(_f(r.miou), num=True), td(_f(r.pixel_acc), num=True), f"<td><code>{esc(r.run_dir)}</code></td>",
             _picture_links(r.run_dir, folders)]
            for r in results.itertuples(index=False)
        ]  # fmt: skip
        parts += [html_table(header, rows), "</details>"]
    commands = "\n".join(r.shell_command() for r in runs)
    parts += [
        f"<details><summary>Commands of the {len(runs)} cells</summary><pre>{esc(commands)}</pre></details>",
        f"<details><summary>The plan</summary><pre>{esc(plan_text)}</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _row_classes(summary: pd.DataFrame, baseline: str | None) -> list[str]:
    return ["sel" if b == baseline else "" for b in summary["backbone"]]


def _picture_links(run_dir: str, folders: Mapping[str, Path]) -> str:
    """Links (relative to report.html, which sits above the cells) to the pictures the cell's run
    folder holds (:data:`~unip_train.finetune.pictures.RUN_PICTURES`)."""
    folder = next((p for key, p in folders.items() if key.endswith(Path(run_dir).as_posix())), None)
    names = [n for n in RUN_PICTURES if folder is not None and (folder / n).is_file()]
    links = " ".join(
        f'<a href="{esc(Path(run_dir, n).as_posix())}">{esc(n.removesuffix(".png").replace("_", " "))}</a>'
        for n in names
    )
    return f"<td>{links}</td>"


def _class_table(results: pd.DataFrame) -> str:
    """IoU per class, mean over seeds: one table per dataset, one line per summary row (backbone,
    mode and, for layer-wise probing, layer)."""
    parts = ["<h2>Per-class IoU (mean over seeds)</h2>"]
    for dataset, d in results.groupby("dataset", sort=False):
        cols = [c for c in class_columns(d) if d[c].notna().any()]
        keys = d.assign(layer=d["layer"].astype("object").where(d["layer"].notna(), ""))
        means = keys.groupby(["backbone", "mode", "layer"], sort=False)[cols].mean()
        rows = [
            [
                td(b),
                td(m),
                td(_layer(layer) if layer != "" else "", num=True),
                *(td(_f(v, 3), num=True) for v in vals),
            ]
            for (b, m, layer), vals in zip(means.index, means.to_numpy())
        ]
        parts += [
            f"<h3>{esc(dataset)}</h3>",
            html_table(["backbone", "mode", "layer", *(c[4:] for c in cols)], rows),
        ]
    return "".join(parts)
