"""Data-loader worker processes: how many every CLI starts by default (``--num-workers``).

The default is the CPU cores this process may use, shared among the training processes torchrun
starts on this machine, at most :data:`MAX_DEFAULT_WORKERS`: never more than the machine has, so
PyTorch's "suggested max number of worker" warning does not fire with the defaults.

When the model itself runs on the CPU, torch's intra-op threads compute on those same cores, and a
loader worker can only take time from them: on the 2-core machine, two workers made a fine-tuning
step 1.28x slower than the bare step and a small-data run 1.33x slower than no workers, while
loading in the training process costs only the loading itself (benchmarks/RESULTS.md). So on the
CPU the default gives workers only the cores torch's threads leave free: 0 where they use them all.
"""

from __future__ import annotations

import os

import torch

MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def computes_on_cpu(device: str | None = "auto") -> bool:
    """Whether a run with ``--device device`` computes on the CPU (``auto``: when no GPU is seen;
    ``None``: no model at all, as in unip-rois)."""
    if device is None:
        return False
    device = device.lower()
    return device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())


def default_num_workers(device: str | None = "auto", cap: int = MAX_DEFAULT_WORKERS) -> int:
    """Loader workers per process: ``min(cap, available cores // LOCAL_WORLD_SIZE)`` (torchrun's
    processes on this machine; 1 without torchrun), less torch's intra-op threads when the model
    runs on the CPU (see the module docstring)."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = available_cores() // local
    if computes_on_cpu(device):
        cores -= torch.get_num_threads()
    return max(0, min(cap, cores))
