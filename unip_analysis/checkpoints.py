"""One registry of checkpoint families, shared by analysis, the distillation teacher and fine-tuning.

A checkpoint is named ``FAMILY:ARCH:PATH``. ARCH is any timm ViT name, optionally with keyword
overrides for ``timm.create_model``: ``vit_tiny_patch16_224(depth=6,embed_dim=128,num_heads=4)``.

Each family is one small function that turns the file as its authors publish it into a state
dict with timm's key names (method.md section 6). :func:`load_backbone` then adapts the position
embedding to the requested image size and loads strictly: a missing or unexpected backbone key
is an error naming the keys, because a silently random layer would make every number wrong.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Attention, VisionTransformer

from . import pad_vit
from .errors import CheckpointError, SpecError
from .files import sha256_file

StateDict = dict[str, torch.Tensor]

# Keys of the classifier / pooling head: never part of the analysed backbone.
_HEAD_KEYS = re.compile(r"^(head|head_dist|fc_norm|attn_pool)\.")


# --- reading files -------------------------------------------------------------------


def read_weights_file(path: str | Path) -> Any:
    """Load a weights file without unpickling objects: safetensors, or torch.load(weights_only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol opcode 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "pass a .pth/.pt/.bin file written by torch.save, or a .safetensors file"
        )
    try:
        # Training checkpoints of MAE / DINO / iBOT carry their argparse.Namespace of options:
        # a plain attribute bag, safe to allow; everything else stays refused.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file can raise almost anything from inside the unpickler
        text = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused or "unrecognized function" in text or "allowlisted" in text:
            what = f" ({refused.group(1)})" if refused else ""
            raise CheckpointError(
                f"{path}: holds pickled Python objects beyond tensors{what}; refusing to unpickle it. "
                "Re-save only the state dict (torch.save(model.state_dict(), ...)) or use safetensors"
            ) from None
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
        msg = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({msg}); it may be truncated or not a PyTorch file"
        ) from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --- family quirks: one small function each -----------------------------------------


