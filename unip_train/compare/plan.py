"""The comparison plan (TOML or JSON): which backbones, datasets, modes and seeds, read and checked in
full before any cell runs. The schema and its validation live here and nowhere else.

    seeds = [0, 1, 2]
    baseline = "random"                        # paired differences are taken against this row
    layer_selection = "analysis/layer_selection.json"   # optional: NMI under layer-wise probing

    [finetune]                                 # options of every cell (unip-finetune long names)
    iters = 2000
    crop = 256

    [[backbones]]                              # one row of the table each
    name = "random"
    backbone = "random:vit_small_patch16_224"
    [[backbones]]
    name = "unip_s"
    backbone = "runs/unip_s"                   # a unip-pretrain (or PAD) run folder, or FAMILY:ARCH:PATH
    selection_model = "unip_s"                 # its name in layer_selection.json (default: name)
    options = { resplit-last-heads = true }    # options of this row only
    modes = ["ft"]                             # the modes this row runs (default: all of them)

    [[datasets]]
    dataset = "soda"                           # unip-finetune --dataset (layout; also mfnet, scut,
                                               # folder, nyuv2, sunrgbd, ade20k, mfnet-rgb)
    root = "/data/SODA"
    # name = "soda"                            # label (default: dataset); options = {...}

    [[modes]]
    mode = "ft"                                # LL-FPN fine-tuning; options = { neck = "multi-layer" }
    [[modes]]
    mode = "lp"
    layers = [4, 6, 8, 12]                     # one probe on these layers, concatenated
    [[modes]]
    mode = "lp"
    layerwise = "all"                          # or a list: one probe per layer (layer-wise probing)

``modes = ["ft", "lp"]`` is the short form. Relative paths are taken from the plan's folder.
Options merge in this order, later wins: ``[finetune]``, the dataset's, the mode's, the row's.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from unip_analysis import selection
from unip_analysis.errors import SelectionError, SpecError, UnipError

from .backbones import Backbone, resolve_backbone

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MODES = ("ft", "lp")
# Options unip-compare sets for every cell itself; a plan may not set them.
MANAGED_OPTIONS = {
    "backbone": "the row's backbone",
    "dataset": "the dataset entry",
    "data_root": "the dataset entry's root",
    "out": "the cell folder",
    "mode": "the mode entry",
    "layers": "the mode entry's layers / layerwise",
    "seed": "the plan's seeds",
    "resume": "unip-compare (it resumes interrupted cells itself)",
    "no_progress": "unip-compare",
    "eval_only": "nothing: unip-compare trains",
    "model": "nothing: unip-compare trains",
    "config": "nothing: put the options in the plan, where they are recorded per cell",
    "help": "nothing",
}

_TOP_KEYS = {"seeds", "baseline", "layer_selection", "finetune", "backbones", "datasets", "modes"}
_BACKBONE_KEYS = {"name", "backbone", "options", "selection_model", "modes"}
_DATASET_KEYS = {"name", "dataset", "root", "options"}
_MODE_KEYS = {"name", "mode", "layers", "layerwise", "options"}


class PlanError(UnipError):
    """A plan entry that cannot be used; the message names the plan file and the entry."""


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a backbone and the options of its cells."""

    name: str
    source: str  # the plan's text
    backbone: Backbone
    depth: int
    options: dict[str, Any] = field(default_factory=dict)
    selection_model: str | None = None
    modes: tuple[str, ...] | None = None  # the mode names this row runs (None: every mode)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    dataset: str  # unip-finetune --dataset
    root: Path
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModeEntry:
    """``layers``: one probe over these layers; ``layerwise``: one cell per layer (``"all"``: every
    layer of each row's depth)."""

    name: str
    mode: str
    layers: tuple[int, ...] | None = None
    layerwise: tuple[int, ...] | str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_layerwise(self) -> bool:
        return self.layerwise is not None


@dataclass(frozen=True)
class Cell:
    """One unip-finetune run: a row on a dataset in a mode (at one probed layer) with one seed."""

    row: Row
    dataset: DatasetEntry
    mode: ModeEntry
    layer: int | None
    seed: int
    options: dict[str, Any]  # unip-finetune options, merged (see the module docstring)

    @property
    def label(self) -> str:
        return "/".join(self.folder.parts[1:])

    @property
    def folder(self) -> Path:
        """Relative to the results folder: ``cells/DATASET/ROW/MODE[_Lnn]/seedS``."""
        mode = self.mode.name if self.layer is None else f"{self.mode.name}_L{self.layer:02d}"
        return Path("cells", self.dataset.name, self.row.name, mode, f"seed{self.seed}")


