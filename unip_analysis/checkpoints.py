"""One registry of checkpoint families, shared by analysis, the distillation teacher and fine-tuning.

A checkpoint is named ``FAMILY:ARCH:PATH``. ARCH is any timm ViT, BEiT or EVA name, optionally
with keyword overrides for ``timm.create_model``: ``vit_tiny_patch16_224(depth=6,embed_dim=128)``.
``timm:ARCH.TAG`` without a PATH names timm's pretrained weights, read from the local Hugging Face
cache (fetched only when the caller allows downloads).

Each family is one small function that turns the file as its authors publish it into a state
dict with timm's key names (method.md section 6), plus, where the file decides more than the
weights, a ``build`` hook (head counts, BEiT's bias layout, transformers' LayerNorm eps).
:func:`load_backbone` then adapts position embeddings to the requested image size and loads
strictly: a missing or unexpected backbone key is an error naming the keys, because a silently
random layer would make every number wrong. What a family's files may lack (CrossMAE's final
norm, a pooling module no analysis uses) is filled from the model's initialisation and said
in the backbone's notes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.vision_transformer import Attention

from . import pad_vit, transformers_format
from .attention import check_supported
from .errors import CheckpointError, SpecError
from .files import sha256_file

StateDict = dict[str, torch.Tensor]

# Classifier heads: dropped when the model (built with num_classes=0) has no such module.
_HEAD_KEYS = re.compile(r"^(head|head_dist|fc_norm|attn_pool)\.")
# Pooling modules that survive without a classifier (SigLIP's attn_pool, fc_norm of average
# pooling): loaded from the file when it has them; never used by analysis or LL-FPN.
_POOL_KEYS = re.compile(r"^(fc_norm|attn_pool)\.")


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


def _family_crossmae(obj: Any, path: Path) -> StateDict:
    """CrossMAE's released "wfm" models: MAE's layout without an encoder norm, plus the decoder's
    per-block norms of the weighted feature maps (``dec_norms.*``) and the weights (``wfm.*``)."""
    return _drop(_family_mae(obj, path), r"^(dec_norms\.|wfm\.)")


def _family_dino(obj: Any, path: Path) -> StateDict:
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("teacher", "model", "state_dict"), path)))
    return _drop(sd, r"^head\.")


def _family_dinov2(obj: Any, path: Path) -> StateDict:
    """DINOv2's own release (torch hub ``dinov2_vit*14[_reg4]_pretrain.pth``): timm names except
    the register tokens, the SwiGLU weights of ViT-g, and a mask token for iBOT-style training."""
    sd = _drop(_family_dino(obj, path), r"^mask_token$")
    return transformers_format.dinov2_to_timm(sd)


def _family_ibot(obj: Any, path: Path) -> StateDict:
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("state_dict", "teacher", "model"), path)))
    return _drop(sd, r"^(head\.|masked_embed$)")


def _family_deit(obj: Any, path: Path) -> StateDict:
    return _strip_prefixes(_tensors_only(_pick(obj, ("model", "state_dict"), path)))


def _family_deit3(obj: Any, path: Path) -> StateDict:
    return _layerscale_names(_family_deit(obj, path))


def _family_beit(obj: Any, path: Path) -> StateDict:
    """BEiT / BEiT v2 (microsoft/unilm, the names timm's Beit kept): ``ckpt["model"]`` (v2 may keep
    ``ckpt["module"]``); the MIM head, mask token and v2's patch-aggregation layers dropped."""
    sd = _strip_prefixes(_tensors_only(_pick(obj, ("model", "module", "state_dict"), path)))
    return _drop(sd, r"^(mask_token$|lm_head\.|cls_pt_layers\.)")


def beit_final_norm() -> dict[str, Any]:
    """timm ``Beit`` keyword arguments for a final norm and no ``fc_norm``: ``use_fc_norm=False`` where
    timm has it (1.0.31 has, 1.0.29 has not), else class-token pooling, which is how earlier versions
    choose it."""
    import inspect

    from timm.models.beit import Beit

    if "use_fc_norm" in inspect.signature(Beit.__init__).parameters:
        return {"use_fc_norm": False}
    return {"global_pool": "token"}