def _pick(obj: Any, keys: tuple[str, ...], path: Path) -> Mapping[str, Any]:
    """The first of ``keys`` present in a checkpoint dict, or the dict itself if it is flat."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for k in keys:
        if k in obj and isinstance(obj[k], Mapping):
            return obj[k]
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(
        f"{path}: no weights found; expected one of the entries {', '.join(keys)} "
        f"or a flat state dict, found entries {', '.join(map(str, list(obj)[:8]))}"
    )


def _tensors_only(sd: Mapping[str, Any]) -> StateDict:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(
    sd: StateDict, prefixes: tuple[str, ...] = ("module.", "backbone.", "encoder.")
) -> StateDict:
    """Remove wrapper prefixes; when some keys carry ``backbone.``, keep only those (DINO/iBOT heads)."""
    out = dict(sd)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def _drop(sd: StateDict, pattern: str) -> StateDict:
    rx = re.compile(pattern)
    return {k: v for k, v in sd.items() if not rx.match(k)}


def _layerscale_names(sd: StateDict) -> StateDict:
    """DeiT III / CaiT style ``blocks.i.gamma_1`` -> timm ``blocks.i.ls1.gamma``."""
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items()}


def _family_mae(obj: Any, path: Path) -> StateDict:
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("model", "state_dict"), path)))
    return _drop(sd, r"^(decoder_|decoder\.|mask_token$)")


def _family_dino(obj: Any, path: Path) -> StateDict:
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("teacher", "model", "state_dict"), path)))
    return _drop(sd, r"^head\.")


def _family_ibot(obj: Any, path: Path) -> StateDict:
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("state_dict", "teacher", "model"), path)))
    return _drop(sd, r"^(head\.|masked_embed$)")


def _family_deit(obj: Any, path: Path) -> StateDict:
    return _strip_prefixes(_tensors_only(_pick(obj, ("model", "state_dict"), path)))


def _family_deit3(obj: Any, path: Path) -> StateDict:
    return _layerscale_names(_family_deit(obj, path))


def _family_timm(obj: Any, path: Path) -> StateDict:
    return _strip_prefixes(_tensors_only(_pick(obj, ("state_dict", "model"), path)))


def _build_unip(arch: str, img_size: int | None, raw: Any, path: Path) -> VisionTransformer:
    """A UNIP student keeps the distilled head count in its last block (safetensors metadata)."""
    return build_vit(arch, img_size=img_size, heads_per_layer=student_heads(path))


@dataclass(frozen=True)
class Family:
    """``extract(raw, path)``: the file's backbone weights with timm key names.
    ``build(arch, img_size, raw, path)``: the model to load them into, where the family needs more
    than :func:`build_vit` (head counts stored in the file, extra modules); ``None``: ``build_vit``."""

    extract: Callable[[Any, Path], StateDict]
    description: str
    build: Callable[[str, int | None, Any, Path], VisionTransformer] | None = None


FAMILIES: dict[str, Family] = {
    "mae": Family(_family_mae, 'MAE .pth: ckpt["model"]; decoder_* and mask_token dropped'),
    "crossmae": Family(_family_mae, "CrossMAE .pth: as MAE"),
    "dino": Family(_family_dino, 'DINO .pth: backbone dict, or ckpt["teacher"] with backbone./module.'),
    "ibot": Family(_family_ibot, 'iBOT .pth: ckpt["state_dict"] or ckpt["teacher"]; masked_embed dropped'),
    "deit": Family(_family_deit, 'DeiT .pth: ckpt["model"]; distilled variants keep dist_token'),
    "deit3": Family(_family_deit3, 'DeiT III .pth: ckpt["model"]; gamma_1/2 -> ls1/ls2'),
    "timm": Family(_family_timm, "timm .safetensors/.bin: the dict itself, timm key names"),
    "unip": Family(_family_timm, "UNIP student .safetensors written by unip-pretrain", _build_unip),
    "pad": Family(pad_vit.extract, "PAD backbone (adapters) from unip-pretrain --method pad", pad_vit.build),
}


# --- building models ------------------------------------------------------------------


_ARCH_RX = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(?:\((.*)\))?\s*$")


def parse_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """``name(key=value, ...)`` -> (name, kwargs). Values are Python literals."""
    m = _ARCH_RX.match(arch)
    if not m:
        raise SpecError(f"architecture {arch!r}: expected a timm model name, optionally name(key=value,...)")
    name, args = m.group(1), m.group(2)
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, AssertionError):
            raise SpecError(
                f"architecture {arch!r}: overrides must read key=value with literal values"
            ) from None
    return name, kwargs


def build_vit(
    arch: str, img_size: int | None = None, heads_per_layer: list[int] | None = None, **extra: Any
) -> VisionTransformer:
    """A randomly initialised timm ViT; ``heads_per_layer`` re-splits blocks' head counts."""
    name, kwargs = parse_arch(arch)
    if not timm.is_model(name):
        raise SpecError(f"architecture {name!r} is not a timm model name (see timm.list_models('vit_*'))")
    kwargs.update(extra)
    kwargs.setdefault("num_classes", 0)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise SpecError(f"architecture {arch!r}: {e}") from None
    if not isinstance(model, VisionTransformer):
        raise SpecError(
            f"architecture {name!r} is a {type(model).__name__}, not a timm VisionTransformer; "
            "attention analysis needs a ViT"
        )
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk.attn, Attention):
            raise SpecError(
                f"architecture {name!r}: block {i + 1} uses {type(blk.attn).__name__}, "
                "not timm's Attention; this model family is not supported"
            )
    if heads_per_layer is not None:
        if len(heads_per_layer) != len(model.blocks):
            raise SpecError(
                f"heads_per_layer has {len(heads_per_layer)} entries but {name} has {len(model.blocks)} blocks"
            )
        for blk, heads in zip(model.blocks, heads_per_layer):
            set_attention_heads(blk.attn, int(heads))
    return model


def set_attention_heads(attn: Attention, heads: int) -> None:
    """Re-split an attention module into ``heads`` heads; qkv/proj weights keep their shapes."""
    dim = attn.attn_dim
    if dim % heads:
        raise SpecError(f"cannot split attention width {dim} into {heads} heads")
    if not isinstance(attn.q_norm, torch.nn.Identity):
        raise SpecError("re-splitting heads is not supported for attention with q/k norm")
    attn.num_heads = heads
    attn.head_dim = dim // heads
    attn.scale = attn.head_dim**-0.5


def heads_per_layer(model: VisionTransformer) -> list[int]:
    return [int(b.attn.num_heads) for b in model.blocks]


# --- loading -----------------------------------------------------------------------------


@dataclass
class LoadedBackbone:
    """A ViT with a family's weights loaded, and where they came from."""

    model: VisionTransformer
    family: str
    arch: str
    path: str
    sha256: str
    img_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def heads_per_layer(self) -> list[int]:
        return heads_per_layer(self.model)