@dataclass(frozen=True)
class Plan:
    """A checked plan: rows, datasets, modes, seeds, the baseline row, the common options and the
    selection file; :meth:`cells` expands it."""

    path: Path | None
    text: str
    rows: tuple[Row, ...]
    datasets: tuple[DatasetEntry, ...]
    modes: tuple[ModeEntry, ...]
    seeds: tuple[int, ...]
    baseline: str | None
    options: dict[str, Any]
    layer_selection: Path | None

    @cached_property
    def selection_doc(self) -> dict | None:
        return None if self.layer_selection is None else selection.read(self.layer_selection)

    def cells(self) -> list[Cell]:
        """Every cell, seeds outermost (a first complete comparison at one seed comes early), the
        baseline row first within each group."""
        rows = sorted(self.rows, key=lambda r: r.name != self.baseline)
        out = []
        for seed in self.seeds:
            for ds in self.datasets:
                for mode in self.modes:
                    for row in rows:
                        if row.modes is not None and mode.name not in row.modes:
                            continue
                        options = {**self.options, **ds.options, **mode.options, **row.options}
                        for layer in _probe_layers(mode, row):
                            out.append(Cell(row, ds, mode, layer, seed, options))
        return out


def _probe_layers(mode: ModeEntry, row: Row) -> list[int | None]:
    if mode.layerwise is None:
        return [None]
    if mode.layerwise == "all":
        return list(range(1, row.depth + 1))
    return list(mode.layerwise)


# --- reading ----------------------------------------------------------------------------------


