"""Every knob of a ``unip-finetune`` run, declared once, and the published recipe's defaults
(method.md section 4).

:class:`FinetuneConfig` is both what Python callers build (``FinetuneConfig(backbone=..., ...)``)
and the declaration the command line, ``--config`` files, ``--help``, a run's ``config.json`` and the
options table of docs/cli.md come from (:mod:`unip_analysis.command`). The numbers come from
casiatao/UNIP's ``UNIP_segmentation/configs`` and ``train_scripts`` (see docs/parity.md for each
file); :func:`resolve` fills what a run leaves unset from them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch

from unip_analysis import command
from unip_analysis.checkpoints import FAMILIES, build_vit, parse_spec
from unip_analysis.errors import SpecError, UnipError
from unip_analysis.images import parse_normalization

from ..precision import normalize_amp
from ..runs import MAX_DEFAULT_WORKERS, default_num_workers
from .layouts import DEFAULT_CROP, EVAL_SPLIT, LABEL_MAPS, get_layout
from .ll_fpn import MODES, NECKS
from .pixl import DEFAULT_ETA, DEFAULT_SCALES, DEFAULT_TAU, DEFAULT_WEIGHT, SCALE_RULES, PixlExtension
from .semi import DEFAULT_DECAY, DEFAULT_THRESHOLD, check_teacher_options, parse_label_fraction

# Iterations and linear warm-up of the published schedule per dataset (configs/fine_tuning/*:
# runner.max_iters, lr_config.warmup_iters; the linear-probing configs use the same; the RGB / depth
# sets: configs/layerwise_linear_probing/*, method.md section 9). The folder layout has no
# reference: 10,000 iterations, warm-up as SODA's.
DEFAULT_ITERS = {
    "soda": 14_400, "mfnet": 9_800, "scut": 16_800, "folder": 10_000,
    "nyuv2": 9_800, "sunrgbd": 65_000, "ade20k": 75_000, "mfnet-rgb": 9_800,
}  # fmt: skip
DEFAULT_WARMUP = {
    "soda": 1_500, "mfnet": 1_000, "scut": 1_700, "folder": 1_500,
    "nyuv2": 1_000, "sunrgbd": 6_000, "ade20k": 1_500, "mfnet-rgb": 1_000,
}  # fmt: skip
# Slide-inference stride of every config, at its own crop (480 or 512); other crops: 2/3 of the window.
REFERENCE_STRIDE = 341
# --norm auto without a norm recorded with the backbone: the dataset's config (method.md sections 4, 9).
DEFAULT_NORM = {name: "infrared" for name in DEFAULT_ITERS} | {
    name: "imagenet" for name in ("nyuv2", "sunrgbd", "ade20k", "mfnet-rgb")
}
# Files a pre-training run writes beside its backbone, whose recipe records the norm it trained with.
PRETRAIN_SIDECARS = ("student.json", "backbone.json")
# Layer-wise lr decay: 0.85 in the LL-FPN launch scripts, 0.65 in the (multi-layer) configs.
DEFAULT_LAYER_DECAY = {"ll-fpn": 0.85, "multi-layer": 0.65}
# Relative position bias: the configs switch it on; the LL-FPN launch scripts switch it off.
DEFAULT_REL_POS_BIAS = {"ll-fpn": False, "multi-layer": True}
# ViT-L and wider: fine-tuning batch 4 (2 GPUs x 2) and drop path 0.2; smaller ViTs 8 and 0.1.
LARGE_EMBED_DIM = 1024
AUX_CHANNELS = 256  # auxiliary FCN head (configs/_base_/models/upernet.py)
# Cross-entropy denominator: labelled pixels (ours), or all pixels (mmsegmentation 0.11, the reference).
CE_AVERAGES = ("labelled", "all")
PIXEL_LOSSES = ("none", "pixl")  # pixl: PiXL (method.md section 8)
ADAPTERS = ("keep", "drop")
# Keys of earlier versions' config.json / model.pt / checkpoint.pt configs -> today's names.
OLD_KEYS = {"crop": "img_size", "amp": "precision", "num_workers": "workers"}

_DATA, _MODEL, _SCHEDULE, _EVAL = "data", "model", "schedule", "evaluation"
_EXT = "pixel-level learning (PiXL) and semi-supervision (docs/pixl.md)"


def _per_dataset(table: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in table.items())


@dataclass(kw_only=True)
class FinetuneConfig:
    """Every knob of a run, declared once. ``None`` means: derive from the recipe (see :func:`resolve`)."""

    # --- what to train on
    backbone: str | None = command.option(
        None, help=f"the pre-trained ViT, FAMILY:ARCH:PATH with FAMILY one of {', '.join(FAMILIES)}",
        group=_DATA, metavar="FAMILY:ARCH:PATH", default_text="required to train",
    )  # fmt: skip
    dataset: str | None = command.option(
        None, help="dataset layout: soda, mfnet, scut, folder, nyuv2, sunrgbd, ade20k or mfnet-rgb "
        "(docs/finetune.md)", group=_DATA,
        metavar="LAYOUT", default_text="required to train",
    )  # fmt: skip
    data_root: str | None = command.option(
        None, help="folder holding the dataset in its layout", group=_DATA, metavar="DIR",
        default_text="required to train",
    )  # fmt: skip
    label_map: Literal[LABEL_MAPS] = command.option(
        "auto", help="SCUT-Seg labels: auto (detect Cityscapes label IDs), none, or cityscapes", group=_DATA
    )
    num_classes: int | None = command.option(
        None, help="class count of a folder layout without classes.txt", group=_DATA, metavar="N",
        default_text="from the layout or classes.txt",
    )  # fmt: skip
    train_split: str = command.option("train", help="split to train on", group=_DATA, metavar="SPLIT")
    img_size: int | None = command.img_size(
        None, "training crop (square, pixels); the backbone's position embedding is resized to it",
        aliases=("--crop",),
    )  # fmt: skip
    norm: str = command.norm(
        "auto",
        "auto: the backbone's pre-training norm where its file records one, else the dataset's "
        "(infrared for the infrared sets, imagenet for nyuv2, sunrgbd, ade20k, mfnet-rgb)",
    )
    # --- the model
    mode: Literal[MODES] = command.option(
        "ft", help="ft: fine-tune backbone, neck and heads; lp: linear probing of the frozen backbone",
        group=_MODEL,
    )  # fmt: skip
    neck: Literal[NECKS] = command.option(
        "ll-fpn", help="ft: ll-fpn (last layer only) or multi-layer (4 layers, BEiT/MAE style)", group=_MODEL
    )
    layers: list[int] | None = command.option(
        None, help="1-based blocks, e.g. 4,6,8,12 (lp / multi-layer); 12 alone probes one layer",
        group=_MODEL, metavar="N,N,...", default_text="the last block (ll-fpn, lp) or 4,6,8,12 scaled to depth",
    )  # fmt: skip
    resplit_last_heads: bool = command.option(
        False, help="re-split the last block into the arch's default head count (as the reference)",
        group=_MODEL,
    )  # fmt: skip
    adapters: Literal[ADAPTERS] = command.option(
        "keep", help="PAD backbones: keep the adapters (trained with the rest) or drop them (plain ViT)",
        group=_MODEL,
    )  # fmt: skip
    drop_path: float | None = command.option(
        None, help="stochastic depth of the last block, a ramp from 0 at the first", group=_MODEL,
        metavar="RATE", default_text="0.1; 0.2 for ViT-L",
    )  # fmt: skip
    layer_scale: float = command.option(
        1.0, help="LayerScale init in every block, trained (0 = none); ft", group=_MODEL, metavar="VALUE"
    )
    rel_pos_bias: bool | None = command.option(
        None, help="BEiT-style relative position bias (--no-rel-pos-bias: none)", group=_MODEL,
        default_text="off with ll-fpn, on with multi-layer",
    )  # fmt: skip
    head_channels: int | None = command.option(
        None, help="UperNet channels", group=_MODEL, metavar="N", default_text="the backbone's embed dim"
    )
    aux_channels: int = command.option(
        AUX_CHANNELS, help="auxiliary FCN head channels", group=_MODEL, metavar="N"
    )
    aux_weight: float = command.option(0.4, help="auxiliary loss weight", group=_MODEL, metavar="W")
    ce_average: Literal[CE_AVERAGES] = command.option(
        "labelled", help="cross-entropy over labelled pixels, or all pixels as the reference's mmseg 0.11",
        group=_MODEL,
    )  # fmt: skip
    # --- pixel-level learning (PiXL) and semi-supervision (mean teacher); see docs/pixl.md
    pixel_loss: Literal[PIXEL_LOSSES] = command.option(
        "none", help="pixl: PiXL's drift-to-prototype InfoNCE on the decode head's features (ft)", group=_EXT
    )
    pixl_weight: float = command.option(DEFAULT_WEIGHT, help="PiXL loss weight", group=_EXT, metavar="W")
    pixl_tau: float = command.option(DEFAULT_TAU, help="PiXL InfoNCE temperature", group=_EXT, metavar="T")
    pixl_eta: str = command.option(
        ",".join(map(str, DEFAULT_ETA)), help="drift-pixel fraction, linear from START at the first step to "
        "END at the last", group=_EXT, metavar="START,END",
    )  # fmt: skip
    pixl_scales: str = command.option(
        ",".join(map(str, DEFAULT_SCALES)), help="feature scales for the prototypes; drift pixels of the "
        "first are aligned", group=_EXT, metavar="S,S,...",
    )  # fmt: skip
    pixl_scale_rule: Literal[SCALE_RULES] = command.option(
        "count", help="per class, the scale with more joint pixels (count) or the larger joint share",
        group=_EXT,
    )  # fmt: skip
    label_fraction: str | None = command.option(
        None, help="keep a seeded fraction F (e.g. 1/8) of the training split labelled; the rest is "
        "labelled by a mean teacher (writes labelled.txt / unlabelled.txt)", group=_EXT, metavar="F",
        default_text="all labelled",
    )  # fmt: skip
    unlabelled: list[str] = command.option(
        [], help="extra label-free images for the mean teacher (repeatable)", group=_EXT, metavar="DIR",
        repeat=True,
    )  # fmt: skip
    ema_decay: float = command.option(DEFAULT_DECAY, help="mean teacher EMA decay", group=_EXT, metavar="D")
    pseudo_threshold: float = command.option(
        DEFAULT_THRESHOLD, help="pseudo-label confidence; the loss is weighted by the confident fraction",
        group=_EXT, metavar="P",
    )  # fmt: skip
    # --- the schedule
    iters: int | None = command.option(
        None, help="training iterations", group=_SCHEDULE, metavar="N",
        default_text=f"the dataset's published count ({_per_dataset(DEFAULT_ITERS)})",
    )  # fmt: skip
    warmup_iters: int | None = command.option(
        None, help="linear warm-up iterations", group=_SCHEDULE, metavar="N",
        default_text=f"the dataset's ({_per_dataset(DEFAULT_WARMUP)}), at most iters / 5",
    )  # fmt: skip
    batch_size: int | None = command.option(
        None, help="images per step, total over processes", group=_SCHEDULE, metavar="N",
        default_text="8; 4 when fine-tuning ViT-L",
    )  # fmt: skip
    lr: float = command.option(
        1e-4, help="base learning rate (AdamW, poly decay)", group=_SCHEDULE, metavar="LR"
    )
    weight_decay: float = command.option(0.05, help="AdamW weight decay", group=_SCHEDULE, metavar="WD")
    betas: tuple[float, float] = command.option(
        (0.9, 0.999), help="AdamW betas", group=_SCHEDULE, metavar="B1,B2"
    )
    layer_decay: float | None = command.option(
        None, help="layer-wise lr decay (1.0 = off)", group=_SCHEDULE, metavar="D",
        default_text=f"{DEFAULT_LAYER_DECAY['ll-fpn']} with ll-fpn, {DEFAULT_LAYER_DECAY['multi-layer']} multi-layer",
    )  # fmt: skip
    seed: int = command.seed()
    # --- evaluation
    eval_window: int | None = command.option(
        None, help="sliding-window size", group=_EVAL, metavar="PX", default_text="--img-size"
    )
    eval_stride: int | None = command.option(
        None, help="sliding-window stride", group=_EVAL, metavar="PX",
        default_text="2/3 of the window, 341 for 512",
    )  # fmt: skip
    eval_split: str | None = command.option(
        None, help="split to evaluate (MFNet also val, val_test, test_day, test_night)", group=_EVAL,
        metavar="SPLIT", default_text="test",
    )  # fmt: skip
    # --- the run
    out: str | None = command.option(
        None, help="run folder (config.json, checkpoint.pt, model.pt, metrics.json, log.jsonl)",
        group="run", metavar="DIR", default_text="required to train",
    )  # fmt: skip
    resume: str | None = command.resume()
    workers: int | None = command.workers(
        "data loader processes per training process, started once (default: cores / local processes, at "
        f"most {MAX_DEFAULT_WORKERS}, less torch's threads when the model runs on the CPU)"
    )
    cache_mb: float = command.option(
        1024.0, help="decoded training images kept in memory, MiB per training process, shared among its "
        "loader workers (0: decode every time); results do not depend on it", group="run", metavar="MIB",
    )  # fmt: skip
    device: str = command.device()
    precision: str = command.precision(
        "auto", "of training and evaluation (fp16 with loss scaling on GPUs without bf16)",
        aliases=("--no-amp=fp32",),
    )  # fmt: skip
    channels_last: bool = command.option(
        True, help="NHWC memory order for the convolutions: the same results up to summation order, faster "
        "(benchmarks/RESULTS.md)", group="run",
    )  # fmt: skip
    compile: bool = command.option(
        False, help="torch.compile the training step's model (evaluation runs it plain)", group="run"
    )
    log_every: int = command.option(
        20, help="iterations between log.jsonl lines", group="run", metavar="N", check=command.positive
    )
    ckpt_every: int = command.option(
        1000, help="iterations between saves of the resumable checkpoint.pt", group="run", metavar="N",
        aliases=("--ckpt-every-steps",), check=command.positive,
    )  # fmt: skip
    progress: bool = command.progress()


class FinetuneError(UnipError):
    """A fine-tuning option or run folder that cannot be used."""


def parse_backbone(text: str) -> tuple[str, str, str]:
    """``FAMILY:ARCH:PATH`` -> (family, arch, path), parsed by the registry's spec parser."""
    try:
        spec = parse_spec(f"backbone={text}")
    except SpecError:
        raise SpecError(
            f"--backbone {text!r}: expected FAMILY:ARCH:PATH with FAMILY one of {', '.join(FAMILIES)}, "
            "for example unip:vit_small_patch16_224:student.safetensors"
        ) from None
    return spec.family, spec.arch, spec.path


