"""What a plan's ``backbone`` entry may say, and what each cell passes to ``unip-finetune --backbone``.

Three forms:

- ``FAMILY:ARCH:PATH``: a checkpoint of a family of :data:`unip_analysis.checkpoints.FAMILIES`.
- a run folder: ``student.safetensors`` + ``student.json`` (``unip-pretrain``, family ``unip``) or
  ``backbone.safetensors`` + ``backbone.json`` (PAD continual pre-training, family from the json,
  ``pad`` by default). The architecture is the json's ``arch``.
- ``random:ARCH``: the architecture with timm's initialisation drawn from the cell's seed, written
  once per seed as a timm safetensors file into the results folder, so that the "random init" row
  is an ordinary fine-tuning run of an ordinary file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from unip_analysis.checkpoints import FAMILIES, parse_arch
from unip_analysis.errors import SpecError
from unip_analysis.files import read_json

RANDOM_FAMILY = "random"
# Run folders: (weights file, json beside it, family when the json does not name one).
RUN_FOLDERS = (
    ("student.safetensors", "student.json", "unip"),
    ("backbone.safetensors", "backbone.json", "pad"),
)
RANDOM_INIT_DIR = "random_init"


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: family, architecture and weights file (``None`` for random init)."""

    family: str
    arch: str
    path: Path | None

    @property
    def is_random(self) -> bool:
        return self.family == RANDOM_FAMILY

    def spec(self, weights: Path | None = None) -> str:
        """``FAMILY:ARCH:PATH`` for ``unip-finetune --backbone``; random init needs ``weights``
        (the file :func:`.cells.prepare` wrote) and reads as a timm checkpoint."""
        if self.is_random:
            if weights is None:
                raise ValueError("a random-init backbone needs the path of its written weights")
            return f"timm:{self.arch}:{weights}"
        return f"{self.family}:{self.arch}:{self.path}"


def resolve_backbone(text: str, base: Path) -> Backbone:
    """Parse a plan's ``backbone`` value; relative paths are taken from ``base`` (the plan's folder).

    Raises :class:`SpecError` (message without the plan entry; the caller prefixes it).
    """
    text = text.strip()
    candidate = base / text if not Path(text).is_absolute() else Path(text)
    if ":" not in text or candidate.is_dir():
        return _run_folder(candidate)
    family, _, rest = text.partition(":")
    family = family.strip()
    if family == RANDOM_FAMILY:
        arch = rest.strip()
        if not arch or (":" in arch and "(" not in arch):
            raise SpecError(f"{text!r}: expected random:ARCH, for example random:vit_small_patch16_224")
        parse_arch(arch)
        return Backbone(RANDOM_FAMILY, arch, None)
    arch, sep, path = rest.partition(":")
    if not sep or not arch.strip() or not path.strip():
        raise SpecError(
            f"{text!r}: expected FAMILY:ARCH:PATH, a unip-pretrain / PAD run folder, or random:ARCH"
        )
    if family not in FAMILIES:
        raise SpecError(
            f"{text!r}: unknown family {family!r}; known: {', '.join([*FAMILIES, RANDOM_FAMILY])}"
        )
    parse_arch(arch.strip())
    weights = Path(path.strip())
    weights = weights if weights.is_absolute() else base / weights
    if not weights.is_file():
        raise SpecError(f"{text!r}: weights file {weights} not found")
    return Backbone(family, arch.strip(), weights.resolve())


def _run_folder(folder: Path) -> Backbone:
    if not folder.is_dir():
        raise SpecError(
            f"{folder}: not a folder, and not FAMILY:ARCH:PATH or random:ARCH; give a checkpoint spec "
            "or a unip-pretrain / PAD run folder"
        )
    for weights_name, json_name, default_family in RUN_FOLDERS:
        weights, info_path = folder / weights_name, folder / json_name
        if not info_path.is_file():
            continue
        if not weights.is_file():
            raise SpecError(f"{folder}: has {json_name} but no {weights_name}; the run did not finish")
        info = read_json(info_path, SpecError, json_name)
        arch = info.get("arch") if isinstance(info, dict) else None
        if not isinstance(arch, str) or not arch:
            raise SpecError(f"{info_path}: no 'arch' entry naming the architecture")
        family = info.get("family", default_family)
        if family not in FAMILIES:
            raise SpecError(
                f"{info_path}: family {family!r} is not a known checkpoint family ({', '.join(FAMILIES)})"
            )
        parse_arch(arch)
        return Backbone(family, arch, weights.resolve())
    names = " or ".join(f"{w} + {j}" for w, j, _ in RUN_FOLDERS)
    raise SpecError(f"{folder}: a run folder must hold {names}")


# --- random initialisation ------------------------------------------------------------------


def random_init_bytes(arch: str, seed: int) -> bytes:
    """The safetensors bytes of ``arch`` with timm's default initialisation under ``seed``."""
    import torch
    from safetensors.torch import save

    from unip_analysis.checkpoints import build_vit

    devices = []  # fork_rng: the caller's random state is left as it was
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = build_vit(arch)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata entry: safetensors writes several in no fixed order, and the bytes must be
    # reproducible (a cell's record holds their sha256).
    return save(state, metadata={"unip-compare/random-init": json.dumps({"arch": arch, "seed": seed})})


def random_init_path(out: Path, row: str, seed: int) -> Path:
    return out / RANDOM_INIT_DIR / row / f"seed{seed}.safetensors"
