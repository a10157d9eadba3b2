"""Analysis speed and memory: plain inference vs our streaming analysis vs the straightforward way.

Variants, on the same random weights and images, each measured in fresh subprocesses:

- (a) ``plain``:    ``model.forward_features`` with timm's fused attention;
- (b) ``stream``:   our analysis (``unip_analysis.analyze.LayerObserver`` under
                    ``observe_attention``): every layer's attention computed a block of query rows
                    at a time and reduced to NMI and attention distance at once; no layer's whole
                    [B, H, N, N] map ever exists;
- (c) ``stacked``:  a forward that keeps every layer's full map, then NMI (reference formula,
                    term by term) and distance on the stacked maps, as the public analysis
                    notebook does.

Prints one JSON line: per configuration the median seconds per batch (one child runs the
variants alternately, repeat by repeat, so that load changes on a shared machine move all of
them alike), peak RSS above the baseline after one warm-up batch (MiB; read in a child of its own
per variant, with the kernel's peak counter reset after the warm-up so that neither model
building nor the code a first call loads counts, and with glibc returning freed blocks to the
OS so that RSS follows live tensors), the size of one layer's maps (MiB), and the ratios.

Where (c) would need more than ``--stacked-max-gib`` (default 4 GiB; predicted as 6 maps per
layer, above the 4.7 to 4.9 measured at 224 and 448 px) it runs on the first ``d`` blocks only,
the most that fit, and its extra memory and time are scaled by ``depth / d``: both are sums of
per-layer terms (each layer adds its maps and their reduction). Such entries are marked
``"stacked_extrapolated_from_depth": d``.

    .venv/bin/python benchmarks/bench_analysis.py            # the five configurations below
    .venv/bin/python benchmarks/bench_analysis.py --no-stacked  # (a) and (b) only
    .venv/bin/python benchmarks/bench_analysis.py --no-stacked --blocks 2 --threads 1  # quick check
    .venv/bin/python benchmarks/bench_analysis.py --profile --threads 1  # where the time goes
    .venv/bin/python benchmarks/bench_analysis.py --quick    # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [
    {"arch": "vit_small_patch16_224", "img": 224, "batch": 8},
    {"arch": "vit_base_patch16_224", "img": 224, "batch": 8},
    {"arch": "vit_base_patch16_224", "img": 448, "batch": 4},
    {"arch": "vit_large_patch16_224", "img": 448, "batch": 2},
    {"arch": "vit_base_patch16_224", "img": 1024, "batch": 1},
]
QUICK = [
    {"arch": "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)", "img": 32, "batch": 2}
]
STACKED_MAPS_PER_LAYER = 6.0  # a prediction for choosing the depth (c) runs at, on the safe side


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so that model building does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def one_layer_maps_mib(batch: int, heads: int, tokens: int) -> float:
    return batch * heads * tokens * tokens * 4 / 2**20


def live_peak_mib(fn) -> float:
    """The most bytes of tensors alive at once during ``fn()``, above those alive before it (MiB).

    From torch.profiler's allocation records (every tensor goes through PyTorch's CPU allocator;
    BLAS scratch, the softmax kernel's 48 KiB of rows a thread and the interpreter do not), so it
    does not move with the allocator's caching or the machine's other processes, unlike RSS.
    Allocations made on threads other than this one are not recorded: the analysis' head groups
    in threads (maps of 64 MiB or more a layer) are outside what it sees."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def child(
    variants: list[str],
    arch: str,
    img: int,
    batch: int,
    repeats: int,
    depth: int | None,
    device: str = "cpu",
    block_bytes: int | None = None,
    live: bool = True,
) -> dict:
    """Measure each of ``variants`` in this process: {variant: {median_s, peak_extra_mib, ...}}.
    ``live``: also the peak of live tensors (:func:`live_peak_mib`, one more call per variant).
    On CUDA the peak is the caching allocator's peak above what was allocated before the batch,
    and every timed call ends with a synchronise."""
    import torch

    from unip_analysis.attention import (
        DEFAULT_BLOCK_BYTES,
        AttentionMaps,
        head_group_threads,
        heads_per_block,
        observe_attention,
    )
    from unip_analysis.checkpoints import build_vit
    from unip_analysis.metrics import patch_distance_matrix

    torch.manual_seed(0)
    model = build_vit(arch, img_size=img).eval().to(device)
    full_depth = len(model.blocks)
    if depth is not None:
        model.blocks = model.blocks[:depth]
    x = torch.randn(batch, 3, img, img).to(device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size[0]
    npt = model.num_prefix_tokens
    if "stream" in variants:
        from unip_analysis.analyze import LayerObserver  # pandas and friends: only where needed

        observer = LayerObserver(len(model.blocks), grid, patch, npt, device=device)

    def plain():
        model.forward_features(x)

    def stream():
        observer.start_batch(batch)
        with observe_attention(model, observer, block_bytes=block_bytes or DEFAULT_BLOCK_BYTES):
            model.forward_features(x)

    def stacked():
        maps = AttentionMaps()
        with observe_attention(model, maps):
            model.forward_features(x)
        attns = torch.stack([maps.maps[i] for i in sorted(maps.maps)])  # [L, B, H, T, T]
        maps.maps.clear()
        a = attns[..., npt:, npt:] + 1e-8
        a = a / a.sum(-1, keepdim=True)
        n = a.shape[-1]
        pq = torch.full(a.shape[:-1], 1.0 / n, device=a.device)
        pk = (a * pq[..., None]).sum(-2)
        mi = (a * pq[..., None] * torch.log(a / pk[..., None, :])).sum((-2, -1))
        hk = -(pk * torch.log(pk)).sum(-1)
        _ = mi / torch.sqrt(hk * math.log(n))
        b = attns[..., npt:, npt:] + 1e-32
        b = b / b.sum(-1, keepdim=True)
        _ = (b * patch_distance_matrix(grid, patch).to(b.device, b.dtype)).sum((-2, -1)) / n

    fns = {"plain": plain, "stream": stream, "stacked": stacked}
    peaks, times, cpu = {}, {v: [] for v in variants}, {v: [] for v in variants}
    with torch.inference_mode():
        for variant in variants:
            fns[variant]()  # warm-up: loads code and libraries once; not part of the peak
        for variant in variants:  # one batch each, the kernel's peak counter reset before it
            if cuda:
                sync()
                base = torch.cuda.memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
                fns[variant]()
                sync()
                peaks[variant] = torch.cuda.max_memory_allocated() / 2**20 - base
                continue
            base = rss_mib()
            reset_peak_rss()
            fns[variant]()
            peaks[variant] = peak_rss_mib() - base
        # the profiler records this thread's allocations only: left out where the analysis runs
        # its head groups in threads of its own
        heads, tokens = int(model.blocks[0].attn.num_heads), grid[0] * grid[1] + npt
        groups = math.ceil(heads / heads_per_block(batch, heads, tokens, block_bytes or DEFAULT_BLOCK_BYTES))
        threaded = head_group_threads(batch, heads, tokens, groups) > 1
        live = {v: live_peak_mib(fns[v]) for v in variants} if live and not cuda and not threaded else {}
        # Variants alternate repeat by repeat, so that a change in the machine's load between
        # them moves every variant alike and leaves the ratios alone; every other repeat runs
        # them in reverse order (a, b, b, a, ...), so that a machine slowing down or speeding up
        # through a run does not favour the variant that runs first.
        for i in range(repeats):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                fns[variant]()
                sync()
                times[variant].append(time.perf_counter() - t0)
                cpu[variant].append(time.process_time() - c0)
    shape = {
        "heads": int(model.blocks[0].attn.num_heads),
        "depth": full_depth,
        "tokens": grid[0] * grid[1] + npt,
    }
    return {
        v: {
            "median_s": statistics.median(times[v]),
            "median_cpu_s": statistics.median(cpu[v]),
            "times_s": times[v],
            "peak_extra_mib": peaks[v],
            "peak_live_extra_mib": live.get(v),
            **shape,
        }
        for v in variants
    }


# Where the time goes: torch.profiler's self CPU time per operator, in these groups.
PROFILE_GROUPS = {
    "linear layers": ("aten::addmm", "aten::mm", "aten::linear", "aten::mkldnn_convolution", "aten::gelu"),
    "fused attention (plain)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "q.k, p.v and p(k) products": ("aten::bmm",),
    "softmax kernel with its statistics": ("unip::softmax_rows",),
    "softmax (PyTorch ops)": ("aten::_softmax",),
    "log (entropy)": ("aten::log",),
    "copies": ("aten::copy_",),
}


def profile(arch: str, img: int, batch: int, depth: int = 1) -> dict:
    """Self CPU seconds per operator group of one plain forward and one analysed forward of the
    first ``depth`` blocks, on this process's threads: {variant: {group: seconds}}."""
    import torch

    from unip_analysis import metrics
    from unip_analysis.analyze import LayerObserver
    from unip_analysis.attention import observe_attention
    from unip_analysis.checkpoints import build_vit

    # The kernel is C code called through ctypes, invisible to the profiler: a named range around
    # each call makes it a row of its own (PyTorch ops run inside it, without a compiler, keep theirs).
    kernel_call = metrics.softmax_rows

    def named_kernel_call(*args, **kwargs):
        with torch.profiler.record_function("unip::softmax_rows"):
            kernel_call(*args, **kwargs)

    torch.manual_seed(0)
    model = build_vit(arch, img_size=img).eval()
    model.blocks = model.blocks[:depth]
    x = torch.randn(batch, 3, img, img)
    grid, patch = tuple(model.patch_embed.grid_size), model.patch_embed.patch_size[0]
    observer = LayerObserver(depth, grid, patch, model.num_prefix_tokens)

    def stream():
        observer.start_batch(batch)
        with observe_attention(model, observer):
            model.forward_features(x)

    metrics.softmax_rows = named_kernel_call
    try:
        with torch.inference_mode():
            out = _profile_variants(model, x, stream)
    finally:
        metrics.softmax_rows = kernel_call
    return out


def _profile_variants(model, x, stream) -> dict:
    """{"plain" | "stream": {group: self CPU seconds}}, each after one warm-up call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for name, fn in (("plain", lambda: model.forward_features(x)), ("stream", stream)):
        fn()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        seconds = {group: 0.0 for group in (*PROFILE_GROUPS, "other")}
        for event in prof.key_averages():
            group = next((g for g, ops in PROFILE_GROUPS.items() if event.key in ops), "other")
            seconds[group] += event.self_cpu_time_total / 1e6
        out[name] = {g: round(v, 4) for g, v in seconds.items() if v > 0}
    return out


# Peak memory is read in a child of its own per variant whose glibc malloc returns every block of
# 128 KiB or more to the OS when it is freed: RSS then follows live tensors, not blocks the
# allocator keeps for reuse (with the default allocator, freed map-sized blocks linger in RSS and
# the number mostly measures fragmentation). Times come from one default-allocator child that
# runs the variants alternately.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MEMORY_RUNS = 3


def run_child(
    variants: list[str],
    cfg: dict,
    repeats: int,
    threads: int,
    depth: int | None = None,
    env: dict | None = None,
    live: bool = True,
) -> dict:
    cmd = [sys.executable, __file__, "--child", ",".join(variants), "--arch", cfg["arch"]]
    cmd += [] if live else ["--no-live"]
    cmd += ["--img", str(cfg["img"]), "--batch", str(cfg["batch"]), "--repeats", str(repeats)]
    cmd += ["--threads", str(threads)] + (["--depth", str(depth)] if depth is not None else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variants(
    variants: list[str], cfg: dict, repeats: int, threads: int, depth: int | None = None
) -> dict:
    """Times from one child running ``variants`` alternately; each variant's peak memory, the
    median of ``MEMORY_RUNS`` live-memory children of its own (one repeat each): one child's peak
    moves by about 1 MiB from run to run, which at 224 px is 0.15 of a layer's maps."""
    timed = run_child(variants, cfg, repeats, threads, depth)
    for v in variants if MEMORY_RUNS else ():  # 0: the timing child's own RSS peak is reported
        peaks = [
            run_child([v], cfg, 1, threads, depth, LIVE_MEMORY_ENV, live=False)[v]["peak_extra_mib"]
            for _ in range(MEMORY_RUNS)
        ]
        timed[v]["peak_extra_mib"] = statistics.median(peaks)
        timed[v]["peak_extra_mib_runs"] = peaks
    return timed


def stacked_depth(plain: dict, batch: int, max_gib: float) -> int | None:
    """Blocks (c) can run within ``max_gib``; ``None`` when the whole model fits."""
    per_layer_mib = STACKED_MAPS_PER_LAYER * one_layer_maps_mib(batch, plain["heads"], plain["tokens"])
    fits = int(max_gib * 1024 // per_layer_mib)
    return None if fits >= plain["depth"] else max(1, fits)


def measure(
    cfg: dict,
    repeats: int,
    threads: int,
    stacked_max_gib: float,
    quick: bool = False,
    stacked: bool = True,
    blocks: int | None = None,
) -> dict:
    if not stacked:  # (a) and (b) only: the rows issue 29 asks for, in a third of the time
        r = run_variants(["plain", "stream"], cfg, repeats, threads, blocks)
        result = summarize(cfg, r["plain"], r["stream"])
        return result if blocks is None else {**result, "blocks": blocks}
    if quick:  # the smoke test: one child does everything (its numbers are not results)
        r = run_child(["plain", "stream", "stacked"], cfg, repeats, threads, None, LIVE_MEMORY_ENV)
        a, b, c = r["plain"], r["stream"], r["stacked"]
        depth = None
    else:
        # (c) needs the shape (a) reports to decide whether it fits: a small probe first.
        probe = run_child(["plain"], dict(cfg, batch=1), 1, threads, 1)["plain"]
        depth = stacked_depth(probe, cfg["batch"], stacked_max_gib)
        if depth is None:
            r = run_variants(["plain", "stream", "stacked"], cfg, repeats, threads)
            a, b, c = r["plain"], r["stream"], r["stacked"]
        else:
            r = run_variants(["plain", "stream"], cfg, repeats, threads)
            a, b = r["plain"], r["stream"]
            # Sums of per-layer terms: (c)'s cost above plain inference of the same truncated
            # model, scaled by depth / d, added to plain inference of the whole model.
            part = run_variants(["plain", "stacked"], cfg, repeats, threads, depth)
            scale = a["depth"] / depth
            c = dict(part["stacked"])
            for key in ("median_s", "peak_extra_mib"):
                c[key] = a[key] + (part["stacked"][key] - part["plain"][key]) * scale
    result = summarize(cfg, a, b, c)
    if depth is not None:
        result["stacked_extrapolated_from_depth"] = depth
    return result


def paired_interval(b_times: list[float], a_times: list[float], draws: int = 2000) -> list[float]:
    """A 90 % bootstrap interval of the median of the repeats' own ratios b_i / a_i: how far the
    machine's noise leaves the ratio uncertain (seeded: the same times give the same interval)."""
    import random

    ratios = [x / y for x, y in zip(b_times, a_times)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return [round(medians[int(0.05 * draws)], 3), round(medians[int(0.95 * draws) - 1], 3)]


def summarize(cfg: dict, a: dict, b: dict, c: dict | None = None) -> dict:
    """One configuration's entry from (a), (b) and, where it ran, (c)."""
    maps = one_layer_maps_mib(cfg["batch"], a["heads"], a["tokens"])
    variants = (("plain", a), ("stream", b)) + ((("stacked", c),) if c is not None else ())
    result = {
        **cfg,
        "tokens": a["tokens"],
        "depth": a["depth"],
        "seconds": {k: round(v["median_s"], 4) for k, v in variants},
        "peak_extra_mib": {k: round(v["peak_extra_mib"], 1) for k, v in variants},
        "one_layer_maps_mib": round(maps, 4),
        "ratio_stream_over_plain": round(b["median_s"] / a["median_s"], 3),
        # Two estimators that load on the machine moves less: the median of each repeat's own
        # ratio (the two forwards of a repeat run back to back) and the ratio of the fastest
        # repeats (other processes only ever add time).
        "ratio_paired_median": round(statistics.median(s / p for s, p in zip(b["times_s"], a["times_s"])), 3),
        "ratio_best_over_best": round(min(b["times_s"]) / min(a["times_s"]), 3),
        "ratio_paired_90pct_interval": paired_interval(b["times_s"], a["times_s"]),
        "times_s": {k: [round(t, 4) for t in v["times_s"]] for k, v in (("plain", a), ("stream", b))},
        # CPU seconds of the timing child (all its threads): on a busy machine wall time also
        # measures the neighbours; on a quiet one the two ratios agree
        "cpu_seconds": {"plain": round(a["median_cpu_s"], 4), "stream": round(b["median_cpu_s"], 4)},
        "ratio_cpu_stream_over_plain": round(b["median_cpu_s"] / a["median_cpu_s"], 3),
        "stream_extra_over_plain_in_layer_maps": round((b["peak_extra_mib"] - a["peak_extra_mib"]) / maps, 3),
    }
    if a.get("peak_live_extra_mib") is not None and b.get("peak_live_extra_mib") is not None:
        # tensors alive at once, from the allocation records (see live_peak_mib); left out by the
        # child where the analysis runs head groups in threads, whose allocations it cannot see
        result["peak_live_extra_mib"] = {k: round(v["peak_live_extra_mib"], 3) for k, v in variants}
        result["stream_live_extra_over_plain_in_layer_maps"] = round(
            (b["peak_live_extra_mib"] - a["peak_live_extra_mib"]) / maps, 3
        )
    if c is not None:
        result["ratio_stacked_over_stream"] = round(c["median_s"] / b["median_s"], 3)
        result["stacked_extra_over_plain_in_layer_maps"] = round(
            (c["peak_extra_mib"] - a["peak_extra_mib"]) / maps, 2
        )
    return result


def main() -> int:
    global MEMORY_RUNS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch default)")
    ap.add_argument(
        "--stacked-max-gib",
        type=float,
        default=4.0,
        help="memory the stacked variant may use before it is extrapolated from fewer blocks (default 4)",
    )
    ap.add_argument(
        "--only",
        type=int,
        action="append",
        metavar="I",
        help="run configuration I only (0-based; repeatable)",
    )
    ap.add_argument("--no-stacked", action="store_true", help="skip the stacked variant (c)")
    ap.add_argument(
        "--memory-runs",
        type=int,
        default=MEMORY_RUNS,
        help="RSS children per variant (median; 0: none, the timing child's RSS peak and live peak only)",
    )
    ap.add_argument(
        "--blocks",
        type=int,
        help="with --no-stacked: time the first N blocks only (every block costs the same; a quick check)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: where one block's time goes per configuration (torch.profiler, first block only)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)  # comma-separated variants
    ap.add_argument("--no-live", action="store_true", help=argparse.SUPPRESS)  # RSS-only memory children
    ap.add_argument("--arch")
    ap.add_argument("--img", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--depth", type=int)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        variants = args.child.split(",")
        report = child(
            variants, args.arch, args.img, args.batch, args.repeats, args.depth, live=not args.no_live
        )
        print(json.dumps(report))
        return 0
    from importlib.metadata import version

    configs = QUICK if args.quick else [c for i, c in enumerate(CONFIGS) if not args.only or i in args.only]
    if args.profile:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from unip_analysis.kernels import library

        rows = [{**cfg, "self_cpu_s": profile(cfg["arch"], cfg["img"], cfg["batch"])} for cfg in configs]
        report = {"benchmark": "analysis_profile", "threads": torch.get_num_threads(), "results": rows}
        print(json.dumps({**report, "softmax_kernel": library() is not None}))
        return 0
    MEMORY_RUNS = args.memory_runs
    repeats = 1 if args.quick else args.repeats
    results = [
        measure(
            cfg, repeats, args.threads, args.stacked_max_gib, args.quick, not args.no_stacked, args.blocks
        )
        for cfg in configs
    ]
    print(
        json.dumps(
            {
                "benchmark": "analysis",
                "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                "torch": version("torch"),
                "timm": version("timm"),
                "repeats": repeats,
                "threads": args.threads or "torch default",
                "load_average_1min": round(os.getloadavg()[0], 2),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