def student_heads(path: Path) -> list[int] | None:
    """Heads per block of a UNIP student, from the safetensors header or student.json beside it."""
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path)
        if "heads_per_layer" in meta:
            return [int(h) for h in json.loads(meta["heads_per_layer"])]
    side = path.with_name("student.json")
    if side.exists():
        info = json.loads(side.read_text())
        if "heads_per_layer" in info:
            return [int(h) for h in info["heads_per_layer"]]
    return None


def load_backbone(
    family: str,
    arch: str,
    path: str | Path,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """Build ``arch`` and load a ``family`` checkpoint into it, strictly. Frozen in eval mode."""
    if family not in FAMILIES:
        raise SpecError(f"unknown checkpoint family {family!r}; known: {', '.join(FAMILIES)}")
    path = Path(path)
    raw = read_weights_file(path)
    fam = FAMILIES[family]
    sd = fam.extract(raw, path)
    model = fam.build(arch, img_size, raw, path) if fam.build else build_vit(arch, img_size=img_size)
    notes = adapt_state_dict(sd, model, path)
    load_strict(model, sd, path, arch)
    model.eval().requires_grad_(False).to(device)
    return LoadedBackbone(
        model=model,
        family=family,
        arch=arch,
        path=str(path),
        sha256=sha256_file(path),
        img_size=int(model.patch_embed.img_size[0]),
        notes=notes,
    )


def adapt_state_dict(sd: StateDict, model: VisionTransformer, path: Path) -> list[str]:
    """Adapt ``sd`` in place to ``model``: drop classifier heads, resize pos_embed. Returns notes."""
    notes = []
    target = model.state_dict()
    if "fc_norm.weight" in sd and "norm.weight" not in sd and "norm.weight" in target:
        # Global-pool fine-tuned checkpoints (MAE/BEiT style) carry fc_norm instead of norm.
        # Attention does not depend on the final norm; keep it at identity and say so.
        sd["norm.weight"], sd["norm.bias"] = target["norm.weight"].clone(), target["norm.bias"].clone()
        notes.append("final norm absent (checkpoint has fc_norm for global pooling); left at identity")
    for k in [k for k in sd if _HEAD_KEYS.match(k)]:
        del sd[k]
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in target and pe.shape != target["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        n_src = pe.shape[1] - prefix
        side = int(round(n_src**0.5))
        if side * side != n_src:
            raise CheckpointError(
                f"{path}: pos_embed has {pe.shape[1]} tokens, which is not {prefix} prefix tokens "
                f"plus a square grid; check the ARCH (prefix/register tokens) matches the checkpoint"
            )
        grid = tuple(model.patch_embed.grid_size)
        sd["pos_embed"] = resample_abs_pos_embed(
            pe, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix
        )
        notes.append(f"pos_embed resized from {side}x{side} to {grid[0]}x{grid[1]}")
    return notes


def load_strict(model: torch.nn.Module, sd: StateDict, path: Path, arch: str) -> None:
    """Load with exact key and shape agreement; the error names what differs."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} backbone keys ({_short(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_short(unexpected)})")
        hint = (
            "not a ViT checkpoint of this family/arch"
            if len(missing) > len(target) // 2
            else ("check FAMILY and ARCH (depth, registers, dist token, layer scale)")
        )
        raise CheckpointError(f"{path}: does not fit {arch}: {'; '.join(parts)}; {hint}")
    for k, v in sd.items():
        if v.shape != target[k].shape:
            raise CheckpointError(
                f"{path}: does not fit {arch}: {k} has shape {tuple(v.shape)}, "
                f"model expects {tuple(target[k].shape)}; check ARCH (width, patch size)"
            )
    model.load_state_dict(sd, strict=False)


def _short(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    family: str
    arch: str
    path: str


def parse_spec(text: str) -> CheckpointSpec:
    """``NAME=FAMILY:ARCH:PATH`` -> :class:`CheckpointSpec` (PATH may itself contain ':')."""
    name, eq, rest = text.partition("=")
    parts = rest.split(":", 2) if eq else []
    if not eq or len(parts) != 3 or not name.strip() or not all(p.strip() for p in parts):
        raise SpecError(
            f"checkpoint spec {text!r}: expected NAME=FAMILY:ARCH:PATH, "
            "for example mae_l=mae:vit_large_patch16_224:/ckpt/mae_pretrain_vit_large.pth"
        )
    family, arch, path = (p.strip() for p in parts)
    if family not in FAMILIES:
        raise SpecError(f"checkpoint spec {text!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return CheckpointSpec(name.strip(), family, arch, path)
