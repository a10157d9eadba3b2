"""What the loop benchmarks read about the machine and how they report: CPU seconds of this process
and its loader workers, the environment every report starts with, the one JSON line.

On a busy machine wall time measures the neighbours as much as the code; the CPU time the run
consumed (its threads plus its loader workers) is what it asked of the machine. On a quiet machine
whose cores the compute keeps busy, the two ratios agree.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def child_pids() -> list[int]:
    """Processes started by any thread of this one (Linux ``/proc``; empty elsewhere)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def cpu_seconds() -> float:
    """User + system seconds of this process and of its live children so far."""
    total = time.process_time()
    for pid in child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
    return total


def device_sync(device):
    """What makes a host timestamp bound the device's work: a CUDA synchronise, nothing on the CPU."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def environment() -> dict:
    """Machine, its load, torch threads, GPU, library versions: the head of every report."""
    import timm
    import torch

    from unip_analysis.workers import available_cores

    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu ({available_cores()} available)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def emit(report: dict, out: str | None = None) -> None:
    """The report as one JSON line on stdout (and in ``out`` when given)."""
    line = json.dumps(report)
    if out:
        Path(out).write_text(line + "\n")
    print(line)
