"""``unip-finetune``: LL-FPN fine-tuning, multi-layer fine-tuning and (layer-wise) linear probing of a
ViT backbone on an infrared segmentation dataset, then sliding-window mIoU (method.md section 4).

    unip-finetune --backbone unip:vit_small_patch16_224:student.safetensors --dataset soda \\
        --data-root /data/SODA --mode ft --out runs/soda_ft
    unip-finetune --eval-only --model runs/soda_ft/model.pt
    torchrun --nproc_per_node 2 -m unip_train.finetune ...   (same flags)

From Python: ``run(FinetuneConfig(...)) -> metrics`` and ``evaluate_saved(path) -> metrics``.

A run folder holds ``checkpoint.pt`` (resumable training state), ``model.pt`` (state dict + config,
``torch.load(weights_only=True)``), ``metrics.json`` and ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from unip_analysis.checkpoints import FAMILIES, build_vit, load_backbone, parse_spec, set_attention_heads
from unip_analysis.errors import SpecError, UnipError, error_line
from unip_analysis.files import atomic_write_text
from unip_analysis.pad_vit import adapter_width, add_adapters, drop_adapters

from .. import distributed as du
from ..checkpointing import check_same_settings, load_checkpoint, restore_rng_state, save_checkpoint
from ..optim import adamw, layer_decay_scale, param_groups, poly_lr, set_lr
from ..sampling import EpochSampler
from .datasets import EVAL_SPLIT, IGNORE_INDEX, EvalResize, SegDataset, TrainAugment, get_layout
from .evaluation import evaluate, summarize
from .ll_fpn import NECKS, Segmentor

PROG = "unip-finetune"
MODEL_FORMAT = "unip-finetune/1"

# method.md section 4: iterations of the published recipe per dataset.
DEFAULT_ITERS = {"soda": 14_400, "mfnet": 10_000, "scut": 16_800, "folder": 10_000}
DEFAULT_LAYER_DECAY = {"ll-fpn": 0.85, "multi-layer": 0.65}
REAL_WARMUP = 1500
# Test-only: SIGKILL this process right after iteration N (exercises --resume).
KILL_ENV = "UNIP_FINETUNE_SIGKILL_AT_ITER"
# Resuming with any of these changed would visit other samples or build another model. (--iters may
# grow: the run then continues on the longer schedule.)
RESUME_MUST_MATCH = ("dataset", "mode", "neck", "layers", "crop", "batch_size", "seed", "world_size")


@dataclass
class FinetuneConfig:
    """Every knob of a run. ``None`` means: derive from the recipe (see :func:`resolve`)."""

    backbone: str  # FAMILY:ARCH:PATH, as for unip-analyze
    dataset: str  # soda | mfnet | scut | folder
    data_root: str
    out: str
    mode: str = "ft"  # ft | lp
    neck: str = "ll-fpn"  # ll-fpn | multi-layer (ft only)
    layers: list[int] | None = None  # 1-based; default last (ll-fpn) or 4,6,8,12 scaled to depth
    iters: int | None = None  # default: the published count for the dataset
    crop: int = 512
    batch_size: int = 8  # total over all processes
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None  # default 0.85 with ll-fpn, 0.65 multi-layer; 1.0 = off
    warmup_iters: int | None = None  # default min(1500, iters // 5)
    head_channels: int = 512
    aux_weight: float = 0.4
    num_classes: int | None = None  # folder layout without classes.txt
    resplit_last_heads: bool = False
    adapters: str = "keep"  # PAD backbones: keep (trained with the rest) | drop (plain ViT, ablation)
    eval_window: int | None = None  # default crop
    eval_stride: int | None = None  # default 2/3 of the window (341 for 512)
    train_split: str = "train"
    eval_split: str | None = None  # default test
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = True  # mixed precision (fp16) on CUDA only
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


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fill recipe defaults and check the options that do not need files."""
    get_layout(cfg.dataset)
    if cfg.mode not in ("ft", "lp"):
        raise FinetuneError(f"--mode {cfg.mode!r}: expected ft or lp")
    if cfg.neck not in NECKS:
        raise FinetuneError(f"--neck {cfg.neck!r}: expected one of {', '.join(NECKS)}")
    iters = cfg.iters if cfg.iters is not None else DEFAULT_ITERS[cfg.dataset]
    window = cfg.eval_window or cfg.crop
    out = replace(
        cfg,
        iters=iters,
        layers=list(cfg.layers) if cfg.layers is not None else None,
        layer_decay=cfg.layer_decay if cfg.layer_decay is not None else DEFAULT_LAYER_DECAY[cfg.neck],
        warmup_iters=cfg.warmup_iters if cfg.warmup_iters is not None else min(REAL_WARMUP, iters // 5),
        eval_window=window,
        eval_stride=cfg.eval_stride or max(1, int(window * 2 / 3)),
        eval_split=cfg.eval_split or EVAL_SPLIT[cfg.dataset],
        betas=tuple(cfg.betas),
    )
    for name in ("iters", "crop", "batch_size", "head_channels", "eval_window", "eval_stride"):
        if getattr(out, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be positive, got {getattr(out, name)}")
    if out.eval_window < out.crop:
        raise FinetuneError(f"--eval-window {out.eval_window} is smaller than --crop {out.crop}")
    return out


# --- building -------------------------------------------------------------------------------


def default_heads(arch: str) -> int:
    """Head count the architecture has by default (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return int(build_vit(arch).blocks[-1].attn.num_heads)


def build_backbone(cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict]:
    family, arch, path = parse_backbone(cfg.backbone)
    loaded = load_backbone(family, arch, path, img_size=cfg.crop)
    model = loaded.model
    info = {"family": family, "arch": arch, "path": path, "sha256": loaded.sha256, "notes": loaded.notes}
    if cfg.resplit_last_heads:
        # The reference fine-tuning re-splits the student's last block to the default head count.
        set_attention_heads(model.blocks[-1].attn, default_heads(arch))
    info["heads_per_layer"] = [int(b.attn.num_heads) for b in model.blocks]
    if cfg.adapters == "drop":
        drop_adapters(model)
    info["adapter_width"] = adapter_width(model)
    if cfg.mode == "ft":
        model.train().requires_grad_(True)
    return model, info


def build_segmentor(cfg: FinetuneConfig, backbone: torch.nn.Module, num_classes: int) -> Segmentor:
    return Segmentor(backbone, num_classes, cfg.mode, cfg.neck, cfg.layers, cfg.head_channels)


def build_optimizer(cfg: FinetuneConfig, model: Segmentor) -> torch.optim.AdamW:
    """AdamW over trainable parameters; backbone layers get lr scale ``decay ** (depth + 1 - layer)``."""
    depth = len(model.backbone.blocks)
    scale = layer_decay_scale(depth, cfg.layer_decay) if cfg.mode == "ft" else None
    groups = param_groups(model, cfg.weight_decay, scale)
    for g in groups:
        g.pop("param_names")
    return adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def seg_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX)


# --- the run ------------------------------------------------------------------------------------


def plain_config(cfg: FinetuneConfig) -> dict:
    """The config as JSON / weights_only-safe types."""
    d = asdict(cfg)
    d["betas"] = list(d["betas"])
    return d


def run(cfg: FinetuneConfig) -> dict:
    """Train per ``cfg``, evaluate, write the run folder; returns the metrics dict."""
    cfg = resolve(cfg)
    dist = du.init_distributed(cfg.device)
    try:
        return _train_and_evaluate(cfg, dist)
    finally:
        du.cleanup()


@dataclass
class _Run:
    """What the training loop needs, built once by :func:`_setup`."""

    cfg: FinetuneConfig
    dist: du.DistInfo
    model: Segmentor  # the bare module: state dicts, evaluation
    ddp: torch.nn.Module  # what the loop calls: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: EpochSampler
    loader: DataLoader
    eval_set: SegDataset
    backbone_info: dict
    amp: bool
    start: int


def _train_and_evaluate(cfg: FinetuneConfig, dist: du.DistInfo) -> dict:
    r = _setup(cfg, dist)
    train_loop(r)
    conf = evaluate(
        r.model, r.eval_set, r.eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device,
        amp=r.amp, rank=dist.rank, world_size=dist.world_size, progress=cfg.progress and dist.is_main,
    )  # fmt: skip
    metrics = _metrics(cfg, conf, r.eval_set)
    if dist.is_main:
        out = Path(cfg.out)
        _save_model(out / "model.pt", r.model, cfg, r.eval_set.classes, r.backbone_info)
        _write_metrics(out, metrics)
    du.barrier()
    return metrics


def _setup(cfg: FinetuneConfig, dist: du.DistInfo) -> _Run:
    """Datasets, model, optimizer, optional resume, DDP wrapper, loader."""
    out = Path(cfg.out)
    du.seed_everything(cfg.seed + dist.rank)
    amp = cfg.amp and dist.device.type == "cuda"
    train_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.train_split, cfg.num_classes, TrainAugment.for_crop(cfg.crop),
        seed=cfg.seed,
    )  # fmt: skip
    eval_set = SegDataset(
        cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes, EvalResize.for_crop(cfg.crop)
    )
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
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start = 0
    if cfg.resume:
        path = out / "checkpoint.pt" if cfg.resume == "auto" else Path(cfg.resume)
        ckpt = load_checkpoint(path)
        for key in ("model", "optimizer", "scaler", "iter", "rng", "config"):
            if key not in ckpt:
                raise FinetuneError(f"{path}: not a {PROG} training checkpoint (no '{key}')")
        saved = {**ckpt["config"], "world_size": len(ckpt["rng"])}
        check_same_settings(
            path, saved, {**plain_config(cfg), "world_size": dist.world_size}, RESUME_MUST_MATCH
        )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iter"])
        restore_rng_state(ckpt["rng"][dist.rank])  # what the model draws (drop path) continues exactly
    ddp = model
    if dist.enabled:
        ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if sync_bn else None)

    # Order from (seed, epoch), crops from (seed, epoch, index): a resumed run skips the positions it
    # has done and sees the same samples. Workers are not persistent: they take the dataset's epoch
    # when each epoch starts. The loader's own generator keeps iterator creation off the global RNG.
    sampler = EpochSampler(len(train_set), dist.world_size, dist.rank, seed=cfg.seed)
    loader = DataLoader(
        train_set, batch_size=per_proc, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=dist.device.type == "cuda", generator=torch.Generator(),
    )  # fmt: skip
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        record = {"event": "start", "config": plain_config(cfg), "backbone": backbone_info}
        _log(out, {**record, "world": dist.world_size, "resumed_from": start})
    return _Run(
        cfg, dist, model, ddp, optimizer, scaler, sampler, loader, eval_set, backbone_info, amp, start
    )


def train_loop(r: _Run) -> None:
    """Iteration-based training: poly lr with linear warm-up, cross-entropy (255 ignored) on the main
    head plus ``aux_weight`` times the auxiliary head's, fp16 autocast + grad scaling on CUDA.
    A resumed run continues mid-epoch exactly where the checkpoint was written."""
    cfg, dist, out = r.cfg, r.dist, Path(r.cfg.out)
    show = cfg.progress and dist.is_main
    bar = tqdm(total=cfg.iters, initial=r.start, desc=f"{cfg.mode} {cfg.dataset}", disable=not show)
    per_proc = r.loader.batch_size
    per_epoch = r.sampler.per_rank // per_proc  # iterations per data epoch (last partial batch dropped)
    kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    it = r.start
    t0, running = time.time(), 0.0
    r.ddp.train()
    while it < cfg.iters:
        epoch, done = divmod(it, per_epoch)
        r.sampler.set_epoch(epoch, start=done * per_proc)
        r.loader.dataset.set_epoch(epoch)
        for img, label in r.loader:
            if it >= cfg.iters:
                break
            lr = poly_lr(it, cfg.iters, cfg.warmup_iters, cfg.lr)
            set_lr(r.optimizer, lr)
            img = img.to(dist.device, non_blocking=True)
            label = label.to(dist.device, non_blocking=True)
            with torch.autocast(device_type=dist.device.type, dtype=torch.float16, enabled=r.amp):
                logits, aux = r.ddp(img)
            loss = seg_loss(logits, label)
            if aux is not None:
                loss = loss + cfg.aux_weight * seg_loss(aux, label)
            if not math.isfinite(loss.item()):
                raise FinetuneError(f"loss became {loss.item()} at iteration {it}; lower --lr")
            r.optimizer.zero_grad(set_to_none=True)
            r.scaler.scale(loss).backward()
            r.scaler.step(r.optimizer)
            r.scaler.update()
            it += 1
            running += loss.item()
            bar.update(1)
            if it % cfg.log_every == 0 or it == cfg.iters:
                mean = du.all_reduce_mean(running / ((it - 1) % cfg.log_every + 1), dist.device)
                running = 0.0
                if dist.is_main:
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                    _log(out, {"iter": it, "loss": mean, "lr": lr, "time": round(time.time() - t0, 2)})
            if it % cfg.ckpt_every == 0 or it == cfg.iters:
                _save_training_state(out, r.model, r.optimizer, r.scaler, it, cfg, dist)
            if kill_at == it:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def _save_training_state(out, model, optimizer, scaler, it, cfg, dist) -> None:
    # Every rank's RNG state is gathered so each resumes its own augmentation stream.
    states = [du.rng_state()]
    if dist.enabled:
        states = [None] * dist.world_size
        torch.distributed.all_gather_object(states, du.rng_state())
    if dist.is_main:
        save_checkpoint(
            out / "checkpoint.pt",
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "iter": it,
                "rng": states,
                "config": plain_config(cfg),
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
        "num_images": len(eval_set),
        "eval_window": cfg.eval_window,
        "eval_stride": cfg.eval_stride,
        "backbone": cfg.backbone,
    }


def _write_metrics(out: Path, metrics: dict) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    atomic_write_text(out / "metrics.json", json.dumps(clean, indent=2) + "\n")
    _log(out, {"event": "eval", "miou": clean["miou"], "pixel_acc": clean["pixel_acc"]})


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --- evaluation of a saved model ----------------------------------------------------------------


def load_model(path: str | Path) -> tuple[Segmentor, FinetuneConfig, dict]:
    """Rebuild a fine-tuned segmentor from ``model.pt`` (no backbone file needed)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        raise FinetuneError(f"{path}: not a model.pt written by unip-finetune (format {MODEL_FORMAT})")
    known = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    info = ckpt["backbone"]
    backbone = build_vit(info["arch"], img_size=cfg.crop, heads_per_layer=info["heads_per_layer"])
    if info.get("adapter_width"):
        add_adapters(backbone, info["adapter_width"])
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
            cfg.data_root, cfg.dataset, cfg.eval_split, cfg.num_classes, EvalResize.for_crop(cfg.crop)
        )
        if eval_set.num_classes != model.num_classes:
            raise FinetuneError(
                f"{cfg.data_root}: dataset has {eval_set.num_classes} classes, the model {model.num_classes}"
            )
        amp = cfg.amp and dist.device.type == "cuda"
        conf = evaluate(
            model, eval_set, eval_set.num_classes, cfg.eval_window, cfg.eval_stride, dist.device, amp=amp,
            rank=dist.rank, world_size=dist.world_size, progress=progress and dist.is_main,
        )  # fmt: skip
        metrics = _metrics(cfg, conf, eval_set)
        if dist.is_main:
            target = Path(out) if out is not None else Path(model_path).parent
            target.mkdir(parents=True, exist_ok=True)
            _write_metrics(target, metrics)
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
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", help="FAMILY:ARCH:PATH of the pre-trained ViT")
    p.add_argument("--dataset", help="soda | mfnet | scut | folder")
    p.add_argument("--data-root", help="folder holding the dataset in its layout")
    p.add_argument("--mode", default="ft", help="ft (fine-tune, default) | lp (linear probing)")
    p.add_argument("--neck", default="ll-fpn", help="ll-fpn (default) | multi-layer")
    p.add_argument(
        "--layers", type=_layers, help="1-based blocks, e.g. 4,6,8,12 (lp / multi-layer); 12 = one layer"
    )
    p.add_argument(
        "--iters", type=int, help="training iterations (default: SODA 14400, MFNet 10000, SCUT 16800)"
    )
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="total over processes (default 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--layer-decay", type=float, help="layer-wise lr decay (default 0.85 ll-fpn, 0.65 multi-layer)"
    )
    p.add_argument("--warmup-iters", type=int, help="linear warm-up (default min(1500, iters/5))")
    p.add_argument("--head-channels", type=int, default=512, help="UperNet channels (aux head: half)")
    p.add_argument("--num-classes", type=int, help="folder layout without classes.txt")
    p.add_argument(
        "--resplit-last-heads",
        action="store_true",
        help="re-split the last block into the arch's default head count",
    )
    p.add_argument(
        "--adapters",
        choices=("keep", "drop"),
        default="keep",
        help="pad backbones: keep the adapters (trained with the rest, default) or drop them (plain ViT)",
    )
    p.add_argument("--eval-window", type=int, help="sliding window (default: crop)")
    p.add_argument("--eval-stride", type=int, help="sliding stride (default: 2/3 window, 341 for 512)")
    p.add_argument("--eval-split", help="split to evaluate (default test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument(
        "--resume", nargs="?", const="auto", help="resume from OUT/checkpoint.pt (or the given file)"
    )
    p.add_argument("--out", help="run folder")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate --model instead of training")
    p.add_argument("--model", help="model.pt of a finished run (with --eval-only)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("backbone", "dataset", "data_root", "out")
        if not getattr(args, n)
    ]
    if missing:
        raise FinetuneError(f"missing {', '.join(missing)} (or use --eval-only --model RUN/model.pt)")
    return FinetuneConfig(
        backbone=args.backbone, dataset=args.dataset, data_root=args.data_root, out=args.out,
        mode=args.mode, neck=args.neck, layers=args.layers, iters=args.iters, crop=args.crop,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        warmup_iters=args.warmup_iters, head_channels=args.head_channels, num_classes=args.num_classes,
        resplit_last_heads=args.resplit_last_heads, eval_window=args.eval_window, eval_stride=args.eval_stride,
        adapters=args.adapters,
        eval_split=args.eval_split, seed=args.seed, workers=args.workers, device=args.device,
        amp=not args.no_amp, log_every=args.log_every, ckpt_every=args.ckpt_every, resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.eval_only:
            if not args.model:
                raise FinetuneError("--eval-only needs --model RUN/model.pt")
            metrics = evaluate_saved(
                args.model, args.data_root, args.eval_split, args.out, args.device, not args.no_progress
            )
        else:
            metrics = run(config_from_args(args))
    except UnipError as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['pixel_acc']:.4f}  ({metrics['dataset']}, {metrics['mode']})"
        )
    return 0

