"""The pre-training loop at its limit: ``unip-pretrain``'s real loop against a bare loop, per step.

Beside ``bench_pretrain.py`` (which compares two ways of computing one distillation step), this
asks how close the whole run comes to that step:

- ``real``: ``unip-pretrain`` itself (:func:`unip_train.pretrain.cli.parse_args`, then
  :func:`unip_train.pretrain.trainer.train`) with its default options except the batch: data
  loading and augmentation in the default number of loader workers, the loss, the non-finite
  checks, the gradient norm, the optimizer, the log line (and TensorBoard) of every step, and a
  checkpoint every 50 steps (``--ckpt-every``). Steps are timed by a global optimizer step
  hook; the checkpoint, which a short window cannot reach, is timed when the run writes it at the
  end of its epoch and counted as 1/50 of it per step.
- ``bare``: the same method's model and loss with the same optimizer, fed a ready-made batch:
  ``zero_grad``, loss, backward, step; nothing else. Timed before (on the method built the same
  way) and after the real run (on the model and optimizer it trained), so a drifting load hits both.

Methods: ``nmi-had`` (student ViT-S/16, teacher ViT-B/16 distilled at layer 9: the
``bench_pretrain.py`` pair) and ``pad`` (an MAE ViT-B/16 with MAE's decoder, 512 wide x 8 blocks,
adapters at PAD's default width; random crops: ``--rois none``). Input 224, batch 8, one micro-batch
per step (the published 256 x 8 does not fit a CPU benchmark), random weights, images: synthetic
480 x 640 grey PNG scenes, one epoch of warm-up + timed steps.

Prints one JSON line; each method's ``ratio_real_over_bare`` is real / bare seconds per step
(target <= 1.10 on the CPU).

    .venv/bin/python benchmarks/bench_pretrain_loop.py            # nmi-had and pad at 224
    .venv/bin/python benchmarks/bench_pretrain_loop.py --quick    # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_seconds, device_sync, emit, environment

METHODS = ("nmi-had", "pad")
FULL = {
    "student": "vit_small_patch16_224",
    "teacher": "vit_base_patch16_224",
    "layer": 9,
    "mae": "vit_base_patch16_224",
    "decoder": (512, 8, 16),  # MAE's released decoder: width, blocks, heads
    "img": 224,
    "batch": 8,
    "image_size": (480, 640),
}
QUICK = {
    "student": "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)",
    "teacher": "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)",
    "layer": 2,
    "mae": "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)",
    "decoder": (32, 1, 4),
    "img": 32,
    "batch": 2,
    "image_size": (40, 48),
}
CKPT_EVERY_STEPS = 50  # unip-pretrain's --ckpt-every default
TARGET_RATIO = 1.10


# --- inputs ----------------------------------------------------------------------------------------


def make_images(root: Path, n: int, size: tuple[int, int]) -> Path:
    from unip_train.synthetic import generate_unlabelled

    out = root / "images"
    if not out.exists():
        generate_unlabelled(out, n, size=size, seed=0)
    return out


def make_selection(root: Path, images: Path, c: dict) -> Path:
    """A random-init teacher (safetensors) and its layer_selection.json with layer ``c['layer']``
    selected, written through the analysis API as ``unip-analyze`` would."""
    import torch
    from safetensors.torch import save_file

    from unip_analysis import analyze, selection
    from unip_analysis.checkpoints import build_vit, load_backbone
    from unip_analysis.patterns import default_thresholds

    weights = root / "teacher.safetensors"
    torch.manual_seed(0)
    teacher = build_vit(c["teacher"], img_size=c["img"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    backbone = load_backbone("timm", c["teacher"], weights, img_size=c["img"])
    data = analyze.image_dataset(images, c["img"], "infmix", limit=2)
    res = analyze.analyze_backbone(backbone, data, name="t", progress=False)
    th = default_thresholds(res.grid)
    doc = {
        "schema_version": selection.SCHEMA_VERSION,
        "generator": "bench_pretrain_loop",
        "created": "2026-01-01T00:00:00Z",
        "thresholds": {"global_max": th.global_max, "local_min": th.local_min},
        "images": {"dir": str(images), "count": res.n_images, "img_size": c["img"], "norm": "infmix"},
        "models": {"t": analyze.model_entry(res, th, layer=c["layer"], n_boot=10)},
    }
    path = root / "layer_selection.json"
    selection.write(path, doc)
    return path


def make_mae(root: Path, c: dict) -> Path:
    """A random-init MAE (encoder + decoder) in MAE's checkpoint format (``ckpt["model"]``)."""
    import torch

    from unip_analysis.checkpoints import build_vit
    from unip_train.pretrain.mae import MaeDecoder

    torch.manual_seed(0)
    encoder = build_vit(c["mae"], img_size=c["img"])
    grid, patch = tuple(encoder.patch_embed.grid_size), int(encoder.patch_embed.patch_size[0])
    dim, depth, heads = c["decoder"]
    decoder = MaeDecoder(encoder.embed_dim, grid, patch, dim, depth, heads).mae_init()
    path = root / "mae.pth"
    torch.save({"model": {**encoder.state_dict(), **decoder.state_dict()}}, path)
    return path