def _build_beit(arch: str, img_size: int | None, raw: Any, path: Path) -> torch.nn.Module:
    """The BEiT layout the file has: pre-training files share one relative position bias across
    blocks and keep the final norm; fine-tuned ones have a table per block and fc_norm."""
    sd = _family_beit(raw, path)
    layout: dict[str, Any] = {}
    if "rel_pos_bias.relative_position_bias_table" in sd:
        layout.update(use_shared_rel_pos_bias=True, use_rel_pos_bias=False)
    elif any(k.endswith("attn.relative_position_bias_table") for k in sd):
        layout.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    if "norm.weight" in sd and "fc_norm.weight" not in sd:
        layout.update(beit_final_norm())
    layout["use_abs_pos_emb"] = "pos_embed" in sd
    if not any(k.endswith(".gamma_1") for k in sd):
        layout["init_values"] = None
    return build_vit(arch, img_size=img_size, **layout)


def _family_timm(obj: Any, path: Path) -> StateDict:
    return _strip_prefixes(_tensors_only(_pick(obj, ("state_dict", "model"), path)))


def _family_unip(obj: Any, path: Path) -> StateDict:
    """A UNIP student: ours (safetensors, timm names) or the released ones (MAE's training
    format, ``ckpt["model"]`` with timm names and ``ckpt["args"]``)."""
    return _strip_prefixes(_tensors_only(_pick(obj, ("model", "state_dict"), path)))


def _build_unip(arch: str, img_size: int | None, raw: Any, path: Path) -> torch.nn.Module:
    """A UNIP student's last block has the teacher's head count: rebuilt from the file."""
    heads, _ = student_heads(path, raw)
    if heads is not None and len(heads) == 1:  # released files record the last block's count only
        model = build_vit(arch, img_size=img_size)
        set_attention_heads(model.blocks[-1].attn, heads[0])
        return model
    return build_vit(arch, img_size=img_size, heads_per_layer=heads)


def _build_pad(arch: str, img_size: int | None, raw: Any, path: Path) -> torch.nn.Module:
    """The ``pad`` family's model: ``arch`` with adapters whose width the file's tensors give."""
    sd = pad_vit.extract(raw, path)
    if path.suffix == ".safetensors":
        pad_vit.check_metadata(safetensors_metadata(path), path)
    return pad_vit.add_adapters(build_vit(arch, img_size=img_size), pad_vit.file_width(sd))


def _notes_unip(raw: Any, path: Path) -> list[str]:
    _, source = student_heads(path, raw)
    return [source]


def _family_hf(obj: Any, path: Path) -> StateDict:
    return transformers_format.to_timm(_tensors_only(_pick(obj, ("state_dict",), path)))


def _build_hf(arch: str, img_size: int | None, raw: Any, path: Path) -> torch.nn.Module:
    """The timm arch, with the folder's config.json deciding LayerNorm eps and the activation;
    any disagreement in shape (width, depth, heads, patch, registers) is an error."""
    config = transformers_format.read_config(path.parent / "config.json")
    model = build_vit(arch, img_size=img_size, **transformers_format.timm_kwargs(config, path.parent))
    transformers_format.check_config(config, model, arch, path.parent)
    return model


@dataclass(frozen=True)
class Family:
    """``extract(raw, path)``: the file's backbone weights with timm key names.
    ``build(arch, img_size, raw, path)``: the model to load them into, where the family needs more
    than :func:`build_vit` (head counts stored in the file, extra modules); ``None``: ``build_vit``.
    ``locate(path)``: the weights file behind what the user named (a folder for transformers).
    ``optional``: model keys (regex) the published files lack, and why; filled from the model's
    initialisation with a note. ``notes(raw, path)``: more notes for the user."""

    extract: Callable[[Any, Path], StateDict]
    description: str
    build: Callable[[str, int | None, Any, Path], torch.nn.Module] | None = None
    locate: Callable[[Path], Path] | None = None
    optional: tuple[str, str] | None = None
    notes: Callable[[Any, Path], list[str]] | None = None


