"""``unip-finetune``: LL-FPN fine-tuning, multi-layer fine-tuning and (layer-wise) linear probing of a
ViT backbone on an infrared segmentation dataset, then sliding-window mIoU (method.md section 4).

    unip-finetune --backbone unip:vit_small_patch16_224:student.safetensors --dataset soda \\
        --data-root /data/SODA --mode ft --out runs/soda_ft
    unip-finetune --config runs/soda_ft/config.json --out runs/soda_ft_again
    unip-finetune --eval-only --model runs/soda_ft/model.pt
    torchrun --nproc_per_node 2 -m unip_train.finetune ...   (same flags)

Set-up lives here (options, data, model, optimizer, resume, run folder); the loop is
:func:`unip_train.finetune.engine.train`. From Python: ``run(FinetuneConfig(...)) -> metrics`` and
``evaluate_saved(path) -> metrics``.

A run folder holds ``config.json`` (the resolved options, written before the first step),
``checkpoint.pt`` (resumable training state), ``model.pt`` (state dict + config,
``torch.load(weights_only=True)``), ``metrics.json``, ``log.jsonl`` and ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from unip_analysis import transformers_format
from unip_analysis.checkpoints import build_vit, load_backbone, set_attention_heads
from unip_analysis.errors import UnipError, error_line
from unip_analysis.files import atomic_write_text
from unip_analysis.pad_vit import adapter_width, add_adapters, drop_adapters

from .. import distributed as du
from .. import runs
from ..checkpointing import check_same_settings, load_checkpoint, restore_rng_state, save_checkpoint
from ..optim import adamw, layer_decay_scale, param_groups
from ..precision import AMP_CHOICES, amp_dtype, grad_scaler
from ..sampling import EpochSampler, KeyBatches, keyed_loader
from .backbone import prepare_for_finetuning
from .config import (
    CE_AVERAGES,
    DEFAULT_ITERS,
    PIXEL_LOSSES,
    FinetuneConfig,
    FinetuneError,
    parse_backbone,
    plain_config,
    resolve,
)
from .datasets import LABEL_MAPS, EvalResize, SegDataset, TrainAugment
from .engine import KILL_ENV, TrainState, seg_loss, train
from .evaluation import evaluate, summarize
from .extensions import Extension, ExtensionContext, build_extensions, check_names
from .ll_fpn import NECKS, Segmentor
from .pixl import DEFAULT_ETA, DEFAULT_SCALES, DEFAULT_TAU, DEFAULT_WEIGHT, SCALE_RULES
from .semi import DEFAULT_DECAY, DEFAULT_THRESHOLD, prepare_semi, write_split

__all__ = [
    "KILL_ENV", "FinetuneConfig", "FinetuneError", "build_backbone", "build_optimizer", "evaluate_saved",
    "load_model", "main", "parse_backbone", "resolve", "run", "seg_loss",
]  # fmt: skip

PROG = "unip-finetune"
MODEL_FORMAT = "unip-finetune/2"  # 2: LayerScale / relative position bias / raw features / head widths
# Resuming with any of these changed would visit other samples or build another model. (--iters may
# grow: the run then continues on the longer schedule.)
RESUME_MUST_MATCH = (
    "dataset", "mode", "neck", "layers", "crop", "batch_size", "seed", "world_size", "extensions",
    "layer_scale", "rel_pos_bias", "head_channels", "aux_channels", "pixel_loss", "pixl_scales",
    "label_fraction", "unlabelled",
)  # fmt: skip
# Values config.json records that are not options (read back with --config, they are skipped).
DERIVED_KEYS = ("world_size", "extensions")


# --- building -------------------------------------------------------------------------------


def default_heads(arch: str) -> int:
    """Head count the architecture has by default (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return int(build_vit(arch).blocks[-1].attn.num_heads)


def build_backbone(cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict]:
    """The pre-trained ViT with the fine-tuning parts added (ft mode) and where it came from."""
    family, arch, path = parse_backbone(cfg.backbone)
    loaded = load_backbone(family, arch, path, img_size=cfg.crop)
    model = loaded.model
    info = {
        "family": family,
        "arch": arch,
        "path": path,
        "sha256": loaded.sha256,
        "notes": list(loaded.notes),
    }
    if cfg.resplit_last_heads:
        # The reference fine-tuning re-splits the student's last block to the default head count.
        set_attention_heads(model.blocks[-1].attn, default_heads(arch))
    info["heads_per_layer"] = [int(b.attn.num_heads) for b in model.blocks]
    if family == "hf":  # LayerNorm eps and activation come from config.json, not the arch's defaults
        info["hf_build"] = transformers_format.build_config(Path(path))
    if cfg.adapters == "drop":
        drop_adapters(model)
    info["adapter_width"] = adapter_width(model)
    if cfg.mode == "ft":
        info["notes"] += prepare_for_finetuning(
            model, cfg.drop_path or 0.0, cfg.layer_scale, bool(cfg.rel_pos_bias)
        )
        model.train().requires_grad_(True)
    return model, info


def build_segmentor(cfg: FinetuneConfig, backbone: torch.nn.Module, num_classes: int) -> Segmentor:
    return Segmentor(
        backbone, num_classes, cfg.mode, cfg.neck, cfg.layers, cfg.head_channels, cfg.aux_channels
    )


def build_optimizer(
    cfg: FinetuneConfig, model: Segmentor, extra: Sequence[torch.nn.Module] = ()
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; backbone layers get lr scale ``decay ** (depth + 1 - layer)``;
    ``extra`` modules (extensions') the base lr."""
    depth = len(model.backbone.blocks)
    scale = layer_decay_scale(depth, cfg.layer_decay) if cfg.mode == "ft" else None
    groups = param_groups(model, cfg.weight_decay, scale)
    for module in extra:
        groups += param_groups(module, cfg.weight_decay)
    for g in groups:
        g.pop("param_names")
    return adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas))


# --- the run ------------------------------------------------------------------------------------


def run(cfg: FinetuneConfig, extensions: Sequence[Extension] = ()) -> dict:
    """Train per ``cfg`` (plus the extensions it asks for and ``extensions``), evaluate, write the
    run folder; returns the metrics dict."""
    cfg = resolve(cfg)
    dist = du.init_distributed(cfg.device)
    state = None
    try:
        state, eval_set, backbone_info = setup(cfg, dist, list(extensions))
        cfg = state.cfg
        train(state, save=lambda it: save_training_state(state, it))
        conf = evaluate(
            state.model, eval_set, eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device,
            amp=state.amp, rank=dist.rank, world_size=dist.world_size, progress=cfg.progress and dist.is_main,
        )  # fmt: skip
        metrics = _metrics(cfg, conf, eval_set)
        if dist.is_main:
            out = Path(cfg.out)
            _save_model(out / "model.pt", state.model, cfg, eval_set.classes, backbone_info)
            atomic_write_text(out / "metrics.json", json.dumps(runs.plain(metrics), indent=2) + "\n")
            state.log.write(
                {
                    "iter": cfg.iters,
                    "event": "eval",
                    "miou": metrics["miou"],
                    "pixel_acc": metrics["pixel_acc"],
                },
                prefix="eval",
            )
        du.barrier()
        return metrics
    finally:
        if state is not None:
            state.log.close()
        du.cleanup()


def setup(
    cfg: FinetuneConfig, dist: du.DistInfo, extensions: list[Extension]
) -> tuple[TrainState, SegDataset, dict]:
    """Datasets, model, extensions, optimizer, optional resume, DDP wrapper, loader, run folder."""
    out = Path(cfg.out)
    du.seed_everything(cfg.seed + dist.rank)
    amp = amp_dtype(cfg.amp, dist.device)
    train_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.train_split, cfg.num_classes, TrainAugment.for_crop(cfg.crop),
        seed=cfg.seed, label_map=cfg.label_map, cache_mb=cfg.cache_mb,
    )  # fmt: skip
    # The evaluation split is read as the training split was (the detected label IDs included).
    eval_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes, EvalResize.for_crop(cfg.crop),
        label_map=train_set.label_map,
    )  # fmt: skip
    cfg = replace(cfg, label_map=train_set.label_map)
    # Semi-supervision: the labelled part of the split, and the images the mean teacher labels.
    semi = prepare_semi(
        train_set, cfg.label_fraction, cfg.unlabelled, cfg.seed, min_labelled=cfg.batch_size or 1,
        eval_images=[s.image for s in eval_set.samples],
    )  # fmt: skip
    train_set = semi.train_set
    extensions = build_extensions(cfg, semi) + list(extensions)
    check_names(extensions)
    per_proc, rem = divmod(cfg.batch_size, dist.world_size)
    if rem or per_proc < 1:
        raise FinetuneError(f"--batch-size {cfg.batch_size} is not divisible by {dist.world_size} processes")
    # SyncBatchNorm needs CUDA; on CPU each process normalizes its own images.
    sync_bn = dist.enabled and dist.device.type == "cuda"
    if cfg.mode == "ft" and per_proc < 2 and not sync_bn:
        raise FinetuneError("--batch-size: fine-tuning needs at least 2 images per process (BatchNorm)")
    if len(train_set) < cfg.batch_size:
        raise FinetuneError(
            f"{cfg.data_root}: split {cfg.train_split!r} has {len(train_set)} images, fewer than one "
            f"batch of {cfg.batch_size}; lower --batch-size"
        )

    backbone, backbone_info = build_backbone(cfg)
    model = build_segmentor(cfg, backbone, train_set.num_classes).to(dist.device)
    if cfg.channels_last:  # 4-D weights (patch embedding, neck, heads) in NHWC order
        model = model.to(memory_format=torch.channels_last)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ctx = ExtensionContext(cfg, model, dist, dist.device, out, train_set, cfg.seed)
    ext_modules: dict[str, list[torch.nn.Module]] = {}
    for ext in extensions:
        ext.setup(ctx)
        mods = [m.to(dist.device) for m in ext.modules()]
        if sync_bn:
            mods = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in mods]
        ext_modules[ext.name] = mods
    all_ext_modules = [m for mods in ext_modules.values() for m in mods]
    optimizer = build_optimizer(cfg, model, all_ext_modules)
    scaler = grad_scaler(dist.device, amp)
    start = 0
    names = [e.name for e in extensions]
    if cfg.resume:
        path = out / "checkpoint.pt" if cfg.resume == "auto" else Path(cfg.resume)
        ckpt = load_checkpoint(path)
        for key in ("model", "optimizer", "scaler", "iter", "rng", "config"):
            if key not in ckpt:
                raise FinetuneError(f"{path}: not a {PROG} training checkpoint (no '{key}')")
        saved = {
            **ckpt["config"],
            "world_size": len(ckpt["rng"]),
            "extensions": list(ckpt.get("extensions", {})),
        }
        current = {**plain_config(cfg), "world_size": dist.world_size, "extensions": names}
        check_same_settings(path, saved, current, RESUME_MUST_MATCH)
        model.load_state_dict(ckpt["model"])
        for ext in extensions:
            for module, sd in zip(ext_modules[ext.name], ckpt["extension_modules"][ext.name]):
                module.load_state_dict(sd)
            ext.load_state_dict(ckpt["extensions"][ext.name])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iter"])
        restore_rng_state(ckpt["rng"][dist.rank])  # what the model draws (drop path) continues exactly
    ddp = model
    if dist.enabled:
        ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if sync_bn else None)
    if cfg.compile:  # the training forward only; state dicts and evaluation use the plain module
        ddp = torch.compile(ddp)

    # Order from (seed, epoch), crops from (seed, epoch, index): batches of (epoch, index) keys from
    # the resumed iteration on; the workers start once and serve every epoch (unip_train.sampling).
    batches = KeyBatches(EpochSampler(len(train_set), dist.world_size, dist.rank, seed=cfg.seed), per_proc)
    batches.set_range(start, cfg.iters)
    loader = keyed_loader(train_set, batches, cfg.workers, pin_memory=dist.device.type == "cuda")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, {**config_record(cfg), "world_size": dist.world_size, "extensions": names})
        if semi.split is not None:
            write_split(out, semi.split)
    log = runs.ScalarLog(
        out, enabled=dist.is_main, step_key="iter", resume_step=start if cfg.resume else None
    )
    notes = list(dict.fromkeys(train_set.notes + eval_set.notes + backbone_info["notes"]))
    if semi.files:
        notes.append(
            f"semi-supervised: {len(train_set)} labelled and {len(semi.files)} unlabelled training images"
            + (
                f" ({semi.left_out} --unlabelled images left out: labelled or evaluation images)"
                if semi.left_out
                else ""
            )
        )
    if dist.is_main:
        for note in notes:
            print(f"{PROG}: {note}", flush=True)
    record = {"event": "start", "config": plain_config(cfg), "backbone": backbone_info, "notes": notes}
    log.write({**record, "world": dist.world_size, "resumed_from": start, "extensions": names})
    state = TrainState(
        cfg, dist, model, ddp, optimizer, scaler, loader, log, amp, start, extensions, ext_modules
    )
    return state, eval_set, backbone_info


