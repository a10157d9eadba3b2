"""What every training run folder holds besides weights, and the command-line conventions both
trainers share.

- ``--config FILE`` (JSON or TOML) sets option defaults; flags on the command line override it
  (:func:`parse_with_config`).
- ``config.json``: the resolved configuration, written before the first step (:func:`write_config`).
- ``log.jsonl``: one JSON object per line; TensorBoard scalars beside it in ``RUN/tensorboard``
  when the optional ``tensorboard`` package is installed (:class:`ScalarLog`); its lines say how
  long the loop waited for batches (:class:`WaitClock`).
- Loader workers default to the cores this process may use (:func:`default_num_workers`, defined in
  :mod:`unip_analysis.workers` so that ``unip-analyze`` shares it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from unip_analysis.errors import SpecError
from unip_analysis.files import atomic_write_text
from unip_analysis.workers import MAX_DEFAULT_WORKERS, available_cores, default_num_workers

__all__ = [
    "MAX_DEFAULT_WORKERS", "ScalarLog", "WaitClock", "available_cores", "default_num_workers", "parse_with_config",
    "plain", "read_config_file", "write_config",
]  # fmt: skip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


# --- --config FILE ----------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option names to values from a ``.json`` or ``.toml`` file.

    Keys are long option names with ``-`` or ``_`` (``batch_size`` or ``batch-size``). A
    ``config.json`` written by a run is accepted as is, so a run can be repeated from its folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: --config file not found; pass a .json or .toml file of option defaults")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise SpecError(f"{path}: --config must end in .json or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"{path}: cannot parse --config file ({e}); fix its syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: --config must hold one table/object of option = value pairs")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` where ``--config FILE`` (which ``parser`` must define) supplies
    the defaults. Keys the parser does not know are refused with the file named; keys in ``ignore``
    (derived values a ``config.json`` records, such as ``world_size``) are skipped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    values = read_config_file(known.config)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    # An option that takes a value may also be named by any of its long spellings (``num_workers``
    # for dest ``workers``); flags without a value only by their dest (``no_amp = true`` would
    # otherwise read as amp = true).
    for a in list(actions.values()):
        if a.nargs != 0:
            for opt in a.option_strings:
                if opt.startswith("--"):
                    actions.setdefault(opt[2:].replace("-", "_"), a)
    unknown = sorted(k for k in values if k not in actions and k not in ignore)
    if unknown:
        raise SpecError(
            f"{known.config}: unknown option(s) {', '.join(unknown)}; keys are this command's long "
            "option names (see --help)"
        )
    defaults = {}
    for key, value in values.items():
        if key not in actions:
            continue
        action = actions[key]
        defaults[action.dest] = _convert(action, value, known.config)
        action.required = False  # given by the file; the command line may still override it
    # argparse appends a repeatable option's values to its default, so a list from the file would be
    # extended by the same option on the command line: parse those from None, and let the command
    # line replace the file's list.
    appended = [
        a.dest for a in parser._actions if isinstance(a, argparse._AppendAction) and a.dest in defaults
    ]
    parser.set_defaults(**{**defaults, **dict.fromkeys(appended)})
    args = parser.parse_args(argv)
    for dest in appended:
        if getattr(args, dest) is None:
            setattr(args, dest, defaults[dest])
    return args


def _convert(action: argparse.Action, value: Any, path: str) -> Any:
    """A file value as argparse would have produced it from the command line."""
    if value is None or action.type is None:
        return value
    try:
        # argparse has no public name for "appends each use"; its private class is stable since 3.2.
        repeated = isinstance(action, argparse._AppendAction)
        if isinstance(value, list) and action.nargs is None and not repeated:
            # One option value given as a list (``layers = [4, 6, 8, 12]``): its comma-separated form.
            return action.type(",".join(map(str, value)))
        if isinstance(value, list):
            return [action.type(v if isinstance(v, str) else str(v)) for v in value]
        return action.type(value if isinstance(value, str) else str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise SpecError(f"{path}: option {action.dest} = {value!r}: {e}") from None


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
    return SummaryWriter(log_dir=str(folder), purge_step=None if purge_step is None else purge_step + 1)


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
