"""Every knob of a ``unip-finetune`` run and the published recipe's defaults (method.md section 4).

The numbers come from casiatao/UNIP's ``UNIP_segmentation/configs`` and ``train_scripts`` (see
docs/parity.md for each file); :func:`resolve` fills what a run leaves unset from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from unip_analysis.checkpoints import FAMILIES, build_vit, parse_spec
from unip_analysis.errors import SpecError, UnipError
from unip_analysis.images import parse_normalization

from ..precision import normalize_amp
from ..runs import default_num_workers
from .layouts import EVAL_SPLIT, LABEL_MAPS, get_layout
from .ll_fpn import NECKS
from .pixl import DEFAULT_ETA, DEFAULT_SCALES, DEFAULT_TAU, DEFAULT_WEIGHT, PixlExtension
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
# Crop and Resize img_scale (long, short) of each dataset's config: 512 and (2048, 512), but 480 and
# (2048, 480) for the two depth sets. A crop other than the default scales img_scale with it.
DEFAULT_CROP = {name: 512 for name in DEFAULT_ITERS} | {"nyuv2": 480, "sunrgbd": 480}
REFERENCE_LONG_EDGE = 2048
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


@dataclass
class FinetuneConfig:
    """Every knob of a run. ``None`` means: derive from the recipe (see :func:`resolve`)."""

    backbone: str  # FAMILY:ARCH:PATH, as for unip-analyze
    dataset: str  # soda | mfnet | scut | folder | nyuv2 | sunrgbd | ade20k | mfnet-rgb
    data_root: str
    out: str
    mode: str = "ft"  # ft | lp
    neck: str = "ll-fpn"  # ll-fpn | multi-layer (ft only)
    layers: list[int] | None = None  # 1-based; default last (ll-fpn) or 4,6,8,12 scaled to depth
    iters: int | None = None  # default: the published count for the dataset
    crop: int | None = None  # default: the dataset's (480 for nyuv2 / sunrgbd, else 512)
    norm: str = "auto"  # auto | imagenet | infrared | infmix | MEAN,STD (see resolve_norm)
    batch_size: int | None = None  # total over processes; default 8 (4 when fine-tuning ViT-L)
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None  # default 0.85 with ll-fpn, 0.65 multi-layer; 1.0 = off
    warmup_iters: int | None = None  # default: the dataset's warm-up, at most iters // 5
    drop_path: float | None = None  # stochastic depth, 0 -> rate over the blocks; default 0.1 (ViT-L 0.2)
    layer_scale: float = 1.0  # LayerScale init in every block (0 = none); ft only
    rel_pos_bias: bool | None = None  # BEiT-style relative position bias; default per neck
    head_channels: int | None = None  # UperNet channels; default the backbone's embed dim
    aux_channels: int = AUX_CHANNELS  # auxiliary FCN head
    aux_weight: float = 0.4
    ce_average: str = "labelled"  # labelled | all (the reference's mmseg 0.11: over all pixels)
    num_classes: int | None = None  # folder layout without classes.txt
    label_map: str = "auto"  # auto | none | cityscapes (SCUT-Seg label IDs)
    resplit_last_heads: bool = False
    adapters: str = "keep"  # PAD backbones: keep (trained with the rest) | drop (plain ViT, ablation)
    # Pixel-level learning (PiXL) and semi-supervision (mean teacher); see docs/pixl.md.
    pixel_loss: str = "none"  # none | pixl
    pixl_weight: float = DEFAULT_WEIGHT
    pixl_tau: float = DEFAULT_TAU
    pixl_eta: str = ",".join(map(str, DEFAULT_ETA))  # START,END of the drift fraction
    pixl_scales: str = ",".join(map(str, DEFAULT_SCALES))
    pixl_scale_rule: str = "count"  # count | share
    label_fraction: str | None = None  # e.g. "1/8": the rest of the training split is unlabelled
    unlabelled: list[str] = field(default_factory=list)  # folders of extra label-free images
    ema_decay: float = DEFAULT_DECAY
    pseudo_threshold: float = DEFAULT_THRESHOLD
    eval_window: int | None = None  # default crop
    eval_stride: int | None = None  # default 2/3 of the window (341 for 512)
    train_split: str = "train"
    eval_split: str | None = None  # default test
    seed: int = 0
    workers: int | None = None  # loader processes; None: default_num_workers(device), see normalize
    cache_mb: float = 1024.0  # decoded training images kept in memory per process (0: none)
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | none (unip_train.precision: auto is bf16 on CUDA, none on CPU)
    channels_last: bool = True  # NHWC memory order for the convolutions (faster on CPU and CUDA alike)
    compile: bool = False  # torch.compile the training forward (evaluation runs the plain model)
    log_every: int = 20
    ckpt_every: int = 1000
    resume: str | None = None  # checkpoint path, or "auto" for OUT/checkpoint.pt
    progress: bool = True


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


def img_scale(dataset: str, crop: int) -> tuple[int, int]:
    """Resize ``img_scale`` (long, short) for ``crop``: the dataset config's (2048, crop) at its own
    crop, scaled with the crop otherwise ((4 * crop, crop) for the 512 sets)."""
    return round(REFERENCE_LONG_EDGE * crop / DEFAULT_CROP[dataset]), crop


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
    get_layout(cfg.dataset)
    if cfg.mode not in ("ft", "lp"):
        raise FinetuneError(f"--mode {cfg.mode!r}: expected ft or lp")
    if cfg.neck not in NECKS:
        raise FinetuneError(f"--neck {cfg.neck!r}: expected one of {', '.join(NECKS)}")
    if cfg.ce_average not in CE_AVERAGES:
        raise FinetuneError(f"--ce-average {cfg.ce_average!r}: expected one of {', '.join(CE_AVERAGES)}")
    if cfg.label_map not in LABEL_MAPS:
        raise FinetuneError(f"--label-map {cfg.label_map!r}: expected one of {', '.join(LABEL_MAPS)}")
    if cfg.pixel_loss not in PIXEL_LOSSES:
        raise FinetuneError(f"--pixel-loss {cfg.pixel_loss!r}: expected one of {', '.join(PIXEL_LOSSES)}")
    if cfg.pixel_loss == "pixl":
        PixlExtension.check_mode(cfg.mode)
        # Built once here to check its options before anything is written.
        PixlExtension(cfg.pixl_weight, cfg.pixl_tau, cfg.pixl_eta, cfg.pixl_scales, cfg.pixl_scale_rule)
    if cfg.label_fraction is not None:
        parse_label_fraction(cfg.label_fraction)
    if cfg.label_fraction is not None or cfg.unlabelled:
        check_teacher_options(cfg.ema_decay, cfg.pseudo_threshold)
    _, arch, _ = parse_backbone(cfg.backbone)
    _, dim = arch_shape(arch)
    large = dim >= LARGE_EMBED_DIM
    iters = cfg.iters if cfg.iters is not None else DEFAULT_ITERS[cfg.dataset]
    crop = cfg.crop if cfg.crop is not None else DEFAULT_CROP[cfg.dataset]
    window = cfg.eval_window or crop
    stride = REFERENCE_STRIDE if window == DEFAULT_CROP[cfg.dataset] else max(1, int(window * 2 / 3))
    out = replace(
        cfg,
        iters=iters,
        crop=crop,
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
        amp=normalize_amp(cfg.amp),
    )
    for name in (
        "iters",
        "crop",
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
        raise FinetuneError(f"--num-workers {out.workers}: expected 0 (load in this process) or more")
    if not 0.0 <= out.drop_path < 1.0:
        raise FinetuneError(f"--drop-path {out.drop_path}: expected a rate in [0, 1)")
    if out.layer_scale < 0:
        raise FinetuneError(f"--layer-scale {out.layer_scale}: expected an initial value >= 0 (0 = none)")
    if out.eval_window < out.crop:
        raise FinetuneError(f"--eval-window {out.eval_window} is smaller than --crop {out.crop}")
    return out


def plain_config(cfg: FinetuneConfig) -> dict:
    """The config as JSON / weights_only-safe types."""
    d = asdict(cfg)
    d["betas"] = list(d["betas"])
    return d