def load_plan(path: str | Path) -> Plan:
    """Read and check a ``.toml`` or ``.json`` plan; raises :class:`PlanError` naming the entry."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: plan file not found; pass a .toml or .json plan (see docs/compare.md)")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise PlanError(f"{path}: a plan must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: cannot parse the plan ({e}); fix its syntax") from None
    return plan_from_dict(data, path.parent, path.name, path=path, text=text)


def plan_from_dict(
    data: Any, base: str | Path = ".", src: str = "plan", path: Path | None = None, text: str | None = None
) -> Plan:
    """Check a plan given as a dict (what the TOML / JSON file holds); ``base`` resolves relative paths."""
    base = Path(base).resolve()
    if not isinstance(data, Mapping):
        raise PlanError(f"{src}: the plan must be one table / object")
    _no_unknown(data, _TOP_KEYS, f"{src}: top level")
    for key in ("backbones", "datasets", "modes"):
        if key not in data:
            raise PlanError(f"{src}: no '{key}' list; see docs/compare.md for a plan's layout")
    known = finetune_options()
    common = _options(data.get("finetune", {}), f"{src}: [finetune]", known)
    rows = _entries(data["backbones"], "backbones", src, lambda e, w: _row(e, w, base, known))
    datasets = _entries(data["datasets"], "datasets", src, lambda e, w: _dataset(e, w, base, known))
    modes = _entries(data["modes"], "modes", src, lambda e, w: _mode(e, w, known))
    seeds = _seeds(data.get("seeds", [0]), src)
    baseline = data.get("baseline")
    if baseline is not None and baseline not in {r.name for r in rows}:
        raise PlanError(
            f"{src}: baseline {baseline!r} is not the name of a backbones entry "
            f"({', '.join(r.name for r in rows)})"
        )
    mode_names = {m.name for m in modes}
    for i, row in enumerate(rows):
        unknown = [m for m in row.modes or () if m not in mode_names]
        if unknown:
            raise PlanError(
                f"{src}: backbones[{i}] {row.name!r}: modes {', '.join(map(repr, unknown))} not in the "
                f"plan's modes ({', '.join(sorted(mode_names))})"
            )
    for i, mode in enumerate(modes):
        for row in rows:
            if row.modes is not None and mode.name not in row.modes:
                continue
            for layer in [*(mode.layers or ()), *(() if mode.layerwise in (None, "all") else mode.layerwise)]:
                if layer > row.depth:
                    raise PlanError(
                        f"{src}: modes[{i}] {mode.name!r}: layer {layer} is deeper than backbone "
                        f"{row.name!r} ({row.depth} blocks)"
                    )
    sel_path = data.get("layer_selection")
    if sel_path is not None:
        if not isinstance(sel_path, str):
            raise PlanError(f"{src}: layer_selection must be a path to a layer_selection.json")
        sel_path = _path(sel_path, base)
    plan = Plan(
        path=path,
        text=text if text is not None else json.dumps(data, indent=2, default=str),
        rows=tuple(rows),
        datasets=tuple(datasets),
        modes=tuple(modes),
        seeds=seeds,
        baseline=baseline,
        options=common,
        layer_selection=sel_path,
    )
    _check_selection(plan, src)
    return plan


def _check_selection(plan: Plan, src: str) -> None:
    """The selection file reads and names every row that asks for it (explicitly or by its name)."""
    if plan.layer_selection is None:
        if any(r.selection_model for r in plan.rows):
            raise PlanError(
                f"{src}: a backbones entry names selection_model but the plan has no layer_selection"
            )
        return
    try:
        doc = plan.selection_doc
    except SelectionError as e:
        raise PlanError(f"{src}: layer_selection: {e}") from None
    for i, row in enumerate(plan.rows):
        if row.selection_model is not None and row.selection_model not in doc["models"]:
            raise PlanError(
                f"{src}: backbones[{i}] {row.name!r}: selection_model {row.selection_model!r} is not in "
                f"{plan.layer_selection} (models: {', '.join(doc['models'])})"
            )


def _entries(value: Any, key: str, src: str, build) -> list:
    if isinstance(value, Mapping) or not isinstance(value, list) or not value:
        raise PlanError(f"{src}: '{key}' must be a non-empty list of entries")
    out = [build(entry, f"{src}: {key}[{i}]") for i, entry in enumerate(value)]
    names = [e.name for e in out]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise PlanError(f"{src}: {key}[{i}]: name {name!r} is used twice; names must be unique")
    return out


def _no_unknown(entry: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise PlanError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _table(entry: Any, where: str, allowed: set[str]) -> Mapping:
    if not isinstance(entry, Mapping):
        raise PlanError(f"{where}: expected a table / object, found {entry!r}")
    _no_unknown(entry, allowed, where)
    return entry


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RX.match(value):
        raise PlanError(
            f"{where}: name {value!r} must be letters, digits, '.', '_' or '-' (it names the cell folders)"
        )
    return value


def _path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _row(entry: Any, where: str, base: Path, known: dict) -> Row:
    entry = _table(entry, where, _BACKBONE_KEYS)
    if "name" not in entry or "backbone" not in entry:
        raise PlanError(
            f"{where}: needs 'name' and 'backbone' (FAMILY:ARCH:PATH, a run folder or random:ARCH)"
        )
    name = _name(entry["name"], where)
    where = f"{where} {name!r}"
    if not isinstance(entry["backbone"], str):
        raise PlanError(f"{where}: backbone must be a string")
    try:
        backbone = resolve_backbone(entry["backbone"], base)
        depth = _depth(backbone.arch)
    except SpecError as e:
        raise PlanError(f"{where}: {e}") from None
    sel = entry.get("selection_model")
    if sel is not None and not isinstance(sel, str):
        raise PlanError(f"{where}: selection_model must be a model name of the layer_selection file")
    modes = entry.get("modes")
    if modes is not None and (
        not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes)
    ):
        raise PlanError(f'{where}: modes must be a list of the plan\'s mode names, for example ["ft"]')
    return Row(
        name=name,
        source=entry["backbone"],
        backbone=backbone,
        depth=depth,
        options=_options(entry.get("options", {}), where, known),
        selection_model=sel,
        modes=None if modes is None else tuple(modes),
    )


def _depth(arch: str) -> int:
    """Blocks of ``arch``, built on the meta device (no memory, no initialisation)."""
    import torch

    from unip_analysis.checkpoints import build_vit

    with torch.device("meta"):
        return len(build_vit(arch).blocks)


def _dataset(entry: Any, where: str, base: Path, known: dict) -> DatasetEntry:
    from unip_train.finetune.layouts import LAYOUTS, split_source

    entry = _table(entry, where, _DATASET_KEYS)
    layout = entry.get("dataset", entry.get("name"))
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise PlanError(f"{where}: dataset {layout!r} is not a unip-finetune layout ({', '.join(LAYOUTS)})")
    name = _name(entry.get("name", layout), where)
    where = f"{where} {name!r}"
    if not isinstance(entry.get("root"), str):
        raise PlanError(f"{where}: needs 'root', the folder holding the {layout} layout")
    root = _path(entry["root"], base)
    if not root.is_dir():
        raise PlanError(f"{where}: root {root} is not a folder; point it at the {layout} dataset")
    train_list = split_source(root, LAYOUTS[layout], "train")  # a list file, or ADE20K's folder
    if not train_list.exists():
        raise PlanError(f"{where}: {train_list} not found; is {root} a {layout} dataset?")
    return DatasetEntry(name, layout, root, _options(entry.get("options", {}), where, known))


def _mode(entry: Any, where: str, known: dict) -> ModeEntry:
    if isinstance(entry, str):
        entry = {"mode": entry}
    entry = _table(entry, where, _MODE_KEYS)
    mode = entry.get("mode")
    if mode not in MODES:
        raise PlanError(f"{where}: mode {mode!r}: expected ft (fine-tuning) or lp (linear probing)")
    layers = entry.get("layers")
    layerwise = entry.get("layerwise")
    if layers is not None:
        layers = _layer_list(layers, where, "layers")
    if layerwise is not None:
        if mode != "lp":
            raise PlanError(f"{where}: layerwise is for mode lp (layer-wise linear probing)")
        if layers is not None:
            raise PlanError(f"{where}: give layers (one probe) or layerwise (one probe per layer), not both")
        layerwise = "all" if layerwise == "all" else _layer_list(layerwise, where, "layerwise")
    default = f"{mode}-layerwise" if layerwise is not None else mode
    name = _name(entry.get("name", default), where)
    return ModeEntry(
        name, mode, layers, layerwise, _options(entry.get("options", {}), f"{where} {name!r}", known)
    )


def _layer_list(value: Any, where: str, key: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok or min(value) < 1 or len(set(value)) != len(value):
        raise PlanError(f"{where}: {key} must be a list of distinct 1-based layer numbers, found {value!r}")
    return tuple(value)


def _seeds(value: Any, src: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok or len(set(value)) != len(value) or min(value) < 0:
        raise PlanError(f"{src}: seeds must be a list of distinct non-negative integers, found {value!r}")
    return tuple(value)


# --- unip-finetune options ----------------------------------------------------------------------


def finetune_options() -> dict[str, Any]:
    """unip-finetune's long options: ``{name: argparse action}`` for every long spelling, aliases
    included (``num_workers`` and ``workers``), from its own parser."""
    from unip_train.finetune.cli import build_parser

    parser = build_parser()
    return {
        s[2:].replace("-", "_"): a for a in parser._actions for s in a.option_strings if s.startswith("--")
    }


def _options(value: Any, where: str, known: dict) -> dict[str, Any]:
    """Check an options table: unip-finetune long names (``-`` or ``_``) with values its parser takes."""
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}: options must be a table of unip-finetune option = value")
    out = {}
    for key, v in value.items():
        dest = str(key).replace("-", "_")
        flag = "--" + dest.replace("_", "-")
        if dest in MANAGED_OPTIONS:
            raise PlanError(f"{where}: option {key!r} is set by {MANAGED_OPTIONS[dest]}, not by options")
        if dest not in known:
            raise PlanError(f"{where}: {flag} is not a unip-finetune option (see unip-finetune --help)")
        action = known[dest]
        dest = action.dest  # one name per option, whichever spelling the plan used
        if dest in MANAGED_OPTIONS:
            raise PlanError(f"{where}: option {key!r} is set by {MANAGED_OPTIONS[dest]}, not by options")
        if action.nargs == 0:  # a flag such as --resplit-last-heads
            if not isinstance(v, bool):
                raise PlanError(f"{where}: {flag} is a flag; write {key} = true or false")
        elif isinstance(v, (bool, Mapping)) or v is None:
            raise PlanError(f"{where}: {flag} needs a value, found {v!r}")
        else:
            try:
                converted = action.type(_text(v)) if action.type is not None else _text(v)
            except Exception as e:  # argparse types raise ValueError / ArgumentTypeError
                raise PlanError(f"{where}: {flag} = {v!r}: {e}") from None
            if action.choices is not None and converted not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise PlanError(f"{where}: {flag} = {v!r}: expected one of {choices}")
        out[dest] = v
    return out


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def option_argv(options: Mapping[str, Any]) -> list[str]:
    """Options as unip-finetune arguments, sorted by name (a cell's argv does not depend on the order
    the plan lists them in): ``true`` flags appear, ``false`` ones do not, lists are comma-joined."""
    argv = []
    for dest in sorted(options):
        value = options[dest]
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        else:
            argv += [flag, _text(value)]
    return argv
