"""Running a plan's cells: at most ``jobs`` unip-finetune processes at a time, on this machine
(one GPU per process where there are several; CPU threads split among them) or through a
submitit executor (SLURM, or submitit's local executor), with progress and an estimate of the
time left.

Every attempt is ``python -m unip_train.finetune ARGS`` in its own process (:mod:`.processes`).
This module schedules, watches and stops those processes; what a cell is (arguments, status) is
:mod:`.cells`'.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unip_analysis.errors import UnipError

from ..runs import available_cores
from .cells import (
    FINISHED,
    METRICS,
    RESUME,
    CellRun,
    clear_failed_attempt,
    read_metrics,
    record_attempt_end,
    record_attempt_start,
)
from .processes import PROCESS_LOG, last_line, run_finetune, start_finetune

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SUBMITIT_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after 2 minutes by default


@dataclass
class Outcome:
    """How one attempt at a cell ended. ``exit`` is the process's status (negative: killed by that
    signal), None when the job never reported one."""

    run: CellRun
    exit: int | None
    seconds: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.exit == 0


# --- where cells run -------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` entries, else 0..count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - torch is a dependency
        return []


def device_slots(jobs: int, gpus: list[str] | None = None) -> list[tuple[str, dict[str, str]]]:
    """``jobs`` places to run a cell: (description, environment). With GPUs, slot i sees GPU
    ``i mod count`` only; on CPU each slot gets ``cores // jobs`` threads (unless the caller set
    ``OMP_NUM_THREADS`` itself)."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        return [
            (f"GPU {gpus[i % len(gpus)]}", {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(jobs)
        ]
    given = os.environ.get("OMP_NUM_THREADS")
    threads = given or str(max(1, available_cores() // jobs))
    env = {} if given else {var: threads for var in THREAD_VARS}
    return [(f"CPU, {threads} thread{'' if threads == '1' else 's'}", env)] * jobs


class _Process:
    """A started cell process, seen like a future: ``done()``, ``result()`` (its exit status)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self) -> int:
        return self.proc.wait()


class LocalBackend:
    """Cells as child processes of this one."""

    poll_seconds = 0.2

    def __init__(self, jobs: int, gpus: list[str] | None = None):
        self.slots = device_slots(jobs, gpus)
        self.procs: list[subprocess.Popen] = []

    def describe(self) -> str:
        places = sorted({d for d, _ in self.slots})
        return f"{len(self.slots)} at a time on this machine ({', '.join(places)})"

    def start(self, run: CellRun, slot: int):
        desc, env = self.slots[slot]
        proc = start_finetune(run.command(), run.run_dir, env)
        self.procs.append(proc)
        return _Process(proc), desc

    def stop(self) -> None:
        """Ctrl-C: end the cell processes this command started (they resume on the next run)."""
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            proc.terminate()
        for proc in alive:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


class SubmititBackend:
    """Cells as jobs of a submitit executor (``submitit.AutoExecutor(cluster="slurm")``,
    ``submitit.LocalExecutor``, ...). Each job runs :func:`run_finetune`."""

    def __init__(self, executor: Any, poll_seconds: float | None = None):
        self.executor = executor
        self.jobs: list[Any] = []
        name = type(executor).__name__
        slurm = getattr(executor, "cluster", "") == "slurm" or "Slurm" in name
        self.poll_seconds = poll_seconds if poll_seconds is not None else (10.0 if slurm else 0.5)

    def describe(self) -> str:
        cluster = getattr(self.executor, "cluster", None) or type(self.executor).__name__
        return f"as submitit jobs ({cluster}; logs in {self.executor.folder})"

    def start(self, run: CellRun, slot: int):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        job = self.executor.submit(run_finetune, run.command(), str(run.run_dir))
        self.jobs.append(job)
        return job, f"job {job.job_id}"

    def stop(self) -> None:
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)


def submitit_executor(kind: str, folder: Path, **params: Any):
    """A submitit executor: ``slurm`` (``AutoExecutor(cluster="slurm")``) or ``local``
    (submitit's LocalExecutor); ``params`` go to ``update_parameters`` (``timeout_min``,
    ``slurm_partition``, ``gpus_per_node``, ...; None values are left out)."""
    try:
        import submitit
    except ImportError:
        raise UnipError(
            f"--executor {kind} needs submitit: pip install 'unip-toolkit[compare]' (or pip install submitit)"
        ) from None
    params = {k: v for k, v in params.items() if v is not None}
    try:
        if kind == "local":
            executor = submitit.LocalExecutor(folder=str(folder))
            params.setdefault("timeout_min", SUBMITIT_TIMEOUT_MIN)
        else:
            executor = submitit.AutoExecutor(folder=str(folder), cluster=kind)
        if params:
            executor.update_parameters(**params)
    except (RuntimeError, ValueError) as e:  # no srun on this machine, a parameter submitit refuses
        raise UnipError(f"--executor {kind}: {' '.join(str(e).split())}") from None
    return executor


# --- progress ----------------------------------------------------------------------------------


def estimate_remaining(
    durations: list[float], queued: int, running_elapsed: list[float], jobs: int
) -> float | None:
    """Seconds left: every queued cell and the rest of every running one take the mean duration of
    the cells finished so far, ``jobs`` at a time. None before the first cell finishes."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = queued * mean + sum(max(mean - e, 0.0) for e in running_elapsed)
    return work / max(1, min(jobs, queued + len(running_elapsed)))


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "after the first cell"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_cells(
    runs: list[CellRun],
    jobs: int = 1,
    executor: Any = None,
    say: Callable[[str], None] = print,
    gpus: list[str] | None = None,
) -> list[Outcome]:
    """Run every cell of ``runs`` that is not finished (resuming interrupted ones), at most ``jobs``
    at a time; ``executor``: a submitit executor, or None for child processes on this machine.
    Returns one :class:`Outcome` per attempted cell. Ctrl-C stops the running cells (a re-run
    resumes them) and re-raises."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    todo = deque(r for r in runs if r.status != FINISHED)
    total, done_before = len(runs), len(runs) - len(todo)
    resuming = sum(r.status == RESUME for r in todo)
    if not todo:
        say(f"all {total} cells finished earlier; nothing to run")
        return []
    backend = LocalBackend(jobs, gpus) if executor is None else SubmititBackend(executor)
    say(
        f"{total} cells: {done_before} finished earlier, {resuming} to resume, {len(todo) - resuming} to start; "
        f"{backend.describe()}"
    )
    free = list(range(jobs))
    running: dict[int, tuple[CellRun, Any, float]] = {}  # slot -> (run, handle, start time)
    outcomes: list[Outcome] = []
    durations: list[float] = []
    finished = started = done_before
    try:
        while todo or running:
            while todo and free:
                slot, run = free.pop(0), todo.popleft()
                clear_failed_attempt(run)
                record_attempt_start(run)
                handle, where = backend.start(run, slot)
                running[slot] = (run, handle, time.time())
                started += 1
                how = "resume from checkpoint" if run.status == RESUME else "start"
                say(f"{how} {run.label} ({where}); cell {started} of {total}")
            time.sleep(backend.poll_seconds)
            for slot in [s for s, (_, h, _) in running.items() if h.done()]:
                run, handle, t0 = running.pop(slot)
                free.append(slot)
                seconds = time.time() - t0
                exit_status, message = _result(handle)
                record_attempt_end(run, seconds, exit_status)
                outcome = Outcome(run, exit_status, seconds, message)
                outcomes.append(outcome)
                now = time.time()
                left = len(todo) + len(running)
                if outcome.ok and (run.run_dir / METRICS).is_file():
                    run.status = FINISHED
                    finished += 1
                    durations.append(seconds)
                    eta = estimate_remaining(
                        durations, len(todo), [now - t for _, _, t in running.values()], jobs
                    )
                    miou = read_metrics(run.run_dir).get("miou")
                    say(
                        f"done {run.label} in {format_seconds(seconds)}, mIoU {_num(miou)}; {finished} of {total} "
                        f"done, {left} left, about {format_seconds(eta) if left else '0s'} to go"
                    )
                else:
                    outcome.message = outcome.message or _failure(run, exit_status)
                    say(f"FAILED {run.label}: {outcome.message}; {left} left")
    except KeyboardInterrupt:
        say(f"interrupted: stopping {len(running)} running cell(s); run the same command again to resume")
        backend.stop()
        for run, _, t0 in running.values():
            record_attempt_end(run, time.time() - t0, None)
        raise
    return outcomes


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _result(handle: Any) -> tuple[int | None, str]:
    """(exit status, message) of a finished future or submitit job."""
    try:
        return int(handle.result()), ""
    except Exception as e:  # a submitit job that failed outside unip-finetune (timeout, node failure)
        text = " ".join(str(e).split())
        return None, f"the job failed: {text[-300:]}"


def _failure(run: CellRun, exit_status: int | None) -> str:
    log = run.run_dir / PROCESS_LOG
    if exit_status is not None and exit_status < 0:
        how = f"killed by signal {-exit_status}"
    elif exit_status == 0:
        how = "exited 0 but wrote no metrics.json"
    else:
        how = f"exit status {exit_status}"
    line = last_line(run.run_dir)
    return f"{how}{': ' + line if line else ''} (output: {log}); run the same command again to retry / resume"
