"""Data-loader worker processes: how many every CLI starts by default (``--num-workers``).

The default is the CPU cores this process may use, shared among the training processes torchrun
starts on this machine, at most :data:`MAX_DEFAULT_WORKERS`: never more than the machine has, so
PyTorch's "suggested max number of worker" warning does not fire with the defaults.
"""

from __future__ import annotations

import os

MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(cap: int = MAX_DEFAULT_WORKERS) -> int:
    """Loader workers per process: ``min(cap, available cores // LOCAL_WORLD_SIZE)`` (torchrun's
    processes on this machine; 1 without torchrun)."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cap, available_cores() // local))
