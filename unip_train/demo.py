"""`make demo` / `make experiment`: the UNIP paper's comparison in miniature, end to end (docs/demo.md).

    demo task (unip_train.demo_task): many unlabelled scenes, a few labelled ones (SODA layout)
      -> unip-analyze of the two shipped teachers (MIM and supervised) -> layer_selection.json
      -> unip-pretrain: NMI-HAD students (the MIM teacher's selected layer; the ablation layer);
         PAD continual pre-training of the MIM teacher
      -> unip-compare: every row fine-tuned (LL-FPN) with paired seeds; layer-wise linear probing
         of both teachers -> results.csv, summary.csv, figures, report.html

Rows of the comparison (``--preset demo`` runs the first two; ``--preset experiment`` all):

| row | backbone |
|---|---|
| random | the student architecture, timm's random init drawn from the seed |
| selected | NMI-HAD student distilled from the MIM teacher's selected (deepest hybrid) layer |
| teacher | the MIM teacher itself, fine-tuned directly |
| last | NMI-HAD student distilled from the teacher's last layer (the paper's ablation); when the last
  layer *is* the selected one, the row is ``local`` instead: the teacher's most local layer |
| pad | PAD continual pre-training of the MIM teacher (adapters + patch-wise scale) |
| selected_pixl | the selected student fine-tuned with PiXL's pixel loss on the same few labels |
| sup_selected | NMI-HAD student distilled from the supervised teacher's selected (deepest hybrid) layer |
| sup_last | NMI-HAD student distilled from the supervised teacher's last layer, which reads global: the
  paper's central ablation (hybrid vs last layer) where the two differ |

Every stage runs through the entry points users call (unip-analyze, unip-pretrain, unip-compare,
which runs unip-finetune per cell) and prints the equivalent command. Finished stages and cells are
reused, so an interrupted demo continues where it stopped.

``--readme README.md`` (make experiment, make figures) keeps the README's table honest: the run's
summary.csv is copied to ``figures/demo_summary.csv`` beside the README, and the table between the
README's ``<!-- demo-table:start -->`` / ``<!-- demo-table:end -->`` markers is rendered from that
copy by :func:`readme_table`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from unip_analysis import cli as analyze_cli
from unip_analysis import selection
from unip_analysis.checkpoints import safetensors_metadata
from unip_analysis.errors import SpecError
from unip_analysis.files import atomic_write_text
from unip_analysis.workers import available_cores

from . import demo_task
from .compare import cli as compare_cli
from .compare.statistics import format_p, paired_t
from .pretrain import cli as pretrain_cli

ASSETS = Path(__file__).parent / "assets"
TEACHERS = ("mim", "sup")
IMG = 64
STUDENT = "vit_tiny_patch16_224(depth=6,embed_dim=64,num_heads=2,patch_size=8)"
ROWS = ("random", "selected", "teacher", "last", "pad", "selected_pixl", "sup_selected", "sup_last")
# The README's demo table: between these markers, rendered from this copy of the run's summary.csv
# (the path is relative to the README's folder).
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
DEMO_SUMMARY = "figures/demo_summary.csv"
DEMO_STAGES = 5  # the stages :func:`run` announces
# What each row of the comparison fine-tunes, in the README's words (summary.csv names the row only).
ROW_BACKBONES = {
    "random": "the student (6 x 64), random init",
    "selected": "NMI-HAD student of the MIM teacher's selected (deepest hybrid) layer",
    "teacher": "the MIM teacher (8 x 128), fine-tuned directly",
    "last": "NMI-HAD student of the MIM teacher's last layer (the paper's ablation)",
    "local": "NMI-HAD student of the MIM teacher's most local layer (stands in for the last-layer ablation)",
    "pad": "PAD of the MIM teacher (fresh decoder)",
    "selected_pixl": "the selected student + PiXL",
    "sup_selected": "NMI-HAD student of the supervised teacher's selected (deepest hybrid) layer",
    "sup_last": "NMI-HAD student of the supervised teacher's last (global) layer",
}
# The paper's central ablation, per teacher: (selected-layer row, last-layer row).
ABLATIONS = {"MIM": ("selected", "last"), "supervised": ("sup_selected", "sup_last")}


@dataclass(frozen=True)
class Preset:
    rows: tuple[str, ...]
    seeds: tuple[int, ...]
    unlabelled: int = 2000
    train: int = 32
    test: int = 100
    distill_epochs: int = 8
    pad_epochs: int = 8
    ft_iters: int = 300
    lp_iters: int = 300
    layerwise: str | tuple[int, ...] | None = "all"  # layer-wise probing of the teachers
    probed: tuple[str, ...] = TEACHERS  # the teachers probed layer by layer
    analysis_images: int = 256


PRESETS = {
    "demo": Preset(rows=("random", "selected"), seeds=(0, 1, 2), probed=("mim",)),
    "experiment": Preset(rows=ROWS, seeds=(0, 1, 2)),
    # The test suite's size: every stage runs, nothing is learned.
    "quick": Preset(
        rows=("random", "selected"),
        seeds=(0, 1),
        unlabelled=64,
        train=8,
        test=4,
        distill_epochs=1,
        pad_epochs=1,
        ft_iters=4,
        lp_iters=4,
        layerwise=(1, 8),
        analysis_images=32,
    ),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def stage(n: int, total: int, title: str) -> float:
    say(f"\n=== [{n}/{total}] {title} ===")
    return time.time()


def run_cli(prog: str, main, argv: list[str]) -> None:
    """Print the equivalent command, run the CLI in this process, stop the demo if it fails."""
    quoted = [f"'{a}'" if any(c in a for c in "(),= ") else a for a in argv]
    say("$ " + " ".join([prog, *quoted]))
    if main(argv) != 0:
        raise SystemExit(f"demo: {prog} failed (see the message above)")


def teacher_files() -> dict[str, Path]:
    files = {t: ASSETS / f"demo_teacher_{t}.safetensors" for t in TEACHERS}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(
            f"demo: {missing[0]}: shipped demo teacher not found; reinstall the package, or train the "
            "teachers with scripts/train_demo_teachers.py --objective mim|sup --out unip_train/assets"
        )
    return files


def distilled_layer(model: dict, which: str) -> int:
    """The teacher's layer a row distils (1-based): selected, last, or the most local (highest NMI)."""
    if which == "selected":
        return int(model["selected_layer"])
    if which == "last":
        return int(model["depth"])
    return 1 + int(np.argmax([layer["nmi"] for layer in model["layers"]]))


