"""``unip-analyze``: attention patterns of ViT checkpoints, and the layer a teacher should distil.

    unip-analyze --checkpoint mae_b=mae:vit_base_patch16_224:mae_pretrain_vit_base.pth \\
                 --checkpoint dino_b=dino:vit_base_patch16_224:dino_vitbase16_pretrain.pth \\
                 --images infrared_samples/ --norm infrared --out analysis/

or ``--manifest checkpoints.json`` with ``{"checkpoints": [{"name", "family", "arch", "path"}, ...]}``.
Writes ``layer_selection.json``, ``layer_stats.csv``, ``figures/*.png`` and ``report.html`` into
``--out``, only once every checkpoint and image has been read and analysed: bad input ends with
one line on stderr, exit status 2, and nothing written.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import __version__, analyze, checkpoints, command, explorer, images, output_folder, report
from .checkpoints import CheckpointSpec, LoadedBackbone
from .device import autocast_dtype, precision_name, resolve_device
from .errors import SpecError
from .files import read_json
from .metrics import NMI_LABELS
from .patterns import Thresholds, default_thresholds
from .workers import MAX_DEFAULT_WORKERS, default_num_workers

PROG = "unip-analyze"
EXIT_BAD_INPUT = 2
_MANIFEST_KEYS = ("name", "family", "arch", "path")


@dataclass(kw_only=True)
class AnalyzeOptions:
    """Every option of ``unip-analyze``, declared once (:mod:`unip_analysis.command`)."""

    checkpoint: list[str] = command.option(
        [],
        help=f"a checkpoint to analyse, NAME=FAMILY:ARCH:PATH (repeatable); FAMILY one of "
        f"{', '.join(checkpoints.FAMILIES)}; NAME=timm:ARCH.TAG (no PATH) reads timm's pretrained weights "
        "from the local Hugging Face cache",
        group="what to analyse",
        metavar="NAME=FAMILY:ARCH:PATH",
        repeat=True,
    )
    manifest: Path | None = command.option(
        None,
        help='many checkpoints: {"checkpoints": [{"name", "family", "arch", "path"}, ...]}; relative paths '
        "are read from the manifest's folder; \"path\": null with family timm and ARCH.TAG reads timm's "
        "pretrained weights",
        group="what to analyse",
        metavar="FILE.json",
    )
    allow_download: bool = command.option(
        False,
        help="let NAME=timm:ARCH.TAG fetch weights missing from the Hugging Face cache (never by default)",
        group="what to analyse",
    )
    images: Path = command.option(help="image folder (searched recursively)", group="data", metavar="DIR")
    img_size: int | None = command.img_size(None, "input size; default: the architecture's own")
    num_images: int | None = command.option(
        None, help="analyse only the first N images (sorted by path)", group="data", metavar="N",
        check=command.positive,
    )  # fmt: skip
    norm: str = command.norm("imagenet")
    nmi: Literal["park", "unip"] = command.option(
        "park",
        help="NMI definition: park (Park et al.: patch tokens, rows renormalised) or unip (the function "
        "UNIP's authors published: the whole map, prefix tokens kept); the bands and the selection use the "
        "same one",
        group="patterns and layer selection",
    )
    global_max: float | None = command.option(
        None,
        help="NMI at or below which a layer is global",
        group="patterns and layer selection",
        metavar="NMI",
        default_text="derived at the analysed token grid",
    )
    local_min: float | None = command.option(
        None,
        help="NMI at or above which a layer is local",
        group="patterns and layer selection",
        metavar="NMI",
        default_text="derived at the analysed token grid",
    )
    layer: list[str] = command.option(
        [],
        help="select layer N (1-based) instead of the rule, for every model (N) or for one (NAME=N); repeatable",
        group="patterns and layer selection",
        metavar="N | NAME=N",
        repeat=True,
    )
    fallback: Literal["nearest", "none"] = command.option(
        "nearest",
        help="when no layer is hybrid: the layer nearest the hybrid band, or none",
        group="patterns and layer selection",
    )
    bootstrap: int = command.option(
        1000, help="bootstrap resamples for the NMI 95% intervals", group="patterns and layer selection",
        metavar="N", check=command.positive,
    )  # fmt: skip
    query_points: str = command.option(
        ";".join(f"{y},{x}" for y, x in analyze.DEFAULT_QUERY_POINTS),
        help="query positions for the attention-map figures, as fractions of the image",
        group="figures",
        metavar="Y,X;Y,X",
    )
    map_images: int = command.option(
        1, help="images shown in the attention-map figures, 0 for none", group="figures", metavar="N",
        check=command.non_negative,
    )  # fmt: skip
    batch_size: int = command.batch_size(16, "images per forward")
    device: str = command.device()
    precision: str = command.precision(
        "fp32", "the models run under autocast; logits, softmax and statistics stay fp32 / fp64"
    )
    explore_images: int = command.option(
        explorer.DEFAULT_EXPLORE_IMAGES,
        help="images in report.html's interactive attention explorer (every layer, head and query); 0 for none",
        group="figures",
        metavar="N",
        check=command.non_negative,
    )
    explore_budget: float = command.option(
        explorer.DEFAULT_BUDGET_MB,
        help="MB the explorer's data of every model together may take in report.html: each model's encoding "
        "and query stride are chosen to fit, every model keeps the same images",
        group="figures",
        metavar="MB",
        check=lambda mb: None if mb > 0 else f"must be more than 0 MB, got {mb}",
    )
    qk_embedding: Literal["pca", "tsne", "umap"] = command.option(
        "pca",
        help="2-D embedding of the explorer's query-key view: pca (deterministic, instant), tsne (openTSNE) "
        "or umap (umap-learn), both from the optional extra unip-toolkit[embed]",
        group="figures",
    )
    workers: int | None = command.workers(
        f"image-decoding worker processes (default: the cores available, at most {MAX_DEFAULT_WORKERS}, "
        "less torch's threads when the model runs on the CPU)"
    )
    out: Path = command.out(
        "folder for the outputs (layer_selection.json, layer_stats.csv, figures/, report.html)"
    )
    overwrite: bool = command.overwrite()
    progress: bool = command.progress()
    debug: bool = command.debug()


COMMAND = command.Command(
    PROG,
    AnalyzeOptions,
    description="Per-layer attention NMI and distance of ViT checkpoints over an image folder; classifies "
    "layers as local / hybrid / global and selects the deepest hybrid layer (UNIP).",
)
# What an analysis folder holds: a folder with one of these is not written over without --overwrite.
OUTPUTS = ("layer_selection.json", "layer_stats.csv", "report.html")


# --- parsing what the user asked for --------------------------------------------------------


def read_manifest(path: str | Path) -> list[CheckpointSpec]:
    """Checkpoint specs from a manifest; relative paths are resolved against the manifest's folder."""
    path = Path(path).expanduser()
    fix = 'expected {"checkpoints": [{"name": ..., "family": ..., "arch": ..., "path": ...}, ...]}'
    if not path.is_file():
        raise SpecError(f"{path}: manifest not found; pass an existing JSON file with --manifest")
    doc = read_json(path, SpecError, "manifest", fix)
    entries = doc.get("checkpoints") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{path}: manifest has no non-empty 'checkpoints' list; {fix}")
    specs = []
    for i, e in enumerate(entries):
        where = f"{path}: checkpoints[{i}]"
        if not isinstance(e, dict):
            raise SpecError(f"{where} is a {type(e).__name__}, not an object; {fix}")
        needed = [
            k
            for k in _MANIFEST_KEYS
            if not (k == "path" and e.get("family") == "timm" and k in e and e[k] is None)
        ]
        missing = [k for k in needed if not isinstance(e.get(k), str) or not e[k].strip()]
        unknown = sorted(set(e) - set(_MANIFEST_KEYS))
        if missing or unknown:
            what = [f"lacks {', '.join(missing)} (non-empty strings)"] if missing else []
            what += [f"has unknown keys {', '.join(unknown)}"] if unknown else []
            raise SpecError(f"{where} {' and '.join(what)}; {fix}")
        if e["family"] not in checkpoints.FAMILIES:
            raise SpecError(
                f"{where}: unknown family {e['family']!r}; known: {', '.join(checkpoints.FAMILIES)}"
            )
        if e["path"] is None:  # "path": null: timm's pretrained weights, from the Hugging Face cache
            specs.append(CheckpointSpec(e["name"].strip(), e["family"], e["arch"].strip(), None))
            continue
        weights = Path(e["path"]).expanduser()
        if not weights.is_absolute():
            weights = path.parent / weights
        specs.append(CheckpointSpec(e["name"].strip(), e["family"], e["arch"].strip(), str(weights)))
    return specs