def arch_shape(arch: str) -> tuple[int, int]:
    """(depth, embed_dim) of an architecture, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_vit(arch)
    return len(model.blocks), int(model.embed_dim)


def recorded_norm(backbone: str) -> tuple[str, Path] | None:
    """The ``--norm`` a pre-training run recorded for this backbone (``recipe.norm`` of the
    ``student.json`` / ``backbone.json`` beside its file), and that file; ``None`` when there is none."""
    _, _, path = parse_backbone(backbone)
    if not path:
        return None
    folder = Path(path).parent
    for name in (Path(path).with_suffix(".json").name, *PRETRAIN_SIDECARS):
        side = folder / name
        if side.name not in PRETRAIN_SIDECARS or not side.is_file():
            continue
        try:
            recipe = json.loads(side.read_text(encoding="utf-8")).get("recipe", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recipe, dict) and isinstance(recipe.get("norm"), str):
            return recipe["norm"], side
    return None


def resolve_norm(norm: str, dataset: str, backbone: str) -> tuple[str, str]:
    """``--norm`` as a preset name or ``MEAN,STD``, and why: ``auto`` is the backbone's pre-training
    normalization when its run recorded one (:func:`recorded_norm`), else the dataset's
    (:data:`DEFAULT_NORM`: the infrared statistics, ImageNet's for the RGB / depth sets)."""
    if norm == "auto":
        found = recorded_norm(backbone)
        if found is not None:
            norm, why = found[0], f"the backbone's pre-training normalization ({found[1]})"
        else:
            norm, why = (
                DEFAULT_NORM[dataset],
                f"the {dataset} default (no normalization recorded with the backbone)",
            )
    else:
        why = "--norm"
    try:
        parse_normalization(norm)
    except SpecError as e:
        raise FinetuneError(f"--norm: {e}") from None
    return norm, why


def norm_record(norm: str) -> dict:
    """What ``model.pt`` and ``metrics.json`` record of a resolved ``--norm``: the name and the
    per-channel mean and std on the 0-1 scale."""
    mean, std = parse_normalization(norm)
    return {"name": norm, "mean": list(mean), "std": list(std)}


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fill recipe defaults and check the options that do not need data files."""
    missing = [
        f"--{n.replace('_', '-')}" for n in ("backbone", "dataset", "data_root", "out") if not getattr(cfg, n)
    ]
    if missing:
        raise FinetuneError(f"missing {', '.join(missing)} (or use --eval-only --model RUN/model.pt)")
    _check_choices(cfg)
    _, arch, _ = parse_backbone(cfg.backbone)
    _, dim = arch_shape(arch)
    large = dim >= LARGE_EMBED_DIM
    iters = cfg.iters if cfg.iters is not None else DEFAULT_ITERS[cfg.dataset]
    crop = cfg.img_size if cfg.img_size is not None else DEFAULT_CROP[cfg.dataset]
    window = cfg.eval_window or crop
    stride = REFERENCE_STRIDE if window == DEFAULT_CROP[cfg.dataset] else max(1, int(window * 2 / 3))
    out = replace(
        cfg,
        iters=iters,
        img_size=crop,
        norm=resolve_norm(cfg.norm, cfg.dataset, cfg.backbone)[0],
        batch_size=cfg.batch_size or (4 if large and cfg.mode == "ft" else 8),
        layers=list(cfg.layers) if cfg.layers is not None else None,
        layer_decay=cfg.layer_decay if cfg.layer_decay is not None else DEFAULT_LAYER_DECAY[cfg.neck],
        warmup_iters=(
            cfg.warmup_iters if cfg.warmup_iters is not None else min(DEFAULT_WARMUP[cfg.dataset], iters // 5)
        ),
        drop_path=cfg.drop_path if cfg.drop_path is not None else (0.2 if large else 0.1),
        rel_pos_bias=cfg.rel_pos_bias if cfg.rel_pos_bias is not None else DEFAULT_REL_POS_BIAS[cfg.neck],
        head_channels=cfg.head_channels or dim,
        eval_window=window,
        eval_stride=cfg.eval_stride or stride,
        eval_split=cfg.eval_split or EVAL_SPLIT[cfg.dataset],
        betas=tuple(cfg.betas),
        label_fraction=None if cfg.label_fraction is None else str(cfg.label_fraction),
        unlabelled=[str(d) for d in cfg.unlabelled or ()],
        workers=cfg.workers if cfg.workers is not None else default_num_workers(cfg.device),
        precision=normalize_amp(cfg.precision),
    )
    _check_ranges(out)
    return out


def _check_choices(cfg: FinetuneConfig) -> None:
    """Options with a fixed set of values (also checked here for configs built in Python)."""
    get_layout(cfg.dataset)
    choices = {
        "mode": MODES, "neck": NECKS, "ce_average": CE_AVERAGES, "label_map": LABEL_MAPS,
        "pixel_loss": PIXEL_LOSSES, "adapters": ADAPTERS,
    }  # fmt: skip
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise FinetuneError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
    if cfg.pixel_loss == "pixl":
        PixlExtension.check_mode(cfg.mode)
        # Built once here to check its options before anything is written.
        PixlExtension(cfg.pixl_weight, cfg.pixl_tau, cfg.pixl_eta, cfg.pixl_scales, cfg.pixl_scale_rule)
    if cfg.label_fraction is not None:
        parse_label_fraction(cfg.label_fraction)
    if cfg.label_fraction is not None or cfg.unlabelled:
        check_teacher_options(cfg.ema_decay, cfg.pseudo_threshold)


def _check_ranges(out: FinetuneConfig) -> None:
    for name in (
        "iters",
        "img_size",
        "batch_size",
        "head_channels",
        "aux_channels",
        "eval_window",
        "eval_stride",
    ):
        if getattr(out, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be positive, got {getattr(out, name)}")
    if out.cache_mb < 0:
        raise FinetuneError(f"--cache-mb {out.cache_mb}: expected 0 (no cache) or more")
    if out.workers < 0:
        raise FinetuneError(f"--workers {out.workers}: expected 0 (load in this process) or more")
    if not 0.0 <= out.drop_path < 1.0:
        raise FinetuneError(f"--drop-path {out.drop_path}: expected a rate in [0, 1)")
    if out.layer_scale < 0:
        raise FinetuneError(f"--layer-scale {out.layer_scale}: expected an initial value >= 0 (0 = none)")
    if out.eval_window < out.img_size:
        raise FinetuneError(f"--eval-window {out.eval_window} is smaller than --img-size {out.img_size}")


def plain_config(cfg: FinetuneConfig) -> dict:
    """The config as JSON / weights_only-safe types (the fields of :class:`FinetuneConfig` only)."""
    d = asdict(cfg)
    d = {f.name: d[f.name] for f in fields(FinetuneConfig)}
    d["betas"] = list(d["betas"])
    return d


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A config as earlier versions recorded it (``crop``, ``amp``, ``num_workers``) in today's names."""
    d = {OLD_KEYS.get(k, k): v for k, v in record.items() if not (k in OLD_KEYS and OLD_KEYS[k] in record)}
    if "precision" in d:
        d["precision"] = normalize_amp(d["precision"])
    return d


def config_from_record(record: Mapping[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` a ``model.pt`` / ``checkpoint.pt`` / ``config.json`` records, old
    keys included; keys that are not options (``world_size``...) are left out."""
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in upgrade_record(record).items() if k in known})
