"""The fine-tuning loop at its limit: ``unip-finetune``'s real loop against a bare loop, per iteration.

- ``real``: what ``unip-finetune`` runs, driven through its own code
  (:func:`unip_train.finetune.trainer.setup`, then :func:`unip_train.finetune.engine.train`) with the
  default options: data loading and augmentation in the default number of loader workers, the loss,
  the optimizer, logging every 20 iterations and the checkpoint every 1,000. Iterations are timed by
  an optimizer step hook (one timestamp per step); the checkpoint, which a short window cannot
  reach, is timed when ``train`` writes it at the end and counted as 1/1000 of it per iteration.
  The timed window starts after the first epoch, which decodes every image once (then kept in
  memory); that epoch's seconds per iteration are reported as ``first_epoch_s_per_iter``.
- ``bare``: the same segmentor with the same optimizer, fed ready-made tensors of the same shape:
  forward, the same loss (main + 0.4 x auxiliary cross-entropy), backward, step. Nothing else: the
  physical limit of this code on this machine. Timed before and after the real loop (two halves).
- Rounds (``--rounds``, 3): each configuration is measured that many times, each round on a newly
  built state (run folder, model, data), and the round with the median ratio is reported, every
  round's ratio beside it (``round_ratios``; with an even count the lower middle one): this shared
  machine has bursts of load lasting seconds, which a single 20-iteration window cannot tell from
  the loop's own cost.

Heads: ``upernet`` (LL-FPN + UperNet at the backbone's width + auxiliary FCN at 256: the recipe),
``ll-fpn`` (the LL-FPN neck with the narrowest heads the options allow, UperNet and auxiliary FCN at
32 channels: what the neck costs without a wide head) and ``linear`` (linear probing, 4 layers).
Backbones ViT-T/16 and ViT-S/16; crops 128 and 256; batch 8 (the recipe's); data: a synthetic
``folder`` dataset of 480 x 640 grey PNG scenes (the size of SODA and MFNet images).

For each configuration the bare steps are split into backbone, LL-FPN neck and heads (with the
loss), forward and backward, and the optimizer step (timestamps from module and gradient hooks).

``small_data``: the issue's case for loader workers: a linear probe of ViT-T at 128 px on 8 images,
batch 4 (2 iterations an epoch), 80 iterations, the whole ``train`` call timed with no workers and
with the default count, alternating.

Variants (``--variants``, each a ``+``-joined set): ``default`` (the product's options: ``--precision auto``,
float32 on the CPU, bf16 on CUDA; channels-last), ``fp32``, ``fp16``, ``bf16`` (``--precision``), ``cl`` /
``nocl`` (``--channels-last`` / ``--no-channels-last``) and ``compile`` (``--compile``); e.g.
``bf16+nocl``. The bare loop runs
the same precision, memory order and compiled module. On CUDA both loops synchronise once a step to
be timed, and the backbone / neck / heads split is left out (host timestamps would not bound the
kernels).

Prints one JSON line; each configuration's ``ratio_real_over_bare`` is real / bare seconds per
iteration (target <= 1.10 on the CPU).

    .venv/bin/python benchmarks/bench_finetune.py                      # the full grid (long on 2 cores)
    .venv/bin/python benchmarks/bench_finetune.py --heads linear --archs vit_tiny_patch16_224
    .venv/bin/python benchmarks/bench_finetune.py --quick              # tiny, for the smoke test
    python benchmarks/bench_finetune.py --device cuda --archs vit_small_patch16_224 --crops 512 \
        --variants default fp32 fp16 bf16+nocl bf16+compile      # GPU precision / layout / compile rows
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_seconds, device_sync, emit, environment

ARCHS = ("vit_tiny_patch16_224", "vit_small_patch16_224")
CROPS = (128, 256)
LIGHT = 32  # the "ll-fpn" row's UperNet and auxiliary widths
HEADS = {
    "upernet": {"mode": "ft"},
    "ll-fpn": {"mode": "ft", "head_channels": LIGHT, "aux_channels": LIGHT},
    "linear": {"mode": "lp"},
}
IMAGE_SIZE = (480, 640)
TRAIN_IMAGES = 64
QUICK = {
    "archs": ("vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)",),
    "crops": (32,),
    "image_size": (40, 48),
    "warmup": 1,
    "timed": 2,
    "small_iters": 4,
}
SMALL = {"arch": "vit_tiny_patch16_224", "crop": 128, "images": 8, "batch": 4, "iters": 80}
TARGET_RATIO = 1.10


# --- inputs ----------------------------------------------------------------------------------------


def make_backbone(root: Path, arch: str, img: int) -> str:
    """A randomly initialised timm ViT saved as safetensors; returns its --backbone spec."""
    import torch
    from safetensors.torch import save_file

    from unip_analysis.checkpoints import build_vit

    path = root / f"backbone_{hashlib.sha1(f'{arch}@{img}'.encode()).hexdigest()[:12]}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = build_vit(arch, img_size=img)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"timm:{arch}:{path}"


def make_data(root: Path, n: int, size: tuple[int, int]) -> Path:
    from unip_train.synthetic import generate

    out = root / f"data_{n}_{size[0]}x{size[1]}"
    if not out.exists():
        generate(out, "folder", n_train=n, n_test=1, size=size, seed=0)
    return out


def variant_options(name: str) -> dict:
    """``--variants`` entry -> unip-finetune options, e.g. ``bf16+nocl`` -> precision bf16, contiguous."""
    opts: dict = {}
    for part in name.split("+"):
        if part in ("fp32", "fp16", "bf16"):
            opts["precision"] = part
        elif part in ("cl", "nocl"):
            opts["channels_last"] = part == "cl"
        elif part == "compile":
            opts["compile"] = True
        elif part != "default":
            raise SystemExit(f"--variants {name!r}: parts are default, fp32, fp16, bf16, cl, nocl, compile")
    return opts


def config(
    backbone: str,
    data: Path,
    out: Path,
    crop: int,
    iters: int,
    workers: int | None,
    device: str = "cpu",
    **kw,
):
    """unip-finetune's defaults, with the benchmark's crop, head, length and run folder."""
    from unip_train.finetune.config import FinetuneConfig, resolve

    opts = dict(
        backbone=backbone, dataset="folder", data_root=str(data), out=str(out), img_size=crop, device=device
    )
    opts.update(iters=iters, progress=False, **kw)  # no progress bar: the JSON line is the output
    if workers is not None:
        opts["workers"] = workers
    return resolve(FinetuneConfig(**opts))


# --- the real loop ---------------------------------------------------------------------------------


def build_state(cfg):
    """What ``unip-finetune`` builds before its loop: data, loader, segmentor, optimizer, run folder."""
    from unip_train import distributed as du
    from unip_train.finetune.trainer import setup

    with contextlib.redirect_stdout(sys.stderr):  # its notes; stdout holds the JSON line only
        state, _, _ = setup(cfg, du.init_distributed(cfg.device), [])
    return state


def real_loop(state, warmup: int, timed: int, epoch: int = 1) -> dict:
    """Seconds per iteration of ``unip-finetune``'s loop over iterations ``warmup .. warmup+timed-1``
    (plus 1/ckpt_every of a checkpoint), and of its first ``epoch`` iterations."""
    from unip_train.finetune.engine import train
    from unip_train.finetune.trainer import save_training_state

    stamps: list[tuple[float, float]] = []  # (wall, CPU of this process and its workers) per step
    sync = device_sync(state.dist.device)

    def stamp(*_) -> None:
        sync()
        stamps.append((time.perf_counter(), cpu_seconds()))

    hook = state.optimizer.register_step_post_hook(stamp)
    saves: list[float] = []

    def save(it: int) -> None:
        t0 = time.perf_counter()
        save_training_state(state, it)
        saves.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    try:
        train(state, save)
    finally:
        hook.remove()
        state.log.close()
    total = time.perf_counter() - t0
    # Step `warmup - 1` ends the warm-up; the window holds `timed` whole iterations after it.
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup - 1], stamps[warmup + timed - 1]
    ckpt = statistics.median(saves)
    return {
        "s_per_iter": (wall1 - wall0) / timed + ckpt / state.cfg.ckpt_every,
        "cpu_s_per_iter": (cpu1 - cpu0) / timed,
        "checkpoint_s": ckpt,
        "first_iter_s": stamps[0][0] - t0,
        "first_epoch_s_per_iter": (stamps[epoch - 1][0] - t0) / epoch,
        "run_s": total,
    }


# --- the bare loop ---------------------------------------------------------------------------------


class Split:
    """Timestamps inside one bare step: where the backbone, the neck and the heads end, forward and
    backward (module forward hooks; gradient hooks on the backbone's and the neck's outputs)."""

    def __init__(self, model):
        self.model, self.t = model, {}
        self.backbone_out: set[int] = set()
        original = model.layer_maps

        def layer_maps(x):  # an instance attribute: Segmentor.forward calls self.layer_maps
            feats = original(x)
            self.t["backbone_fwd"] = time.perf_counter()
            self.backbone_out = {id(f) for f in feats}
            for f in feats:
                if f.requires_grad:
                    f.register_hook(self.mark("neck_bwd"))
            return feats

        model.layer_maps = layer_maps
        self.handles = []
        if model.neck is not None:
            self.handles.append(model.neck.register_forward_hook(self.neck_done))
            # The auxiliary head reads a backbone map directly (the neck's identity branch).
            self.handles.append(model.aux_head.register_full_backward_hook(self.aux_done))

    def neck_done(self, module, inputs, outputs) -> None:
        self.t["neck_fwd"] = time.perf_counter()
        for o in outputs:
            if o.requires_grad and id(o) not in self.backbone_out:  # the identity branch is the backbone's
                o.register_hook(self.mark("heads_bwd"))

    def aux_done(self, module, grad_in, grad_out) -> None:
        self.mark("heads_bwd")(None)

    def mark(self, name: str):
        def hook(grad):  # several tensors: the last one's time is when all are done
            self.t[name] = max(self.t.get(name, 0.0), time.perf_counter())

        return hook

    def remove(self) -> None:
        del self.model.layer_maps
        for h in self.handles:
            h.remove()


def bare_step(state, img, label) -> tuple[float, float]:
    """One bare iteration: forward, the loss (main + aux_weight x auxiliary cross-entropy), backward,
    the optimizer step. Returns the timestamps at which the loss and the backward were done."""
    from unip_train.finetune.losses import seg_loss
    from unip_train.precision import autocast

    cfg, scaler, opt = state.cfg, state.scaler, state.optimizer
    with autocast(state.dist.device, state.amp):
        logits, aux = state.ddp(img)
        loss = seg_loss(logits, label, cfg.ce_average)
        if aux is not None:
            loss = loss + cfg.aux_weight * seg_loss(aux, label, cfg.ce_average)
    t_loss = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    t_bwd = time.perf_counter()
    scaler.step(opt)
    scaler.update()
    return t_loss, t_bwd


def bare_loop(state, steps: int, seed: int = 0) -> tuple[list[float], list[float], list[dict]]:
    """``steps`` bare iterations on ready-made tensors: wall and CPU seconds each, and each one's split
    (the split on the CPU and without --compile only; empty otherwise)."""
    import torch

    cfg, device = state.cfg, state.dist.device
    g = torch.Generator().manual_seed(seed)
    b = cfg.batch_size
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    img = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=g).to(device, memory_format=fmt)
    label = torch.randint(0, state.model.num_classes, (b, cfg.img_size, cfg.img_size), generator=g).to(device)
    sync = device_sync(device)
    state.ddp.train()
    split = Split(state.model) if device.type == "cpu" and not cfg.compile else None
    times, cpu, splits = [], [], []
    try:
        for _ in range(steps):
            if split is not None:
                split.t = {}
            sync()
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            t_loss, t_bwd = bare_step(state, img, label)
            sync()
            t_end = time.perf_counter()
            times.append(t_end - t0)
            cpu.append(cpu_seconds() - c0)
            if split is None:
                continue
            t = split.t
            bb_f = t["backbone_fwd"]
            neck_f = t.get("neck_fwd", bb_f)
            heads_b = t.get("heads_bwd", t_bwd)
            neck_b = t.get("neck_bwd", heads_b)
            splits.append(
                {
                    "backbone_fwd": bb_f - t0,
                    "neck_fwd": neck_f - bb_f,
                    "heads_fwd": t_loss - neck_f,  # the loss included
                    "heads_bwd": heads_b - t_loss,  # zero_grad included (microseconds)
                    "neck_bwd": neck_b - heads_b,
                    "backbone_bwd": t_bwd - neck_b,
                    "optimizer": t_end - t_bwd,
                }
            )
    finally:
        if split is not None:
            split.remove()
    return times, cpu, splits


def summarize_split(splits: list[dict]) -> dict | None:
    """Mean seconds per part, and the shares of backbone / neck / heads / optimizer (None: no split)."""
    if not splits:
        return None
    mean = {k: statistics.fmean(s[k] for s in splits) for k in splits[0]}
    total = sum(mean.values())
    parts = {
        "backbone": mean["backbone_fwd"] + mean["backbone_bwd"],
        "neck": mean["neck_fwd"] + mean["neck_bwd"],
        "heads": mean["heads_fwd"] + mean["heads_bwd"],
        "optimizer": mean["optimizer"],
    }
    return {
        "seconds": {k: round(v, 4) for k, v in mean.items()},
        "share": {k: round(v / total, 3) for k, v in parts.items()},
    }


def data_seconds(state, batches: int = 8) -> float:
    """Seconds one process takes to read, augment and collate one batch of the run's training data
    (after the real loop: its images are in memory, as in the timed window)."""
    dataset, stream = state.loader.dataset, state.loader.batch_sampler
    collate = state.loader.collate_fn
    stream.set_range(0, batches)
    keyed = list(stream)
    t0 = time.perf_counter()
    for keys in keyed:
        collate([dataset[key] for key in keys])
    return (time.perf_counter() - t0) / batches


# --- one configuration -----------------------------------------------------------------------------


def measure_round(state, warmup: int, epoch: int, args) -> dict:
    """One round on a freshly built state: bare halves before and after the real loop (so a drifting
    machine load hits both alike), then one process's data work per batch."""
    bare_loop(state, args.warmup)
    first, first_cpu, split_a = bare_loop(state, (args.timed + 1) // 2)
    real = real_loop(state, warmup, args.timed, epoch)
    second, second_cpu, split_b = bare_loop(state, args.timed // 2) if args.timed > 1 else ([], [], [])
    bare = statistics.fmean(first + second)
    return {
        "real": real,
        "bare": bare,
        "bare_cpu": statistics.fmean(first_cpu + second_cpu),
        "ratio": real["s_per_iter"] / bare,
        "splits": split_a + split_b,
        "data": data_seconds(state),
    }


def run_config(root: Path, arch: str, crop: int, head: str, variant: str, args) -> dict:
    backbone = make_backbone(root, arch, crop)
    data = make_data(root, args.train_images, args.image_size)
    opts = {**HEADS[head], **variant_options(variant)}
    outs = [Path(tempfile.mkdtemp(dir=root)) for _ in range(args.rounds)]
    batch = config(backbone, data, outs[0], crop, 1, args.num_workers, args.device, **opts).batch_size
    # The real loop's warm-up covers its first epoch, which decodes every image once (then kept in
    # memory, --cache-mb): the timed window is the steady state; the first epoch is reported apart.
    epoch = -(-args.train_images // batch)
    warmup = epoch + args.warmup
    # Rounds, each from a new run folder and state: a burst of the machine's load lands in one round,
    # and the round of median ratio is reported (every round's ratio beside it).
    rounds = []
    for out in outs:
        cfg = config(backbone, data, out, crop, warmup + args.timed, args.num_workers, args.device, **opts)
        state = build_state(cfg)
        rounds.append(measure_round(state, warmup, epoch, args))
    mid = sorted(rounds, key=lambda r: r["ratio"])[(len(rounds) - 1) // 2]
    real, bare, bare_cpu, data = mid["real"], mid["bare"], mid["bare_cpu"], mid["data"]
    return {
        "arch": arch,
        "crop": crop,
        "head": head,
        "variant": variant,
        "amp": str(state.amp).replace("torch.", "") if state.amp else "float32",
        "device": str(state.dist.device),
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "mode": cfg.mode,
        "head_channels": cfg.head_channels if cfg.mode == "ft" else None,
        "aux_channels": cfg.aux_channels if cfg.mode == "ft" else None,
        "layers": state.model.layers,
        "batch": cfg.batch_size,
        "workers": cfg.workers,
        "real_s_per_iter": round(real["s_per_iter"], 6),
        "bare_s_per_iter": round(bare, 6),
        "ratio_real_over_bare": round(mid["ratio"], 3),
        "round_ratios": [round(r["ratio"], 3) for r in rounds],
        "real_cpu_s_per_iter": round(real["cpu_s_per_iter"], 4),
        "bare_cpu_s_per_iter": round(bare_cpu, 4),
        "ratio_cpu_real_over_bare": round(real["cpu_s_per_iter"] / bare_cpu, 3),
        "data_s_per_batch": round(data, 6),
        # The ratio a loop would reach that added to the bare step nothing but this data work, done in
        # the training process (the CPU default: no workers): the floor of in-process loading.
        "ratio_floor_in_process": round((bare + data) / bare, 3),
        "checkpoint_s": round(real["checkpoint_s"], 3),
        "first_iter_s": round(real["first_iter_s"], 3),
        "first_epoch_s_per_iter": round(real["first_epoch_s_per_iter"], 4),
        "warmup_iters": warmup,
        "split": summarize_split([s for r in rounds for s in r["splits"]]),
    }


def small_data(root: Path, args) -> dict:
    """Whole-``train`` seconds of the issue's small-data linear probe, workers 0 vs the default."""
    from unip_train.finetune.engine import train
    from unip_train.finetune.trainer import save_training_state
    from unip_train.runs import default_num_workers

    arch = args.archs[0] if args.quick else SMALL["arch"]
    crop = args.crops[0] if args.quick else SMALL["crop"]
    backbone = make_backbone(root, arch, crop)
    data = make_data(root, SMALL["images"], args.image_size)
    default = args.num_workers if args.num_workers is not None else default_num_workers(args.device)
    seconds: dict[str, list[float]] = {"workers_0": [], "workers_default": []}
    cpu: dict[str, list[float]] = {"workers_0": [], "workers_default": []}
    for _ in range(args.small_rounds):
        for key, workers in (("workers_0", 0), ("workers_default", default)):
            out = Path(tempfile.mkdtemp(dir=root))
            cfg = config(
                backbone,
                data,
                out,
                crop,
                args.small_iters,
                workers,
                args.device,
                mode="lp",
                batch_size=SMALL["batch"],
            )
            state = build_state(cfg)
            c0, t0 = cpu_seconds(), time.perf_counter()
            train(state, lambda it, s=state: save_training_state(s, it))
            seconds[key].append(round(time.perf_counter() - t0, 3))
            cpu[key].append(round(cpu_seconds() - c0, 3))  # the workers are alive still (persistent)
            state.log.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "arch": arch,
        "crop": crop,
        "images": SMALL["images"],
        "batch": SMALL["batch"],
        "iters": args.small_iters,
        "default_workers": default,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "ratio_cpu_default_over_0": round(med_cpu["workers_default"] / med_cpu["workers_0"], 3),
        "ratio_default_over_0": round(med["workers_default"] / med["workers_0"], 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and data, 2 timed steps (smoke test)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--crops", nargs="+", type=int, default=list(CROPS))
    ap.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=list(HEADS))
    ap.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed iterations first, each loop (2); the real loop's first epoch comes on top",
    )
    ap.add_argument(
        "--timed", type=int, default=20, help="timed iterations per loop (20: one logging interval)"
    )
    ap.add_argument(
        "--num-workers", type=int, help="loader workers of the real loop (default: the product's)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds per configuration; the median one is reported (3)"
    )
    ap.add_argument("--small-rounds", type=int, default=2, help="small-data runs per setting (2)")
    ap.add_argument("--no-small-data", action="store_true", help="skip the small-data comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="precision / layout / compile sets to run, e.g. default fp32 fp16 bf16+nocl bf16+compile (default: default)",
    )
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.image_size, args.train_images, args.small_iters = IMAGE_SIZE, TRAIN_IMAGES, SMALL["iters"]
    if args.quick:
        args.archs, args.crops = list(QUICK["archs"]), list(QUICK["crops"])
        args.image_size, args.warmup, args.timed = QUICK["image_size"], QUICK["warmup"], QUICK["timed"]
        args.train_images, args.small_iters, args.small_rounds = 8, QUICK["small_iters"], 1
        args.rounds = 2
    if args.warmup < 1 or args.timed < 1 or args.rounds < 1:
        ap.error("--warmup, --timed and --rounds must be at least 1")
    for variant in args.variants:
        variant_options(variant)  # a misspelt variant fails before any run

    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        root = Path(tmp)
        results = []
        for arch in args.archs:
            for crop in args.crops:
                for head in args.heads:
                    for variant in args.variants:
                        results.append(run_config(root, arch, crop, head, variant, args))
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress
        small = None if args.no_small_data else small_data(root, args)
    ratios = [r["ratio_real_over_bare"] for r in results]
    report = {
        "benchmark": "finetune_loop",
        **environment(),
        "image_size": list(args.image_size),
        "train_images": args.train_images,
        "warmup": args.warmup,
        "timed": args.timed,
        "target_ratio_cpu": TARGET_RATIO,
        "target_met_cpu": max(ratios) <= TARGET_RATIO if args.device == "cpu" else None,
        "results": results,
        "small_data": small,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
