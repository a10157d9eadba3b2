"""What every training run folder holds besides weights (the command line itself, ``--config``
included, is :mod:`unip_analysis.command`'s).

- ``config.json``: the resolved configuration, written before the first step (:func:`write_config`).
- ``log.jsonl``: one JSON object per line; TensorBoard scalars beside it in ``RUN/tensorboard``
  when the optional ``tensorboard`` package is installed (:class:`ScalarLog`); its lines say how
  long the loop waited for batches (:class:`WaitClock`).
- Loader workers default to the cores this process may use (:func:`default_num_workers`, defined in
  :mod:`unip_analysis.workers` so that ``unip-analyze`` shares it).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unip_analysis.files import atomic_write_text
from unip_analysis.workers import MAX_DEFAULT_WORKERS, available_cores, default_num_workers

__all__ = [
    "MAX_DEFAULT_WORKERS", "ScalarLog", "WaitClock", "available_cores", "default_num_workers", "plain",
    "write_config",
]  # fmt: skip

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def plain(value: Any) -> Any:
    """JSON-ready copy: paths as strings, tuples as lists, non-finite floats as None."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """``RUN/config.json``: the resolved configuration (atomic write)."""
    return atomic_write_text(Path(run_dir) / CONFIG_NAME, json.dumps(plain(config), indent=2) + "\n")


# --- log.jsonl + TensorBoard --------------------------------------------------------------------


class ScalarLog:
    """Appends records to ``RUN/log.jsonl``; numeric fields also go to TensorBoard (``RUN/tensorboard``)
    when ``tensorboard`` is installed. Only the process with ``enabled=True`` (rank 0) writes.

    ``resume_step``: records past it (written by a run that was killed) are dropped from the log,
    and TensorBoard events from that step on are purged, so a resumed run's curves do not double.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        step_key: str = "step",
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.path = Path(run_dir) / LOG_NAME
        self.enabled, self.step_key = enabled, step_key
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        if tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR, resume_step)

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            value = json.loads(line).get(self.step_key)
            if value is None or value <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One line of ``log.jsonl``; each finite number except the step also as ``prefix/name``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(plain(record)) + "\n")
        step = record.get(self.step_key)
        if self.writer is not None and step is not None:
            for key, value in record.items():
                if key == self.step_key:
                    continue
                # A list of numbers (one per layer, say) becomes one curve per element: name/0, name/1...
                values = enumerate(value) if isinstance(value, list) else [(None, value)]
                for i, v in values:
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        tag = f"{prefix}/{key}" if i is None else f"{prefix}/{key}/{i}"
                        self.writer.add_scalar(tag, v, int(step))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboard_writer(folder: Path, purge_step: int | None):
    """A SummaryWriter, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when tensorboard is missing
        return None
    if purge_step is not None:
        _wait_past_event_files(folder)
    return SummaryWriter(log_dir=str(folder), purge_step=None if purge_step is None else purge_step + 1)


def _wait_past_event_files(folder: Path) -> None:
    """Sleep (under a second) until the clock is past the newest event file's second.

    TensorBoard reads a folder's event files in the order of their names,
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``, and the purge a resumed writer records
    only removes events read before it. Two writers started in the same second are ordered by a
    counter written without padding, so the tenth sorts before the ninth and the killed run's steps
    survive the purge. A resumed writer's file must therefore carry a later second.
    """
    seconds = [
        int(m.group(1)) for f in folder.glob("events.out.tfevents.*") if (m := _EVENT_SECOND.match(f.name))
    ]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(max(seconds) + 1.01 - time.time())


_EVENT_SECOND = re.compile(r"events\.out\.tfevents\.(\d+)\.")


class WaitClock:
    """Seconds a training loop spends waiting for its batches: :meth:`wrap` the loader, :meth:`take`
    the seconds waited since the last take (one logging window). Items are drawn only when the loop
    asks for them, so ``zip(range(n), clock.wrap(loader))`` draws no more than ``n``."""

    def __init__(self) -> None:
        self.waited = 0.0

    def wrap(self, iterable: Iterable) -> Iterator:
        items = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            yield item

    def take(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited
