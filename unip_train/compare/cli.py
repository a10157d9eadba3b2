"""``unip-compare``: the paper's comparison as one command. Every cell of a plan (backbone x dataset
x mode x probed layer x seed) is an ordinary unip-finetune run folder under OUT; then results.csv,
summary.csv, figures/ and report.html.

    unip-compare --plan plan.toml --out results/              # or plan.json / plan.yaml
    unip-compare --plan plan.toml --out results/ --jobs 4     # 4 cells at a time (one GPU each)
    unip-compare --plan plan.toml --out results/ --executor slurm --slurm-partition gpu --gpus-per-job 1
    unip-compare --plan plan.toml --out results/ --dry-run    # check the plan, list the cells

Re-running the same command skips finished cells and resumes interrupted ones; a cell folder that
holds a run of other settings is refused (``--overwrite`` moves its files aside). The plan's layout
is in docs/compare.md and in :mod:`unip_train.compare.plan`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unip_analysis import command, output_folder
from unip_analysis.errors import UnipError

from .cells import FINISHED, prepare
from .comparison import build_outputs, comparison_run, write_outputs
from .execution import run_cells, submitit_executor
from .plan import load_plan
from .statistics import format_p

PROG = "unip-compare"
EXECUTORS = ("local", "slurm", "submitit-local")
_SUBMITIT = "executor (submitit)"


@dataclass(kw_only=True)
class CompareOptions:
    """Every option of ``unip-compare``, declared once (:mod:`unip_analysis.command`)."""

    plan: Path = command.option(
        help="plan file (.toml, .json or .yaml), see docs/compare.md", group="plan", metavar="FILE"
    )
    out: Path = command.out("results folder (cells/, results.csv, summary.csv, figures/, report.html)")
    dry_run: bool = command.option(
        False, help="check the plan, list every cell and its state; run nothing", group="plan"
    )
    report_only: bool = command.option(
        False, help="write the outputs from finished cells; run nothing", group="plan"
    )
    overwrite: bool = command.option(
        False, help="a cell folder holding a run of other settings (or not made by unip-compare): move its "
        "files into CELL/previous-<time>/ and run the cell again, instead of refusing", group="run",
    )  # fmt: skip
    jobs: int = command.option(
        1, help="cells at a time; one GPU each when there are GPUs", group="run", metavar="N",
        check=command.positive,
    )  # fmt: skip
    executor: Literal[EXECUTORS] = command.option(
        "local", help="local: child processes here; slurm: submitit jobs on SLURM; submitit-local: "
        "submitit's local executor (try the slurm path on this machine)", group=_SUBMITIT,
    )  # fmt: skip
    timeout_min: int | None = command.option(
        None, help="time limit per cell in minutes", group=_SUBMITIT, metavar="MIN",
        default_text="SLURM's; a week with submitit-local",
    )  # fmt: skip
    gpus_per_job: int | None = command.option(
        None,
        help="GPUs per cell (gpus_per_node)",
        group=_SUBMITIT,
        metavar="N",
        default_text="the executor's",
    )
    cpus_per_job: int | None = command.option(
        None, help="CPU cores per cell (cpus_per_task)", group=_SUBMITIT, metavar="N",
        default_text="the executor's",
    )  # fmt: skip
    mem_gb: float | None = command.option(
        None, help="memory per cell", group=_SUBMITIT, metavar="GB", default_text="the executor's"
    )
    slurm_partition: str | None = command.option(
        None, help="SLURM partition", group=_SUBMITIT, metavar="NAME", default_text="the cluster's"
    )
    slurm_account: str | None = command.option(
        None, help="SLURM account", group=_SUBMITIT, metavar="NAME", default_text="the cluster's"
    )
    debug: bool = command.debug()


COMMAND = command.Command(PROG, CompareOptions, description=__doc__.split("\n\n")[0])


def make_executor(args: CompareOptions):
    """None (child processes here) or the submitit executor the options ask for."""
    if args.executor == "local":
        return None
    params = {
        "timeout_min": args.timeout_min,
        "gpus_per_node": args.gpus_per_job,
        "cpus_per_task": args.cpus_per_job,
        "mem_gb": args.mem_gb,
    }
    if args.executor == "slurm":
        params.update(slurm_partition=args.slurm_partition, slurm_account=args.slurm_account)
        return submitit_executor("slurm", args.out / "submitit", **params)
    params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node")}
    return submitit_executor("local", args.out / "submitit", **params)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args: CompareOptions) -> int:
    plan = load_plan(args.plan)
    # The results folder is unip-compare's; each cell folder then checks its own settings.
    folder = output_folder.check(args.out, comparison_run(plan), resume=True)
    if args.dry_run:
        for cell in prepare(plan, args.out, write=False, overwrite=args.overwrite):
            _say(f"{cell.status:8s} {cell.label}\n         {cell.shell_command()}")
        return 0
    executor = None if args.report_only else make_executor(args)
    runs = prepare(
        plan, args.out, write=not args.report_only, overwrite=args.overwrite and not args.report_only,
        folder=folder,
    )  # fmt: skip
    if args.report_only:
        folder.begin()
    try:
        outcomes = [] if args.report_only else run_cells(runs, jobs=args.jobs, executor=executor, say=_say)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    outputs = build_outputs(plan, args.out, outcomes, runs)
    written = write_outputs(outputs, args.out)
    done = sum(r.status == FINISHED for r in outputs.runs)
    _say(f"{done} of {len(outputs.runs)} cells finished; wrote {written['summary']} and {written['report']}")
    for line in _verdicts(outputs.summary):
        _say(line)
    if done < len(outputs.runs):
        how = (
            "run without --report-only to run them"
            if args.report_only
            else "run the same command again to retry / resume them"
        )
        print(
            f"{PROG}: {len(outputs.runs) - done} cell(s) have no results (see {written['report']}); {how}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 done, 1 cells without results, 2 bad input)."""
    return command.main(COMMAND, run, list(sys.argv[1:] if argv is None else argv), exit_codes={UnipError: 2})


def _verdicts(summary) -> list[str]:
    """One line per non-baseline row of the whole-backbone modes: mean, difference, verdict and the
    test behind it."""
    lines = []
    if not len(summary):
        return lines
    for r in summary[summary["layer"].isna()].itertuples(index=False):
        line = f"  {r.dataset} {r.mode} {r.backbone}: mIoU {r.miou_mean:.4f} over {r.n_seeds} seed(s)"
        if r.n_paired:
            line += f", {r.diff_mean:+.4f} vs {r.baseline}: {r.verdict}"
            if isinstance(r.test, str) and r.test:
                line += (
                    f" ({r.test}: {r.diff_ci95_lo:+.4f} to {r.diff_ci95_hi:+.4f}, p = {format_p(r.diff_p)})"
                )
        lines.append(line)
    return lines