def distil(
    out: Path, sel_path: Path, unlabelled: Path, layer: int, selected: int, p: Preset, teacher: str = "mim"
) -> Path:
    """NMI-HAD of ``teacher``'s ``layer`` into the student; returns the run folder."""
    run = out / (f"pretrain_layer{layer}" if teacher == "mim" else f"pretrain_{teacher}_layer{layer}")
    if not (run / "student.safetensors").exists():
        argv = ["--selection", str(sel_path), "--teacher", teacher]
        if layer != selected:  # the selected layer is what unip-pretrain reads from the file
            argv += ["--layer", str(layer)]
        argv += ["--student", STUDENT, "--img-size", str(IMG), "--infrared", str(unlabelled),
                 "--norm", "infrared", "--epochs", str(p.distill_epochs), "--warmup-epochs", "1",
                 "--batch-size", "64", "--accum-iter", "1", "--lr", "1e-3", "--workers", "0",
                 "--save-every", str(p.distill_epochs), "--ckpt-every", "0", "--no-progress",
                 "--out", str(run)]  # fmt: skip
        run_cli("unip-pretrain", pretrain_cli.main, argv + continue_or_replace(run))
    say(f"  {teacher} layer {layer}: distillation loss {loss_curve(run / 'log.jsonl')}")
    return run


