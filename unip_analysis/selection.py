"""``layer_selection.json``: the one contract between analysis and training (schema version 2).

This module alone writes, reads and validates the file. Layout::

    {schema_version: 2, generator, created,
     nmi_definition: "park" | "unip",                      (optional: absent reads as "park")
     thresholds: {global_max, local_min},
     images: {dir, count, img_size, norm},
     models: {NAME: {family, arch, weights, weights_sha256, depth, embed_dim, patch_size,
                     num_prefix_tokens, heads_per_layer: [...],
                     layers: [{layer (1-based), nmi, nmi_ci95: [lo, hi], attn_distance,
                               pattern, head_nmi: [...],
                               sink_share, prefix_share, sink_token, sink_key_norm_ratio}],
                     selected_layer (int or null), selected_heads (int or null), selection_rule,
                     robustness: {rule_layer (int or null), fragile,          (optional)
                                  margins: [{layer, edge, margin, margin_ci95: [lo, hi],
                                             edge_in_ci95}],
                                  moved_bands: [{global_max_factor, local_min_factor,
                                                 global_max, local_min, valid,
                                                 selected_layer (int or null)}]}}}}

Every NMI in the file (layers, thresholds, robustness) is of the one ``nmi_definition``
(:mod:`unip_analysis.metrics`); :func:`nmi_definition` reads it. The two optional fields came
later within version 1: files written before them stay readable.

Version 2 adds each layer's attention sinks (:func:`unip_analysis.metrics.sink_result`, method.md
section 10), averaged over heads and images: ``sink_share`` (the largest share of the patch
queries' attention one token receives), ``prefix_share`` (the prefix tokens' share),
``sink_token`` (the most frequent such token: "cls", "dist", "reg0".. or a patch index, 0-based
row-major) and ``sink_key_norm_ratio`` (its key's norm over the median key norm). Version 1 files
(without them) are still read: :func:`has_sinks` says which a document is.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import SelectionError
from .files import atomic_write_text, read_json, sha256_file
from .metrics import NMI_DEFINITIONS
from .patterns import PATTERNS

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no sink fields
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


_SINKS = {"sink_share": float, "prefix_share": float, "sink_key_norm_ratio": float}
_PREFIX_NAME = re.compile(r"(cls|dist|reg\d+|prefix\d+)")
_MARGIN = {"layer": int, "edge": str, "margin": float, "margin_ci95": list, "edge_in_ci95": bool}
_MOVED = {
    "global_max_factor": float,
    "local_min_factor": float,
    "global_max": float,
    "local_min": float,
    "valid": bool,
}
DEFAULT_NMI_DEFINITION = "park"  # what files written before the field measured


def nmi_definition(doc: dict) -> str:
    """Which NMI the document's numbers are: 'park' or 'unip' ('park' for files without the field)."""
    return doc.get("nmi_definition", DEFAULT_NMI_DEFINITION)


def has_sinks(doc: dict) -> bool:
    """Whether the document's layers carry the sink fields (schema version 2 and later)."""
    return doc.get("schema_version", 1) >= 2


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
    """Check a document against its schema version (1 or 2); returns it, or raises
    :class:`SelectionError`."""
    if not isinstance(doc, dict):
        raise SelectionError(f"{src}: top level must be a JSON object")
    version = doc.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise SelectionError(
            f"{src}: schema_version is {version!r}, this toolkit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; regenerate the file with this version of unip-analyze"
        )
    _check_fields(doc, _TOP, "top level", src)
    if nmi_definition(doc) not in NMI_DEFINITIONS:
        raise SelectionError(
            f"{src}: nmi_definition {doc['nmi_definition']!r} not in {NMI_DEFINITIONS}; "
            "regenerate the file with unip-analyze --nmi"
        )
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
            if has_sinks(doc):
                _check_sinks(layer, f"{where}.layers[{i}]", src)
        sel = m.get("selected_layer", "absent")
        if sel is not None and not (_type_ok(sel, int) and 1 <= sel <= depth):
            raise SelectionError(f"{src}: {where}.selected_layer must be null or 1..{depth}, found {sel!r}")
        heads = m.get("selected_heads", "absent")
        if sel is None and heads is not None:
            raise SelectionError(f"{src}: {where}.selected_heads must be null when selected_layer is null")
        if sel is not None and heads != m["heads_per_layer"][sel - 1]:
            raise SelectionError(f"{src}: {where}.selected_heads {heads!r} disagrees with heads_per_layer")
        if "robustness" in m:
            _check_robustness(m["robustness"], depth, f"{where}.robustness", src)
    return doc


def _check_sinks(layer: dict, where: str, src: str) -> None:
    _check_fields(layer, {**_SINKS, "sink_token": object}, where, src)
    for key in ("sink_share", "prefix_share"):
        if not 0.0 <= layer[key] <= 1.0 + 1e-6:
            raise SelectionError(f"{src}: {where}.{key} should be a share in [0, 1], found {layer[key]!r}")
    token = layer["sink_token"]
    if not (
        (_type_ok(token, int) and token >= 0) or (isinstance(token, str) and _PREFIX_NAME.fullmatch(token))
    ):
        raise SelectionError(
            f"{src}: {where}.sink_token should be a patch index or 'cls', 'dist', 'regN', found {token!r}"
        )


def _check_layer_or_null(value: Any, depth: int, where: str, src: str) -> None:
    if value is not None and not (_type_ok(value, int) and 1 <= value <= depth):
        raise SelectionError(f"{src}: {where} must be null or 1..{depth}, found {value!r}")


def _check_robustness(rob: Any, depth: int, where: str, src: str) -> None:
    _check_fields(rob, {"margins": list, "moved_bands": list, "fragile": bool}, where, src)
    _check_layer_or_null(rob.get("rule_layer", "absent"), depth, f"{where}.rule_layer", src)
    if len(rob["margins"]) != depth:
        raise SelectionError(f"{src}: {where} has {len(rob['margins'])} margins for depth {depth}")
    for i, mg in enumerate(rob["margins"]):
        at = f"{where}.margins[{i}]"
        _check_fields(mg, _MARGIN, at, src)
        if mg["layer"] != i + 1 or mg["edge"] not in ("global_max", "local_min"):
            raise SelectionError(
                f"{src}: {at} should be layer {i + 1} with edge global_max or local_min, "
                f"found layer {mg['layer']!r}, edge {mg['edge']!r}"
            )
        if len(mg["margin_ci95"]) != 2 or not all(_type_ok(v, float) for v in mg["margin_ci95"]):
            raise SelectionError(f"{src}: {at}.margin_ci95 should be [lo, hi], found {mg['margin_ci95']!r}")
    changed = False
    for i, cell in enumerate(rob["moved_bands"]):
        at = f"{where}.moved_bands[{i}]"
        _check_fields(cell, _MOVED, at, src)
        _check_layer_or_null(cell.get("selected_layer", "absent"), depth, f"{at}.selected_layer", src)
        if not cell["valid"] and cell["selected_layer"] is not None:
            raise SelectionError(f"{src}: {at} has crossed bands (valid false) but a selected_layer")
        changed |= cell["valid"] and cell["selected_layer"] != rob["rule_layer"]
    if changed != rob["fragile"]:
        raise SelectionError(
            f"{src}: {where}.fragile is {rob['fragile']} but the moved bands "
            f"{'do' if changed else 'never'} change the rule's layer"
        )


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
