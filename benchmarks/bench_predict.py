"""``unip-predict`` at its limit, and ONNX Runtime against PyTorch on the CPU.

- ``predict``: what ``unip-predict`` runs once the model is loaded
  (:func:`unip_train.predict.runner.predict`): images read, resized and normalized in the default
  number of loader workers, batched through the sliding window, every output written (indexed PNG
  mask, JPEG overlay); images per second over the whole call.
- ``bare``: the same model (:class:`~unip_train.predict.inference.Segmenter`) over the same images
  prepared beforehand (ready tensors in memory), the same batches, logits and argmax, nothing
  written: the limit of this model on this machine. ``--rounds`` (3) rounds of bare then predict
  (each into a new folder), the round with the median ratio reported, every round's beside it:
  ``ratio_predict_over_bare`` = predict seconds / bare seconds (1.0 = reading and writing fully
  hidden behind the model); ``cpu_ratio_predict_over_bare`` the same in CPU seconds of this process
  and its loader workers (on a busy machine wall time measures the neighbours; the round kept is
  the one with the median CPU ratio).
- ``onnx_window``: one batch of windows [B, 3, win, win] through ONNX Runtime (CPU provider, as
  many intra-op threads as torch has) and through PyTorch (float32), alternately, median of the
  repeats; ``ratio_ort_over_torch`` < 1 means ONNX Runtime is faster. ``predict_onnx``:
  ``predict`` with ``--backend onnx`` on the same images (images per second).

Model: ViT-T/16 LL-FPN + UperNet (the recipe's head at the backbone's width), random weights, crop
128 (evaluation windows 128, stride 85); images: synthetic 480 x 640 grey PNG scenes (SODA and
MFNet's size), resized to 128 x 171 for evaluation (two windows each).

    .venv/bin/python benchmarks/bench_predict.py                # 32 images (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_predict.py --quick        # tiny, for the smoke test

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_finetune import QUICK, config, make_backbone
from machine import cpu_seconds, emit, environment

IMAGE_SIZE = (480, 640)


def make_model(root: Path, arch: str, crop: int) -> Path:
    """A randomly initialised LL-FPN + UperNet model.pt (6 classes, a palette) for ``arch`` at ``crop``."""
    import torch

    from unip_train.finetune.classes import voc_colours
    from unip_train.finetune.config import resolve
    from unip_train.finetune.model_file import build_backbone, build_segmentor, save_model
    from unip_train.synthetic import CLASSES

    cfg = resolve(config(make_backbone(root, arch, crop), root, root / "run", crop, 1, 0, "cpu"))
    backbone, info = build_backbone(cfg)
    torch.manual_seed(0)
    model = build_segmentor(cfg, backbone, len(CLASSES)).eval()
    path = root / "run" / "model.pt"
    save_model(path, model, cfg, CLASSES, info, palette=voc_colours(len(CLASSES)), channels=1)
    return path


def bare_seconds(seg, batches) -> tuple[float, float]:
    """Logits and argmax of ready batches, nothing else: (wall, CPU) seconds."""
    t, c = time.perf_counter(), cpu_seconds()
    for batch, size in batches:
        seg.logits(batch, size).argmax(1)
    return time.perf_counter() - t, cpu_seconds() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--images", type=int, default=32, help="images segmented (32)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20, help="ONNX Runtime / PyTorch window batches (20)")
    ap.add_argument("--rounds", type=int, default=3, help="bare / predict rounds, the median ratio kept (3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch

    from unip_analysis.workers import default_num_workers
    from unip_train.export.onnx import export_onnx
    from unip_train.predict.inference import open_model
    from unip_train.predict.outputs import Targets
    from unip_train.predict.runner import list_images, predict
    from unip_train.synthetic import generate_unlabelled

    if args.threads:
        torch.set_num_threads(args.threads)
    size = IMAGE_SIZE
    if args.quick:
        args.arch, args.crop, size = QUICK["archs"][0], QUICK["crops"][0], QUICK["image_size"]
        args.images, args.repeats, args.rounds = 4, 2, 1
    workers = default_num_workers("cpu")
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        root = Path(tmp)
        model = make_model(root, args.arch, args.crop)
        images = generate_unlabelled(root / "images", args.images, size=size, seed=0)
        items = list_images(images)
        seg = open_model(model, device="cpu")
        prepared = [seg.prepare(it.image) for it in items]
        batches = [
            (torch.stack([x for x, _ in prepared[i : i + args.batch_size]]), prepared[i][1].shape)
            for i in range(0, len(prepared), args.batch_size)
        ]
        bare_seconds(seg, batches[:1])  # warm-up
        rounds = []
        for r in range(args.rounds):  # alternately, so that a change of load moves both
            bare, bare_cpu = bare_seconds(seg, batches)
            t, c = time.perf_counter(), cpu_seconds()
            done = predict(seg, items, root / f"pred{r}", args.batch_size, workers, progress=False)
            rounds.append((time.perf_counter() - t, bare, cpu_seconds() - c, bare_cpu))
            assert not done.failures, done.failures
        real, bare, real_cpu, bare_cpu = sorted(rounds, key=lambda rb: rb[2] / rb[3])[(len(rounds) - 1) // 2]

        report = export_onnx(model, root / "model.onnx", images=str(images))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(root / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        win = seg.info.window
        x = torch.randn(args.batch_size, 3, win, win)
        times = {"ort": [], "torch": []}
        with torch.no_grad():
            for r in range(args.repeats + 1):
                t = time.perf_counter()
                session.run(None, {"input": x.numpy()})
                t1 = time.perf_counter()
                seg.fn(x)
                t2 = time.perf_counter()
                if r:  # the first round warms both up
                    times["ort"].append(t1 - t)
                    times["torch"].append(t2 - t1)
        onnx_seg = open_model(root / "model.onnx", device="cpu")
        t = time.perf_counter()
        predict(onnx_seg, items, root / "pred_onnx", args.batch_size, workers, progress=False)
        real_onnx = time.perf_counter() - t
        agree = float(
            np.mean(
                [
                    (
                        _png(Targets(root / "pred0", it.rel).pred)
                        == _png(Targets(root / "pred_onnx", it.rel).pred)
                    ).mean()
                    for it in items
                ]
            )
        )
    n = len(items)
    ort_s, torch_s = statistics.median(times["ort"]), statistics.median(times["torch"])
    emit(
        {
            "benchmark": "predict",
            **environment(),
            "arch": args.arch,
            "crop": args.crop,
            "image_size": list(size),
            "images": n,
            "batch": args.batch_size,
            "workers": workers,
            "windows_per_image": _windows(seg.info, prepared[0][0].shape[-2:]),
            "predict_images_per_s": round(n / real, 3),
            "bare_images_per_s": round(n / bare, 3),
            "ratio_predict_over_bare": round(real / bare, 3),
            "cpu_s_per_image": {"predict": round(real_cpu / n, 4), "bare": round(bare_cpu / n, 4)},
            "cpu_ratio_predict_over_bare": round(real_cpu / bare_cpu, 3),
            "round_ratios": [round(a / b, 3) for a, b, _, _ in rounds],
            "round_cpu_ratios": [round(c / d, 3) for _, _, c, d in rounds],
            "onnx_window_batch": [args.batch_size, 3, win, win],
            "onnx_window_s": {"ort": round(ort_s, 5), "torch": round(torch_s, 5)},
            "ratio_ort_over_torch": round(ort_s / torch_s, 3),
            "predict_onnx_images_per_s": round(n / real_onnx, 3),
            "onnx_max_abs_diff": report["max_abs_diff"],
            "onnx_vs_torch_mask_agreement": round(agree, 6),
        },
        args.out,
    )
    return 0


def _png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _windows(info, hw) -> int:
    from unip_train.finetune.evaluation import window_starts

    return len(window_starts(hw[0], info.window, info.stride)) * len(
        window_starts(hw[1], info.window, info.stride)
    )


if __name__ == "__main__":
    raise SystemExit(main())
