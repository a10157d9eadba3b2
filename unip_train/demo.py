"""`make demo`: the whole UNIP pipeline, end to end, on data and teachers the project provides.

    analysis -> layer selection -> NMI-HAD distillation -> LL-FPN fine-tuning -> mIoU

1. Synthetic infrared data (unip_train.synthetic): unlabelled scenes for analysis and
   distillation, and a labelled set in the SODA layout for fine-tuning.
2. Two shipped tiny teachers trained with different objectives on those scenes
   (scripts/train_demo_teachers.py): masked-image modelling (``mim``) and supervised
   classification (``sup``). The analysis compares their NMI-vs-depth profiles and picks each
   one's layer; the report says whether the profiles differ.
3. The ``mim`` teacher's selected layer is distilled into a student (UNIP distils MAE).
4. The student is fine-tuned with LL-FPN and linear-probed; so is the same architecture from
   random init, with three seeds each (paired: a seed fixes the head's init and the data order),
   so the mIoU gain of the distillation is measured and shown, not asserted.

Every stage runs through the same entry points users call (unip-analyze, unip-pretrain,
unip-finetune); the equivalent commands are printed. Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from unip_analysis import cli as analyze_cli
from unip_analysis import selection
from unip_analysis.checkpoints import safetensors_metadata

from . import finetune, pretrain, synthetic
from .pretrain.nmi_had import build_student, save_student

ASSETS = Path(__file__).parent / "assets"
TEACHERS = ("mim", "sup")
IMG = 64
STUDENT = "vit_tiny_patch16_224(depth=6,embed_dim=96,num_heads=3,patch_size=8)"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _stage(n: int, title: str) -> float:
    _say(f"\n=== [{n}/5] {title} ===")
    return time.time()


def _command(argv: list[str], prog: str) -> None:
    _say("$ " + " ".join([prog] + [f"'{a}'" if any(c in a for c in "(),= ") else a for a in argv]))


def _run_cli(prog: str, main, argv: list[str]) -> None:
    """Print the equivalent command, then run the CLI in-process; stop the demo if it fails."""
    _command(argv, prog)
    if main(argv) != 0:
        raise SystemExit(f"demo: {prog} failed (see the message above)")


def teacher_files(cache: Path) -> dict[str, Path]:
    """The shipped teachers; if absent (a stripped install), train short ones into the cache once."""
    shipped = {t: ASSETS / f"demo_teacher_{t}.safetensors" for t in TEACHERS}
    if all(p.exists() for p in shipped.values()):
        return shipped
    cached = {t: cache / f"demo_teacher_{t}.safetensors" for t in TEACHERS}
    if not all(p.exists() for p in cached.values()):
        _say(f"shipped teachers not found; training short ones into {cache} (once)")
        script = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_teachers.py"
        subprocess.run([sys.executable, str(script), "--steps", "300", "--out", str(cache)], check=True)
    return cached


def run(out: Path, quick: bool = False, figures_dir: Path | None = None) -> dict:
    t_start = time.time()
    out = out.resolve()
    n_unlab, n_train, n_test = (96, 32, 8) if quick else (512, 160, 40)
    epochs, ft_iters = (1, 20) if quick else (40, 200)

    t = _stage(1, "synthetic infrared data")
    unlabelled = synthetic.generate_unlabelled(out / "data" / "unlabelled", n_unlab, size=IMG, seed=1)
    soda = synthetic.generate(out / "data" / "soda", "soda", n_train, n_test, size=96, seed=2)
    _say(
        f"{n_unlab} unlabelled scenes in {unlabelled}; SODA-layout set ({n_train} train / {n_test} test) "
        f"in {soda} ({time.time() - t:.0f}s)"
    )

    t = _stage(2, "attention analysis of two teachers (unip-analyze)")
    teachers = teacher_files(out / "cache")
    for name, path in teachers.items():
        meta = safetensors_metadata(path)
        _say(
            f"teacher {name}: {meta.get('objective', '?')} objective, {meta.get('steps', '?')} steps, "
            f"made by `{meta.get('made_by', 'scripts/train_demo_teachers.py')}`"
        )
    arch = safetensors_metadata(teachers["mim"])["arch"]
    argv = [a for name, p in teachers.items() for a in ("--checkpoint", f"{name}=timm:{arch}:{p}")]
    argv += [
        "--images",
        str(unlabelled),
        "--img-size",
        str(IMG),
        "--norm",
        "infrared",
        "--num-images",
        "128" if quick else "256",
        "--batch-size",
        "32",
        "--map-images",
        "1",
        "--out",
        str(out / "analysis"),
    ]
    _run_cli("unip-analyze", analyze_cli.main, argv)
    sel_path = out / "analysis" / selection.FILENAME
    doc = selection.read(sel_path)
    for name, m in doc["models"].items():
        curve = " ".join(f"{lay['nmi']:.3f}" for lay in m["layers"])
        _say(f"  {name} NMI by layer: {curve} -> selected layer {m['selected_layer']}")
    _say(f"({time.time() - t:.0f}s)")

    t = _stage(3, "NMI-HAD distillation of the mim teacher's selected layer (unip-pretrain)")
    argv = [
        "--selection",
        str(sel_path),
        "--teacher",
        "mim",
        "--student",
        STUDENT,
        "--input-size",
        str(IMG),
        "--infrared",
        str(unlabelled),
        "--norm",
        "infrared",
        "--epochs",
        str(epochs),
        "--warmup-epochs",
        "1",
        "--batch-size",
        "32",
        "--accum-iter",
        "1",
        "--lr",
        "1e-3",
        "--num-workers",
        "0",
        "--save-every",
        str(epochs),
        "--ckpt-every-steps",
        "0",
        "--out",
        str(out / "pretrain"),
    ]
    _run_cli("unip-pretrain", pretrain.main, argv)
    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    _say(
        f"distillation loss {log[0]['loss']:.4f} -> {np.mean([r['loss'] for r in log[-5:]]):.4f} "
        f"over {len(log)} steps ({time.time() - t:.0f}s)"
    )

    t = _stage(
        4,
        "LL-FPN fine-tuning and linear probing on SODA-layout data (unip-finetune): distilled vs random init",
    )
    student = out / "pretrain" / "student.safetensors"
    heads = json.loads((out / "pretrain" / "student.json").read_text())["heads_per_layer"]
    scratch = out / "scratch" / "student.safetensors"
    save_student(scratch, build_student(STUDENT, heads[-1], IMG), STUDENT)
    # One run per seed and backbone; a seed fixes the head's init and the data order for both
    # backbones, so the comparison is paired. A single run is too noisy to call a difference.
    seeds = (0,) if quick else (0, 1, 2)
    runs: dict[tuple[str, str], list[dict]] = {}
    for mode, seed, (label, weights) in itertools.product(
        ("ft", "lp"), seeds, (("distilled", student), ("random init", scratch))
    ):
        run_dir = out / f"{mode}_{'distilled' if label == 'distilled' else 'scratch'}" / f"seed{seed}"
        cfg = finetune.FinetuneConfig(
            backbone=f"unip:{STUDENT}:{weights}",
            dataset="soda",
            data_root=str(soda),
            out=str(run_dir),
            mode=mode,
            iters=ft_iters,
            crop=IMG,
            batch_size=8,
            lr=1e-3,
            head_channels=64,
            warmup_iters=ft_iters // 10,
            seed=seed,
            workers=0,
            log_every=50,
        )
        _say(
            f"$ unip-finetune --backbone unip:'{STUDENT}':{weights} --dataset soda --data-root {soda} "
            f"--mode {mode} --iters {ft_iters} --crop {IMG} --batch-size 8 --lr 1e-3 --head-channels 64 "
            f"--seed {seed} --out {run_dir}"
        )
        runs.setdefault((mode, label), []).append(finetune.run(cfg))
    _say(f"({time.time() - t:.0f}s)")

    t = _stage(5, "summary")
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for png in (out / "analysis" / "figures").glob("*.png"):
            shutil.copy2(png, figures_dir / png.name)
        _say(f"figures copied to {figures_dir}")
    from unip_analysis.report import compare_profiles

    for line in compare_profiles(doc):
        _say(line)
    names = {"ft": "LL-FPN fine-tuning", "lp": "linear probe (frozen backbone)"}
    results = {}
    for (mode, label), metrics in runs.items():
        mious = [m["miou"] for m in metrics]
        results[(mode, label)] = {"miou": float(np.mean(mious)), "miou_per_seed": mious}
        _say(
            f"mIoU, {names[mode]}, {label} backbone, {ft_iters} iterations: mean {np.mean(mious):.4f} "
            f"over seeds {list(seeds)} ({' '.join(f'{v:.4f}' for v in mious)})"
        )
    for mode in ("ft", "lp"):
        gains = np.subtract(runs_miou(runs, mode, "distilled"), runs_miou(runs, mode, "random init"))
        _say(f"{names[mode]}: distilled minus random init {gains.mean():+.4f} mIoU, {paired_verdict(gains)}")
    _say(f"report: {out / 'analysis' / 'report.html'}")
    _say(f"selection: {sel_path}")
    _say(f"demo finished in {time.time() - t_start:.0f}s")
    return {
        "selection": doc,
        "finetune": {f"{m} {label}": r for (m, label), r in results.items()},
        "seeds": list(seeds),
        "seconds": time.time() - t_start,
    }


def runs_miou(runs: dict, mode: str, label: str) -> list[float]:
    return [m["miou"] for m in runs[(mode, label)]]


def paired_verdict(gains: np.ndarray, margin: float = 0.01) -> str:
    """What per-seed differences (distilled minus random init) support, said plainly: a difference
    counts when every seed agrees on its sign and the mean clears ``margin``."""
    per_seed = " ".join(f"{g:+.4f}" for g in gains)
    if len(gains) > 1:
        per_seed = f"per seed {per_seed}"
    if gains.mean() > margin and (gains > 0).all():
        return f"distillation helped at this tiny scale ({per_seed})"
    if gains.mean() < -margin and (gains < 0).all():
        return f"distillation hurt at this tiny scale ({per_seed})"
    return f"no clear difference at this tiny scale ({per_seed})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--quick", action="store_true", help="tiny settings (the test suite uses this)")
    ap.add_argument("--figures-dir", type=Path, help="also copy the analysis figures here (make figures)")
    args = ap.parse_args(argv)
    run(args.out, quick=args.quick, figures_dir=args.figures_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
