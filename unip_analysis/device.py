"""Where a command computes and in which precision: one rule for every command (``--device``,
``--precision``), the analysis's and the trainers' alike.

``--device``: ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; ``cuda:N`` is checked against
the GPUs this process sees. ``--precision``: ``auto`` is bf16 on a CUDA device that has it (fp16 where
it does not) and float32 on the CPU; ``bf16`` also runs on the CPU; ``fp16`` needs CUDA; ``fp32`` is
float32 everywhere. Under autocast the model's matrix products run in the chosen dtype.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from .errors import SpecError

DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISIONS = ("auto", *DTYPES)  # the values of --precision
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # the values of --device
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available, else cpu); cuda:N is honoured exactly"


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device of ``--device device`` for this process, refused (:class:`SpecError`) when it
    is not visible.

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. A single process honours ``cuda:N``
    exactly. Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its LOCAL_RANK, so only
    ``cuda`` without an index is accepted there: an explicit index would be remapped or shared.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not DEVICE_PATTERN.fullmatch(str(device)):
        raise SpecError(f"--device {device!r}: expected {DEVICE_HELP}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise SpecError(f"--device {device}: no CUDA device is visible to this process; use --device cpu")
    count = torch.cuda.device_count()
    if world > 1:
        if dev.index is not None:
            raise SpecError(
                f"--device {device}: under torchrun each process uses the GPU of its local rank; pass "
                "--device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local >= count:
            raise SpecError(
                f"torchrun started process {local} on this machine, which has {count} GPU(s): one process per "
                f"GPU (--nproc-per-node {count}), or --device cpu"
            )
        return torch.device("cuda", local)
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise SpecError(
            f"--device {device}: this process sees {count} GPU(s) (cuda:0 to cuda:{count - 1}); "
            "pick one of those or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``--precision precision`` on ``device``, or None for float32."""
    if precision not in PRECISIONS:
        raise SpecError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type != "cuda":
        if precision == "fp16":
            raise SpecError(
                f"--precision fp16 needs CUDA; this run is on {device}; use --precision bf16 or fp32"
            )
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16`` / ``fp16`` / ``fp32``: the ``--precision`` value of an autocast dtype."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