FAMILIES: dict[str, Family] = {
    "mae": Family(_family_mae, 'MAE .pth: ckpt["model"]; decoder_* and mask_token dropped'),
    "crossmae": Family(
        _family_crossmae,
        'CrossMAE .pth (wfm models): ckpt["model"]; no encoder norm; decoder, dec_norms, wfm dropped',
        optional=(
            r"^norm\.(weight|bias)$",
            "final norm absent (CrossMAE's wfm encoders have none): a plain LayerNorm (weight 1, bias 0) "
            "stands in; attention does not use it and LL-FPN / linear probing read raw block outputs",
        ),
    ),
    "dino": Family(_family_dino, 'DINO .pth: backbone dict, or ckpt["teacher"] with backbone./module.'),
    "dinov2": Family(
        _family_dinov2, "DINOv2 .pth (torch hub release): register_tokens, mask_token, SwiGLU w12/w3 mapped"
    ),
    "ibot": Family(_family_ibot, 'iBOT .pth: ckpt["state_dict"] or ckpt["teacher"]; masked_embed dropped'),
    "deit": Family(_family_deit, 'DeiT .pth: ckpt["model"]; distilled variants keep dist_token'),
    "deit3": Family(_family_deit3, 'DeiT III .pth: ckpt["model"]; gamma_1/2 -> ls1/ls2'),
    "beit": Family(
        _family_beit,
        'BEiT / BEiT v2 .pth (unilm): ckpt["model"]; shared or per-block relative position bias as in the file',
        _build_beit,
    ),
    "timm": Family(
        _family_timm,
        "timm .safetensors/.bin: the dict itself, timm key names; or timm:ARCH.TAG from the HF cache",
    ),
    "unip": Family(
        _family_unip,
        'UNIP student: ours (.safetensors + student.json) or released (.pth, ckpt["args"].last_heads)',
        _build_unip,
        notes=_notes_unip,
    ),
    "hf": Family(
        _family_hf,
        "transformers folder (config.json + model.safetensors / pytorch_model.bin): ViT, ViTMAE, "
        "DINOv2 (+ registers), DeiT",
        _build_hf,
        locate=transformers_format.weights_file,
    ),
    "pad": Family(pad_vit.extract, "PAD backbone (adapters) from unip-pretrain --method pad", _build_pad),
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
) -> torch.nn.Module:
    """A randomly initialised timm ViT / BEiT / EVA without classifier; ``heads_per_layer``
    re-splits blocks' head counts (timm ViT attention only). ``extra`` overrides the arch's kwargs."""
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
    check_supported(model, f"architecture {name!r}")
    if heads_per_layer is not None:
        if len(heads_per_layer) != len(model.blocks):
            raise SpecError(
                f"heads_per_layer has {len(heads_per_layer)} entries but {name} has {len(model.blocks)} blocks"
            )
        for blk, heads in zip(model.blocks, heads_per_layer):
            if int(heads) != blk.attn.num_heads:
                set_attention_heads(blk.attn, int(heads))
    return model


def set_attention_heads(attn: torch.nn.Module, heads: int) -> None:
    """Re-split an attention module into ``heads`` heads; qkv/proj weights keep their shapes."""
    if type(attn) is not Attention:
        raise SpecError(
            f"re-splitting heads needs timm's ViT Attention; {type(attn).__name__} ties its parameters "
            "(position bias, rotary embedding) to the head count"
        )
    dim = attn.attn_dim
    if dim % heads:
        raise SpecError(f"cannot split attention width {dim} into {heads} heads")
    if not isinstance(attn.q_norm, torch.nn.Identity):
        raise SpecError("re-splitting heads is not supported for attention with q/k norm")
    attn.num_heads = heads
    attn.head_dim = dim // heads
    attn.scale = attn.head_dim**-0.5


def heads_per_layer(model: torch.nn.Module) -> list[int]:
    return [int(b.attn.num_heads) for b in model.blocks]


# --- loading -----------------------------------------------------------------------------


@dataclass
class LoadedBackbone:
    """A ViT with a family's weights loaded, and where they came from."""

    model: torch.nn.Module
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


