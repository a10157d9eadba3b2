"""Mixed precision of the trainers: the shared ``--precision`` rule (:mod:`unip_analysis.device`: ``auto``
is bf16 on a CUDA device that has it, fp16 with loss scaling where it does not, float32 on the CPU),
the old ``--amp`` values, loss scaling and run records' dtype names.

The old ``--amp`` values still read: ``none`` is ``fp32``; ``true`` / ``false`` (config files of
earlier versions) are ``auto`` / ``fp32``.
"""

from __future__ import annotations

import torch

from unip_analysis.device import PRECISIONS, autocast, autocast_dtype
from unip_analysis.errors import SpecError

__all__ = ["PRECISIONS", "amp_dtype", "autocast", "dtype_name", "grad_scaler", "normalize_amp"]

_OLD_VALUES = {"none": "fp32"}  # the old --amp value that is no --precision value


def normalize_amp(choice: str | bool) -> str:
    """A ``--precision`` value (one of :data:`PRECISIONS`) from a current or an old ``--amp`` value."""
    if isinstance(choice, bool):
        return "auto" if choice else "fp32"
    choice = _OLD_VALUES.get(choice, choice)
    if choice not in PRECISIONS:
        raise SpecError(f"--precision {choice!r}: expected one of {', '.join(PRECISIONS)}")
    return choice


def amp_dtype(choice: str | bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``--precision choice`` (current or old value) on ``device``, or None
    for float32: the shared rule, :func:`unip_analysis.device.autocast_dtype`."""
    return autocast_dtype(normalize_amp(choice), device)


def dtype_name(dtype: torch.dtype | None) -> str:
    """``bfloat16`` / ``float16`` / ``none``: how run records name the precision."""
    return str(dtype).replace("torch.", "") if dtype is not None else "none"


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, enabled for fp16 only (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
