"""The paper's comparison in miniature, end to end, with the toolkit's own CLIs (docs/demo.md).

    demo task (unip_train.demo_task) -> unip-analyze (both shipped teachers) -> layer_selection.json
      -> unip-pretrain (NMI-HAD: the MIM teacher's selected layer; and its last layer, the ablation)
      -> unip-finetune (LL-FPN and linear probe) of every row, paired seeds -> table

Rows (a backbone each; the same fine-tuning settings for all):

| row | backbone |
|---|---|
| random | the student architecture, MAE-style random init |
| teacher | the MIM teacher itself (timm family), fine-tuned directly |
| selected | NMI-HAD student distilled from the teacher's selected (deepest hybrid) layer |
| last | NMI-HAD student distilled from the teacher's last layer (the paper's ablation); when the last
  layer is the selected one, the row is the selected student again and the table says so |
| local | NMI-HAD student distilled from the teacher's most local layer (highest NMI) |

A seed fixes the head's init and the data order, the same for every row: the comparison is paired.

    python scripts/demo_experiment.py --preset demo --out demo_exp          # random vs selected, LL-FPN
    python scripts/demo_experiment.py --preset experiment --out demo_exp    # every row, LL-FPN + probe

Every stage prints the equivalent command; the table goes to stdout and OUT/results.csv, the stage
times to OUT/timings.json. Finished fine-tuning runs (metrics.json present) are reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unip_analysis import cli as analyze_cli
from unip_analysis import selection
from unip_analysis.checkpoints import safetensors_metadata
from unip_train import demo_task
from unip_train.finetune import cli as finetune_cli
from unip_train.pretrain import cli as pretrain_cli
from unip_train.pretrain.nmi_had import build_student, save_student

ASSETS = Path(__file__).resolve().parents[1] / "unip_train" / "assets"
IMG = 64
STUDENT = "vit_tiny_patch16_224(depth=6,embed_dim=64,num_heads=2,patch_size=8)"
STUDENT_DIM = 64
ROWS = ("random", "teacher", "selected", "last", "local")
PRESETS = {
    "demo": {"rows": ("random", "selected"), "modes": ("ft",)},
    "experiment": {"rows": ROWS, "modes": ("ft", "lp")},
}


def say(msg: str) -> None:
    print(msg, flush=True)


def run_cli(prog: str, main, argv: list[str]) -> None:
    """Print the equivalent command, run the CLI in this process, stop if it fails."""
    quoted = [f"'{a}'" if any(c in a for c in "(),= ") else a for a in argv]
    say("$ " + " ".join([prog, *quoted]))
    if main(argv) != 0:
        raise SystemExit(f"demo_experiment: {prog} failed (see the message above)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (overrides the preset)")
    ap.add_argument("--modes", help="ft,lp (overrides the preset)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--teachers", type=Path, default=ASSETS, help="folder with demo_teacher_{mim,sup}.safetensors"
    )
    g = ap.add_argument_group("data")
    g.add_argument("--unlabelled", type=int, default=2000)
    g.add_argument("--train", type=int, default=32, help="labelled training scenes")
    g.add_argument("--test", type=int, default=100, help="labelled test scenes")
    g.add_argument("--data-seed", type=int, default=1, help="unlabelled scenes; labelled ones use +1")
    g = ap.add_argument_group("distillation (unip-pretrain)")
    g.add_argument("--student", default=STUDENT)
    g.add_argument("--distill-epochs", type=int, default=8)
    g.add_argument("--distill-batch", type=int, default=64)
    g.add_argument("--distill-lr", type=float, default=1e-3)
    g = ap.add_argument_group("fine-tuning (unip-finetune)")
    g.add_argument("--ft-iters", type=int, default=300)
    g.add_argument("--ft-lr", type=float, default=2e-3)
    g.add_argument("--ft-batch", type=int, default=8)
    g.add_argument("--lp-iters", type=int, default=300)
    g.add_argument("--lp-lr", type=float, default=1e-2)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return ap.parse_args(argv)


def stage_data(args, timings: dict) -> tuple[Path, Path]:
    t = time.time()
    unlabelled = args.out / "data" / "unlabelled"
    soda = args.out / "data" / "soda"
    if not (soda / "test_infrared.txt").exists():
        demo_task.generate_unlabelled(unlabelled, args.unlabelled, IMG, args.data_seed)
        demo_task.generate_labelled(soda, args.train, args.test, IMG, args.data_seed + 1)
    timings["data"] = time.time() - t
    say(
        f"data: {args.unlabelled} unlabelled scenes, {args.train} labelled train / {args.test} test ({timings['data']:.0f}s)"
    )
    return unlabelled, soda


def stage_analysis(args, unlabelled: Path, timings: dict) -> dict:
    t = time.time()
    sel = args.out / "analysis" / selection.FILENAME
    if not sel.exists():
        argv = []
        for name in ("mim", "sup"):
            path = args.teachers / f"demo_teacher_{name}.safetensors"
            argv += ["--checkpoint", f"{name}=timm:{safetensors_metadata(path)['arch']}:{path}"]
        argv += ["--images", str(unlabelled), "--img-size", str(IMG), "--norm", "infrared", "--num-images", "256",
                 "--batch-size", "32", "--map-images", "1", "--no-progress", "--out", str(args.out / "analysis")]  # fmt: skip
        run_cli("unip-analyze", analyze_cli.main, argv)
    doc = selection.read(sel)
    for name, m in doc["models"].items():
        curve = " ".join(f"{layer['nmi']:.3f}{layer['pattern'][0]}" for layer in m["layers"])
        say(f"  {name}: NMI by layer (l/h/g) {curve} -> selected layer {m['selected_layer']}")
    timings["analysis"] = time.time() - t
    return doc


def distilled_layer(mim: dict, which: str) -> int:
    """The MIM teacher's layer a row distils (1-based): selected, last, or the most local one."""
    if which == "selected":
        return int(mim["selected_layer"])
    if which == "last":
        return int(mim["depth"])
    return 1 + int(np.argmax([layer["nmi"] for layer in mim["layers"]]))


