"""One cell attempt as a process: ``python -m unip_train.finetune ARGS`` with its output in
``CELL/unip-finetune.out``. Standard library only: a submitit job imports this module (and
nothing heavier) before it starts the cell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROCESS_LOG = "unip-finetune.out"
FINETUNE_MODULE = "unip_train.finetune"


def python_command(argv: list[str]) -> list[str]:
    """``python -m unip_train.finetune ARGV`` with this interpreter."""
    return [sys.executable, "-m", FINETUNE_MODULE, *argv]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a unip-finetune process: ours, the package this one runs first on the
    path (a cell runs the same code as the command that started it), plus ``extra``."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def start_finetune(
    argv: list[str], run_dir: str | Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``unip-finetune ARGV``, output appended to ``RUN/unip-finetune.out``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / PROCESS_LOG, "ab") as log:
        return subprocess.Popen(
            python_command(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(extra_env),
        )


def run_finetune(argv: list[str], run_dir: str) -> int:
    """Run ``unip-finetune ARGV`` to its end; returns its exit status. What a submitit job calls
    (the cluster, not us, decides the GPU it sees)."""
    return start_finetune(argv, run_dir).wait()


def last_line(run_dir: str | Path) -> str:
    """The last line unip-finetune printed (its one-line error, when it failed)."""
    path = Path(run_dir) / PROCESS_LOG
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