def pad(out: Path, teacher: Path, unlabelled: Path, p: Preset) -> Path:
    """PAD continual pre-training of the MIM teacher. The shipped teacher holds no MAE decoder (only
    the encoder was kept), so a small fresh one is built: a departure PAD's run records."""
    run = out / "pretrain_pad"
    if not (run / "backbone.safetensors").exists():
        arch = safetensors_metadata(teacher)["arch"]
        argv = ["--method", "pad", "--init", f"timm:{arch}:{teacher}", "--decoder", "random",
                "--decoder-dim", "96", "--decoder-depth", "2", "--decoder-heads", "4", "--rois", "none",
                "--img-size", str(IMG), "--infrared", str(unlabelled), "--norm", "infrared",
                "--epochs", str(p.pad_epochs), "--warmup-epochs", "1",
                "--scale-frozen-epochs", str(max(1, round(0.6 * p.pad_epochs))), "--batch-size", "64",
                "--accum-iter", "1", "--lr", "1e-3", "--workers", "0", "--save-every",
                str(p.pad_epochs), "--ckpt-every", "0", "--no-progress", "--out", str(run)]  # fmt: skip
        run_cli("unip-pretrain", pretrain_cli.main, argv + continue_or_replace(run))
    say(f"  PAD: reconstruction loss {loss_curve(run / 'log.jsonl')}")
    return run


def continue_or_replace(run: Path) -> list[str]:
    """A pre-training folder the demo left unfinished: continued from its checkpoint (--resume), or
    replaced (--overwrite: the old files moved aside) when it got no checkpoint written."""
    if any((run / name).is_file() for name in (pretrain_cli.CHECKPOINT, pretrain_cli.OLD_CHECKPOINT)):
        return ["--resume"]
    return ["--overwrite"] if run.is_dir() and any(run.iterdir()) else []


def loss_curve(log: Path) -> str:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return f"{np.mean(losses[:5]):.4f} -> {np.mean(losses[-5:]):.4f} over {len(losses)} steps"


