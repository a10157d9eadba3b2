"""``unip-compare``: the paper's comparison as one command. Every cell of a plan (backbone x dataset
x mode x probed layer x seed) is an ordinary unip-finetune run folder under OUT; then results.csv,
summary.csv, figures/ and report.html.

    unip-compare --plan plan.toml --out results/              # or plan.json
    unip-compare --plan plan.toml --out results/ --jobs 4     # 4 cells at a time (one GPU each)
    unip-compare --plan plan.toml --out results/ --executor slurm --slurm-partition gpu --gpus-per-job 1
    unip-compare --plan plan.toml --out results/ --dry-run    # check the plan, list the cells

Re-running the same command skips finished cells and resumes interrupted ones. The plan's layout
is in docs/compare.md and in :mod:`unip_train.compare.plan`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unip_analysis.errors import UnipError, error_line

from .cells import FINISHED, prepare
from .comparison import build_outputs, write_outputs
from .execution import run_cells, submitit_executor
from .plan import load_plan
from .statistics import format_p

PROG = "unip-compare"
EXECUTORS = ("local", "slurm", "submitit-local")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as for every other error of this command
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="plan file (.toml or .json), see docs/compare.md")
    p.add_argument(
        "--out", required=True, type=Path, help="results folder (cells/, results.csv, report.html)"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="cells at a time (default 1); one GPU each when there are GPUs"
    )
    p.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="local: child processes here (default); slurm: submitit jobs on SLURM; "
        "submitit-local: submitit's local executor (try the slurm path on this machine)",
    )
    p.add_argument("--timeout-min", type=int, help="submitit: time limit per cell in minutes")
    p.add_argument("--gpus-per-job", type=int, help="submitit: GPUs per cell (gpus_per_node)")
    p.add_argument("--cpus-per-job", type=int, help="submitit: CPU cores per cell (cpus_per_task)")
    p.add_argument("--mem-gb", type=float, help="submitit: memory per cell")
    p.add_argument("--slurm-partition", help="slurm: partition")
    p.add_argument("--slurm-account", help="slurm: account")
    p.add_argument(
        "--dry-run", action="store_true", help="check the plan, list every cell and its state; run nothing"
    )
    p.add_argument(
        "--report-only", action="store_true", help="write the outputs from finished cells; run nothing"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def make_executor(args: argparse.Namespace):
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise UnipError(f"--jobs {args.jobs}: expected at least 1")
        plan = load_plan(args.plan)
        if args.dry_run:
            for run in prepare(plan, args.out, write=False):
                _say(f"{run.status:8s} {run.label}\n         {run.shell_command()}")
            return 0
        executor = None if args.report_only else make_executor(args)
        runs = prepare(plan, args.out, write=not args.report_only)
        outcomes = [] if args.report_only else run_cells(runs, jobs=args.jobs, executor=executor, say=_say)
        outputs = build_outputs(plan, args.out, outcomes, runs)
        written = write_outputs(outputs, args.out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except UnipError as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        return 2
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