def stage_distill(args, doc: dict, unlabelled: Path, which: str, timings: dict) -> Path:
    """NMI-HAD of the MIM teacher's ``which`` layer (selected | last | local) into the student."""
    t = time.time()
    mim = doc["models"]["mim"]
    layer = distilled_layer(mim, which)
    if which != "selected" and layer == distilled_layer(mim, "selected"):
        say(f"  {which} layer = selected layer {layer}: the '{which}' row is the selected student")
        return stage_distill(args, doc, unlabelled, "selected", timings)
    run = args.out / f"pretrain_layer{layer}"
    student = run / "student.safetensors"
    if not student.exists():
        argv = ["--selection", str(args.out / "analysis" / selection.FILENAME), "--teacher", "mim"]
        if which != "selected":  # the selected layer is what unip-pretrain reads from the file
            argv += ["--layer", str(layer)]
        argv += ["--student", args.student, "--input-size", str(IMG), "--infrared", str(unlabelled),
                 "--norm", "infrared", "--epochs", str(args.distill_epochs), "--warmup-epochs", "1",
                 "--batch-size", str(args.distill_batch), "--accum-iter", "1", "--lr", str(args.distill_lr),
                 "--num-workers", "0", "--save-every", str(args.distill_epochs), "--ckpt-every-steps", "0",
                 "--no-progress", "--out", str(run)]  # fmt: skip
        run_cli("unip-pretrain", pretrain_cli.main, argv)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    timings[f"distill_{which}"] = time.time() - t
    say(
        f"  distillation ({which}: layer {layer}): KL {np.mean([r['loss'] for r in log[:5]]):.4f} -> "
        f"{np.mean([r['loss'] for r in log[-5:]]):.4f} over {len(log)} steps ({timings[f'distill_{which}']:.0f}s)"
    )
    return student


def random_student(args, doc: dict) -> Path:
    """The student architecture at MAE-style random init, with the distilled students' head counts."""
    path = args.out / "random_init" / "student.safetensors"
    if not path.exists():
        heads = doc["models"]["mim"]["selected_heads"]
        torch.manual_seed(0)
        save_student(path, build_student(args.student, heads, IMG), args.student)
    return path