def student_heads(path: Path, raw: Any = None) -> tuple[list[int] | None, str]:
    """Heads per block of a UNIP student, and where that came from: our safetensors header or
    student.json beside the file (every block), or a released file's ``args.last_heads`` (the
    last block only, as a one-element list)."""
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path)
        if "heads_per_layer" in meta:
            return [
                int(h) for h in json.loads(meta["heads_per_layer"])
            ], "head counts from the file's metadata"
    args = raw.get("args") if isinstance(raw, Mapping) else None
    last = getattr(args, "last_heads", None) if args is not None else None
    if last is not None:
        return [int(last)], f"last block split into {int(last)} heads (args.last_heads in the file)"
    side = path.with_name("student.json")
    if side.exists():
        info = json.loads(side.read_text())
        if "heads_per_layer" in info:
            return [int(h) for h in info["heads_per_layer"]], f"head counts from {side}"
    return None, (
        "the file records no head counts (no metadata, args.last_heads or student.json): "
        "analysed with the architecture's default split"
    )


def load_backbone(
    family: str,
    arch: str,
    path: str | Path | None,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> LoadedBackbone:
    """Build ``arch`` and load a ``family`` checkpoint into it, strictly. Frozen in eval mode.

    ``path`` ``None`` (family ``timm`` only): timm's pretrained weights for ``arch`` (``ARCH.TAG``)
    from the local Hugging Face cache; ``allow_download`` lets a missing file be fetched."""
    if family not in FAMILIES:
        raise SpecError(f"unknown checkpoint family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    notes: list[str] = []
    if path is None:
        if family != "timm":
            raise SpecError(
                f"family {family!r} needs a PATH; only timm:ARCH.TAG reads timm's pretrained weights"
            )
        weights, hub_note = timm_hub_weights(arch, allow_download)
        notes.append(hub_note)
        path = weights
    path = Path(path)
    weights = fam.locate(path) if fam.locate else path
    raw = read_weights_file(weights)
    sd = fam.extract(raw, weights)
    model = fam.build(arch, img_size, raw, weights) if fam.build else build_vit(arch, img_size=img_size)
    if fam.notes:
        notes += fam.notes(raw, weights)
    notes += adapt_state_dict(sd, model, weights, fam.optional)
    load_strict(model, sd, weights, arch)
    model.eval().requires_grad_(False).to(device)
    return LoadedBackbone(
        model=model,
        family=family,
        arch=arch,
        path=str(path),
        sha256=sha256_file(weights),
        img_size=int(model.patch_embed.img_size[0]),
        notes=notes,
    )


def adapt_state_dict(
    sd: StateDict, model: torch.nn.Module, path: Path, optional: tuple[str, str] | None = None
) -> list[str]:
    """Adapt ``sd`` in place to ``model``: drop classifier heads and buffers the model computes
    itself, fill what the family's files may lack, resize position embeddings and BEiT's
    relative position tables. Returns notes for the user."""
    notes = []
    target = model.state_dict()
    computed = {name for name, _ in model.named_buffers()} - set(target)  # non-persistent buffers
    for k in [k for k in sd if k in computed or k.endswith("relative_position_index")]:
        del sd[k]
    if "fc_norm.weight" in sd and "norm.weight" not in sd and "norm.weight" in target:
        # Global-pool fine-tuned checkpoints (MAE/BEiT style) carry fc_norm instead of norm.
        # Attention does not depend on the final norm; keep a plain LayerNorm and say so.
        sd["norm.weight"], sd["norm.bias"] = target["norm.weight"].clone(), target["norm.bias"].clone()
        notes.append(
            "final norm absent (checkpoint has fc_norm for global pooling); a plain LayerNorm stands in"
        )
    for k in [k for k in sd if _HEAD_KEYS.match(k) and k not in target]:
        del sd[k]
    if optional is not None:
        pattern, why = optional
        filled = [k for k in target if re.match(pattern, k) and k not in sd]
        for k in filled:
            sd[k] = target[k].clone()
        if filled:
            notes.append(why)
    pool = [k for k in target if _POOL_KEYS.match(k) and k not in sd]
    if pool:
        for k in pool:
            sd[k] = target[k].clone()
        modules = sorted({k.split(".")[0] for k in pool})
        notes.append(
            f"pooling module {', '.join(modules)} absent from the file: left at initialisation "
            "(no analysis or fine-tuning path uses it)"
        )
    pe = sd.get("pos_embed")
    if pe is not None and target.get("pos_embed") is not None and pe.shape != target["pos_embed"].shape:
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
    for k in [k for k in sd if k.endswith("relative_position_bias_table") and k in target]:
        if sd[k].shape != target[k].shape:
            window = tuple(model.patch_embed.grid_size)
            sd[k] = resize_rel_pos_bias_table(sd[k], new_window_size=window, new_bias_shape=target[k].shape)
            if not any("relative position" in n for n in notes):
                notes.append(f"relative position bias tables resized to a {window[0]}x{window[1]} window")
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


# --- timm's pretrained weights in the Hugging Face cache -----------------------------------------


def hub_cache_dir() -> str | None:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, HF_HOME/hub);
    ``None``: huggingface_hub's default (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def timm_hub_weights(arch: str, allow_download: bool = False) -> tuple[Path, str]:
    """The weights file of timm's pretrained ``ARCH.TAG`` in the local Hugging Face cache, and a
    note naming it. Never touches the network unless ``allow_download``."""
    from huggingface_hub import hf_hub_download

    name, _ = parse_arch(arch)
    if "." not in name:
        raise SpecError(
            f"timm:{name} without a PATH names timm's pretrained weights: add the tag, ARCH.TAG "
            f"(see timm.list_pretrained('{name}*')), or give the weights file as timm:{name}:PATH"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # timm's message names the unknown tag
        raise SpecError(f"timm:{name}: {e} (see timm.list_pretrained('{name.split('.')[0]}*'))") from None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise SpecError(
            f"timm:{name}: timm knows no Hugging Face hub weights for it; download the file yourself "
            "and name it as timm:ARCH:PATH"
        )
    repo = cfg.hf_hub_id
    cache = hub_cache_dir()
    failures = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            file = hf_hub_download(repo, filename, cache_dir=cache, local_files_only=not allow_download)
            return Path(file), f"timm pretrained weights {repo}/{filename} from the Hugging Face cache"
        except Exception as e:  # not cached, not on the hub, or no network: try the next name
            failures.append(f"{filename}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    if not allow_download:
        raise CheckpointError(
            f"timm:{name}: {repo} is not in {where}; fetch it once with --allow-download "
            f"(or huggingface-cli download {repo}), or pass the file as timm:ARCH:PATH"
        )
    raise CheckpointError(f"timm:{name}: could not fetch {repo} ({'; '.join(failures)})")


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    family: str
    arch: str
    path: str | None  # None: timm's pretrained weights (timm:ARCH.TAG)


def parse_spec(text: str) -> CheckpointSpec:
    """``NAME=FAMILY:ARCH:PATH`` (PATH may itself contain ':'), or ``NAME=timm:ARCH.TAG`` for timm's
    pretrained weights from the Hugging Face cache -> :class:`CheckpointSpec`."""
    name, eq, rest = text.partition("=")
    parts = rest.split(":", 2) if eq else []
    if len(parts) == 2 and parts[0].strip() == "timm":
        parts.append("")
    fix = (
        f"checkpoint spec {text!r}: expected NAME=FAMILY:ARCH:PATH, "
        "for example mae_l=mae:vit_large_patch16_224:/ckpt/mae_pretrain_vit_large.pth, "
        "or NAME=timm:ARCH.TAG for timm's pretrained weights"
    )
    if not eq or len(parts) != 3 or not name.strip() or not all(p.strip() for p in parts[:2]):
        raise SpecError(fix)
    family, arch, path = (p.strip() for p in parts)
    if family not in FAMILIES:
        raise SpecError(f"checkpoint spec {text!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if not path and family != "timm":
        raise SpecError(fix)
    return CheckpointSpec(name.strip(), family, arch, path or None)
