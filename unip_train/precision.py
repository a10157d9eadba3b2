"""Mixed precision: one rule for ``unip-pretrain`` and ``unip-finetune`` (``--precision``).

``auto`` is bf16 on a CUDA device that has it (fp16 with loss scaling where it does not) and float32
on the CPU; ``bf16`` also runs on the CPU; ``fp16`` needs CUDA; ``fp32`` is float32 everywhere.
The old ``--amp`` values still read: ``none`` is ``fp32``; ``true`` / ``false`` (config files of
earlier versions) are ``auto`` / ``fp32``.
"""

from __future__ import annotations

import contextlib

import torch

from unip_analysis.errors import SpecError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AMP_CHOICES = ("auto", "bf16", "fp16", "none")  # the old --amp values
_OLD_VALUES = {"none": "fp32"}


def normalize_amp(choice: str | bool) -> str:
    """A ``--precision`` value (one of :data:`PRECISIONS`) from a current or an old ``--amp`` value."""
    if isinstance(choice, bool):
        return "auto" if choice else "fp32"
    choice = _OLD_VALUES.get(choice, choice)
    if choice not in PRECISIONS:
        raise SpecError(f"--precision {choice!r}: expected one of {', '.join(PRECISIONS)}")
    return choice


def amp_dtype(choice: str | bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``--precision choice`` on ``device``, or None for float32."""
    choice, device = normalize_amp(choice), torch.device(device)
    if device.type != "cuda":
        if choice == "fp16":
            raise SpecError(
                f"--precision fp16 needs CUDA; this run is on {device}; use --precision bf16 or fp32"
            )
        return torch.bfloat16 if choice == "bf16" else None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]


def dtype_name(dtype: torch.dtype | None) -> str:
    """``bfloat16`` / ``float16`` / ``none``: how run records name the precision."""
    return str(dtype).replace("torch.", "") if dtype is not None else "none"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, enabled for fp16 only (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
