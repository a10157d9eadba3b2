"""A plan's cells against a results folder: each cell's unip-finetune arguments, its folder, and
whether it is finished, to be resumed, or new.

A cell folder is an ordinary unip-finetune run folder plus two files of ours:

- ``compare_cell.json``: the cell, its unip-finetune arguments (without ``--out`` / ``--resume``),
  the sha256 of its backbone weights, and one entry per attempt (start, seconds, exit status).
  It is written before the first attempt starts.
- ``unip-finetune.out``: what the unip-finetune process printed (:mod:`.processes`).

A cell is finished when ``metrics.json`` is there; interrupted when ``checkpoint.pt`` is there
(the next run passes ``--resume``). A folder whose recorded arguments or weights differ from what
the plan now asks is refused, before any cell runs: results are never mixed across settings.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unip_analysis.files import atomic_write_bytes, atomic_write_text, sha256_file

from .backbones import random_init_bytes, random_init_path
from .plan import Cell, Plan, PlanError, option_argv

RECORD = "compare_cell.json"
RECORD_FORMAT = "unip-compare-cell/1"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"

FINISHED, RESUME, NEW = "finished", "resume", "new"


@dataclass
class CellRun:
    """A cell resolved against a results folder."""

    cell: Cell
    run_dir: Path
    argv: list[str]  # unip-finetune arguments, without --out and --resume
    backbone_sha256: str
    status: str  # finished | resume | new

    @property
    def label(self) -> str:
        return self.cell.label

    def command(self) -> list[str]:
        """The unip-finetune arguments of the next attempt."""
        return [*self.argv, "--out", str(self.run_dir), *(["--resume"] if self.status == RESUME else [])]

    def shell_command(self) -> str:
        """The equivalent command line, for the report and for running a cell by hand."""
        return "unip-finetune " + " ".join(shlex.quote(a) for a in self.command())


def cell_argv(cell: Cell, backbone_spec: str) -> list[str]:
    """unip-finetune arguments of a cell (without --out / --resume): what it is, then its options."""
    argv = ["--backbone", backbone_spec, "--dataset", cell.dataset.dataset]
    argv += ["--data-root", str(cell.dataset.root), "--mode", cell.mode.mode]
    layers = [cell.layer] if cell.layer is not None else cell.mode.layers
    if layers:
        argv += ["--layers", ",".join(str(v) for v in layers)]
    return [*argv, "--seed", str(cell.seed), *option_argv(cell.options), "--no-progress"]


def prepare(plan: Plan, out: str | Path, write: bool = True) -> list[CellRun]:
    """Every cell of ``plan`` under ``out`` with its status. ``write``: write the random-init weights
    that are missing, once every cell folder has been checked (with ``write=False`` nothing is
    written; their digest is computed in memory).

    Raises :class:`PlanError` when a cell folder holds a run with other settings, or a folder
    unip-compare did not make.
    """
    out = Path(out).resolve()
    known: dict[Path, str] = {}  # weights file -> sha256, each file hashed once
    to_write: dict[Path, bytes] = {}
    runs, conflicts = [], []
    for cell in plan.cells():
        backbone = cell.row.backbone
        weights = random_init_path(out, cell.row.name, cell.seed) if backbone.is_random else backbone.path
        if weights not in known:
            if weights.is_file():
                known[weights] = sha256_file(weights)
            else:  # random init not written yet
                to_write[weights] = random_init_bytes(backbone.arch, cell.seed)
                known[weights] = hashlib.sha256(to_write[weights]).hexdigest()
        run = CellRun(cell, out / cell.folder, cell_argv(cell, backbone.spec(weights)), known[weights], NEW)
        problem = _status(run)
        if problem:
            conflicts.append(problem)
        runs.append(run)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more cell folders)" if len(conflicts) > 1 else ""
        raise PlanError(
            f"{conflicts[0]}{more}; delete those folders to run them again, or choose another --out"
        )
    if write:
        for path, data in to_write.items():
            atomic_write_bytes(path, data)
    return runs


def _status(run: CellRun) -> str | None:
    """Set ``run.status`` from its folder; returns why the folder cannot be used, or None."""
    folder = run.run_dir
    if not folder.exists() or not any(folder.iterdir()):
        return None
    record_path = folder / RECORD
    if not record_path.is_file():
        return f"{folder}: exists but was not made by unip-compare (no {RECORD})"
    record = read_record(folder)
    if record.get("argv") != run.argv:
        return f"{folder}: was run with other settings ({_argv_change(record.get('argv') or [], run.argv)})"
    if record.get("backbone_sha256") != run.backbone_sha256:
        return (
            f"{folder}: its backbone weights changed since it ran (sha256 "
            f"{str(record.get('backbone_sha256'))[:12]}... now {run.backbone_sha256[:12]}...)"
        )
    if (folder / METRICS).is_file():
        run.status = FINISHED
    elif (folder / CHECKPOINT).is_file():
        run.status = RESUME
    return None


def _as_options(argv: list[str]) -> dict[str, str]:
    opts, key = {}, None
    for a in argv:
        if a.startswith("--"):
            key = a
            opts[key] = "on"
        elif key is not None:
            opts[key] = a
    return opts


def _argv_change(old: list[str], new: list[str]) -> str:
    """The options that differ, ``--iters 200 -> 400``, for the refusal message."""
    a, b = _as_options(old), _as_options(new)
    changes = [
        f"{k} {a.get(k, 'unset')} -> {b.get(k, 'unset')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    return ", ".join(changes) or "argument order"


# --- the record -----------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(
            f"{run_dir / RECORD}: unreadable ({e}); delete the cell folder to run it again"
        ) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise PlanError(
            f"{run_dir / RECORD}: not a {RECORD_FORMAT} record; delete the cell folder to run it again"
        )
    return record


def record_attempt_start(run: CellRun) -> None:
    """Write (or extend) the cell's record before an attempt starts."""
    path = run.run_dir / RECORD
    if path.is_file():
        record = read_record(run.run_dir)
    else:
        c = run.cell
        record = {
            "format": RECORD_FORMAT,
            "cell": {
                "backbone": c.row.name,
                "dataset": c.dataset.name,
                "mode": c.mode.name,
                "layer": c.layer,
                "seed": c.seed,
            },
            "argv": run.argv,
            "backbone_sha256": run.backbone_sha256,
            "attempts": [],
        }
    record["attempts"].append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed": run.status == RESUME,
            "seconds": None,
            "exit": None,
        }
    )
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def record_attempt_end(run: CellRun, seconds: float, exit_status: int | None) -> None:
    record = read_record(run.run_dir)
    record["attempts"][-1].update(seconds=round(seconds, 2), exit=exit_status)
    atomic_write_text(run.run_dir / RECORD, json.dumps(record, indent=2) + "\n")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS).read_text(encoding="utf-8"))
