"""The method-agnostic pre-training run: data, optimizer, schedule, precision, run folder,
checkpoints and exact resume, logging, torchrun. A method (:mod:`.method`) plugs in what it trains.

Setup lives in :func:`train`; the step is :func:`unip_train.pretrain.engine.train_one_epoch`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unip_analysis import images as imgs
from unip_analysis import output_folder, selection
from unip_analysis.errors import CheckpointError, SpecError, UnipError

from .. import checkpointing, distributed, runs
from ..optim import adamw, lr_from_blr
from ..precision import amp_dtype, dtype_name, grad_scaler
from ..sampling import EpochSampler, KeyBatches, keyed_loader
from .data import InfMix, collate, collect_sources
from .engine import LoopConfig, train_one_epoch
from .method import METHODS, PretrainMethod

PROG = "unip-pretrain"
CHECKPOINT = "checkpoint.pt"  # the resumable checkpoint, refreshed every --ckpt-every steps
OLD_CHECKPOINT = "checkpoint-last.pt"  # its name before; still read when resuming such a run folder
# Files whose presence means the folder holds a run: never written over without --resume / --overwrite.
RUN_MARKERS = (
    CHECKPOINT,
    OLD_CHECKPOINT,
    "config.json",
    "log.jsonl",
    "student.safetensors",
    "backbone.safetensors",
)
# Everything a run writes at the top of its folder (checkpoint-EPOCH.pt is listed as it is saved).
OUTPUTS = (*RUN_MARKERS, "student.json", "backbone.json", runs.TENSORBOARD_DIR)
BETAS = (0.9, 0.95)
# Test-only: SIGKILL this process right after optimizer step N (exercises --resume).
KILL_ENV = "UNIP_PRETRAIN_SIGKILL_AT_STEP"
# Resuming with any of these changed would visit different samples or train another model.
RESUME_MUST_MATCH = ("method", "batch_size", "accum_iter", "world_size", "seed", "images", "img_size")
# Option names in the recipes of earlier versions' checkpoints -> today's.
OLD_RECIPE_KEYS = {
    "input_size": "img_size",
    "amp": "precision",
    "num_workers": "workers",
    "ckpt_every_steps": "ckpt_every",
}
# Values config.json records that are not options (so a run's config.json can be passed to --config).
DERIVED = (
    "effective_batch", "world_size", "lr_absolute", "steps_per_epoch", "total_steps", "warmup_steps",
    "betas", "amp_dtype", "images", "started_from",
)  # fmt: skip
# Options that steer this process only, not the run: never recorded, never compared.
NOT_RECORDED = ("debug", "progress", "resume", "overwrite")


def gather(obj: object) -> list:
    """``obj`` from every process, in rank order (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RunFolder:
    """The run folder: checkpoints, the step log, unreadable-image bookkeeping. Only rank 0 writes."""

    def __init__(self, out: Path, info: distributed.DistInfo, state_fn, kill_at: int | None):
        self.out, self.info, self.state_fn, self.kill_at = out, info, state_fn, kill_at
        self.skipped: set[str] = set()
        self.log: runs.ScalarLog | None = None

    def note_skipped(self, paths: list[str]) -> None:
        for p in paths:
            if p not in self.skipped:
                self.skipped.add(p)
                print(f"{PROG}: warning: unreadable image skipped: {p}", file=sys.stderr, flush=True)

    def all_skipped(self) -> list[str]:
        return sorted(set().union(*gather(self.skipped)))

    def save(self, epoch: int, iters_done: int, step: int, keep_epoch: bool = False) -> None:
        """checkpoint.pt (and checkpoint-EPOCH.pt): a collective call, every process gives its RNG."""
        state = self.state_fn(epoch, iters_done, step)
        state["rng"] = gather(distributed.rng_state())
        state["skipped"] = self.all_skipped()
        if self.info.is_main:
            checkpointing.save_checkpoint(self.out / CHECKPOINT, state)
            if keep_epoch:
                output_folder.claim(self.out, f"checkpoint-{epoch}.pt")
                checkpointing.save_checkpoint(self.out / f"checkpoint-{epoch}.pt", state)
        distributed.barrier()

    def after_step(self, record: dict, epoch: int, iters_done: int, iters_per_epoch: int, every: int) -> None:
        self.log.write(record)
        if every and record["step"] % every == 0 and iters_done < iters_per_epoch:
            self.save(epoch, iters_done, record["step"])
        if self.kill_at is not None and record["step"] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def resume_path(args: Any) -> Path | None:
    """The checkpoint ``--resume`` continues from: the run folder's (bare ``--resume``) or the file
    given. Refuses, before anything is built: ``--resume`` with nothing to resume, and a run folder
    that holds a run without ``--resume`` / ``--overwrite`` (``--overwrite`` moves it aside later,
    once every check has passed: :func:`start_run_folder`)."""
    if args.resume is not None and args.overwrite:
        raise SpecError(
            "--resume and --overwrite together: continue the run (--resume) or replace it (--overwrite)"
        )
    if args.resume is None:
        # --overwrite moves the old run aside later, once every check has passed (start_run_folder).
        output_folder.check(args.out, pretrain_run(args), overwrite=args.overwrite)
        return None
    if args.resume == "auto":
        for name in (CHECKPOINT, OLD_CHECKPOINT):
            if (args.out / name).is_file():
                output_folder.check(args.out, pretrain_run(args), resume=True)  # the same run only
                return args.out / name
        raise SpecError(
            f"{args.out}: nothing to resume (no {CHECKPOINT}); drop --resume to start a run there, or pass "
            "--overwrite to replace what the folder holds"
        )
    path = Path(args.resume)
    if not path.is_file():
        raise CheckpointError(
            f"--resume {path}: checkpoint not found; pass a {CHECKPOINT} of a {PROG} run, or a bare "
            "--resume to continue the run in --out"
        )
    output_folder.check(args.out, pretrain_run(args), resume=True)
    return path


def start_run_folder(args: Any, say) -> None:
    """Rank 0, once every check has passed: ``--overwrite`` moves the old run's own files aside, then
    the folder is made and ``run.json`` lists what the run writes."""
    folder = output_folder.check(
        args.out, pretrain_run(args), resume=args.resume is not None, overwrite=args.overwrite
    )
    if folder.begin() is not None:
        say(f"--overwrite: the previous run's files moved to {folder.aside}")


def selected_teacher_file(args: Any) -> Path | None:
    """The teacher checkpoint the selection file names for ``--teacher`` (nmi-had), if it can be read
    now (a bad file is refused, with its own message, when the method builds)."""
    sel, name = getattr(args, "selection", None), getattr(args, "teacher", None)
    if sel is None or name is None or not Path(sel).is_file():
        return None
    try:
        entry, _ = selection.resolve_teacher(
            selection.read(sel), name, str(sel), layer=getattr(args, "layer", None), check_sha=False
        )
    except UnipError:
        return None
    weights = entry.get("weights")
    return Path(weights) if isinstance(weights, str) and Path(weights).is_file() else None


def pretrain_run(args: Any) -> output_folder.Run:
    """A pre-training run: the settings a resume must keep and the sha256 of the teacher (the file
    the selection names, or PAD's --init) and the selection file. Inputs: the image folders, the teacher, the selection file, the RoI folder, the
    checkpoint resumed from."""
    recorded = recorded_options(args)
    keys = RESUME_MUST_MATCH + METHODS[args.method].resume_keys
    files = [output_folder.spec_file(getattr(args, n, None)) for n in ("init", "selection")]
    files.append(selected_teacher_file(args))
    ident = output_folder.identity({k: recorded[k] for k in keys if k in recorded}, digests=files)
    inputs = [*args.infrared, *args.infpre, *args.rgb, *[f for f in files if f is not None]]
    if getattr(args, "rois", None):
        inputs.append(Path(args.rois))
    if args.resume not in (None, "auto"):
        inputs.append(Path(args.resume))
    return output_folder.Run(PROG, ident, OUTPUTS, inputs, markers=RUN_MARKERS, what=f"a {PROG} run")


def recorded_options(args: Any) -> dict[str, Any]:
    """The resolved options a run records (config.json, the checkpoints' recipe): every option but
    the other methods' and those that steer this process only (``--resume``, ``--debug``...)."""
    skip = set(NOT_RECORDED) | METHODS[args.method].foreign_options()
    return runs.plain({f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in skip})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``--precision``: auto (bf16 on CUDA, fp16 where the GPU lacks it; fp32 on the CPU), bf16,
    fp16 (CUDA only) or fp32 (None)."""
    if precision == "fp16" and device.type != "cuda":
        raise SpecError(f"--precision fp16 needs CUDA; this run is on {device}; use --precision bf16 or fp32")
    return amp_dtype("none" if precision == "fp32" else precision, device)


def build_data(args: Any, method: PretrainMethod, info: distributed.DistInfo) -> tuple:
    """(sources, dataset, batches, loader, micro-batches per epoch) for this process."""
    sources = collect_sources(args)
    mean, std = imgs.parse_normalization(args.norm)
    dataset = InfMix(sources, args.img_size, mean, std, seed=args.seed, proposals=method.proposals(sources))
    sampler = EpochSampler(len(dataset), info.world_size, info.rank, seed=args.seed)
    # Whole accumulation windows only: a partial one would leak gradients into the next epoch.
    iters = sampler.per_rank // args.batch_size // args.accum_iter * args.accum_iter
    if iters == 0:
        raise SpecError(
            f"{len(dataset)} images give each of {info.world_size} process(es) {sampler.per_rank} per epoch, "
            f"fewer than one optimizer step of {args.batch_size} x {args.accum_iter}; "
            "lower --batch-size / --accum-iter or add images"
        )
    batches = KeyBatches(sampler, args.batch_size, per_epoch=iters)
    loader = keyed_loader(
        dataset, batches, args.workers, pin_memory=info.device.type == "cuda", collate_fn=collate
    )
    return sources, dataset, batches, loader, iters


def wrap(module: torch.nn.Module, info: distributed.DistInfo) -> torch.nn.Module:
    """``module`` under DDP when torchrun started several processes (it syncs what requires grad)."""
    if not info.enabled:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def trainable(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(id(p) for p in module.parameters() if p.requires_grad)


def loop_config(args: Any, iters: int, world_size: int, amp: torch.dtype | None) -> LoopConfig:
    """The optimization: effective batch = batch x accumulation x processes, lr from --lr or from
    --blr scaled by it (lr = blr x effective / 256), warm-up and total steps from the epochs."""
    effective = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else lr_from_blr(args.blr, effective)
    steps_per_epoch = iters // args.accum_iter
    return LoopConfig(
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


def run_recipe(args: Any, cfg: LoopConfig, world_size: int, images: int) -> dict:
    """What the run records (config.json, every checkpoint): the options and the values derived
    from them; a resumed run must match it (:func:`check_resumable`)."""
    recipe = recorded_options(args)
    recipe.update(
        effective_batch=cfg.effective_batch,
        world_size=world_size,
        lr_absolute=cfg.lr,
        steps_per_epoch=cfg.steps_per_epoch,
        total_steps=cfg.total_steps,
        warmup_steps=cfg.warmup_steps,
        betas=list(BETAS),
        amp_dtype=dtype_name(cfg.amp_dtype),
        images=images,
    )
    return runs.plain(recipe)


def checkpoint_state(method: PretrainMethod, optimizer, scaler, recipe: dict):
    """The function a :class:`RunFolder` calls for a checkpoint's state at (epoch, micro-batch, step)."""

    def state(epoch: int, iters_done: int, step: int) -> dict:
        return {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "iter_in_epoch": iters_done,
            "step": step,
            "recipe": recipe,
            "identity": method.identity(),
        }

    return state


def load_resume(
    path: Path, recipe: dict, method: PretrainMethod, optimizer, scaler, run: RunFolder, say
) -> tuple[int, int, dict]:
    """Check ``path`` against this run and load its weights, optimizer, scaler and skipped images
    (not yet its RNG state); returns the epoch and micro-batch to continue from, and the checkpoint."""
    ckpt = checkpointing.load_checkpoint(path)
    check_resumable(ckpt, recipe, method, path)
    method.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    start_epoch, start_iter = int(ckpt["epoch"]), int(ckpt["iter_in_epoch"])
    run.skipped.update(ckpt.get("skipped", []))
    say(f"resumed from {path}: epoch {start_epoch}, micro-batch {start_iter}, step {ckpt['step']}")
    return start_epoch, start_iter, ckpt


def train_epochs(
    args: Any,
    method: PretrainMethod,
    info: distributed.DistInfo,
    cfg: LoopConfig,
    batches: KeyBatches,
    loader,
    optimizer,
    scaler,
    run: RunFolder,
    start_epoch: int,
    start_iter: int,
) -> int:
    """The epochs from (``start_epoch``, ``start_iter``) to the last, a checkpoint after each;
    returns the optimizer steps done."""
    iters, steps_per_epoch = cfg.iters_per_epoch, cfg.steps_per_epoch
    model, wrapped_for = None, None
    step = start_epoch * steps_per_epoch + start_iter // args.accum_iter
    # One loader pass from the resumed micro-batch to the last: every batch carries its epoch, so
    # the workers start once and run on across epoch ends and checkpoints.
    batches.set_range(start_epoch * iters + start_iter, args.epochs * iters)
    stream = iter(loader)
    for epoch in range(start_epoch, args.epochs):
        method.on_epoch(epoch)
        if trainable(method.module) != wrapped_for:  # DDP syncs only what required grad when wrapped
            model = None  # the previous wrapper and its gradient hooks go before a new one is made
            model, wrapped_for = wrap(method.module, info), trainable(method.module)
        train_one_epoch(
            model,
            method.loss,
            stream,
            optimizer,
            scaler,
            epoch,
            cfg,
            start_iter=start_iter,
            on_step=lambda rec, done, e=epoch: run.after_step(rec, e, done, iters, args.ckpt_every),
            on_skipped=run.note_skipped,
            progress=info.is_main and args.progress,
        )
        start_iter = 0
        step = (epoch + 1) * steps_per_epoch
        done = epoch + 1
        run.save(done, 0, step, keep_epoch=done % args.save_every == 0 or done == args.epochs)
    return step


def export_run(
    args: Any,
    method: PretrainMethod,
    info: distributed.DistInfo,
    run: RunFolder,
    sources: list,
    images: int,
    recipe: dict,
    step: int,
    say,
) -> None:
    """Rank 0 exports the student with the run's summary; every process must hold the same weights."""
    digests = gather(checkpointing.weights_digest(method.backbone()))
    skipped = run.all_skipped()
    if info.is_main:
        summary = {
            "data": {
                "images": images,
                "sources": [s.summary() for s in sources],
                "skipped_unreadable": len(skipped),
            },
            "recipe": recipe,
            "epochs_done": args.epochs,
            "steps_done": step,
            "weights_sha256_per_rank": digests,
        }
        written = method.export(args.out, summary)
        say(f"wrote {written} ({len(skipped)} unreadable images skipped)")
    if len(set(digests)) != 1:
        raise UnipError(f"processes ended with different weights ({digests}); DDP did not keep them in sync")


def train(args: Any, method: PretrainMethod) -> None:
    """One run of ``method`` with unip-pretrain's resolved options ``args`` (:mod:`.cli`)."""
    # The run folder's rule first: nothing is built for a refused run. Under torchrun every process
    # checks before the process group forms, so none can see a file rank 0 writes later.
    path = resume_path(args)
    info = distributed.init_distributed(args.device)
    device = info.device
    amp = autocast_dtype(args.precision, device)
    say = print if info.is_main else (lambda *a, **k: None)

    # Same seed on every process, so every process starts from the same weights.
    distributed.seed_everything(args.seed)
    method.build(device)
    sources, dataset, batches, loader, iters = build_data(args, method, info)

    cfg = loop_config(args, iters, info.world_size, amp)
    optimizer = adamw(method.param_groups(args.weight_decay), lr=cfg.lr, betas=BETAS)
    scaler = grad_scaler(device, amp)
    recipe = run_recipe(args, cfg, info.world_size, len(dataset))

    kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    run = RunFolder(args.out, info, checkpoint_state(method, optimizer, scaler, recipe), kill_at)
    start_epoch, start_iter, ckpt = 0, 0, None
    if path is not None:
        start_epoch, start_iter, ckpt = load_resume(path, recipe, method, optimizer, scaler, run, say)
    if info.is_main:  # everything is checked: the run folder may now be written
        start_run_folder(args, say)
        runs.write_config(args.out, {**recipe, "started_from": method.info()})
    run.log = runs.ScalarLog(args.out, info.is_main, resume_step=int(ckpt["step"]) if ckpt else None)

    say(
        f"{method.describe()}\n"
        f"data: {len(dataset)} images from {len(sources)} folder(s); effective batch {cfg.effective_batch} = "
        f"{args.batch_size} x {args.accum_iter} x {info.world_size}; lr {cfg.lr:.3g}; "
        f"{cfg.steps_per_epoch} steps/epoch x {args.epochs} epochs",
        flush=True,
    )
    if ckpt is not None:  # last, so nothing in setup draws from the restored generators
        checkpointing.restore_rng_state(ckpt["rng"][info.rank])  # same world size: check_resumable

    step = train_epochs(
        args, method, info, cfg, batches, loader, optimizer, scaler, run, start_epoch, start_iter
    )
    run.log.close()
    export_run(args, method, info, run, sources, len(dataset), recipe, step, say)


def check_resumable(ckpt: dict, recipe: dict, method: PretrainMethod, path: Path) -> None:
    for key in ("model", "optimizer", "scaler", "epoch", "iter_in_epoch", "step", "rng", "recipe"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a {PROG} checkpoint (no '{key}')")
    keys = RESUME_MUST_MATCH + method.resume_keys
    old = {OLD_RECIPE_KEYS.get(k, k): v for k, v in ckpt["recipe"].items()}  # earlier versions' names
    checkpointing.check_same_settings(path, old, recipe, keys)
    saved = ckpt.get("identity", {})
    for key, value in method.identity().items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{path}: saved from starting weights with {key} {saved.get(key)!r}, this run has {value!r}; "
                "resume with the same files, or start a new run folder"
            )
