"""Can a batch's data work hide behind the model's step on the CPU? Every way of loading, side by side.

On the 2-core machine ``unip-finetune`` reads and augments its batches in the training process (the
CPU default: no loader workers, ``unip_analysis/workers.py``), so each iteration is the model's step
plus one batch's data work. This benchmark times, in one run and on one configuration (default: the
one row of ``bench_finetune.py`` above its target, ViT-T's linear probe at 128 px, batch 8), seconds
per iteration of:

- ``bare``: the step on one ready-made batch (``bench_finetune.bare_step``): the physical limit;
- ``in_process``: each batch read, augmented and collated in the training process, then the step
  (what ``unip-finetune`` does on the CPU);
- ``thread``: a background thread prepares the next batches (up to 2 ahead) while the step runs;
- ``worker``: one persistent DataLoader worker process (2 batches ahead) beside torch's threads;
- ``thread_1`` / ``worker_1`` / ``bare_1``: the same with torch at one thread, leaving a core to the
  loading;
- ``passive_*``: ``bare``, ``in_process`` and ``worker`` again in a child process started with
  ``OMP_WAIT_POLICY=PASSIVE`` (torch's idle OpenMP threads sleep instead of spinning, so a worker
  might use the cycles they spun away).

Every ratio is over ``bare`` in this process (default OpenMP settings, default threads). Also
reported: ``floor_in_process``, the ratio that in-process loading would reach if the iteration
added nothing to the step but the batch's data work timed on its own.

    .venv/bin/python benchmarks/bench_loader_overlap.py                 # ViT-T linear probe, 128 px
    .venv/bin/python benchmarks/bench_loader_overlap.py --arch vit_small_patch16_224 --mode ft
    .venv/bin/python benchmarks/bench_loader_overlap.py --quick         # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_finetune import QUICK, bare_step, build_state, config, data_seconds, make_backbone, make_data
from machine import emit, environment

IMAGE_SIZE = (480, 640)
TRAIN_IMAGES = 64
PASSIVE = ("bare", "in_process", "worker")  # what the OMP_WAIT_POLICY=PASSIVE child runs


def build(args, root: Path):
    """unip-finetune's state for the configuration, every training image decoded once (in memory)."""
    backbone = make_backbone(root, args.arch, args.crop)
    data = make_data(root, args.train_images, args.image_size)
    out = Path(tempfile.mkdtemp(dir=root))
    cfg = config(backbone, data, out, args.crop, 1, 0, "cpu", mode=args.mode)
    state = build_state(cfg)
    state.log.close()
    for i in range(len(state.loader.dataset)):
        state.loader.dataset.load(i)
    state.ddp.train()
    return state


def key_batches(state, first: int):
    """The run's batches of (epoch, index) keys from stream batch ``first`` on, without end."""
    stream = state.loader.batch_sampler
    stream.set_range(first, None)
    return stream


def prepare(state, keys):
    """One batch as the training process makes it: read, augment, collate."""
    dataset, collate = state.loader.dataset, state.loader.collate_fn
    return collate([dataset[k] for k in keys])


def timed(step_batches, steps: int, warmup: int) -> float:
    """Median seconds between consecutive steps after ``warmup``; ``step_batches`` runs one step a
    yield."""
    stamps = []
    for _ in zip(range(warmup + steps + 1), step_batches):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return statistics.median(gaps)


def arrangement(state, name: str):
    """Steps fed the way ``name`` says: a generator that yields after each step."""
    import torch

    fmt = torch.channels_last if state.cfg.channels_last else torch.contiguous_format
    stream = key_batches(state, len(state.loader.dataset) // state.cfg.batch_size)  # the second epoch on
    keys = iter(stream)

    def step(img, label) -> None:
        bare_step(state, img.to(memory_format=fmt), label)

    if name.startswith("bare"):
        img, label = prepare(state, next(keys))
        while True:
            step(img, label)
            yield
    elif name.startswith("in_process"):
        while True:
            step(*prepare(state, next(keys)))
            yield
    elif name.startswith("thread"):
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                ready.put(prepare(state, next(keys)))

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while True:
                step(*ready.get())
                yield
        finally:
            stop.set()
            while worker.is_alive():  # unblock a pending put
                try:
                    ready.get_nowait()
                except queue.Empty:
                    time.sleep(0.001)
    elif name.startswith("worker"):
        from unip_train.sampling import keyed_loader

        loader = keyed_loader(state.loader.dataset, stream, 1, collate_fn=state.loader.collate_fn)
        for img, label in loader:
            step(img, label)
            yield
    else:
        raise ValueError(name)


def run(state, names, steps: int, warmup: int) -> dict[str, float]:
    import torch

    threads = torch.get_num_threads()
    seconds = {}
    for name in names:
        torch.set_num_threads(1 if name.endswith("_1") else threads)
        gen = arrangement(state, name)
        try:
            seconds[name] = timed(gen, steps, warmup)
        finally:
            gen.close()
        print(f"{name}: {seconds[name] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    return seconds


def passive_child(args) -> dict[str, float]:
    """``PASSIVE`` timed in a child process whose OpenMP threads sleep when idle."""
    cmd = [sys.executable, __file__, "--child", "--arch", args.arch, "--crop", str(args.crop)]
    cmd += ["--mode", args.mode, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)] * bool(args.threads) + ["--quick"] * args.quick
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return {f"passive_{k}": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--mode", choices=("lp", "ft"), default="lp", help="linear probe (default) or fine-tune")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per arrangement (40)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first, each arrangement (10)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny model and data, 2 timed steps (smoke test)")
    ap.add_argument("--no-passive", action="store_true", help="skip the OMP_WAIT_POLICY=PASSIVE child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.image_size, args.train_images = IMAGE_SIZE, TRAIN_IMAGES
    if args.quick:
        args.arch, args.crop = QUICK["archs"][0], QUICK["crops"][0]
        args.image_size, args.train_images, args.steps, args.warmup = QUICK["image_size"], 8, 2, 1
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    names = (
        PASSIVE
        if args.child
        else ("bare", "in_process", "thread", "worker", "bare_1", "thread_1", "worker_1")
    )
    with tempfile.TemporaryDirectory(prefix="bench_loader_overlap_") as tmp:
        state = build(args, Path(tmp))
        seconds = run(state, names, args.steps, args.warmup)
        data = data_seconds(state)
    if args.child:
        print(json.dumps(seconds))
        return 0
    if not args.no_passive:
        seconds.update(passive_child(args))
    bare = seconds["bare"]
    report = {
        "benchmark": "loader_overlap",
        **environment(),
        "arch": args.arch,
        "crop": args.crop,
        "mode": args.mode,
        "batch": state.cfg.batch_size,
        "image_size": list(args.image_size),
        "steps": args.steps,
        "warmup": args.warmup,
        "s_per_iter": {k: round(v, 6) for k, v in seconds.items()},
        "ratio_over_bare": {k: round(v / bare, 3) for k, v in seconds.items()},
        "data_s_per_batch": round(data, 6),
        "floor_in_process": round((bare + data) / bare, 3),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