def argv_for(method: str, root: Path, images: Path, out: Path, c: dict, args) -> list[str]:
    """unip-pretrain's command line: defaults, except one epoch, the batch and --no-progress."""
    common = ["--infrared", str(images), "--img-size", str(c["img"]), "--epochs", "1"]
    common += ["--batch-size", str(c["batch"]), "--accum-iter", "1", "--out", str(out), "--no-progress"]
    common += ["--device", args.device]
    if args.num_workers is not None:
        common += ["--workers", str(args.num_workers)]
    if method == "nmi-had":
        sel = root / "layer_selection.json"
        if not sel.exists():
            make_selection(root, images, c)
        return ["--selection", str(sel), "--teacher", "t", "--student", c["student"], *common]
    mae = root / "mae.pth"
    if not mae.exists():
        make_mae(root, c)
    heads = str(c["decoder"][2])
    return [
        "--method",
        "pad",
        "--init",
        f"mae:{c['mae']}:{mae}",
        "--decoder-heads",
        heads,
        "--rois",
        "none",
        *common,
    ]


# --- the loops -------------------------------------------------------------------------------------


def bare_loop(method, optimizer, images, steps: int, amp=None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``steps`` bare steps: zero_grad, the method's loss (under the
    run's autocast), backward, step (loss scaling with fp16)."""
    from unip_train.precision import autocast, grad_scaler

    times, cpu = [], []
    scaler, sync = grad_scaler(images.device, amp), device_sync(images.device)
    method.module.train()
    for _ in range(steps):
        sync()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, amp):
            loss, _ = method.loss(method.module, images)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return times, cpu