def config_record(cfg: FinetuneConfig) -> dict:
    """What ``config.json`` holds: every option as resolved (``--config`` reads it back), not --resume."""
    d = plain_config(cfg)
    d.pop("resume")
    return d


def save_training_state(s: TrainState, it: int) -> None:
    """Atomic ``checkpoint.pt``: model, extensions, optimizer, scaler, iteration, every rank's RNG."""
    # Every rank's RNG state is gathered so each resumes its own augmentation stream.
    states = [du.rng_state()]
    if s.dist.enabled:
        states = [None] * s.dist.world_size
        torch.distributed.all_gather_object(states, du.rng_state())
    if s.dist.is_main:
        save_checkpoint(
            Path(s.cfg.out) / "checkpoint.pt",
            {
                "model": s.model.state_dict(),
                "extensions": {e.name: e.state_dict() for e in s.extensions},
                "extension_modules": {
                    name: [m.state_dict() for m in mods] for name, mods in s.extension_modules.items()
                },
                "optimizer": s.optimizer.state_dict(),
                "scaler": s.scaler.state_dict(),
                "iter": it,
                "rng": states,
                "config": plain_config(s.cfg),
            },
        )
    du.barrier()


def _save_model(path: Path, model: Segmentor, cfg: FinetuneConfig, classes, backbone_info: dict) -> None:
    state = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": plain_config(cfg),
        "classes": list(classes),
        "backbone": backbone_info,
    }
    save_checkpoint(path, state)


