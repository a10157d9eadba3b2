"""Every GPU check in one command (``make bench-gpu``): at most 8 minutes on one H100.

A GPU is lent only now and then, for minutes; this script is the whole check, ready to run. Each
part reuses the CPU benchmarks' own functions, on the GPU, with each part's peak GPU memory
(``torch.cuda.max_memory_allocated`` after a reset; ``null`` on the CPU):

- ``analysis``:      ViT-B/16 at 197, 785 and 4,097 tokens (224, 448, 1,024 px): plain fused
                     forward vs the streaming analysis (:func:`bench_analysis.child`, median of 3),
                     at the CPU's block size and at ``--gpu-block-mib``;
- ``pretrain_step``: the NMI-HAD step against the naive one and against its own bare parts
                     (:func:`bench_pretrain.run_config`, bf16 autocast);
- ``pretrain_loop``: ``unip-pretrain``'s whole loop against a bare loop, images/s
                     (:func:`bench_pretrain_loop.run_method`, nmi-had);
- ``finetune``:      ``unip-finetune``'s loop against a bare loop, fine-tuning (LL-FPN + UperNet) and
                     linear probing, ViT-S/16 at 512 px (:func:`bench_finetune.run_config`);
- ``predict``:       ``unip-predict`` images/s against the bare model on ready tensors.

A part that fails is reported with its error and the others still run (exit status 1 then): one
GPU loan gives every number it can. ``--dry-run`` runs everything on the CPU at toy sizes and
prints the same JSON keys (the test suite runs it, so a first GPU run does not fail on a typo).

    python benchmarks/bench_gpu.py --out benchmarks/results_gpu.json --results-md benchmarks/RESULTS.md
    python benchmarks/bench_gpu.py --dry-run            # CPU, toy sizes, seconds

Prints one JSON line; ``--results-md`` rewrites the section between the ``bench_gpu`` markers of
that file (written to a temporary file, then renamed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import bench_analysis
import bench_finetune
import bench_predict
import bench_pretrain
import bench_pretrain_loop
from machine import emit, environment

PARTS = ("analysis", "pretrain_step", "pretrain_loop", "finetune", "predict")
FULL = {
    "analysis": [  # (arch, img, batch): 197, 785 and 4,097 tokens
        ("vit_base_patch16_224", 224, 64),
        ("vit_base_patch16_224", 448, 16),
        ("vit_base_patch16_224", 1024, 2),
    ],
    "analysis_repeats": 3,
    "pretrain": {
        "student": bench_pretrain.STUDENT,
        "teacher": bench_pretrain.TEACHER,
        "layer": bench_pretrain.TEACHER_LAYER,
        "img": bench_pretrain.IMG,
    },
    "pretrain_batch": 64,
    "pretrain_steps": (2, 5),  # warm-up, timed (step benchmark)
    "loop_batch": 32,
    "loop_steps": (2, 10),  # warm-up, timed (pre-training loop)
    "finetune_arch": "vit_small_patch16_224",
    "finetune_crop": 512,
    "finetune_steps": (2, 20),
    "finetune_rounds": 2,
    "finetune_images": 32,  # drawn at 0.4 s each: 13 s of the budget
    "predict_arch": "vit_small_patch16_224",
    "predict_crop": 512,
    "predict_images": 64,
    "predict_batch": 8,
}
TINY = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
DRY = {
    "analysis": [(TINY, 32, 2), (TINY, 64, 1), (TINY, 128, 1)],  # 17, 65, 257 tokens
    "analysis_repeats": 1,
    "pretrain": {
        "student": bench_pretrain.QUICK["student"],
        "teacher": bench_pretrain.QUICK["teacher"],
        "layer": bench_pretrain.QUICK["layer"],
        "img": bench_pretrain.QUICK["img"],
    },
    "pretrain_batch": 2,
    "pretrain_steps": (1, 1),
    "loop_batch": 2,
    "loop_steps": (1, 2),
    "finetune_arch": bench_finetune.QUICK["archs"][0],
    "finetune_crop": bench_finetune.QUICK["crops"][0],
    "finetune_steps": (1, 2),
    "finetune_rounds": 1,
    "finetune_images": 8,
    "predict_arch": bench_finetune.QUICK["archs"][0],
    "predict_crop": bench_finetune.QUICK["crops"][0],
    "predict_images": 4,
    "predict_batch": 2,
}
MARK_START, MARK_END = "<!-- bench_gpu: start -->", "<!-- bench_gpu: end -->"


# --- peak memory and failures ----------------------------------------------------------------------


def measured(device, fn, *args, **kw) -> dict:
    """``fn(...)`` (a dict) with ``peak_gpu_mib`` and ``seconds`` added; on failure ``{"error": ...}``
    (the traceback on stderr) so that the next part still runs."""
    import torch

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = fn(*args, **kw)
        peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, the run goes on
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 1)}
    return {**out, "peak_gpu_mib": peak, "seconds": round(time.perf_counter() - t0, 1)}


# --- the parts -------------------------------------------------------------------------------------


def unlabelled_images(out: Path, n: int, size: tuple[int, int], distinct: int = 16) -> Path:
    """``n`` grey scenes in ``out``: ``distinct`` of them drawn (0.4 s each on one core; a lease's
    previous try at 384 ran out of time making them), the rest copies, which a loader decodes as
    any other file."""
    from unip_train.synthetic import generate_unlabelled

    generate_unlabelled(out, min(n, distinct), size=size)
    drawn = sorted(out.glob("*.png"))
    for i in range(len(drawn), n):
        shutil.copyfile(drawn[i % len(drawn)], out / f"{i:05d}.png")
    return out


def analysis(device, c: dict, block_mib: float) -> list[dict]:
    from unip_analysis.attention import DEFAULT_BLOCK_BYTES

    rows = []
    for arch, img, batch in c["analysis"]:
        for mib in (None, block_mib):  # the CPU's block size (2 MiB), then the GPU-sized one
            block = None if mib is None else int(mib * 2**20)

            def one(arch=arch, img=img, batch=batch, block=block) -> dict:
                r = bench_analysis.child(
                    ["plain", "stream"], arch, img, batch, c["analysis_repeats"], None, str(device), block
                )
                plain, stream = r["plain"], r["stream"]
                maps = bench_analysis.one_layer_maps_mib(batch, plain["heads"], plain["tokens"])
                return {
                    "seconds_plain": round(plain["median_s"], 5),
                    "seconds_stream": round(stream["median_s"], 5),
                    "ratio_stream_over_plain": round(stream["median_s"] / plain["median_s"], 3),
                    "tokens": plain["tokens"],
                    "one_layer_maps_mib": round(maps, 2),
                    "extra_peak_mib": {
                        "plain": round(plain["peak_extra_mib"], 1),
                        "stream": round(stream["peak_extra_mib"], 1),
                    },
                }

            head = {"arch": arch, "img": img, "batch": batch, "block_mib": mib or DEFAULT_BLOCK_BYTES / 2**20}
            rows.append({**head, **measured(device, one)})
            print(f"bench_gpu: analysis {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def pretrain_step(device, c: dict) -> dict:
    warmup, repeats = c["pretrain_steps"]
    args = SimpleNamespace(**c["pretrain"], warmup=warmup, repeats=repeats)
    amp = "bf16" if device.type == "cuda" else "fp32"
    return measured(device, bench_pretrain.run_config, args, str(device), amp, False, c["pretrain_batch"])


def pretrain_loop(device, c: dict, root: Path) -> dict:
    warmup, timed = c["loop_steps"]
    args = SimpleNamespace(device=str(device), num_workers=None, warmup=warmup, timed=timed)
    cfg = dict(bench_pretrain_loop.QUICK if c is DRY else bench_pretrain_loop.FULL, batch=c["loop_batch"])

    def run() -> dict:
        images = unlabelled_images(
            root / "pretrain" / "images", cfg["batch"] * (warmup + timed), cfg["image_size"]
        )
        r = bench_pretrain_loop.run_method("nmi-had", root / "pretrain", images, cfg, args)
        return {**r, "images_per_s": round(cfg["batch"] / r["real_s_per_step"], 2)}

    (root / "pretrain").mkdir()
    return measured(device, run)


def finetune(device, c: dict, root: Path) -> list[dict]:
    warmup, timed = c["finetune_steps"]
    size = bench_finetune.QUICK["image_size"] if c is DRY else bench_finetune.IMAGE_SIZE
    args = SimpleNamespace(
        device=str(device),
        num_workers=None,
        warmup=warmup,
        timed=timed,
        rounds=c["finetune_rounds"],
        train_images=c["finetune_images"],
        image_size=size,
    )
    rows = []
    for head in ("upernet", "linear"):
        run = bench_finetune.run_config
        r = measured(device, run, root, c["finetune_arch"], c["finetune_crop"], head, "default", args)
        if "real_s_per_iter" in r:
            r["images_per_s"] = round(r["batch"] / r["real_s_per_iter"], 2)
        rows.append({"head": head, **r})
        print(f"bench_gpu: finetune {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def predict(device, c: dict, root: Path) -> dict:
    import torch

    from unip_analysis.workers import default_num_workers
    from unip_train.predict.inference import open_model
    from unip_train.predict.runner import list_images
    from unip_train.predict.runner import predict as run_predict

    def run() -> dict:
        size = bench_finetune.QUICK["image_size"] if c is DRY else bench_predict.IMAGE_SIZE
        model = bench_predict.make_model(root / "predict", c["predict_arch"], c["predict_crop"])
        items = list_images(unlabelled_images(root / "predict" / "images", c["predict_images"], size))
        seg = open_model(model, device=str(device))
        prepared = [seg.prepare(it.image) for it in items]
        b = c["predict_batch"]
        batches = [
            (torch.stack([x for x, _ in prepared[i : i + b]]), prepared[i][1].shape)
            for i in range(0, len(prepared), b)
        ]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        workers = default_num_workers(device.type)
        bench_predict.bare_seconds(seg, batches[:1])  # warm-up
        sync()
        bare, _ = bench_predict.bare_seconds(seg, batches)
        sync()
        t0 = time.perf_counter()
        done = run_predict(seg, items, root / "predict" / "out", b, workers, progress=False)
        real = time.perf_counter() - t0
        if done.failures:
            raise RuntimeError(f"unip-predict failed on {len(done.failures)} images: {done.failures[:2]}")
        n = len(items)
        return {
            "arch": c["predict_arch"],
            "crop": c["predict_crop"],
            "images": n,
            "batch": b,
            "workers": workers,
            "predict_images_per_s": round(n / real, 2),
            "bare_images_per_s": round(n / bare, 2),
            "ratio_predict_over_bare": round(real / bare, 3),
        }

    (root / "predict").mkdir()
    return measured(device, run)


# --- the RESULTS.md section --------------------------------------------------------------------


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else str(value).split("(")[0]  # a toy arch's keyword arguments dropped


def results_section(report: dict) -> str:
    """The report as the markdown section that ``--results-md`` writes between the markers."""
    env = f"{report['gpu'] or 'no GPU (dry run)'}, torch {report['torch']}, timm {report['timm']}"
    lines = [
        MARK_START,
        "## Every GPU check in one run: `bench_gpu.py`",
        "",
        f"Command: `{report['command']}` ({env}, {report['machine']}, load average "
        f"{report['load_average_1min']}; {report['seconds']} s in all; raw output in "
        "`benchmarks/results_gpu.json`). Peak GPU memory: the caching allocator's peak in each part.",
        "",
    ]
    rows = report["parts"].get("analysis")
    if rows:
        lines += [
            "| analysis | tokens | batch | block MiB | plain s | stream s | stream / plain | extra peak MiB plain / stream | one layer's maps MiB | peak GPU MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            peaks = r.get("extra_peak_mib") or {}
            lines.append(
                f"| {_cell(r, 'arch')} {r['img']} | {_cell(r, 'tokens')} | {r['batch']} | {r['block_mib']:g} "
                f"| {_cell(r, 'seconds_plain')} | {_cell(r, 'seconds_stream')} "
                f"| **{_cell(r, 'ratio_stream_over_plain')}** | {peaks.get('plain', '-')} / {peaks.get('stream', '-')} "
                f"| {_cell(r, 'one_layer_maps_mib')} | {_cell(r, 'peak_gpu_mib')} |"
                + (f" error: {r['error']}" if "error" in r else "")
            )
        lines.append("")
    lines += [
        "| part | images/s | real (or ours) / bare | other | peak GPU MiB | part s |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, part: dict, speed: str, ratio: str, other: str) -> None:
        lines.append(
            f"| {label} | {speed} | **{_cell(part, ratio)}** | {other} | {_cell(part, 'peak_gpu_mib')} "
            f"| {part['seconds']} |"
        )

    step = report["parts"].get("pretrain_step")
    if step:
        label = f"NMI-HAD step, batch {step.get('batch', '-')}, {step.get('precision', '-')}"
        other = f"ours / naive {_cell(step, 'ratio_ours_over_naive')} (throughput)"
        row(label, step, step.get("images_per_s", {}).get("ours", "-"), "ratio_ours_over_bare", other)
    loop = report["parts"].get("pretrain_loop")
    if loop:
        label = f"pre-training loop (nmi-had), batch {loop.get('batch', '-')}"
        row(
            label,
            loop,
            _cell(loop, "images_per_s"),
            "ratio_real_over_bare",
            f"workers {_cell(loop, 'workers')}",
        )
    for r in report["parts"].get("finetune") or []:
        label = f"fine-tuning loop, {r['head']}, {_cell(r, 'arch')} {_cell(r, 'crop')}"
        other = f"rounds {_cell(r, 'round_ratios')}, {_cell(r, 'amp')}"
        row(label, r, _cell(r, "images_per_s"), "ratio_real_over_bare", other)
    pred = report["parts"].get("predict")
    if pred:
        label = f"unip-predict, {_cell(pred, 'arch')} {_cell(pred, 'crop')}"
        other = f"bare {_cell(pred, 'bare_images_per_s')} images/s"
        row(label, pred, _cell(pred, "predict_images_per_s"), "ratio_predict_over_bare", other)
    errors = [
        f"{name}: {p['error']}" for name, p in report["parts"].items() if isinstance(p, dict) and "error" in p
    ]
    errors += [
        f"{name} {r.get('head', r.get('img'))}: {r['error']}"
        for name, p in report["parts"].items()
        if isinstance(p, list)
        for r in p
        if "error" in r
    ]
    if errors:
        lines += ["", "Failed parts: " + "; ".join(errors)]
    return "\n".join([*lines, MARK_END])


def write_section(path: Path, section: str) -> None:
    """Replace the text between the bench_gpu markers of ``path`` (atomically: temp file, rename)."""
    text = path.read_text()
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        raise SystemExit(
            f"{path}: no '{MARK_START}' ... '{MARK_END}' markers; add them where the GPU section goes"
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text[:start] + section + text[end + len(MARK_END) :])
    os.replace(tmp, path)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the same JSON keys in seconds")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N; --dry-run uses the CPU")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (all)")
    ap.add_argument(
        "--gpu-block-mib", type=float, default=64.0, help="analysis block size tried beside the CPU's (64)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", help="also write the JSON line to this file")
    ap.add_argument("--results-md", help="rewrite the bench_gpu section of this markdown file")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.results_md and not Path(args.results_md).is_file():
        ap.error(f"--results-md {args.results_md}: no such file")
    c = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(
            f"--device {args.device}: CUDA is not available here; use --dry-run to check the script on the CPU"
        )
    t0 = time.perf_counter()
    parts: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = Path(tmp)
        for name in args.parts:
            if name == "analysis":
                parts[name] = analysis(device, c, args.gpu_block_mib)
            elif name == "pretrain_step":
                parts[name] = pretrain_step(device, c)
            elif name == "pretrain_loop":
                parts[name] = pretrain_loop(device, c, root)
            elif name == "finetune":
                parts[name] = finetune(device, c, root)
            else:
                parts[name] = predict(device, c, root)
            print(f"bench_gpu: {name} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report = {
        "benchmark": "gpu",
        "dry_run": args.dry_run,
        "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]),
        **environment(),
        "device": str(device),
        "seconds": round(time.perf_counter() - t0, 1),
        "parts": parts,
    }
    emit(report, args.out)
    if args.results_md:
        write_section(Path(args.results_md), results_section(report))
    failed = [
        n for n, p in parts.items() if "error" in p or (isinstance(p, list) and any("error" in r for r in p))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
