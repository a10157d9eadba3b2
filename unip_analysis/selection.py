"""``layer_selection.json``: the one contract between analysis and training (schema version 1).

This module alone writes, reads and validates the file. Layout::

    {schema_version: 1, generator, created,
     thresholds: {global_max, local_min},
     images: {dir, count, img_size, norm},
     models: {NAME: {family, arch, weights, weights_sha256, depth, embed_dim, patch_size,
                     num_prefix_tokens, heads_per_layer: [...],
                     layers: [{layer (1-based), nmi, nmi_ci95: [lo, hi], attn_distance,
                               pattern, head_nmi: [...]}],
                     selected_layer (int or null), selected_heads (int or null), selection_rule}}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import SelectionError
from .files import atomic_write_text, read_json, sha256_file
from .patterns import PATTERNS

SCHEMA_VERSION = 1
FILENAME = "layer_selection.json"

_TOP = {
    "schema_version": int,
    "generator": str,
    "created": str,
    "thresholds": dict,
    "images": dict,
    "models": dict,
}
_MODEL = {
    "family": str,
    "arch": str,
    "weights": str,
    "weights_sha256": str,
    "depth": int,
    "embed_dim": int,
    "patch_size": int,
    "num_prefix_tokens": int,
    "heads_per_layer": list,
    "layers": list,
    "selection_rule": str,
}
_LAYER = {
    "layer": int,
    "nmi": float,
    "nmi_ci95": list,
    "attn_distance": float,
    "pattern": str,
    "head_nmi": list,
}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_fields(obj: Any, fields: dict[str, type], where: str, src: str) -> None:
    if not isinstance(obj, dict):
        raise SelectionError(f"{src}: {where} must be an object, found {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise SelectionError(f"{src}: {where} lacks '{key}'; regenerate the file with unip-analyze")
        if not _type_ok(obj[key], kind):
            raise SelectionError(f"{src}: {where}.{key} should be {kind.__name__}, found {obj[key]!r}")


def validate(doc: Any, src: str = "layer_selection.json") -> dict:
    """Check a document against schema version 1; returns it, or raises :class:`SelectionError`."""
    if not isinstance(doc, dict):
        raise SelectionError(f"{src}: top level must be a JSON object")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SelectionError(
            f"{src}: schema_version is {version!r}, this toolkit reads version {SCHEMA_VERSION}; "
            "regenerate the file with this version of unip-analyze"
        )
    _check_fields(doc, _TOP, "top level", src)
    _check_fields(doc["thresholds"], {"global_max": float, "local_min": float}, "thresholds", src)
    _check_fields(doc["images"], {"dir": str, "count": int, "img_size": int, "norm": str}, "images", src)
    if not doc["models"]:
        raise SelectionError(f"{src}: 'models' is empty")
    for name, m in doc["models"].items():
        where = f"models.{name}"
        _check_fields(m, _MODEL, where, src)
        depth = m["depth"]
        if len(m["heads_per_layer"]) != depth or len(m["layers"]) != depth:
            raise SelectionError(
                f"{src}: {where} has depth {depth} but {len(m['layers'])} layers / "
                f"{len(m['heads_per_layer'])} head counts"
            )
        for i, layer in enumerate(m["layers"]):
            _check_fields(layer, _LAYER, f"{where}.layers[{i}]", src)
            if layer["layer"] != i + 1:
                raise SelectionError(
                    f"{src}: {where}.layers[{i}].layer is {layer['layer']}, expected {i + 1}"
                )
            if layer["pattern"] not in PATTERNS:
                raise SelectionError(
                    f"{src}: {where}.layers[{i}].pattern {layer['pattern']!r} not in {PATTERNS}"
                )
            if len(layer["head_nmi"]) != m["heads_per_layer"][i]:
                raise SelectionError(
                    f"{src}: {where}.layers[{i}] has {len(layer['head_nmi'])} head_nmi values "
                    f"for {m['heads_per_layer'][i]} heads"
                )
        sel = m.get("selected_layer", "absent")
        if sel is not None and not (_type_ok(sel, int) and 1 <= sel <= depth):
            raise SelectionError(f"{src}: {where}.selected_layer must be null or 1..{depth}, found {sel!r}")
        heads = m.get("selected_heads", "absent")
        if sel is None and heads is not None:
            raise SelectionError(f"{src}: {where}.selected_heads must be null when selected_layer is null")
        if sel is not None and heads != m["heads_per_layer"][sel - 1]:
            raise SelectionError(f"{src}: {where}.selected_heads {heads!r} disagrees with heads_per_layer")
    return doc


def write(path: str | Path, doc: dict) -> Path:
    """Validate and write atomically (temp file + rename): never a partial JSON."""
    validate(doc, str(path))
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read(path: str | Path) -> dict:
    """Read and validate a selection file."""
    path = Path(path)
    if not path.exists():
        raise SelectionError(f"{path}: selection file not found; run unip-analyze first")
    return validate(
        read_json(path, SelectionError, "selection file", "regenerate it with unip-analyze"), str(path)
    )


def model_entry(doc: dict, name: str, src: str = "layer_selection.json") -> dict:
    """One model's entry, with a clear error naming the models that do exist."""
    if name not in doc["models"]:
        raise SelectionError(f"{src}: no model named {name!r}; the file has: {', '.join(doc['models'])}")
    return doc["models"][name]


def resolve_teacher(
    doc: dict, name: str, src: str = "layer_selection.json", layer: int | None = None, check_sha: bool = True
) -> tuple[dict, int]:
    """What a distillation teacher needs: its entry and the 1-based layer to distil.

    Refuses a null selection (unless ``layer`` overrides it) and weights whose sha256 no longer
    matches the file the analysis measured.
    """
    m = model_entry(doc, name, src)
    chosen = layer if layer is not None else m["selected_layer"]
    if chosen is None:
        raise SelectionError(
            f"{src}: model {name!r} has selected_layer null ({m['selection_rule']}); pass --layer N to choose one"
        )
    if not 1 <= chosen <= m["depth"]:
        raise SelectionError(f"layer {chosen} is outside 1..{m['depth']} for model {name!r}")
    weights = Path(m["weights"])
    if check_sha:
        if not weights.exists():
            raise SelectionError(f"{src}: teacher weights {weights} (model {name!r}) not found")
        digest = sha256_file(weights)
        if digest != m["weights_sha256"]:
            raise SelectionError(
                f"{weights}: sha256 {digest[:12]}... differs from {m['weights_sha256'][:12]}... recorded in {src}; "
                "the file changed since the analysis: re-run unip-analyze on it"
            )
    return m, chosen