def finetune_cell(args, name: str, backbone: str, dim: int, mode: str, seed: int, soda: Path) -> float:
    """One unip-finetune run (reused when its metrics.json exists); returns its mIoU."""
    run = args.out / "finetune" / f"{name}_{mode}" / f"seed{seed}"
    metrics = run / "metrics.json"
    if not metrics.exists():
        iters, lr = (args.ft_iters, args.ft_lr) if mode == "ft" else (args.lp_iters, args.lp_lr)
        argv = ["--backbone", backbone, "--dataset", "soda", "--data-root", str(soda), "--mode", mode,
                "--iters", str(iters), "--crop", str(IMG), "--batch-size", str(args.ft_batch), "--lr", str(lr),
                "--warmup-iters", str(max(1, iters // 10)), "--head-channels", str(dim), "--seed", str(seed),
                "--workers", "0", "--log-every", "50", "--no-progress", "--out", str(run)]  # fmt: skip
        run_cli("unip-finetune", finetune_cli.main, argv)
    return float(json.loads(metrics.read_text())["miou"])


def summarize(
    results: dict[tuple[str, str], list[float]],
    seeds: list[int],
    labels: dict[str, str] | None = None,
    baseline: str = "random",
) -> list[str]:
    """Table lines: mIoU per seed and mean per row and mode, then the paired difference to ``baseline``
    per seed; a difference is called only when every seed agrees on its sign and the mean exceeds 0.01."""
    labels = labels or {}
    width = max(len(labels.get(row, row)) for row, _ in results) + 2
    lines = [
        f"{'row':<{width}}{'mode':<6}"
        + "".join(f"seed{s:<6}" for s in seeds)
        + "mean    vs random (per seed)"
    ]
    for (row, mode), mious in results.items():
        line = f"{labels.get(row, row):<{width}}{mode:<6}" + "".join(f"{v:<10.4f}" for v in mious)
        line += f"{np.mean(mious):<8.4f}"
        base = results.get((baseline, mode))
        if base is not None and row != baseline:
            d = np.subtract(mious, base)
            verdict = (
                "better"
                if d.mean() > 0.01 and (d > 0).all()
                else "worse"
                if d.mean() < -0.01 and (d < 0).all()
                else "no clear difference"
            )
            line += f"{d.mean():+.4f} ({' '.join(f'{x:+.4f}' for x in d)}): {verdict}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    rows = tuple(args.rows.split(",")) if args.rows else preset["rows"]
    modes = tuple(args.modes.split(",")) if args.modes else preset["modes"]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"demo_experiment: --rows {','.join(unknown)}: expected some of {','.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()
    unlabelled, soda = stage_data(args, timings)
    doc = stage_analysis(args, unlabelled, timings)
    mim = doc["models"]["mim"]
    # row -> (backbone spec, UperNet channels = its embed dim, run-folder name). Rows that resolve to
    # the same backbone (last = selected) share their fine-tuning runs.
    backbones: dict[str, tuple[str, int, str]] = {}
    for row in rows:
        if row == "random":
            backbones[row] = (f"unip:{args.student}:{random_student(args, doc)}", STUDENT_DIM, "random_init")
        elif row == "teacher":
            backbones[row] = (f"timm:{mim['arch']}:{mim['weights']}", int(mim["embed_dim"]), "teacher")
        else:
            student = stage_distill(args, doc, unlabelled, row, timings)
            backbones[row] = (f"unip:{args.student}:{student}", STUDENT_DIM, student.parent.name)
    results: dict[tuple[str, str], list[float]] = {}
    for mode in modes:
        for row in rows:
            t = time.time()
            backbone, dim, name = backbones[row]
            results[(row, mode)] = [finetune_cell(args, name, backbone, dim, mode, s, soda) for s in seeds]
            timings[f"{mode}_{row}"] = time.time() - t
            say(
                f"  {row} {mode}: mIoU {' '.join(f'{v:.4f}' for v in results[(row, mode)])} ({timings[f'{mode}_{row}']:.0f}s)"
            )
    timings["total"] = time.time() - t_all
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "mode", "seed", "miou"])
        for (row, mode), mious in results.items():
            w.writerows([row, mode, s, f"{v:.6f}"] for s, v in zip(seeds, mious))
    (args.out / "timings.json").write_text(
        json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n"
    )
    say(
        "\nselected layers: "
        + ", ".join(f"{n} {m['selected_layer']} of {m['depth']}" for n, m in doc["models"].items())
    )
    labels = {r: f"{r} (layer {distilled_layer(mim, r)})" for r in rows if r in ("selected", "last", "local")}
    if "last" in labels and distilled_layer(mim, "last") == distilled_layer(mim, "selected"):
        labels["last"] = f"last (layer {mim['depth']} = selected)"
    for line in summarize(results, seeds, labels):
        say(line)
    say("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