def _metrics(cfg: FinetuneConfig, conf, eval_set: SegDataset) -> dict:
    summary = summarize(conf, eval_set.classes)
    return {
        "dataset": cfg.dataset,
        "mode": cfg.mode,
        "neck": cfg.neck if cfg.mode == "ft" else None,
        "layers": cfg.layers,
        "iters": cfg.iters,
        "miou": summary["miou"],
        "per_class_iou": summary["per_class_iou"],
        "pixel_acc": summary["pixel_acc"],
        "split": cfg.eval_split,
        "split_file": eval_set.split_path.name,
        "num_images": len(eval_set),
        "eval_window": cfg.eval_window,
        "eval_stride": cfg.eval_stride,
        "backbone": cfg.backbone,
    }


# --- evaluation of a saved model ----------------------------------------------------------------


def load_model(path: str | Path) -> tuple[Segmentor, FinetuneConfig, dict]:
    """Rebuild a fine-tuned segmentor from ``model.pt`` (no backbone file needed)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise FinetuneError(
            f"{path}: not a model.pt of this unip-finetune (format {MODEL_FORMAT}, found {found}); "
            "fine-tune again to re-evaluate it"
        )
    known = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    info = ckpt["backbone"]
    kwargs = transformers_format.timm_kwargs(info["hf_build"], path) if "hf_build" in info else {}
    backbone = build_vit(info["arch"], img_size=cfg.crop, heads_per_layer=info["heads_per_layer"], **kwargs)
    if info.get("adapter_width"):
        add_adapters(backbone, info["adapter_width"])
    if cfg.mode == "ft":
        prepare_for_finetuning(backbone, cfg.drop_path or 0.0, cfg.layer_scale, bool(cfg.rel_pos_bias))
    model = build_segmentor(cfg, backbone, len(ckpt["classes"]))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise FinetuneError(
            f"{path}: state dict does not fit the stored config "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return model.eval(), cfg, ckpt


def evaluate_saved(
    model_path: str | Path,
    data_root: str | None = None,
    split: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Re-evaluate ``model.pt``; writes ``metrics.json`` next to it (or into ``out``)."""
    model, cfg, _ = load_model(model_path)
    cfg = replace(cfg, data_root=data_root or cfg.data_root, eval_split=split or cfg.eval_split)
    dist = du.init_distributed(device)
    try:
        model.to(dist.device)
        eval_set = SegDataset(
            cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes, EvalResize.for_crop(cfg.crop),
            label_map=cfg.label_map,
        )  # fmt: skip
        if eval_set.num_classes != model.num_classes:
            raise FinetuneError(
                f"{cfg.data_root}: dataset has {eval_set.num_classes} classes, the model {model.num_classes}"
            )
        if dist.is_main:
            for note in eval_set.notes:
                print(f"{PROG}: {note}", flush=True)
        amp = amp_dtype(cfg.amp, dist.device)
        conf = evaluate(
            model, eval_set, eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device, amp=amp,
            rank=dist.rank, world_size=dist.world_size, progress=progress and dist.is_main,
        )  # fmt: skip
        metrics = _metrics(cfg, conf, eval_set)
        if dist.is_main:
            target = Path(out) if out is not None else Path(model_path).parent
            target.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target / "metrics.json", json.dumps(runs.plain(metrics), indent=2) + "\n")
            record = {"event": "eval", "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]}
            with open(target / runs.LOG_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(runs.plain({**record, "split": cfg.eval_split})) + "\n")
        return metrics
    finally:
        du.cleanup()


# --- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as for every other error of this CLI
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1-based layer numbers like 4,6,8,12") from None


def build_parser() -> argparse.ArgumentParser:
    """Every option's dest is the :class:`FinetuneConfig` field it sets (so config.json reads back)."""
    iters = ", ".join(f"{k} {v}" for k, v in DEFAULT_ITERS.items())
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", help="JSON or TOML file of option defaults (a run's config.json works); flags override it"
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--backbone", help="FAMILY:ARCH:PATH of the pre-trained ViT")
    g.add_argument("--dataset", help="soda | mfnet | scut | folder")
    g.add_argument("--data-root", help="folder holding the dataset in its layout")
    g.add_argument(
        "--label-map",
        default="auto",
        choices=LABEL_MAPS,
        help="SCUT-Seg labels: auto (detect Cityscapes label IDs, default) | none | cityscapes",
    )
    g.add_argument("--num-classes", type=int, help="folder layout without classes.txt")
    g.add_argument("--train-split", default="train", help="split to train on (default train)")
    g.add_argument(
        "--eval-split",
        help="split to evaluate (default test; MFNet also val, val_test, test_day, test_night)",
    )
    g.add_argument("--mode", default="ft", help="ft (fine-tune, default) | lp (linear probing)")
    g.add_argument("--neck", default="ll-fpn", help=f"{' | '.join(NECKS)} (ft; default ll-fpn)")
    g.add_argument(
        "--layers", type=_layers, help="1-based blocks, e.g. 4,6,8,12 (lp / multi-layer); 12 = one layer"
    )
    g.add_argument(
        "--resplit-last-heads",
        action="store_true",
        help="re-split the last block into the arch's default head count (as the reference)",
    )
    g.add_argument(
        "--adapters",
        choices=("keep", "drop"),
        default="keep",
        help="pad backbones: keep the adapters (trained with the rest, default) or drop them (plain ViT)",
    )
    g.add_argument(
        "--drop-path",
        type=float,
        help="stochastic depth of the last block, 0 at the first (default 0.1; 0.2 for ViT-L)",
    )
    g.add_argument(
        "--layer-scale",
        type=float,
        default=1.0,
        help="LayerScale init in every block, trained (default 1.0; 0 = none)",
    )
    g.add_argument(
        "--rel-pos-bias",
        action=argparse.BooleanOptionalAction,
        help="BEiT-style relative position bias (default: off with ll-fpn, on with multi-layer)",
    )
    g.add_argument("--head-channels", type=int, help="UperNet channels (default: the backbone's embed dim)")
    g.add_argument("--aux-channels", type=int, default=256, help="auxiliary FCN head channels (default 256)")
    g.add_argument("--aux-weight", type=float, default=0.4, help="auxiliary loss weight (default 0.4)")
    g.add_argument(
        "--ce-average",
        default="labelled",
        choices=CE_AVERAGES,
        help="cross-entropy over labelled pixels (default) | all pixels, as the reference's mmseg 0.11",
    )
    g = p.add_argument_group("pixel-level learning (PiXL) and semi-supervision (docs/pixl.md)")
    g.add_argument(
        "--pixel-loss",
        default="none",
        choices=PIXEL_LOSSES,
        help="none (default) | pixl: PiXL's drift-to-prototype InfoNCE on the decode head's features (ft)",
    )
    g.add_argument("--pixl-weight", type=float, default=DEFAULT_WEIGHT, help="PiXL loss weight (0.1)")
    g.add_argument("--pixl-tau", type=float, default=DEFAULT_TAU, help="InfoNCE temperature (0.1)")
    g.add_argument(
        "--pixl-eta",
        default=",".join(map(str, DEFAULT_ETA)),
        metavar="START,END",
        help="drift-pixel fraction, linear from START at the first step to END at the last (0.2,0.001)",
    )
    g.add_argument(
        "--pixl-scales",
        default=",".join(map(str, DEFAULT_SCALES)),
        help="feature scales for the prototypes; drift pixels of the first are aligned (1,0.5)",
    )
    g.add_argument(
        "--pixl-scale-rule",
        default="count",
        choices=SCALE_RULES,
        help="per class, the scale with more joint pixels (count, default) or the larger joint share",
    )
    g.add_argument(
        "--label-fraction",
        metavar="F",
        help="keep a seeded fraction F (e.g. 1/8) of the training split labelled; the rest is unlabelled "
        "and labelled by a mean teacher (writes labelled.txt / unlabelled.txt)",
    )
    g.add_argument(
        "--unlabelled",
        action="append",
        default=[],
        metavar="DIR",
        help="extra label-free images for the mean teacher (repeatable)",
    )
    g.add_argument("--ema-decay", type=float, default=DEFAULT_DECAY, help="mean teacher EMA (0.999)")
    g.add_argument(
        "--pseudo-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="pseudo-label confidence; the loss is weighted by the confident fraction (0.968)",
    )
    g = p.add_argument_group("schedule")
    g.add_argument("--iters", type=int, help=f"training iterations (default: {iters})")
    g.add_argument(
        "--warmup-iters",
        type=int,
        help="linear warm-up (default: SODA 1500, MFNet 1000, SCUT 1700; at most iters/5)",
    )
    g.add_argument("--crop", type=int, default=512)
    g.add_argument(
        "--batch-size", type=int, help="total over processes (default 8; 4 when fine-tuning ViT-L)"
    )
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    g.add_argument(
        "--layer-decay", type=float, help="layer-wise lr decay (default 0.85 ll-fpn, 0.65 multi-layer)"
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-window", type=int, help="sliding window (default: crop)")
    g.add_argument("--eval-stride", type=int, help="sliding stride (default: 2/3 window, 341 for 512)")
    g.add_argument("--eval-only", action="store_true", help="re-evaluate --model instead of training")
    g.add_argument("--model", help="model.pt of a finished run (with --eval-only)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue this run folder (bare), or from the given checkpoint file",
    )
    g.add_argument(
        "--num-workers",
        "--workers",
        dest="workers",
        type=int,
        default=None,
        help=f"data loader processes per training process, started once (default: cores / local processes, at "
        f"most {runs.MAX_DEFAULT_WORKERS}, less torch's threads when the model runs on the CPU: "
        f"{runs.default_num_workers()} here with --device auto)",
    )
    g.add_argument(
        "--cache-mb",
        type=float,
        default=1024.0,
        help="decoded training images kept in memory, MiB per training process, shared among its loader "
        "workers (1024; 0: decode every time). Results do not depend on it",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision of training and evaluation; auto: bf16 on CUDA (fp16 + loss scaling where "
        "bf16 is missing), none on the CPU",
    )
    g.add_argument("--no-amp", dest="amp", action="store_const", const="none", help="same as --amp none")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory order for the convolutions (patch embedding, neck, heads): the same results up to "
        "summation order, faster (UperNet steps -15%% on CPU, -12..-23%% on an H100; benchmarks/RESULTS.md)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step's model (compiles once at the start; evaluation runs it plain)",
    )
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--ckpt-every", type=int, default=1000)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("backbone", "dataset", "data_root", "out")
        if not getattr(args, n)
    ]
    if missing:
        raise FinetuneError(f"missing {', '.join(missing)} (or use --eval-only --model RUN/model.pt)")
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    values["betas"] = tuple(values["betas"])
    return FinetuneConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = runs.parse_with_config(build_parser(), argv, ignore=DERIVED_KEYS)
        if args.eval_only:
            if not args.model:
                raise FinetuneError("--eval-only needs --model RUN/model.pt")
            metrics = evaluate_saved(
                args.model, args.data_root, args.eval_split, args.out, args.device, args.progress
            )
        else:
            metrics = run(config_from_args(args))
    except UnipError as e:
        if debug:
            raise
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        miou = metrics["miou"]
        shown = f"{miou:.4f}" if miou is not None and math.isfinite(miou) else "n/a"
        print(
            f"mIoU {shown}  pixel acc {metrics['pixel_acc']:.4f}  ({metrics['dataset']}, {metrics['mode']})"
        )
    return 0
