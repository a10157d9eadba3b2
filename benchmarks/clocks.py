"""CPU seconds of this process and its live children (loader workers), for the loop benchmarks.

On a busy machine wall time measures the neighbours as much as the code; the CPU time the run
consumed (its threads plus its loader workers) is what it asked of the machine. On a quiet machine
whose cores the compute keeps busy, the two ratios agree.
"""

from __future__ import annotations

import os
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
