"""Mixed precision: one rule for ``unip-pretrain`` and ``unip-finetune`` (``--amp``).

``auto`` is bf16 on a CUDA device that has it (fp16 with loss scaling where it does not) and float32
on the CPU; ``bf16`` also runs on the CPU; ``fp16`` needs CUDA; ``none`` is float32 everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from unip_analysis.errors import SpecError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def normalize_amp(choice: str | bool) -> str:
    """An ``--amp`` value; ``True`` / ``False`` (what config files of earlier versions hold) read as
    ``auto`` / ``none``."""
    if isinstance(choice, bool):
        return "auto" if choice else "none"
    if choice not in AMP_CHOICES:
        raise SpecError(f"--amp {choice!r}: expected one of {', '.join(AMP_CHOICES)}")
    return choice


def amp_dtype(choice: str | bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``--amp choice`` on ``device``, or None for float32."""
    choice, device = normalize_amp(choice), torch.device(device)
    if device.type != "cuda":
        if choice == "fp16":
            raise SpecError(f"--amp fp16 needs CUDA; this run is on {device}; use --amp bf16 or none")
        return torch.bfloat16 if choice == "bf16" else None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


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
