"""A ``unip-finetune`` run: the run folder (the no-overwrite rule), set-up (data, model, extensions,
optimizer, resume), the loop (:func:`unip_train.finetune.engine.train`), evaluation and the files a
run folder holds. From Python: ``run(FinetuneConfig(...)) -> metrics`` and
``evaluate_saved(path) -> metrics``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from unip_analysis import command, output_folder
from unip_analysis.files import atomic_write_text
from unip_analysis.images import parse_normalization

from .. import distributed as du
from .. import runs
from ..checkpointing import check_same_settings, load_checkpoint, restore_rng_state, save_checkpoint
from ..optim import adamw, layer_decay_scale, param_groups
from ..precision import amp_dtype, grad_scaler
from ..sampling import EpochSampler, KeyBatches, keyed_loader
from .augment import EvalResize, TrainAugment
from .config import (
    FinetuneConfig,
    FinetuneError,
    norm_record,
    parse_backbone,
    plain_config,
    resolve,
    resolve_norm,
    upgrade_record,
)
from .dataset import SegDataset
from .engine import TrainState, train
from .evaluation import evaluate, summarize
from .extensions import Extension, ExtensionContext, build_extensions, check_names
from .layouts import img_scale
from .ll_fpn import Segmentor
from .model_file import build_backbone, build_segmentor, load_model, save_model
from .pictures import CONFUSION_CSV, RUN_PICTURES, write_run_pictures
from .semi import SPLIT_FILES, SemiData, prepare_semi, write_split

PROG = "unip-finetune"
RESUME_MUST_MATCH = (
    "dataset", "mode", "neck", "layers", "img_size", "batch_size", "seed", "world_size", "extensions",
    "layer_scale", "rel_pos_bias", "head_channels", "aux_channels", "pixel_loss", "pixl_scales",
    "label_fraction", "unlabelled", "norm",
)  # fmt: skip
# Values config.json records that are not options (read back with --config, they are skipped).
DERIVED_KEYS = ("world_size", "extensions")
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.json"
# What a run folder holds: one of these there means a run that is continued or replaced, never reused.
MARKERS = (CHECKPOINT, "model.pt", METRICS, runs.LOG_NAME)
# Everything a run writes at the top of its folder (run.json lists these before they are written).
OUTPUTS = (*MARKERS, runs.CONFIG_NAME, runs.TENSORBOARD_DIR, *SPLIT_FILES, *RUN_PICTURES, CONFUSION_CSV)


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


def run(cfg: FinetuneConfig, extensions: Sequence[Extension] = (), *, overwrite: bool = False) -> dict:
    """Train per ``cfg`` (plus the extensions it asks for and ``extensions``), evaluate, write the
    run folder; returns the metrics dict. A folder that holds a run is refused unless ``cfg.resume``
    (continue it) or ``overwrite`` (its files are moved to ``previous-<time>/`` first)."""
    resolved = resolve(cfg)
    why = resolve_norm(cfg.norm, cfg.dataset, cfg.backbone)[1]  # where the resolved norm came from
    cfg = resolved
    dist = du.init_distributed(cfg.device)
    state = None
    try:
        folder = claim_run_folder(cfg, dist, overwrite)
        state, eval_set, backbone_info = setup(cfg, dist, list(extensions), norm_why=why, folder=folder)
        cfg = state.cfg
        train(state, save=lambda it: save_training_state(state, it))
        conf = evaluate(
            state.model, eval_set, eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device,
            amp=state.amp, rank=dist.rank, world_size=dist.world_size, progress=cfg.progress and dist.is_main,
        )  # fmt: skip
        metrics = run_metrics(cfg, conf, eval_set)
        if dist.is_main:
            out = Path(cfg.out)
            save_model(
                out / "model.pt", state.model, cfg, eval_set.classes, backbone_info, eval_set.palette,
                eval_set.channels,
            )  # fmt: skip
            atomic_write_text(out / METRICS, json.dumps(runs.plain(metrics), indent=2) + "\n")
            record = {
                "iter": cfg.iters,
                "event": "eval",
                "miou": metrics["miou"],
                "pixel_acc": metrics["pixel_acc"],
            }
            state.log.write(record, prefix="eval")
            write_run_pictures(
                out, state.model, eval_set, conf, cfg.eval_window, cfg.eval_stride, dist.device, state.amp,
                eval_set.palette,
            )  # fmt: skip
        du.barrier()
        return metrics
    finally:
        if state is not None:
            state.log.close()
        du.cleanup()


def claim_run_folder(cfg: FinetuneConfig, dist: du.DistInfo, overwrite: bool) -> output_folder.OutputFolder:
    """The run-folder rule (:mod:`unip_analysis.output_folder`) for ``cfg.out``: a folder made by
    another command or another fine-tuning run is refused; ``--resume`` continues the same run,
    ``--overwrite`` moves only this run's own files aside. Every rank reads the folder before any
    file moves, so all refuse alike (none is left waiting); only rank 0 moves and records, once the
    set-up has passed (:func:`start_run_folder`): a refused run leaves nothing behind."""
    out = Path(cfg.out)
    auto = cfg.resume == "auto"
    if cfg.resume and not auto and not Path(cfg.resume).is_file():
        raise FinetuneError(f"{cfg.resume}: nothing to resume (no such checkpoint); check the --resume path")
    if overwrite and cfg.resume:
        raise FinetuneError(
            "--resume and --overwrite together: continue the run (--resume) or replace it (--overwrite)"
        )
    if auto and not (out / CHECKPOINT).is_file():
        raise FinetuneError(f"{out}: nothing to resume (no {CHECKPOINT}); drop --resume to start a run")
    # An explicit --resume CKPT may continue into a new folder or into the run it came from.
    folder = output_folder.check(out, finetune_run(cfg), resume=bool(cfg.resume), overwrite=overwrite)
    du.barrier()
    return folder


def finetune_run(cfg: FinetuneConfig) -> output_folder.Run:
    """A fine-tuning run: the settings a resume must keep (:data:`RESUME_MUST_MATCH`) and the
    backbone file's sha256. Inputs: the backbone file, the dataset, the unlabelled folders, the
    checkpoint resumed from."""
    options = plain_config(cfg)
    ident = {k: options[k] for k in RESUME_MUST_MATCH if k in options}
    backbone = parse_backbone(cfg.backbone)[2] if cfg.backbone else None
    ident = output_folder.identity(ident, digests=[backbone])
    inputs = [p for p in (backbone, cfg.data_root, *(cfg.unlabelled or ())) if p]
    if cfg.resume and cfg.resume != "auto":
        inputs.append(cfg.resume)
    return output_folder.Run(PROG, ident, OUTPUTS, inputs, markers=MARKERS, what=f"a {PROG} run")


def setup(
    cfg: FinetuneConfig,
    dist: du.DistInfo,
    extensions: list[Extension],
    norm_why: str = "--norm",
    folder: output_folder.OutputFolder | None = None,
) -> tuple[TrainState, SegDataset, dict]:
    """Datasets, model, extensions, optimizer, optional resume, DDP wrapper, loader, run folder.
    ``norm_why``: where the resolved ``cfg.norm`` came from, for the run's notes; ``folder``: the
    checked run folder (:func:`claim_run_folder`), recorded once the set-up has passed."""
    du.seed_everything(cfg.seed + dist.rank)
    train_set, eval_set, semi = read_data(cfg)
    cfg = replace(cfg, label_map=train_set.label_map)  # as detected: the evaluation split reads alike
    train_set = semi.train_set
    extensions = build_extensions(cfg, semi) + list(extensions)
    check_names(extensions)
    per_proc, sync_bn = check_batch(cfg, dist, train_set)
    backbone, backbone_info = build_backbone(cfg)
    model = build_segmentor(cfg, backbone, train_set.num_classes).to(dist.device)
    if cfg.channels_last:  # 4-D weights (patch embedding, neck, heads) in NHWC order
        model = model.to(memory_format=torch.channels_last)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ctx = ExtensionContext(cfg, model, dist, dist.device, Path(cfg.out), train_set, cfg.seed)
    ext_modules = setup_extensions(extensions, ctx, sync_bn)
    optimizer = build_optimizer(cfg, model, [m for mods in ext_modules.values() for m in mods])
    amp = amp_dtype(cfg.precision, dist.device)
    scaler = grad_scaler(dist.device, amp)
    start = 0
    if cfg.resume:
        start = resume_from(cfg, dist, model, extensions, ext_modules, optimizer, scaler)
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
    log = start_run_folder(cfg, dist, semi, [e.name for e in extensions], start, folder)
    notes = run_notes(cfg, train_set, eval_set, semi, backbone_info, norm_why)
    if dist.is_main:
        for note in notes:
            print(f"{PROG}: {note}", flush=True)
    record = {"event": "start", "config": plain_config(cfg), "backbone": backbone_info, "notes": notes}
    log.write(
        {
            **record,
            "world": dist.world_size,
            "resumed_from": start,
            "extensions": [e.name for e in extensions],
        }
    )
    state = TrainState(
        cfg, dist, model, ddp, optimizer, scaler, loader, log, amp, start, extensions, ext_modules
    )
    return state, eval_set, backbone_info


def read_data(cfg: FinetuneConfig) -> tuple[SegDataset, SegDataset, SemiData]:
    """The training and evaluation splits, and the semi-supervised split of the training one."""
    norm = parse_normalization(cfg.norm)
    scale = img_scale(cfg.dataset, cfg.img_size)
    train_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.train_split, cfg.num_classes,
        TrainAugment.for_crop(cfg.img_size, scale), seed=cfg.seed, label_map=cfg.label_map,
        cache_mb=cfg.cache_mb, norm=norm,
    )  # fmt: skip
    # The evaluation split is read as the training split was (the detected label IDs included).
    eval_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes, EvalResize.for_crop(cfg.img_size, scale),
        label_map=train_set.label_map, norm=norm,
    )  # fmt: skip
    # Semi-supervision: the labelled part of the split, and the images the mean teacher labels.
    semi = prepare_semi(
        train_set, cfg.label_fraction, cfg.unlabelled, cfg.seed, min_labelled=cfg.batch_size or 1,
        eval_images=[s.image for s in eval_set.samples],
    )  # fmt: skip
    return train_set, eval_set, semi


def check_batch(cfg: FinetuneConfig, dist: du.DistInfo, train_set: SegDataset) -> tuple[int, bool]:
    """Images per process, and whether BatchNorm is synchronised over processes."""
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
    return per_proc, sync_bn


def setup_extensions(
    extensions: list[Extension], ctx: ExtensionContext, sync_bn: bool
) -> dict[str, list[torch.nn.Module]]:
    """Each extension set up; its trainable modules on the device, by extension name."""
    ext_modules: dict[str, list[torch.nn.Module]] = {}
    for ext in extensions:
        ext.setup(ctx)
        mods = [m.to(ctx.device) for m in ext.modules()]
        if sync_bn:
            mods = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in mods]
        ext_modules[ext.name] = mods
    return ext_modules


def resume_from(
    cfg: FinetuneConfig,
    dist: du.DistInfo,
    model: Segmentor,
    extensions: list[Extension],
    ext_modules: dict[str, list[torch.nn.Module]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> int:
    """Load the checkpoint ``cfg.resume`` names into everything trained; returns the iterations done."""
    path = Path(cfg.out) / CHECKPOINT if cfg.resume == "auto" else Path(cfg.resume)
    ckpt = load_checkpoint(path)
    for key in ("model", "optimizer", "scaler", "iter", "rng", "config"):
        if key not in ckpt:
            raise FinetuneError(f"{path}: not a {PROG} training checkpoint (no '{key}')")
    names = [e.name for e in extensions]
    saved = {
        "norm": "infrared",  # checkpoints from before --norm trained with the infrared statistics
        **upgrade_record(ckpt["config"]),
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
    restore_rng_state(ckpt["rng"][dist.rank])  # what the model draws (drop path) continues exactly
    return int(ckpt["iter"])


def start_run_folder(
    cfg: FinetuneConfig,
    dist: du.DistInfo,
    semi: SemiData,
    extension_names: list[str],
    start: int,
    folder: output_folder.OutputFolder | None = None,
) -> runs.ScalarLog:
    """Rank 0: the old run's own files moved aside (``--overwrite``), ``run.json``, ``config.json``
    (and the semi-supervised split) written; the log opened."""
    out = Path(cfg.out)
    if dist.is_main:
        if folder is not None:
            folder.begin()
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(
            out, {**config_record(cfg), "world_size": dist.world_size, "extensions": extension_names}
        )
        if semi.split is not None:
            write_split(out, semi.split)
    return runs.ScalarLog(
        out, enabled=dist.is_main, step_key="iter", resume_step=start if cfg.resume else None
    )


def run_notes(
    cfg: FinetuneConfig,
    train_set: SegDataset,
    eval_set: SegDataset,
    semi: SemiData,
    backbone_info: dict,
    norm_why: str = "",
) -> list[str]:
    stats = norm_record(cfg.norm)
    norm_note = (
        f"normalization {cfg.norm} (mean {', '.join(f'{m * 255:.4g}' for m in stats['mean'])}, std "
        f"{', '.join(f'{s * 255:.4g}' for s in stats['std'])} on 0-255): {norm_why}"
    )
    notes = list(dict.fromkeys(train_set.notes + eval_set.notes + backbone_info["notes"] + [norm_note]))
    if semi.files:
        left_out = (
            f" ({semi.left_out} --unlabelled images left out: labelled or evaluation images)"
            if semi.left_out
            else ""
        )
        notes.append(
            f"semi-supervised: {len(train_set)} labelled and {len(semi.files)} unlabelled training images{left_out}"
        )
    return notes


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


def run_metrics(cfg: FinetuneConfig, conf, eval_set: SegDataset) -> dict:
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
        "norm": norm_record(cfg.norm),
        "palette": [list(c) for c in eval_set.palette],
        "palette_source": eval_set.palette_source,
    }


def eval_run(model_path: str | Path, cfg: FinetuneConfig) -> output_folder.Run:
    """An evaluation of ``model.pt`` in a folder of its own: the model file's sha256, the dataset
    and split it was scored on; it writes the metrics, the log line and the pictures."""
    ident = output_folder.identity(
        {"eval_only": True, "data_root": os.path.abspath(cfg.data_root), "eval_split": cfg.eval_split},
        digests=[model_path],
    )
    outputs = (METRICS, runs.LOG_NAME, *RUN_PICTURES, CONFUSION_CSV)
    return output_folder.Run(
        PROG,
        ident,
        outputs,
        [model_path, cfg.data_root],
        markers=(METRICS,),
        what=f"a {PROG} --eval-only result",
    )


def evaluate_saved(
    model_path: str | Path,
    data_root: str | None = None,
    split: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Re-evaluate ``model.pt``; writes ``metrics.json`` next to it (or into ``out``) and appends an
    eval line to that folder's ``log.jsonl``.

    Next to the model (the run that made it), a ``metrics.json`` already there is refused unless
    ``overwrite``, which moves it to ``previous-<time>/`` (the rest of the run stays in place).
    Another ``out`` is a folder of its own (:func:`eval_run`, recorded in its ``run.json``): new,
    or one that holds the same evaluation (replaced with ``overwrite``); any other folder is refused."""
    model, cfg, ckpt = load_model(model_path)
    cfg = replace(cfg, data_root=data_root or cfg.data_root, eval_split=split or cfg.eval_split)
    target = Path(out) if out is not None else Path(model_path).parent
    folder = None
    if target.resolve() != Path(model_path).resolve().parent:
        folder = output_folder.check(target, eval_run(model_path, cfg), overwrite=overwrite, can_resume=False)
    else:
        record = output_folder.read_record(target)
        if record is not None and record["command"] != PROG:
            raise FinetuneError(
                f"{target} holds a {record['command']} run ({output_folder.RECORD}); choose another --out"
            )
        if (target / METRICS).exists() and not overwrite:
            raise FinetuneError(
                f"{target} already holds a {METRICS}; pass --overwrite to re-score into it (the old one is moved "
                f"to {target}/{command.PREVIOUS_PREFIX}<time>/), or choose another --out"
            )
    dist = du.init_distributed(device)
    try:
        model.to(dist.device)
        eval_set = SegDataset(
            cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes,
            EvalResize.for_crop(cfg.img_size, img_scale(cfg.dataset, cfg.img_size)), label_map=cfg.label_map,
            norm=parse_normalization(cfg.norm),
        )  # fmt: skip
        if eval_set.num_classes != model.num_classes:
            raise FinetuneError(
                f"{cfg.data_root}: dataset has {eval_set.num_classes} classes, the model {model.num_classes}"
            )
        if dist.is_main:
            for note in eval_set.notes:
                print(f"{PROG}: {note}", flush=True)
        amp = amp_dtype(cfg.precision, dist.device)
        conf = evaluate(
            model, eval_set, eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device, amp=amp,
            rank=dist.rank, world_size=dist.world_size, progress=progress and dist.is_main,
        )  # fmt: skip
        metrics = run_metrics(cfg, conf, eval_set)
        if dist.is_main:
            if folder is not None:
                folder.begin()  # the old evaluation's files aside (overwrite), run.json
            target.mkdir(parents=True, exist_ok=True)
            if folder is None and (target / METRICS).exists():
                output_folder.move_aside(target, [METRICS])
            atomic_write_text(target / METRICS, json.dumps(runs.plain(metrics), indent=2) + "\n")
            record = {"event": "eval", "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]}
            with open(target / runs.LOG_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(runs.plain({**record, "split": cfg.eval_split})) + "\n")
            write_run_pictures(
                target, model, eval_set, conf, cfg.eval_window, cfg.eval_stride, dist.device, amp, ckpt.get("palette"),
            )  # fmt: skip
        return metrics
    finally:
        du.cleanup()
