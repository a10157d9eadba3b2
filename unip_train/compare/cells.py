"""A plan's cells against a results folder: each cell's unip-finetune arguments, its folder, and
whether it is finished, to be resumed, or new.

A cell folder is an ordinary unip-finetune run folder plus two files of ours:

- ``compare_cell.json``: the cell, its unip-finetune arguments (without ``--out`` / ``--resume``),
  the sha256 of its backbone weights, and one entry per attempt (start, seconds, exit status).
  It is written before the first attempt starts.
- ``unip-finetune.out``: what the unip-finetune process printed (:mod:`.processes`).

A cell is finished when ``metrics.json`` is there; interrupted when ``checkpoint.pt`` is there
(the next run passes ``--resume``); a failed attempt that left no checkpoint is started again, its
files moved to ``previous-<time>/`` first. Only a folder whose record matches what the plan now
asks is continued: one whose recorded arguments or weights differ, or one unip-compare did not
make, is refused before any cell runs (results are never mixed across settings), or with
``overwrite`` its files are moved to ``previous-<time>/`` and the cell starts anew.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unip_analysis import command, output_folder
from unip_analysis.files import atomic_write_bytes, atomic_write_text, sha256_file

from .backbones import random_init_bytes, random_init_path
from .plan import Cell, Plan, PlanError, finetune_options, option_argv
from .processes import PROCESS_LOG

RECORD = "compare_cell.json"
RECORD_FORMAT = "unip-compare-cell/1"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
# What unip-finetune writes into a run folder that marks it as holding a run (its MARKERS).
RUN_FILES = (CHECKPOINT, "model.pt", METRICS, "log.jsonl")

# replace: a folder of other settings that --overwrite moves aside before the cell starts.
FINISHED, RESUME, NEW, REPLACE = "finished", "resume", "new", "replace"


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


def prepare(
    plan: Plan,
    out: str | Path,
    write: bool = True,
    overwrite: bool = False,
    folder: output_folder.OutputFolder | None = None,
) -> list[CellRun]:
    """Every cell of ``plan`` under ``out`` with its status. ``write``: write the random-init weights
    that are missing, once every cell folder has been checked, and (with ``overwrite``) move the
    refused folders' files aside; with ``write=False`` nothing is written (their digest is computed
    in memory, refused folders show as ``replace``).

    Raises :class:`PlanError` when a cell folder holds a run with other settings, or a folder
    unip-compare did not make, unless ``overwrite``. ``folder``: the results folder's record,
    written (:meth:`~unip_analysis.output_folder.OutputFolder.begin`) before anything else.
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
            conflicts.append((run, problem))
        runs.append(run)
    if conflicts and not overwrite:
        more = f" (and {len(conflicts) - 1} more cell folders)" if len(conflicts) > 1 else ""
        raise PlanError(
            f"{conflicts[0][1]}{more}; pass --overwrite to move their files aside (into "
            f"{command.PREVIOUS_PREFIX}<time>/ in each folder) and run them again, or choose another --out"
        )
    if write and folder is not None:
        folder.begin()
    for run, _ in conflicts:
        run.status = REPLACE
        if write:
            move_cell_aside(run.run_dir)
            run.status = NEW
    if write:
        for path, data in to_write.items():
            atomic_write_bytes(path, data)
    return runs


def move_cell_aside(folder: Path, keep: tuple[str, ...] = ()) -> Path:
    """A cell folder is unip-compare's own (its record and the unip-finetune run it started): its
    files but ``keep`` go to ``previous-<time>/``."""
    return output_folder.move_aside(folder, [p.name for p in folder.iterdir() if p.name not in keep])


def _status(run: CellRun) -> str | None:
    """Set ``run.status`` from its folder; returns why the folder cannot be used, or None."""
    folder = run.run_dir
    entries = (
        [p for p in folder.iterdir() if not p.name.startswith(command.PREVIOUS_PREFIX)]
        if folder.is_dir()
        else []
    )
    if not entries:
        return None
    record_path = folder / RECORD
    if not record_path.is_file():
        return f"{folder}: exists but was not made by unip-compare (no {RECORD})"
    record = read_record(folder)
    recorded = record.get("argv") or []
    if canonical_options(recorded) != canonical_options(run.argv):
        return f"{folder}: was run with other settings ({_argv_change(recorded, run.argv)})"
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


def canonical_options(argv: list[str]) -> dict[str, str]:
    """unip-finetune arguments as ``{--option: value}`` under today's names, so that a cell recorded
    with an old spelling (``--crop 32``, ``--num-workers 0``, ``--amp none``) still matches."""
    known = finetune_options()
    opts = {}
    for flag, value in _as_options(argv).items():
        negated = flag.startswith("--no-") and flag[5:].replace("-", "_") in known
        name = (flag[5:] if negated else flag[2:]).replace("-", "_")
        spec = known.get(name)
        if spec is None:  # not an option (any more): compared as written
            opts[flag] = value
            continue
        value = "off" if negated else spec.deprecated_values.get(value, value)
        opts[spec.flag] = value
    return opts


def clear_failed_attempt(run: CellRun) -> None:
    """A cell that starts anew, in a folder where an earlier attempt died before its first
    checkpoint: that attempt's files go to ``previous-<time>/`` (unip-finetune refuses a folder
    holding a run); the cell's record and process output stay."""
    if run.status == NEW and any((run.run_dir / name).exists() for name in RUN_FILES):
        move_cell_aside(run.run_dir, keep=(RECORD, PROCESS_LOG))


def _as_options(argv: list[str]) -> dict[str, str]:
    opts, key = {}, None
    for a in argv:
        if a.startswith("--"):
            key = a
            opts.setdefault(key, "on")
        elif key is not None:
            # A repeated option (--unlabelled A --unlabelled B) keeps every value.
            opts[key] = a if opts[key] == "on" else f"{opts[key]},{a}"
    return opts


def _argv_change(old: list[str], new: list[str]) -> str:
    """The options that differ, ``--iters 200 -> 400``, for the refusal message."""
    a, b = canonical_options(old), canonical_options(new)
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
