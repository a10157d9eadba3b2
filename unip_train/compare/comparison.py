"""A whole comparison, step by step, as the command runs it and as a notebook can:

plan = load_plan("plan.toml")
outcomes = run_plan(plan, "results/", jobs=2)        # the cells (skips finished, resumes killed)
out = build_outputs(plan, "results/")                 # results, summary, figures, html in memory
write_outputs(out, "results/")                        # results.csv, summary.csv, figures/, report.html
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from unip_analysis import output_folder
from unip_analysis.files import atomic_write_bytes, atomic_write_text

from .backbones import RANDOM_INIT_DIR
from .cells import CellRun, prepare
from .execution import Outcome, run_cells
from .figures import render_figures
from .plan import Plan
from .report import render_html
from .statistics import results_table, summarize

RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"


def run_plan(
    plan: Plan,
    out: str | Path,
    jobs: int = 1,
    executor: Any = None,
    say=print,
    gpus: list[str] | None = None,
    overwrite: bool = False,
) -> list[Outcome]:
    """Run every cell of ``plan`` under ``out`` that has not finished; see :func:`.execution.run_cells`.
    ``overwrite``: cell folders of other settings are moved aside instead of refused."""
    runs = prepare(plan, out, overwrite=overwrite)
    return run_cells(runs, jobs=jobs, executor=executor, say=say, gpus=gpus)


@dataclass
class Outputs:
    """What :func:`write_outputs` writes, held in memory."""

    runs: list[CellRun]
    results: pd.DataFrame
    summary: pd.DataFrame
    figures: dict[str, bytes]
    html: str
    failures: dict[str, str] = field(default_factory=dict)


def selection_models(plan: Plan) -> dict[str, str]:
    """Row name -> model name in the plan's layer_selection.json: ``selection_model`` where given,
    else the row's own name when the file has a model of that name."""
    doc = plan.selection_doc
    if doc is None:
        return {}
    out = {}
    for row in plan.rows:
        name = row.selection_model or row.name
        if name in doc["models"]:
            out[row.name] = name
    return out


def build_outputs(
    plan: Plan, out: str | Path, outcomes: list[Outcome] | None = None, runs: list[CellRun] | None = None
) -> Outputs:
    """Results table, summary, figures and report of the cells of ``plan`` finished under ``out``
    (the others are listed in the report as missing, with why the last attempt failed).
    ``runs``: the cells as :func:`.cells.prepare` gave them (default: prepared again, writing nothing)."""
    out = Path(out).resolve()
    runs = runs if runs is not None else prepare(plan, out, write=False)
    failures = {o.run.label: o.message for o in outcomes or [] if not o.ok}
    results = results_table(runs, out_prefix=str(out))
    summary = summarize(results, plan.baseline)
    figures = (
        render_figures(results, summary, plan.baseline, plan.selection_doc, selection_models(plan))
        if len(results)
        else {}
    )
    name = plan.path.name if plan.path is not None else "plan"
    html = render_html(runs, results, summary, figures, plan.text, name, plan.baseline, failures)
    return Outputs(runs, results, summary, figures, html, failures)


def comparison_run(plan: Plan) -> output_folder.Run:
    """The results folder as unip-compare's: any plan may continue it (each cell folder checks its
    own settings, :func:`_status`); another command's folder, or one inside a backbone's or a
    dataset's folder, is refused."""
    inputs = [row.backbone.path for row in plan.rows if row.backbone.path is not None]
    inputs += [ds.root for ds in plan.datasets]
    inputs += [p for p in (plan.path, plan.layer_selection) if p is not None]
    outputs = ("cells", RANDOM_INIT_DIR, "submitit", RESULTS_CSV, SUMMARY_CSV, FIGURES_DIR, REPORT_HTML)
    return output_folder.Run("unip-compare", {}, outputs, inputs, markers=("cells",), what="a comparison")


def write_outputs(outputs: Outputs, out: str | Path) -> dict[str, Path]:
    """Write results.csv, summary.csv, figures/*.png and report.html under ``out``, each atomically."""
    out = Path(out)
    written = {
        "results": atomic_write_text(out / RESULTS_CSV, outputs.results.to_csv(index=False)),
        "summary": atomic_write_text(out / SUMMARY_CSV, outputs.summary.to_csv(index=False)),
    }
    for name, png in outputs.figures.items():
        written[f"figure {name}"] = atomic_write_bytes(out / FIGURES_DIR / name, png)
    written["report"] = atomic_write_text(out / REPORT_HTML, outputs.html)
    return written
