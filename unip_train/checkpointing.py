"""Atomic training checkpoints: written to a temp file and renamed, so a kill never leaves a
half-written file and the previous checkpoint stays intact until the new one is complete.

Files are read back with ``torch.load(weights_only=True)``: checkpoints hold tensors, numbers,
strings, lists and dicts only (RNG states included), never pickled objects.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unip_analysis.checkpoints import read_weights_file
from unip_analysis.errors import CheckpointError
from unip_analysis.files import atomic_write


def _plain(obj: Any) -> Any:
    """Convert numpy arrays / tuples inside RNG states to types weights_only loading accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomically write ``state`` (model/optimizer state dicts, counters, RNG states)."""
    plain = _plain(state)
    return atomic_write(path, lambda tmp: torch.save(plain, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint through the registry's safe reader (weights_only, clear errors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint to resume from not found")
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a training checkpoint (holds a {type(state).__name__}, not a dict)"
        )
    return state


def numpy_state_from_plain(state: list) -> tuple:
    """Inverse of :func:`_plain` for ``np.random.get_state()``."""
    name, keys, pos, has_gauss, cached = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached))


def restore_rng_state(state: dict) -> None:
    """Set every RNG from a state saved by :func:`save_checkpoint` (``distributed.rng_state()``)."""
    from .distributed import set_rng_state

    state = dict(state)
    state["numpy"] = numpy_state_from_plain(state["numpy"])
    set_rng_state(state)


def check_same_settings(path: str | Path, saved: dict, current: dict, keys) -> None:
    """Refuse to resume when a setting that decides the data stream or the model differs."""
    for key in keys:
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{path}: saved with {key}={saved.get(key)!r}, this run has {current.get(key)!r}; "
                "resume with the same settings, or start a new run folder"
            )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over state-dict names and bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