def collect_specs(spec_texts: Sequence[str], manifest: Path | None) -> list[CheckpointSpec]:
    specs = [checkpoints.parse_spec(t) for t in spec_texts]
    if manifest is not None:
        specs += read_manifest(manifest)
    if not specs:
        raise SpecError(
            "no checkpoints given; pass --checkpoint NAME=FAMILY:ARCH:PATH or --manifest FILE.json"
        )
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise SpecError(f"model name {s.name!r} is given twice; every checkpoint needs its own NAME")
        seen.add(s.name)
    return specs


def parse_layer_overrides(values: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """``--layer N`` (every model) and ``--layer NAME=N`` (one model; wins over N) -> {name: N}."""
    every: int | None = None
    per: dict[str, int] = {}
    for text in values:
        name, eq, num = text.rpartition("=")
        if not re.fullmatch(r"\s*\d+\s*", num) or (eq and not name.strip()):
            raise SpecError(f"--layer {text!r}: expected N or NAME=N with N a 1-based layer number")
        if not eq:
            if every is not None:
                raise SpecError(f"--layer given twice for every model ({every} and {int(num)})")
            every = int(num)
            continue
        name = name.strip()
        if name not in names:
            raise SpecError(f"--layer {text!r}: no model named {name!r}; models: {', '.join(names)}")
        if name in per:
            raise SpecError(f"--layer given twice for {name!r}")
        per[name] = int(num)
    return {n: per.get(n, every) for n in names if per.get(n, every) is not None}


def parse_query_points(text: str) -> list[tuple[float, float]]:
    """``'0.5,0.5;0.25,0.25'`` -> [(y, x), ...] as fractions of the image."""
    points = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            y, x = (float(v) for v in part.split(","))
        except ValueError:
            raise SpecError(
                f"--query-points {text!r}: expected 'y,x;y,x' fractions, e.g. 0.5,0.5;0.25,0.25"
            ) from None
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise SpecError(
                f"--query-points {text!r}: ({y}, {x}) is outside the image; use fractions in [0, 1]"
            )
        points.append((y, x))
    if not points:
        raise SpecError("--query-points is empty; give at least one 'y,x'")
    return points


def resolve_precision(text: str, device: torch.device | str) -> str:
    """The precision name (bf16, fp16, fp32) of ``--precision`` on ``device``: the shared rule
    (:func:`unip_analysis.device.autocast_dtype`; the statistics stay fp32 / fp64 either way)."""
    return precision_name(autocast_dtype(text, device))


def resolve_thresholds(
    global_max: float | None,
    local_min: float | None,
    grids: dict[str, tuple[int, int]],
    nmi_definition: str = "park",
) -> Thresholds:
    """Given values win; missing ones are derived at the analysed token grid (one grid for all
    models), with the NMI definition they will be applied to."""
    if global_max is not None and local_min is not None:
        return Thresholds(global_max, local_min, source="given with --global-max / --local-min")
    if len(set(grids.values())) > 1:
        listing = ", ".join(f"{n} {g[0]}x{g[1]}" for n, g in grids.items())
        raise SpecError(
            f"the models see different token grids ({listing}) and default thresholds depend on the grid; "
            "pass --img-size so the grids agree, or give --global-max and --local-min"
        )
    derived = default_thresholds(next(iter(grids.values())), nmi_definition)
    if global_max is None and local_min is None:
        return derived
    given = "global_max" if global_max is not None else "local_min"
    return Thresholds(
        global_max if global_max is not None else derived.global_max,
        local_min if local_min is not None else derived.local_min,
        source=f"{given} given on the command line; the other {derived.source}",
    )


# --- the run ---------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, flush=True)


def check_out_folder(
    args: AnalyzeOptions, specs: Sequence[CheckpointSpec]
) -> tuple[int, output_folder.OutputFolder]:
    """Refuse, before any work, an --out the run may not write into (:mod:`unip_analysis.output_folder`:
    a file, an analysis without --overwrite, another command's run, the image folder or a folder inside
    it); returns how many images the folder holds and the folder (its old files move at the end)."""
    folder = output_folder.check(
        args.out, analysis_run(args, specs), overwrite=args.overwrite, can_resume=False
    )
    return len(images.find_images(args.images)), folder


def analysis_run(args: AnalyzeOptions, specs: Sequence[CheckpointSpec]) -> output_folder.Run:
    """An analysis: every option that changes the outputs and the checkpoints' sha256. Inputs: the
    image folder (found recursively: a run inside it would read its own figures as images), the
    checkpoints and the manifest."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    paths = [Path(s.path) for s in specs if s.path]
    ident = output_folder.identity(
        options, skip=("device", "batch_size", "allow_download"), digests=paths, paths=("images", "manifest")
    )
    inputs = [args.images, *paths, *([Path(args.manifest)] if args.manifest else [])]
    return output_folder.Run(
        "unip-analyze", ident, (*OUTPUTS, report.FIGURES_DIR), inputs, markers=OUTPUTS, what="an analysis"
    )


def load_backbones(
    specs: Sequence[CheckpointSpec], overrides: dict[str, int], args: AnalyzeOptions, device: str
) -> dict[str, LoadedBackbone]:
    """Every checkpoint, by name, with its loader's notes said; a --layer beyond its depth refused.
    The weights stay on the CPU: each model goes to ``device`` only for its own analysis."""
    backbones: dict[str, LoadedBackbone] = {}
    for s in specs:
        _say(f"loading {s.name}: {s.family} {s.arch} from {s.path or 'the Hugging Face cache'}")
        bb = checkpoints.load_backbone(
            s.family,
            s.arch,
            s.path,
            img_size=args.img_size,
            device="cpu",
            allow_download=args.allow_download,
        )
        for note in bb.notes:
            _say(f"  note: {note}")
        if s.name in overrides and not 1 <= overrides[s.name] <= bb.depth:
            raise SpecError(
                f"--layer {overrides[s.name]} for {s.name!r} is outside 1..{bb.depth} ({bb.path})"
            )
        backbones[s.name] = bb
    return backbones


def common_img_size(backbones: dict[str, LoadedBackbone]) -> int:
    """The input size every model runs at; models whose defaults differ need --img-size."""
    sizes = {bb.img_size for bb in backbones.values()}
    if len(sizes) > 1:
        listing = ", ".join(f"{n} {bb.img_size}" for n, bb in backbones.items())
        raise SpecError(f"the architectures default to different input sizes ({listing}); pass --img-size")
    return sizes.pop()


def analyze_models(
    args: AnalyzeOptions,
    names: Sequence[str],
    backbones: dict[str, LoadedBackbone],
    dataset: torch.utils.data.Dataset,
    th: Thresholds,
    overrides: dict[str, int],
    points: list[tuple[float, float]],
    device: str,
) -> tuple[list[analyze.ModelAnalysis], dict[str, dict]]:
    """Analyse the models one at a time, each on the device only for its own analysis and dropped
    from ``backbones`` as it starts; returns the analyses and each model's selection entry."""
    analyses, entries = [], {}
    explore, notes = explorer.plan_images(
        [analyze.explorer_shape(bb) for bb in backbones.values()],
        min(args.explore_images, len(dataset)),
        int(args.explore_budget * 1e6),
    )
    for note in notes:
        _say(f"explorer: {note}")
    for name in names:
        _say(f"analysing {name}")
        res = analyze.analyze_backbone(
            backbones.pop(name),  # drop our reference: one model's weights held at a time from here
            dataset,
            name=name,
            batch_size=args.batch_size,
            device=device,
            query_points=points,
            map_images=args.map_images,
            num_workers=args.workers if args.workers is not None else default_num_workers(args.device),
            progress=args.progress and sys.stderr.isatty(),  # no bar fragments in logs
            precision=resolve_precision(args.precision, device),
            nmi=args.nmi,
            explore_images=explore if args.explore_images else 0,
            explore_budget=int(args.explore_budget * 1e6),
            qk_embedding=args.qk_embedding,
        )
        entries[name] = analyze.model_entry(res, th, overrides.get(name), args.fallback, args.bootstrap)
        analyses.append(res)
    return analyses, entries


def write_outputs(
    args: AnalyzeOptions, rep: report.Report, folder: output_folder.OutputFolder
) -> dict[str, Path]:
    """Write the run (the record first; under --overwrite the old run's own files moved aside) and say
    what was selected and written."""
    if folder.begin() is not None:
        _say(f"--overwrite: the previous analysis moved to {folder.aside}")
    written = report.write_report(rep, args.out)
    lines = report.selection_summary(rep.doc) + report.robustness_summary(rep.doc)
    for line in lines + report.compare_profiles(rep.doc):
        _say(line)
    _say("wrote:")
    width = max(len(k) for k in written)
    for kind, path in written.items():
        _say(f"  {kind:<{width}}  {path}")
    return written


def run(args: AnalyzeOptions) -> dict[str, Path]:
    """Load, analyse, then write; returns the written paths. Raises UnipError on bad input."""
    specs = collect_specs(args.checkpoint, args.manifest)
    names = [s.name for s in specs]
    overrides = parse_layer_overrides(args.layer, names)
    points = parse_query_points(args.query_points)
    images.parse_normalization(args.norm)  # fail on a bad --norm before loading anything
    if args.explore_images:
        explorer.check_qk_embedding(args.qk_embedding)  # t-SNE / UMAP's library, before any pass
    device = resolve_device(args.device)  # the one --device rule: cuda:N checked against the visible GPUs
    resolve_precision(args.precision, device)  # fp16 without CUDA: refused before loading anything
    n_found, folder = check_out_folder(args, specs)

    backbones = load_backbones(specs, overrides, args, device)
    img_size = common_img_size(backbones)
    grids = {n: tuple(int(g) for g in bb.model.patch_embed.grid_size) for n, bb in backbones.items()}
    th = resolve_thresholds(args.global_max, args.local_min, grids, args.nmi)
    dataset = analyze.image_dataset(args.images, img_size, args.norm, limit=args.num_images)
    _say(
        f"images: {len(dataset)} of {n_found} under {args.images} at {img_size}px, norm {args.norm}\n"
        f"NMI: {NMI_LABELS[args.nmi]} (--nmi {args.nmi})\n"
        f"thresholds: global_max={th.global_max:.4f} local_min={th.local_min:.4f} ({th.source})"
    )

    analyses, entries = analyze_models(args, names, backbones, dataset, th, overrides, points, device)
    rep = report.build_report(
        analyses,
        entries,
        th,
        args.images,
        len(dataset),
        args.norm,
        explore_budget=int(args.explore_budget * 1e6),
    )
    for res in analyses:
        if res.explorer is not None:
            _say(f"explorer {res.name}: {explorer.summary(res.explorer)}")
    return write_outputs(args, rep, folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 done, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        print(f"{PROG} {__version__}")
        return 0
    return command.main(COMMAND, run_quietly, argv, exit_codes={ValueError: 2, OSError: 2})


def run_quietly(args: AnalyzeOptions) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