def run_method(name: str, root: Path, images: Path, c: dict, args) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from unip_train.optim import adamw, lr_from_blr
    from unip_train.precision import dtype_name
    from unip_train.pretrain import trainer
    from unip_train.pretrain.cli import parse_args

    out = Path(tempfile.mkdtemp(dir=root))
    opts, method = parse_args(argv_for(name, root, images, out, c, args))
    device = torch.device(args.device)
    amp = trainer.autocast_dtype(opts.precision, device)
    batch = torch.randn(c["batch"], 3, c["img"], c["img"], generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    lr = opts.lr if opts.lr is not None else lr_from_blr(opts.blr, c["batch"])

    # Bare, first half: the method built as the run builds it, an optimizer as the run makes it.
    method.build(device)
    method.on_epoch(0)  # what trains in the first epoch, as the run sets it
    optimizer = adamw(method.param_groups(opts.weight_decay), lr=lr, betas=trainer.BETAS)
    bare_loop(method, optimizer, batch, args.warmup, amp)
    first, first_cpu = bare_loop(method, optimizer, batch, (args.timed + 1) // 2, amp)

    # Real: the whole run; every optimizer step stamped; checkpoint writes timed.
    stamps, saved, saves = [], [], []  # (wall, CPU of this process and its workers) per step

    sync = device_sync(device)

    def stamp(opt, *_):
        sync()
        stamps.append((time.perf_counter(), cpu_seconds()))
        saved.append(opt)

    hook = register_optimizer_step_post_hook(stamp)
    save = trainer.RunFolder.save

    def timed_save(self, *a, **k):
        t0 = time.perf_counter()
        save(self, *a, **k)
        saves.append(time.perf_counter() - t0)

    trainer.RunFolder.save = timed_save
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its messages; stdout holds the JSON line only
            trainer.train(opts, method)
    finally:
        hook.remove()
        trainer.RunFolder.save = save
    total = time.perf_counter() - t0
    (wall0, cpu0), (wall1, cpu1) = stamps[args.warmup - 1], stamps[args.warmup + args.timed - 1]
    ckpt = statistics.median(saves)
    real = (wall1 - wall0) / args.timed + ckpt / CKPT_EVERY_STEPS
    real_cpu = (cpu1 - cpu0) / args.timed

    # Bare, second half: the model the run trained, with the run's own optimizer.
    second, second_cpu = bare_loop(method, saved[-1], batch, args.timed // 2, amp)
    bare, bare_cpu = statistics.fmean(first + second), statistics.fmean(first_cpu + second_cpu)
    return {
        "method": name,
        "device": str(device),
        "amp": dtype_name(amp),
        "img": c["img"],
        "batch": c["batch"],
        "workers": opts.workers,
        "steps": len(stamps),
        "real_s_per_step": round(real, 6),
        "bare_s_per_step": round(bare, 6),
        "ratio_real_over_bare": round(real / bare, 3),
        "real_cpu_s_per_step": round(real_cpu, 4),
        "bare_cpu_s_per_step": round(bare_cpu, 4),
        "ratio_cpu_real_over_bare": round(real_cpu / bare_cpu, 3),
        "checkpoint_s": round(ckpt, 3),
        "first_step_s": round(stamps[0][0] - t0, 3),
        "run_s": round(total, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and data, 2 timed steps (smoke test)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, each loop (2)")
    ap.add_argument("--timed", type=int, default=20, help="timed steps per loop (20)")
    ap.add_argument("--num-workers", type=int, help="loader workers of the real run (default: the product's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (with --amp auto: bf16)")
    ap.add_argument("--batch", type=int, help="images per step (default 8, the CPU-sized batch)")
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    c = dict(QUICK if args.quick else FULL)
    if args.batch:
        c["batch"] = args.batch
    if args.quick:
        args.warmup, args.timed = 1, 2
    if args.warmup < 1 or args.timed < 1:
        ap.error("--warmup and --timed must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench_pretrain_loop_") as tmp:
        root = Path(tmp)
        # One epoch = the warm-up and timed steps: the run ends right after the window.
        images = make_images(root, c["batch"] * (args.warmup + args.timed), c["image_size"])
        results = []
        for name in args.methods:
            results.append(run_method(name, root, images, c, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress
    ratios = [r["ratio_real_over_bare"] for r in results]
    report = {
        "benchmark": "pretrain_loop",
        **environment(),
        "student": c["student"],
        "teacher": c["teacher"],
        "teacher_layer": c["layer"],
        "mae": c["mae"],
        "decoder": list(c["decoder"]),
        "image_size": list(c["image_size"]),
        "warmup": args.warmup,
        "timed": args.timed,
        "target_ratio_cpu": TARGET_RATIO,
        "target_met_cpu": max(ratios) <= TARGET_RATIO if args.device == "cpu" else None,
        "results": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
