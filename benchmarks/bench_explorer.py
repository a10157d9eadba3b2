"""The attention explorer's budget case: report size, Chromium load time, click-to-render time, and
what the explorer adds to the analysis.

ViT-B/16 at 224 px (random weights), ``--explore-images 4`` out of ``--images`` analysed images:

- analysis seconds without (``explore_images=0``) and with the explorer, timed alternately in this
  process (median of ``--repeats``, after a warm-up of each), and their ratio;
- report.html bytes (everything: figures, tables, the explorer's data);
- load: navigation start to ``window.unipExplorer.ready`` resolved (the data decoded and the first
  render done), in Debian's chromium (headless, ``/usr/bin/chromium``), median of fresh pages;
- click: a click on the image at a new query to the next animation frame, all small maps
  (every layer x head) and the big map drawn, median of ``--clicks`` clicks.

Budgets (issue 22): report <= 25 MB, load < 3 s, click < 200 ms.

    .venv/bin/python benchmarks/bench_explorer.py --out benchmarks/results_explorer.json
    .venv/bin/python benchmarks/bench_explorer.py --quick    # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unip_analysis import analyze, checkpoints, report  # noqa: E402
from unip_analysis.patterns import default_thresholds  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FULL = {"arch": "vit_base_patch16_224", "img": 224, "images": 16, "batch": 8, "explore": 4}
QUICK = {
    "arch": "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)",
    "img": 32,
    "images": 4,
    "batch": 2,
    "explore": 2,
}


def write_images(folder: Path, n: int, size: int) -> Path:
    """Smooth random grey and colour scenes (blurred noise): attention that is not uniform."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.random((max(2, size // 16), max(2, size // 16), 3))
        img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        (img.convert("L") if i % 2 else img).save(folder / f"scene_{i:03d}.png")
    return folder


def time_analysis(bb, dataset, cfg: dict, repeats: int) -> tuple[dict, object]:
    """Median seconds of the analysis without and with the explorer, timed alternately."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    res = None
    for r in range(repeats + 1):  # the first round warms up
        for kind, n in (("without", 0), ("with", cfg["explore"])):
            t = time.perf_counter()
            out = analyze.analyze_backbone(
                bb, dataset, name="vit_b", batch_size=cfg["batch"], progress=False, explore_images=n
            )
            if r:
                times[kind].append(time.perf_counter() - t)
            if n:
                res = out
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "ratio_with_over_without": med["with"] / med["without"]}, res


def measured_error(bb, dataset, res) -> dict:
    """Image 0, every layer, head and stored query: the explorer's rows (decoded q and k, as the
    page computes them) against softmax(attention.layer_qk_logits) in fp64; and the bound."""
    from unip_analysis import attention

    ex, npt = res.explorer, res.num_prefix_tokens
    worst_abs = worst_rel = worst_bound = 0.0
    x = dataset[0][None]
    for layer in range(1, res.depth + 1):
        with torch.no_grad():
            true = attention.layer_qk_logits(bb.model, x, layer - 1).double().softmax(-1)[0]
        true = true[:, [npt + q for q in ex.queries]].numpy()  # [heads, queries, tokens]
        q = ex.q[0][layer - 1].decoded().astype(np.float64)
        k = ex.k[0][layer - 1].decoded().astype(np.float64)
        logits = q @ k.transpose(0, 2, 1)
        if ex.bias[layer - 1] is not None:
            logits = logits + ex.bias[layer - 1]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        worst_abs = max(worst_abs, float(np.abs(p - true).max()))
        worst_rel = max(worst_rel, float((np.abs(p - true) / true).max()))
        worst_bound = max(worst_bound, float(np.expm1(2 * ex.logit_error(0, layer)).max()))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "max_rel_bound": worst_bound}


def browser_times(path: Path, loads: int, clicks: int, screenshot: Path | None) -> dict:
    from playwright.sync_api import sync_playwright

    load_ms, click_ms = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for i in range(loads):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(path.as_uri(), wait_until="commit")
            load_ms.append(
                page.evaluate(
                    "new Promise(r => { const w = () => window.unipExplorer "
                    "? window.unipExplorer.ready.then(() => r(performance.now())) "
                    ": setTimeout(w, 5); w(); })"
                )
            )
            if i == loads - 1:
                rng = np.random.default_rng(0)
                for _ in range(clicks):
                    fx, fy = rng.random(2)
                    click_ms.append(
                        page.evaluate(
                            """([fx, fy]) => new Promise(resolve => {
                                const c = document.querySelector("canvas.ux-big"), b = c.getBoundingClientRect();
                                const t = performance.now();
                                c.dispatchEvent(new MouseEvent("click", {bubbles: true,
                                    clientX: b.left + fx * b.width, clientY: b.top + fy * b.height}));
                                requestAnimationFrame(() => resolve(performance.now() - t));
                            })""",
                            [float(fx), float(fy)],
                        )
                    )
                if screenshot is not None:
                    page.locator("[data-unip-explorer]").screenshot(path=str(screenshot))
            page.close()
        version = browser.version
        browser.close()
    return {
        "chromium": version,
        "load_ms_median": statistics.median(load_ms),
        "load_ms": load_ms,
        "click_to_frame_ms_median": statistics.median(click_ms),
        "click_to_frame_ms_max": max(click_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, for the smoke test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--keep", type=Path, help="keep the report.html here")
    ap.add_argument("--screenshot", type=Path, help="a PNG of the explorer after the clicks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(tmp / "images", cfg["images"], cfg["img"])
        torch.manual_seed(0)
        model = checkpoints.build_vit(cfg["arch"], img_size=cfg["img"]).eval()
        bb = checkpoints.LoadedBackbone(model, "timm", cfg["arch"], "random", "0" * 64, cfg["img"])
        dataset = analyze.image_dataset(images, cfg["img"])
        timing, res = time_analysis(bb, dataset, cfg, repeats)
        th = default_thresholds(res.grid)
        entries = {res.name: analyze.model_entry(res, th, n_boot=100)}
        t = time.perf_counter()
        rep = report.build_report([res], entries, th, images, len(dataset), "imagenet")
        build_s = time.perf_counter() - t
        path = report.write_report(rep, tmp / "out")["report"]
        size = path.stat().st_size
        result = {
            "config": {**cfg, "torch": torch.__version__, "threads": torch.get_num_threads()},
            "machine": platform.machine(),
            "analysis": timing,
            "report_build_seconds": build_s,
            "report_bytes": size,
            "report_mb": size / 1e6,
            "precision": res.explorer.plan.precision,
            "reductions": res.explorer.plan.reductions,
            "max_logit_error_bound": max(
                float(res.explorer.logit_error(i, lay).max())
                for i in range(len(res.explorer.images))
                for lay in range(1, res.depth + 1)
            ),
        }
        result["image0_error"] = measured_error(bb, dataset, res)
        if Path(CHROMIUM).exists():
            result["browser"] = browser_times(
                path, 1 if args.quick else args.loads, 3 if args.quick else args.clicks, args.screenshot
            )
        if args.keep:
            args.keep.write_bytes(path.read_bytes())
    line = json.dumps(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