def make_plan(out: Path, soda: Path, backbones: list[dict], p: Preset) -> Path:
    """The unip-compare plan of the demo (JSON): the rows fine-tuned, the teachers probed by layer."""
    modes: list = [{"mode": "ft"}]
    if p.layerwise is not None:
        layerwise = p.layerwise if isinstance(p.layerwise, str) else list(p.layerwise)
        modes.append({"mode": "lp", "layerwise": layerwise, "options": {"iters": p.lp_iters, "lr": 1e-2}})
    plan = {
        "seeds": list(p.seeds),
        "baseline": "random",
        "layer_selection": str(out / "analysis" / selection.FILENAME),
        "finetune": {
            "iters": p.ft_iters,
            "img-size": IMG,
            "batch-size": 8,
            "lr": 8e-3,  # chosen at seed 0: 2e-3, 4e-3, 8e-3 raised every row (docs/demo.md)
            "warmup-iters": max(1, p.ft_iters // 10),
            "workers": 0,
            "log-every": 50,
        },  # fmt: skip
        "backbones": backbones,
        "datasets": [{"dataset": "soda", "root": str(soda)}],
        "modes": modes,
    }
    return atomic_write_text(out / "plan.json", json.dumps(plan, indent=2) + "\n")


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table(summary: list[dict], labels: dict[str, str], mode: str = "ft") -> list[str]:
    """The fine-tuning rows of summary.csv as a fixed-width table: mIoU per seed, mean, interval,
    the paired difference against random init at each seed, and unip-compare's verdict."""
    rows = [r for r in summary if r["mode"] == mode and not r["layer"]]
    width = max(len(labels.get(r["backbone"], r["backbone"])) for r in rows) + 2
    lines = [f"{'row':<{width}}{'mIoU mean [95% interval]':<28}{'vs random per seed':<30}verdict"]
    for r in rows:
        interval = f"{float(r['miou_mean']):.4f}"
        if r["miou_ci95_lo"]:
            interval += f" [{float(r['miou_ci95_lo']):.3f}, {float(r['miou_ci95_hi']):.3f}]"
        diffs = " ".join(f"{float(d.split(':')[1]):+.4f}" for d in r["diff_per_seed"].split()) or "-"
        lines.append(
            f"{labels.get(r['backbone'], r['backbone']):<{width}}{interval:<28}{diffs:<30}{r['verdict']}"
        )
    return lines


def readme_table(summary: list[dict], mode: str = "ft") -> str:
    """The README's demo table, from the rows of the demo's summary.csv (as :func:`read_summary`
    gives them): per fine-tuned row, mean mIoU with its 95% interval, the difference to random init
    at each seed, and unip-compare's paired t-test of it (interval, p, verdict)."""
    rows = [r for r in summary if r["mode"] == mode and not r["layer"]]
    if not rows:
        raise SpecError(f"the demo's summary has no {mode!r} rows to put in the README table")
    tests = list(dict.fromkeys(r["test"] for r in rows if r["test"]))
    lines = [
        f"Rendered from [`{DEMO_SUMMARY}`]({DEMO_SUMMARY}) (the run's `summary.csv`) by "
        f"`python -m unip_train.demo --readme README.md`. LL-FPN fine-tuning, seeds "
        f"{', '.join(rows[0]['seeds'].split())}, paired against random init; "
        f"verdict: {'; '.join(tests) or 'no paired test'}, a difference called only when the interval excludes 0.",
        "",
        "| row | backbone | mean mIoU [95% interval] | minus random init, per seed "
        "| difference [95% interval] | p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mean = f"{float(r['miou_mean']):.3f}"
        if r["miou_ci95_lo"]:
            mean += f" [{float(r['miou_ci95_lo']):.3f}, {float(r['miou_ci95_hi']):.3f}]"
        per_seed = " ".join(d.split(":")[1] for d in r["diff_per_seed"].split())
        diff = f"{float(r['diff_mean']):+.4f}" if r["diff_mean"] else ""
        if r["diff_ci95_lo"]:
            diff += f" [{float(r['diff_ci95_lo']):+.4f}, {float(r['diff_ci95_hi']):+.4f}]"
        cells = [r["backbone"], ROW_BACKBONES.get(r["backbone"], ""), mean, per_seed, diff,
                 format_p(r["diff_p"]), r["verdict"]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ablation = ablation_rows(rows)
    if ablation:
        lines += [
            "",
            "The paper's central ablation, per teacher: the student distilled from the selected (hybrid) "
            "layer minus the one distilled from the last layer, paired by seed (the same paired t-test).",
            "",
            "| teacher | selected minus last, per seed | difference [95% interval] | p | verdict |",
            "|---|---|---|---|---|",
            *ablation,
        ]
    return "\n".join(lines) + "\n"


def ablation_rows(rows: list[dict]) -> list[str]:
    """Selected-layer student minus last-layer student, per seed, for each teacher whose two rows the
    summary holds. Both rows' differences to random init share the seed's random-init run, so their
    difference is the two students' own paired difference."""
    by_name = {r["backbone"]: r for r in rows}
    out = []
    for teacher, (sel, last) in ABLATIONS.items():
        if sel not in by_name or last not in by_name:
            continue
        per_seed = {}
        for name, sign in ((sel, 1.0), (last, -1.0)):
            for item in by_name[name]["diff_per_seed"].split():
                seed, value = item.split(":")
                per_seed.setdefault(seed, []).append(sign * float(value))
        diffs = {seed: sum(v) for seed, v in per_seed.items() if len(v) == 2}
        test = paired_t(list(diffs.values()))
        cells = [
            teacher,
            " ".join(f"{seed}:{d:+.4f}" for seed, d in diffs.items()),
            f"{test.mean:+.4f} [{test.lo:+.4f}, {test.hi:+.4f}]",
            format_p(test.p),
            test.verdict,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def readme_block(readme: Path) -> tuple[str, str, str]:
    """The README's text before, between and after the demo-table markers."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(
            f"{readme}: cannot read the README ({e.strerror}); pass the README.md to update"
        ) from None
    if (
        text.count(TABLE_START) != 1
        or text.count(TABLE_END) != 1
        or text.index(TABLE_START) > text.index(TABLE_END)
    ):
        raise SpecError(
            f"{readme}: expected one {TABLE_START} line and, after it, one {TABLE_END} line around the "
            "demo table; add them where the table goes"
        )
    head, rest = text.split(TABLE_START)
    body, tail = rest.split(TABLE_END)
    return head, body, tail


def write_readme_table(readme: Path, summary_csv: Path) -> tuple[Path, Path]:
    """Copy ``summary_csv`` to ``figures/demo_summary.csv`` beside ``readme`` and render the table
    between the README's markers from that copy; both written atomically. Returns both paths."""
    head, _, tail = readme_block(readme)
    copy = atomic_write_text(readme.parent / DEMO_SUMMARY, summary_csv.read_text(encoding="utf-8"))
    table_md = readme_table(read_summary(copy))
    atomic_write_text(readme, f"{head}{TABLE_START}\n{table_md}{TABLE_END}{tail}")
    return readme, copy


def layerwise_lines(summary: list[dict], doc: dict) -> list[str]:
    """Per teacher: probe mIoU by layer beside the layer's NMI and pattern, and where each peaks."""
    lines = []
    for name in TEACHERS:
        rows = sorted(
            (r for r in summary if r["backbone"] == f"{name}_teacher" and r["layer"]),
            key=lambda r: int(r["layer"]),
        )
        if not rows:
            continue
        layers = {lay["layer"]: lay for lay in doc["models"][name]["layers"]}
        cells = [
            f"L{r['layer']} {float(r['miou_mean']):.3f} ({layers[int(r['layer'])]['pattern'][0]})"
            for r in rows
        ]
        best = max(rows, key=lambda r: float(r["miou_mean"]))
        lines.append(
            f"  {name}: " + "  ".join(cells) + f"  -> probing peaks at layer {best['layer']}, "
            f"selected layer {doc['models'][name]['selected_layer']}"
        )
    return lines


def synthetic_data(out: Path, p: Preset) -> tuple[Path, Path]:
    """Stage 1: the unlabelled scenes and the labelled SODA-layout task (kept when already there)."""
    t = stage(1, DEMO_STAGES, "synthetic infrared task: many unlabelled scenes, a few labelled ones")
    unlabelled = out / "data" / "unlabelled"
    soda = out / "data" / "soda"
    if not (soda / "test_infrared.txt").exists():
        demo_task.generate_unlabelled(unlabelled, p.unlabelled, IMG, seed=1)
        demo_task.generate_labelled(soda, p.train, p.test, IMG, seed=2)
    say(
        f"{p.unlabelled} unlabelled scenes in {unlabelled}; {p.train} labelled train / {p.test} test "
        f"scenes (SODA layout) in {soda} ({time.time() - t:.0f}s)"
    )
    return unlabelled, soda


def analyze_teachers(out: Path, unlabelled: Path, p: Preset) -> tuple[dict[str, Path], dict, Path]:
    """Stage 2: unip-analyze of the shipped teachers (unless done); returns the teachers' files, the
    selection document and its path."""
    t = stage(2, DEMO_STAGES, "attention analysis of the two shipped teachers (unip-analyze)")
    teachers = teacher_files()
    sel_path = out / "analysis" / selection.FILENAME
    if not sel_path.exists():
        argv = []
        for name, path in teachers.items():
            meta = safetensors_metadata(path)
            say(f"teacher {name}: {meta.get('objective', '?')}, {meta.get('steps', '?')} steps")
            argv += ["--checkpoint", f"{name}=timm:{meta['arch']}:{path}"]
        argv += ["--images", str(unlabelled), "--img-size", str(IMG), "--norm", "infrared",
                 "--num-images", str(p.analysis_images), "--batch-size", "32", "--map-images", "1",
                 "--no-progress", "--out", str(out / "analysis")]  # fmt: skip
        run_cli("unip-analyze", analyze_cli.main, argv)
    doc = selection.read(sel_path)
    for name, m in doc["models"].items():
        curve = " ".join(f"{lay['nmi']:.3f}{lay['pattern'][0]}" for lay in m["layers"])
        say(
            f"  {name}: NMI by layer (l/h/g = local/hybrid/global) {curve} -> selected layer {m['selected_layer']}"
        )
    say(f"({time.time() - t:.0f}s)")
    return teachers, doc, sel_path


def pretrain_rows(
    out: Path, doc: dict, sel_path: Path, teachers: dict[str, Path], unlabelled: Path, p: Preset
) -> tuple[list[dict], dict[str, str]]:
    """Stage 3: distil (or reuse) every row's student; returns the comparison's backbones and the
    rows' display labels."""
    t = stage(3, DEMO_STAGES, "pre-training: NMI-HAD students of the MIM teacher, PAD (unip-pretrain)")
    mim = doc["models"]["mim"]
    selected = distilled_layer(mim, "selected")
    ablation, ablation_row = distilled_layer(mim, "last"), "last"
    if ablation == selected:
        ablation, ablation_row = distilled_layer(mim, "local"), "local"
        if "last" in p.rows:
            say(
                f"  the MIM teacher's last layer ({mim['depth']}) is its selected layer: the last-layer "
                f"ablation would repeat the selected row, so the ablation row distils its most local "
                f"layer ({ablation}) instead"
            )
    labels = {"random": "random init", "selected": f"NMI-HAD, layer {selected} (selected)",
              "teacher": "MIM teacher", "last": f"NMI-HAD, layer {ablation} (last)",
              "local": f"NMI-HAD, layer {ablation} (most local)", "pad": "PAD of the MIM teacher",
              "selected_pixl": f"NMI-HAD, layer {selected} + PiXL", "mim_teacher": "MIM teacher (probe)",
              "sup_teacher": "supervised teacher (probe)"}  # fmt: skip
    sup = doc["models"]["sup"]
    sup_layers = {"sup_selected": distilled_layer(sup, "selected"), "sup_last": distilled_layer(sup, "last")}
    labels["sup_selected"] = f"NMI-HAD of sup, layer {sup_layers['sup_selected']} (selected)"
    labels["sup_last"] = f"NMI-HAD of sup, layer {sup_layers['sup_last']} (last)"
    arch = safetensors_metadata(teachers["mim"])["arch"]
    backbones: list[dict] = []
    ft_only = ["ft"]
    for row in p.rows:
        if row == "random":
            backbones.append({"name": "random", "backbone": f"random:{STUDENT}", "modes": ft_only})
        elif row in ("selected", "selected_pixl"):
            entry = {"name": row, "backbone": str(distil(out, sel_path, unlabelled, selected, selected, p))}
            if row == "selected_pixl":
                entry["options"] = {"pixel-loss": "pixl"}
            backbones.append({**entry, "modes": ft_only})
        elif row == "last":
            run_dir = distil(out, sel_path, unlabelled, ablation, selected, p)
            backbones.append({"name": ablation_row, "backbone": str(run_dir), "modes": ft_only})
        elif row == "teacher":
            backbones.append(
                {"name": "teacher", "backbone": f"timm:{arch}:{teachers['mim']}", "modes": ft_only}
            )
        elif row in sup_layers:
            if sup_layers["sup_selected"] == sup_layers["sup_last"] and row == "sup_last":
                say(
                    "  the supervised teacher selects its last layer: the sup_last row would repeat sup_selected"
                )
                continue
            run_dir = distil(out, sel_path, unlabelled, sup_layers[row], sup_layers["sup_selected"], p, "sup")
            backbones.append({"name": row, "backbone": str(run_dir), "modes": ft_only})
        elif row == "pad":
            backbones.append({"name": "pad", "backbone": str(pad(out, teachers["mim"], unlabelled, p)), "modes": ft_only})  # fmt: skip
    if p.layerwise is not None:
        for name in p.probed:
            backbones.append({"name": f"{name}_teacher", "backbone": f"timm:{arch}:{teachers[name]}",
                              "selection_model": name, "modes": ["lp-layerwise"]})  # fmt: skip
    say(f"({time.time() - t:.0f}s)")
    return backbones, labels


def fine_tune_rows(out: Path, soda: Path, backbones: list[dict], p: Preset, jobs: int | None) -> None:
    """Stage 4: unip-compare over every row (fine-tuning) and teacher (layer-wise probing)."""
    t = stage(
        4,
        DEMO_STAGES,
        "fine-tuning (LL-FPN) of every row and layer-wise probing of the teachers (unip-compare)",
    )
    plan = make_plan(out, soda, backbones, p)
    jobs = jobs or max(1, min(2, available_cores()))
    run_cli(
        "unip-compare",
        compare_cli.main,
        ["--plan", str(plan), "--out", str(out / "compare"), "--jobs", str(jobs)],
    )
    say(f"({time.time() - t:.0f}s)")


def print_summary(out: Path, doc: dict, labels: dict[str, str], p: Preset) -> list[dict]:
    """Stage 5: the teachers' profiles, the fine-tuning table, the ablation and the layer-wise probe;
    returns the summary rows."""
    stage(5, DEMO_STAGES, "summary")
    summary = read_summary(out / "compare" / "summary.csv")
    from unip_analysis.report import compare_profiles

    for line in compare_profiles(doc):
        say(line)
    say(
        f"\nLL-FPN fine-tuning on {p.train} labelled scenes, {p.ft_iters} iterations, seeds "
        f"{', '.join(map(str, p.seeds))} (paired: a seed fixes the head's init and the data order):"
    )
    for line in table(summary, labels):
        say("  " + line)
    ablation = ablation_rows([r for r in summary if r["mode"] == "ft" and not r["layer"]])
    if ablation:
        say("\nselected-layer student minus last-layer student, per teacher (paired by seed):")
        for line in ablation:
            say("  " + line)
    probe = layerwise_lines(summary, doc)
    if probe:
        say("\nlayer-wise linear probing of the teachers (mIoU, mean over seeds; pattern of the layer):")
        for line in probe:
            say(line)
    return summary


def copy_figures(out: Path, figures_dir: Path) -> None:
    """Copy the analysis and comparison figures into ``figures_dir``."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    for png in [
        *(out / "analysis" / "figures").glob("*.png"),
        *(out / "compare" / "figures").glob("*.png"),
    ]:
        shutil.copy2(png, figures_dir / png.name)
    say(f"figures copied to {figures_dir}")


def run(
    out: Path,
    preset: str = "demo",
    rows: tuple[str, ...] | None = None,
    jobs: int | None = None,
    figures_dir: Path | None = None,
    readme: Path | None = None,
) -> dict:
    """Run the demo into ``out``; returns the selection document, the summary rows and the time.
    ``readme``: also render the fine-tuning table into that README (:func:`write_readme_table`)."""
    t_start = time.time()
    p = PRESETS[preset]
    if rows is not None:
        p = replace(p, rows=rows)
    out = Path(out).resolve()
    if readme is not None:
        readme_block(readme)  # a README without the markers fails now, not after the run
    out.mkdir(parents=True, exist_ok=True)

    unlabelled, soda = synthetic_data(out, p)
    teachers, doc, sel_path = analyze_teachers(out, unlabelled, p)
    backbones, labels = pretrain_rows(out, doc, sel_path, teachers, unlabelled, p)
    fine_tune_rows(out, soda, backbones, p, jobs)
    summary = print_summary(out, doc, labels, p)

    if figures_dir is not None:
        copy_figures(out, figures_dir)
    if readme is not None:
        _, copy = write_readme_table(readme, out / "compare" / "summary.csv")
        say(f"README table rendered into {readme} from {copy}")
    say(f"\nanalysis report: {out / 'analysis' / 'report.html'}")
    say(f"comparison report: {out / 'compare' / 'report.html'}")
    seconds = time.time() - t_start
    say(f"demo ({preset}) finished in {seconds / 60:.1f} min")
    return {"selection": doc, "summary": summary, "labels": labels, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="demo: random vs selected (make demo, ~10 min on 2 cores); experiment: every row "
        "(make experiment, ~40 min); quick: tiny settings (the test suite)",
    )
    ap.add_argument("--rows", help=f"comma-separated rows, overriding the preset's ({','.join(ROWS)})")
    ap.add_argument("--jobs", type=int, help="fine-tuning cells at a time (default: min(2, cores))")
    ap.add_argument("--figures-dir", type=Path, help="also copy the figures here (make figures)")
    ap.add_argument(
        "--readme",
        type=Path,
        help=f"also render the fine-tuning table between this README's {TABLE_START} / {TABLE_END} "
        f"markers, from a copy of summary.csv written to {DEMO_SUMMARY} beside it (make experiment, make figures)",
    )
    args = ap.parse_args(argv)
    rows = None
    if args.rows:
        rows = tuple(args.rows.split(","))
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            ap.error(f"--rows {','.join(unknown)}: expected some of {','.join(ROWS)}")
        if "random" not in rows:
            ap.error("--rows must include random (the baseline of the paired differences)")
    try:
        run(
            args.out,
            preset=args.preset,
            rows=rows,
            jobs=args.jobs,
            figures_dir=args.figures_dir,
            readme=args.readme,
        )
    except SpecError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
