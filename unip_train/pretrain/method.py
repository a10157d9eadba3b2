"""What a pre-training method is to the shared run (:mod:`.trainer`): a small object that builds
what it trains, gives the loss of a batch, knows its own hooks and exports the backbone.

Everything else (data, parameter groups' optimizer, schedule, accumulation, precision, checkpoints
and exact resume, logging, torchrun) is the trainer's, once for every method.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

# Every method, by its --method value (filled as the method modules are imported).
METHODS: dict[str, type[PretrainMethod]] = {}


class PretrainMethod:
    """Base class of ``--method`` choices. Subclasses set the class attributes and override the
    methods marked so; the defaults below are the no-op hooks."""

    name: str = ""  # the --method value
    # This method's own options: a ``kw_only`` dataclass of ``command.option`` fields, each None
    # unless given (so that a given option of another method can be refused), grouped in --help
    # under the method's title; unip-pretrain's options dataclass inherits it.
    options: type | None = None
    # Values filled in after parsing for options left None: this method's own option defaults and the
    # common options whose default is the method's recipe (PAD's 30 warm-up epochs, say).
    defaults: dict[str, Any] = {}
    # Options that must match when a checkpoint of this method is resumed.
    resume_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    @classmethod
    def option_names(cls) -> set[str]:
        """The names of this method's own options."""
        return {f.name for f in dataclasses.fields(cls.options)} if cls.options else set()

    @classmethod
    def foreign_options(cls) -> set[str]:
        """The options of the other methods (refused when given, never recorded)."""
        return set().union(*(m.option_names() for m in METHODS.values())) - cls.option_names()

    def __init__(self, args: Any):
        self.args = args  # unip-pretrain's options (unip_train.pretrain.cli.PretrainOptions)
        self.module: torch.nn.Module | None = None  # built by build(): what DDP wraps

    def check_args(self) -> None:
        """Refuse option combinations this method cannot run; fill derived defaults."""

    def build(self, device: torch.device) -> None:
        """Load / create the models; set ``self.module`` (trainable parts requiring grad)."""
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over everything this method will ever train (see :mod:`unip_train.optim`)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(float32 scalar loss, extra numbers to log) for one micro-batch; ``model`` is
        ``self.module`` or its DDP wrapper, and must be what the forward goes through."""
        raise NotImplementedError

    def on_epoch(self, epoch: int) -> None:
        """Called before every epoch (also the first one after a resume)."""

    def proposals(self, sources: list) -> list | None:
        """Per-image object proposals ([K, 4] boxes or None), aligned with the sources' files, for
        object-aware crops; None: random resized crops for every image."""
        return None

    def identity(self) -> dict:
        """Facts about the starting weights a resumed checkpoint must share (sha256s, layers)."""
        return {}

    def info(self) -> dict:
        """What the run started from, for config.json and the exported summary."""
        return {}

    def describe(self) -> str:
        """One line for the terminal: what is trained from what."""
        return self.name

    def backbone(self) -> torch.nn.Module:
        """The model :meth:`export` writes (its digest proves processes stayed in sync)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds (the trained module's)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def export(self, out: Path, summary: dict) -> Path:
        """Write the backbone (and its JSON summary, ``summary`` merged in) into ``out``."""
        raise NotImplementedError
