"""``unip-pretrain``: NMI-HAD distillation of a teacher's selected layer into a small ViT (method.md s.2).

Setup lives here (arguments, teacher, student, data, optimizer, resume, outputs); the loop is
:func:`unip_train.pretrain.engine.train_one_epoch`. Run it as is, or under
``torchrun --nproc_per_node N -m unip_train.pretrain ...`` (or ``torchrun $(which unip-pretrain)``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from unip_analysis import images as imgs
from unip_analysis import selection
from unip_analysis.checkpoints import heads_per_layer, load_backbone
from unip_analysis.errors import CheckpointError, SpecError, UnipError, error_line
from unip_analysis.files import atomic_write_text

from .. import checkpointing, distributed
from ..optim import adamw, param_groups
from ..sampling import EpochSampler
from .data import InfMix, collate, collect_source
from .engine import LoopConfig, NonFiniteLoss, train_one_epoch
from .nmi_had import (
    LOSSES,
    Student,
    Teacher,
    build_student,
    check_token_grids,
    lr_from_blr,
    save_student,
    weights_digest,
)

PROG = "unip-pretrain"
LAST = "checkpoint-last.pt"
# Test-only: SIGKILL this process right after optimizer step N (exercises --resume).
KILL_ENV = "UNIP_PRETRAIN_SIGKILL_AT_STEP"
# Resuming with any of these changed would visit different samples at the saved position.
RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "seed", "images", "student", "input_size")

EPILOG = """\
effective batch = --batch-size x --accum-iter x processes (torchrun --nproc_per_node x nodes).
The published recipe uses 4096 = 256 x 8 x 2 processes; on one process the defaults give 2048, so
use e.g. --accum-iter 16, or --batch-size 128 --accum-iter 4 on 8 processes. The learning rate is
--blr x effective_batch / 256 unless --lr is given.

