"""Analysis speed and memory: plain inference vs our streaming analysis vs the straightforward way.

Variants, on the same random weights and images, each measured in a fresh subprocess:

- (a) ``plain``:    ``model.forward_features`` with timm's fused attention;
- (b) ``stream``:   our analysis: NMI and attention distance of every layer, reduced while the
                    forward runs (one layer's map alive at a time);
- (c) ``stacked``:  a forward that returns every layer's attention maps, then NMI (reference
                    formula, term by term) and distance computed on the stacked maps, as the
                    public analysis notebook does.

Prints one JSON line: per configuration the median seconds per batch, peak RSS above the
loaded-model baseline (MiB; the peak counter is reset after the model is built, and read in a
child whose allocator returns freed blocks to the OS, so it follows live memory; the default
allocator's figure is reported beside it), the size of one layer's maps (MiB), and the ratios.

    .venv/bin/python benchmarks/bench_analysis.py            # ViT-S/16 224, ViT-B/16 224, ViT-B/16 448
    .venv/bin/python benchmarks/bench_analysis.py --quick    # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
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
]
QUICK = [
    {"arch": "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)", "img": 64, "batch": 2}
]


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


def child(variant: str, arch: str, img: int, batch: int, repeats: int) -> dict:
    import torch

    from unip_analysis.attention import observe_attention
    from unip_analysis.checkpoints import build_vit
    from unip_analysis.metrics import layer_statistics_, patch_distance_matrix

    torch.manual_seed(0)
    model = build_vit(arch, img_size=img).eval()
    x = torch.randn(batch, 3, img, img)
    grid = tuple(model.patch_embed.grid_size)
    dist = patch_distance_matrix(grid, model.patch_embed.patch_size[0]).float()
    npt = model.num_prefix_tokens

    def plain():
        model.forward_features(x)

    def stream():
        def observer(layer, attn):
            layer_statistics_(attn, npt, dist)

        with observe_attention(model, observer):
            model.forward_features(x)

    def stacked():
        maps = []
        with observe_attention(model, lambda i, a: maps.append(a.clone())):
            model.forward_features(x)
        attns = torch.stack(maps)  # [L, B, H, T, T]
        maps.clear()
        a = attns[..., npt:, npt:] + 1e-8
        a = a / a.sum(-1, keepdim=True)
        n = a.shape[-1]
        pq = torch.full(a.shape[:-1], 1.0 / n)
        pk = (a * pq[..., None]).sum(-2)
        mi = (a * pq[..., None] * torch.log(a / pk[..., None, :])).sum((-2, -1))
        hk = -(pk * torch.log(pk)).sum(-1)
        _ = mi / torch.sqrt(hk * torch.log(torch.tensor(float(n))))
        _ = (a * dist.to(a.dtype)).sum((-2, -1)) / n

    fn = {"plain": plain, "stream": stream, "stacked": stacked}[variant]
    with torch.inference_mode():
        base = rss_mib()
        reset_peak_rss()
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mib()
    tokens = grid[0] * grid[1] + npt
    heads = model.blocks[0].attn.num_heads
    return {
        "median_s": statistics.median(times),
        "peak_extra_mib": peak - base,
        "one_layer_maps_mib": batch * heads * tokens * tokens * 4 / 2**20,
        "depth": len(model.blocks),
        "tokens": tokens,
    }


# Peak memory is read in a second child whose glibc malloc returns every block of 128 KiB or more
# to the OS when it is freed: RSS then follows live tensors, not blocks the allocator keeps for
# reuse (with the default allocator, freed map-sized blocks linger in RSS and the number mostly
# measures fragmentation). Timing children use the default allocator.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(variant: str, cfg: dict, repeats: int, threads: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--arch", cfg["arch"], "--img", str(cfg["img"])]
    cmd += ["--batch", str(cfg["batch"]), "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variant(variant: str, cfg: dict, repeats: int, threads: int) -> dict:
    """Median time from a default-allocator child; peak memory from a live-memory child."""
    timed = run_child(variant, cfg, repeats, threads)
    live = run_child(variant, cfg, 1, threads, LIVE_MEMORY_ENV)
    return {
        **timed,
        "peak_extra_mib_default_malloc": timed["peak_extra_mib"],
        "peak_extra_mib": live["peak_extra_mib"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch default)")
    ap.add_argument("--child", choices=["plain", "stream", "stacked"], help=argparse.SUPPRESS)
    ap.add_argument("--arch")
    ap.add_argument("--img", type=int)
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.arch, args.img, args.batch, args.repeats)))
        return 0
    import timm
    import torch

    configs = QUICK if args.quick else CONFIGS
    repeats = 1 if args.quick else args.repeats
    results = []
    for cfg in configs:
        r = {v: run_variant(v, cfg, repeats, args.threads) for v in ("plain", "stream", "stacked")}
        a, b, c = r["plain"], r["stream"], r["stacked"]
        results.append(
            {
                **cfg,
                "tokens": a["tokens"],
                "depth": a["depth"],
                "seconds": {k: round(v["median_s"], 4) for k, v in r.items()},
                "peak_extra_mib": {k: round(v["peak_extra_mib"], 1) for k, v in r.items()},
                "peak_extra_mib_default_malloc": {
                    k: round(v["peak_extra_mib_default_malloc"], 1) for k, v in r.items()
                },
                "one_layer_maps_mib": round(a["one_layer_maps_mib"], 1),
                "ratio_stream_over_plain": round(b["median_s"] / a["median_s"], 3),
                "ratio_stacked_over_stream": round(c["median_s"] / b["median_s"], 3),
                "stream_extra_over_plain_in_layer_maps": round(
                    (b["peak_extra_mib"] - a["peak_extra_mib"]) / a["one_layer_maps_mib"], 2
                ),
                "stacked_extra_over_plain_in_layer_maps": round(
                    (c["peak_extra_mib"] - a["peak_extra_mib"]) / a["one_layer_maps_mib"], 2
                ),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "analysis",
                "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                "torch": torch.__version__,
                "timm": timm.__version__,
                "repeats": repeats,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