Outputs in --out: checkpoint-last.pt (resumable; --resume auto), checkpoint-EPOCH.pt every
--save-every epochs and at the end, student.safetensors + student.json, log.jsonl (one line per
optimizer step). Load the student with unip-analyze --checkpoint s=unip:ARCH:RUN/student.safetensors.
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="NMI-HAD distillation: train a ViT student's last-block attention logits to match "
        "a frozen teacher's selected layer (UNIP, method.md section 2). Defaults follow the published recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("teacher and student")
    g.add_argument("--selection", type=Path, required=True, help="layer_selection.json from unip-analyze")
    g.add_argument("--teacher", required=True, help="model name in the selection file")
    g.add_argument("--layer", type=int, help="1-based teacher layer to distil (default: selected_layer)")
    g.add_argument(
        "--student", default="vit_small_patch16_224", help="timm ViT name, optionally name(k=v,...)"
    )
    g.add_argument("--input-size", type=int, default=224, help="image side for teacher and student (224)")
    g.add_argument("--drop-path", type=float, default=0.1, help="student stochastic depth rate (0.1)")
    g.add_argument(
        "--loss", choices=sorted(LOSSES), default="kl", help="kl: KL(teacher||student) (default); ce"
    )
    g.add_argument("--temperature", type=float, default=1.0, help="teacher logits are divided by it (1)")
    g = p.add_argument_group("data (InfMix-style mix)")
    g.add_argument(
        "--infrared",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="infrared folder, read as is (repeatable)",
    )
    g.add_argument(
        "--rgb",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="RGB folder, converted to grey (repeatable)",
    )
    g.add_argument(
        "--per-class-cap",
        type=int,
        metavar="N",
        help="--rgb folders: at most N images per immediate subfolder (ImageNet subset: 200); files directly in the folder are kept",
    )
    g.add_argument(
        "--max-images-per-source",
        type=int,
        metavar="N",
        help="every folder: keep a fixed random subset of N images",
    )
    g.add_argument(
        "--norm",
        default="infmix",
        help="normalization: infmix (mean 0.3801, std 0.1871), infrared, imagenet or MEAN,STD",
    )
    g.add_argument(
        "--num-workers", type=int, default=8, help="data loader processes per training process (8)"
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100, help="(100)")
    g.add_argument(
        "--warmup-epochs", type=float, default=5, help="linear warm-up, then cosine per optimizer step (5)"
    )
    g.add_argument("--batch-size", type=int, default=256, help="images per process per micro-batch (256)")
    g.add_argument("--accum-iter", type=int, default=8, help="micro-batches per optimizer step (8)")
    g.add_argument(
        "--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective_batch / 256 (1.5e-4)"
    )
    g.add_argument("--lr", type=float, help="absolute learning rate; overrides --blr")
    g.add_argument("--min-lr", type=float, default=0.0, help="floor of the cosine schedule (0)")
    g.add_argument(
        "--weight-decay", type=float, default=0.05, help="AdamW, none on biases/norms/tokens (0.05)"
    )
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (off)")
    g.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "none"),
        default="auto",
        help="mixed precision; auto: bf16 on CUDA (fp16 + loss scaling where bf16 is missing), none on CPU",
    )
    g.add_argument("--seed", type=int, default=0, help="data order, augmentation and init (0)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    g = p.add_argument_group("run folder and checkpoints")
    g.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder for all outputs")
    g.add_argument(
        "--save-every",
        type=int,
        default=20,
        metavar="K",
        help="keep checkpoint-EPOCH.pt every K epochs and at the end (20)",
    )
    g.add_argument(
        "--ckpt-every-steps",
        type=int,
        default=50,
        metavar="S",
        help="also refresh checkpoint-last.pt every S optimizer steps mid-epoch; 0: epoch ends only (50)",
    )
    g.add_argument(
        "--resume",
        metavar="CKPT",
        help="RUN/checkpoint-last.pt to continue exactly, or 'auto' (the one in --out, if any)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "accum_iter", "input_size", "save_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("epochs", "warmup_epochs", "ckpt_every_steps", "num_workers"):
        if getattr(args, name) < 0:
            raise SpecError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not args.infrared and not args.rgb:
        raise SpecError("no data: pass at least one --infrared DIR or --rgb DIR")


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32. On CPU only an explicit bf16 turns autocast on."""
    if device.type != "cuda":
        if choice == "fp16":
            raise SpecError(f"--amp fp16 needs CUDA; this run is on {device}; use --amp bf16 or none")
        return torch.bfloat16 if choice == "bf16" else None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


def gather(obj: object) -> list:
    """``obj`` from every process, in rank order (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Run:
    """The run folder: log.jsonl, checkpoints, final outputs. Only rank 0 writes."""

    def __init__(self, out: Path, info: distributed.DistInfo, state_fn, kill_at: int | None):
        self.out, self.info, self.state_fn, self.kill_at = out, info, state_fn, kill_at
        self.skipped: set[str] = set()
        self.log_path = out / "log.jsonl"

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def note_skipped(self, paths: list[str]) -> None:
        for p in paths:
            if p not in self.skipped:
                self.skipped.add(p)
                print(f"{PROG}: warning: unreadable image skipped: {p}", file=sys.stderr, flush=True)

    def all_skipped(self) -> list[str]:
        return sorted(set().union(*gather(self.skipped)))

    def log(self, record: dict) -> None:
        if self.info.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop lines past the resumed step (written by the run that was killed)."""
        if self.info.is_main and self.log_path.exists():
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(self.log_path, "".join(ln + "\n" for ln in kept))

    def save(self, epoch: int, iters_done: int, step: int, keep_epoch: bool = False) -> None:
        """checkpoint-last.pt (and checkpoint-EPOCH.pt): a collective call, every process gives its RNG."""
        state = self.state_fn(epoch, iters_done, step)
        state["rng"] = gather(distributed.rng_state())
        state["skipped"] = self.all_skipped()
        if self.info.is_main:
            checkpointing.save_checkpoint(self.out / LAST, state)
            if keep_epoch:
                checkpointing.save_checkpoint(self.out / f"checkpoint-{epoch}.pt", state)
        distributed.barrier()

    def after_step(self, record: dict, epoch: int, iters_done: int, iters_per_epoch: int, every: int) -> None:
        self.log(record)
        if every and record["step"] % every == 0 and iters_done < iters_per_epoch:
            self.save(epoch, iters_done, record["step"])
        if self.kill_at is not None and record["step"] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def resume_path(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = args.out / LAST
        return path if path.exists() else None
    return Path(args.resume)


def build_data(args: argparse.Namespace, info: distributed.DistInfo) -> tuple:
    """(sources, dataset, sampler, loader, micro-batches per epoch) for this process."""
    sources = [
        collect_source(d, "infrared", max_images=args.max_images_per_source) for d in args.infrared
    ] + [collect_source(d, "rgb", args.per_class_cap, args.max_images_per_source) for d in args.rgb]
    mean, std = imgs.parse_normalization(args.norm)
    dataset = InfMix(sources, args.input_size, mean, std, seed=args.seed)
    sampler = EpochSampler(len(dataset), info.world_size, info.rank, seed=args.seed)
    # Whole accumulation windows only: a partial one would leak gradients into the next epoch.
    iters = sampler.per_rank // args.batch_size // args.accum_iter * args.accum_iter
    if iters == 0:
        raise SpecError(
            f"{len(dataset)} images give each of {info.world_size} process(es) {sampler.per_rank} per epoch, "
            f"fewer than one optimizer step of {args.batch_size} x {args.accum_iter}; "
            "lower --batch-size / --accum-iter or add images"
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        generator=torch.Generator(),  # keeps iterator creation off the global RNG (exact resume)
    )
    return sources, dataset, sampler, loader, iters


def train(args: argparse.Namespace) -> None:
    check_args(args)
    info = distributed.init_distributed(args.device)
    device = info.device
    amp = amp_dtype(args.amp, device)
    say = print if info.is_main else (lambda *a, **k: None)

    # Teacher: the selection file says which checkpoint and which layer.
    doc = selection.read(args.selection)
    entry, layer = selection.resolve_teacher(doc, args.teacher, str(args.selection), layer=args.layer)
    backbone = load_backbone(entry["family"], entry["arch"], entry["weights"], img_size=args.input_size)
    teacher = Teacher(backbone, layer - 1, args.temperature).to(device)

    # Student: same seed on every process, so every process starts from the same weights.
    distributed.seed_everything(args.seed)
    vit = build_student(args.student, teacher.heads, args.input_size, args.drop_path)
    check_token_grids(teacher, vit, args.input_size)
    student = Student(vit).to(device)

    sources, dataset, sampler, loader, iters = build_data(args, info)

    # Optimization.
    effective = args.batch_size * args.accum_iter * info.world_size
    lr = args.lr if args.lr is not None else lr_from_blr(args.blr, effective)
    steps_per_epoch = iters // args.accum_iter
    cfg = LoopConfig(
        iters_per_epoch=iters,
        accum_iter=args.accum_iter,
        lr=lr,
        min_lr=args.min_lr,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        total_steps=args.epochs * steps_per_epoch,
        effective_batch=effective,
        clip_grad=args.clip_grad,
        amp_dtype=amp,
    )
    optimizer = adamw(param_groups(vit, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    model = student
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)

    teacher_info = {
        "name": args.teacher,
        "family": entry["family"],
        "arch": entry["arch"],
        "weights": entry["weights"],
        "weights_sha256": entry["weights_sha256"],
        "layer": layer,
        "heads": teacher.heads,
    }
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recipe["infrared"] = [str(d) for d in args.infrared]
    recipe["rgb"] = [str(d) for d in args.rgb]
    recipe.update(
        effective_batch=effective,
        world_size=info.world_size,
        lr_absolute=lr,
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.total_steps,
        warmup_steps=cfg.warmup_steps,
        betas=[0.9, 0.95],
        amp_dtype=str(amp).replace("torch.", "") if amp else "none",
        images=len(dataset),
    )
    for k in ("debug", "no_progress", "resume", "device"):
        recipe.pop(k)

    def state(epoch: int, iters_done: int, step: int) -> dict:
        return {
            "model": vit.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "iter_in_epoch": iters_done,
            "step": step,
            "recipe": recipe,
            "teacher": teacher_info,
        }

    kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    run = Run(args.out, info, state, kill_at)
    if info.is_main:
        args.out.mkdir(parents=True, exist_ok=True)

    start_epoch, start_iter, ckpt = 0, 0, None
    path = resume_path(args)
    if path is not None:
        ckpt = checkpointing.load_checkpoint(path)
        check_resumable(ckpt, recipe, teacher_info, path)
        vit.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_iter = int(ckpt["epoch"]), int(ckpt["iter_in_epoch"])
        run.skipped.update(ckpt.get("skipped", []))
        run.truncate_log(int(ckpt["step"]))
        say(f"resumed from {path}: epoch {start_epoch}, micro-batch {start_iter}, step {ckpt['step']}")
    elif (args.out / LAST).exists():
        raise SpecError(
            f"{args.out / LAST} exists: pass --resume auto to continue that run, or choose a new --out"
        )
    elif info.is_main:
        run.log_path.unlink(missing_ok=True)

    say(
        f"teacher {args.teacher} ({entry['family']}:{entry['arch']}) layer {layer}, {teacher.heads} heads; "
        f"student {args.student}, heads {heads_per_layer(vit)}\n"
        f"data: {len(dataset)} images from {len(sources)} folder(s); effective batch {effective} = "
        f"{args.batch_size} x {args.accum_iter} x {info.world_size}; lr {lr:.3g}; "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs",
        flush=True,
    )
    if ckpt is not None:  # last, so nothing in setup draws from the restored generators
        checkpointing.restore_rng_state(ckpt["rng"][info.rank])  # same world size: check_resumable

    criterion = LOSSES[args.loss]
    step = start_epoch * steps_per_epoch + start_iter // args.accum_iter
    for epoch in range(start_epoch, args.epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start=start_iter * args.batch_size)
        train_one_epoch(
            model,
            teacher,
            criterion,
            loader,
            optimizer,
            scaler,
            epoch,
            cfg,
            start_iter=start_iter,
            on_step=lambda rec, done, e=epoch: run.after_step(rec, e, done, iters, args.ckpt_every_steps),
            on_skipped=run.note_skipped,
            progress=info.is_main and not args.no_progress,
        )
        start_iter = 0
        step = (epoch + 1) * steps_per_epoch
        done = epoch + 1
        run.save(done, 0, step, keep_epoch=done % args.save_every == 0 or done == args.epochs)

    digests = gather(weights_digest(vit))
    skipped = run.all_skipped()
    if info.is_main:
        save_student(args.out / "student.safetensors", vit, args.student)
        summary = {
            "arch": args.student,
            "heads_per_layer": heads_per_layer(vit),
            "teacher": teacher_info,
            "data": {
                "images": len(dataset),
                "sources": [s.summary() for s in sources],
                "skipped_unreadable": len(skipped),
            },
            "recipe": recipe,
            "epochs_done": args.epochs,
            "steps_done": step,
            "weights_sha256_per_rank": digests,
        }
        atomic_write_text(args.out / "student.json", json.dumps(summary, indent=2) + "\n")
        say(f"wrote {args.out / 'student.safetensors'} ({len(skipped)} unreadable images skipped)")
    if len(set(digests)) != 1:
        raise UnipError(f"processes ended with different weights ({digests}); DDP did not keep them in sync")


def check_resumable(ckpt: dict, recipe: dict, teacher_info: dict, path: Path) -> None:
    for key in ("model", "optimizer", "scaler", "epoch", "iter_in_epoch", "step", "rng", "recipe"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a {PROG} checkpoint (no '{key}')")
    checkpointing.check_same_settings(path, ckpt["recipe"], recipe, RESUME_MUST_MATCH)
    saved = ckpt.get("teacher", {})
    for key in ("weights_sha256", "layer"):
        if saved.get(key) != teacher_info[key]:
            raise CheckpointError(
                f"{path}: distilled teacher {key} {saved.get(key)!r}, this run uses {teacher_info[key]!r}"
            )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        train(args)
        return 0
    except NonFiniteLoss as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1
    except UnipError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.cleanup()

