"""unip-compare: the plan parser (good plans, every kind of bad input), the summary statistics against
a hand computation, the figures, and real runs of tiny cells: two at a time, skipped when finished,
refused when the plan changed, resumed after a SIGKILL (equal to the uninterrupted run), and
through submitit's local executor."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from unip_analysis import selection
from unip_analysis.checkpoints import build_vit, load_backbone
from unip_analysis.errors import UnipError
from unip_train.compare import (
    PlanError,
    build_outputs,
    load_plan,
    paired_t,
    plan_from_dict,
    plot_layerwise,
    render_figures,
    run_plan,
    summarize,
    t_interval,
)
from unip_train.compare.backbones import random_init_bytes
from unip_train.compare.cells import RECORD, canonical_options, prepare
from unip_train.compare.cli import main
from unip_train.compare.execution import device_slots, estimate_remaining
from unip_train.synthetic import generate

TINY = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"
# The settings of every real cell here: a handful of iterations on 32 px crops.
CELL_OPTIONS = {
    "iters": 4, "crop": 32, "batch-size": 4, "workers": 0, "head-channels": 8, "lr": 1e-3,
    "ckpt-every": 2, "log-every": 1,
}  # fmt: skip
T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (from a table)


# --- fixtures: a tiny backbone, a synthetic SODA-layout dataset, a selection file -------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """tiny.safetensors (timm), a unip-pretrain-like run folder, a PAD-like one, SODA-layout data
    and a layer_selection.json naming the tiny model."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_vit(TINY, img_size=32).state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    (root / "student_run").mkdir()
    save_file(state, str(root / "student_run" / "student.safetensors"))
    (root / "student_run" / "student.json").write_text(json.dumps({"arch": TINY, "heads_per_layer": [2] * 4}))
    (root / "pad_run").mkdir()
    save_file(state, str(root / "pad_run" / "backbone.safetensors"))
    (root / "pad_run" / "backbone.json").write_text(json.dumps({"arch": TINY, "family": "timm"}))
    generate(root / "soda", "soda", n_train=8, n_test=3, size=48, seed=0)
    selection.write(root / "layer_selection.json", selection_doc({"tiny": [0.30, 0.12, 0.06, 0.01]}))
    return root


def selection_doc(models: dict[str, list[float]]) -> dict:
    """A valid layer_selection.json document with the given layer NMI per model (2 heads a layer)."""
    th = {"global_max": 0.02, "local_min": 0.2}

    def pattern(v: float) -> str:
        return "global" if v <= th["global_max"] else "local" if v >= th["local_min"] else "hybrid"

    entries = {}
    for name, nmis in models.items():
        hybrid = [i + 1 for i, v in enumerate(nmis) if pattern(v) == "hybrid"]
        entries[name] = {
            "family": "timm", "arch": TINY, "weights": "tiny.safetensors", "weights_sha256": "0" * 64,
            "depth": len(nmis), "embed_dim": 64, "patch_size": 8, "num_prefix_tokens": 1,
            "heads_per_layer": [2] * len(nmis),
            "layers": [
                {"layer": i + 1, "nmi": v, "nmi_ci95": [v * 0.9, v * 1.1], "attn_distance": 4.0 + i,
                 "pattern": pattern(v), "head_nmi": [v, v]}
                for i, v in enumerate(nmis)
            ],
            "selected_layer": hybrid[-1] if hybrid else None, "selected_heads": 2 if hybrid else None,
            "selection_rule": "deepest hybrid layer",
        }  # fmt: skip
    doc = {
        "schema_version": 1, "generator": "test", "created": "2025-01-01T00:00:00Z", "thresholds": th,
        "images": {"dir": "imgs", "count": 4, "img_size": 32, "norm": "infrared"}, "models": entries,
    }  # fmt: skip
    return selection.validate(doc)


def base_plan(assets: Path, **changes) -> dict:
    """A plan (as the JSON / TOML file holds it): random init (the baseline) and the tiny
    checkpoint, LL-FPN fine-tuning on SODA, seed 0."""
    plan = {
        "seeds": [0],
        "baseline": "random",
        "finetune": dict(CELL_OPTIONS),
        "backbones": [
            {"name": "random", "backbone": f"random:{TINY}"},
            {"name": "tiny", "backbone": f"timm:{TINY}:{assets / 'tiny.safetensors'}"},
        ],
        "datasets": [{"dataset": "soda", "root": str(assets / "soda")}],
        "modes": ["ft"],
    }
    plan.update(changes)
    return plan


def write_plan(folder: Path, plan: dict, name: str = "plan.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(plan, indent=2))
    return path


# --- the plan --------------------------------------------------------------------------------------

FULL_TOML = """
seeds = [3, 1]
baseline = "random"
layer_selection = "layer_selection.json"

[finetune]
iters = 4
crop = 32
lr = 0.001

[[backbones]]
name = "tiny"
backbone = "timm:{tiny}:tiny.safetensors"
options = {{ resplit-last-heads = true, lr = 0.002 }}

[[backbones]]
name = "random"
backbone = "random:{tiny}"

[[backbones]]
name = "student"
backbone = "student_run"
selection_model = "tiny"

[[backbones]]
name = "pad"
backbone = "pad_run"

[[datasets]]
name = "soda_small"
dataset = "soda"
root = "soda"
options = {{ batch_size = 4 }}

[[modes]]
mode = "ft"
options = {{ neck = "multi-layer" }}

[[modes]]
mode = "lp"
layers = [2, 4]

[[modes]]
mode = "lp"
layerwise = "all"
"""


def test_good_plan_in_toml_json_and_yaml_expands_to_the_same_cells(assets: Path):
    toml_path = assets / "full.toml"
    toml_path.write_text(FULL_TOML.format(tiny=TINY))
    plan = load_plan(toml_path)
    assert [r.name for r in plan.rows] == ["tiny", "random", "student", "pad"]
    assert plan.rows[2].backbone.family == "unip" and plan.rows[2].backbone.path.name == "student.safetensors"
    assert plan.rows[3].backbone.family == "timm"  # from backbone.json beside the weights
    cells = plan.cells()
    # 2 seeds x 4 rows x (ft + lp on 2,4 + 4 layer-wise probes)
    assert len(cells) == 2 * 4 * 6
    assert [c.seed for c in cells[:24]] == [3] * 24  # seeds outermost, in plan order
    assert cells[0].row.name == "random"  # the baseline first in each group
    layerwise = [c for c in cells if c.mode.is_layerwise and c.row.name == "tiny" and c.seed == 1]
    assert [c.layer for c in layerwise] == [1, 2, 3, 4]
    assert str(layerwise[1].folder) == "cells/soda_small/tiny/lp-layerwise_L02/seed1"

    runs = {r.label: r for r in prepare(plan, assets / "out_never_written", write=False)}
    assert not (assets / "out_never_written").exists()
    tiny_ft = runs["soda_small/tiny/ft/seed3"].argv
    # common < dataset < mode < row; options sorted by name, flags bare
    assert tiny_ft[tiny_ft.index("--lr") + 1] == "0.002"
    assert tiny_ft[tiny_ft.index("--neck") + 1] == "multi-layer"
    assert tiny_ft[tiny_ft.index("--batch-size") + 1] == "4"
    assert "--resplit-last-heads" in tiny_ft and "--layers" not in tiny_ft
    assert tiny_ft[tiny_ft.index("--data-root") + 1] == str((assets / "soda").resolve())
    probe = runs["soda_small/random/lp-layerwise_L03/seed1"].argv
    assert probe[probe.index("--layers") + 1] == "3" and probe[probe.index("--mode") + 1] == "lp"
    assert (
        runs["soda_small/pad/lp/seed1"].argv[runs["soda_small/pad/lp/seed1"].argv.index("--layers") + 1]
        == "2,4"
    )

    as_json = tomllib_load(toml_path)
    same = plan_from_dict(as_json, assets)
    assert [c.label for c in same.cells()] == [c.label for c in cells]
    # YAML too, read by the same machinery as every command's --config file.
    import yaml

    yaml_path = assets / "full.yaml"
    yaml_path.write_text(yaml.safe_dump(as_json))
    from_yaml = load_plan(yaml_path).cells()
    assert [(c.label, c.options) for c in from_yaml] == [(c.label, c.options) for c in cells]


def test_a_row_can_run_a_subset_of_the_modes(assets: Path):
    """``modes = [...]`` in a row: that row's cells exist in those modes only (layer-wise probing of
    some rows without probing every row at every layer)."""
    plan = plan_from_dict(
        base_plan(
            assets,
            backbones=[
                {"name": "random", "backbone": f"random:{TINY}"},
                {
                    "name": "tiny",
                    "backbone": f"timm:{TINY}:{assets / 'tiny.safetensors'}",
                    "modes": ["lp-layerwise"],
                },
            ],
            modes=["ft", {"mode": "lp", "layerwise": "all"}],
        ),
        assets,
    )
    labels = [c.label for c in plan.cells()]
    assert "soda/random/ft/seed0" in labels and "soda/tiny/lp-layerwise_L02/seed0" in labels
    assert not any(label.startswith("soda/tiny/ft/") for label in labels)
    assert sum(label.startswith("soda/random/lp-layerwise") for label in labels) == 4


def test_option_aliases_name_the_same_option(assets: Path):
    """unip-finetune's loader option is --workers, with --num-workers its old spelling: a plan may use
    either, and the cells' arguments do not depend on which."""
    cells = {
        spelling: plan_from_dict(
            base_plan(
                assets, finetune={**{k: v for k, v in CELL_OPTIONS.items() if k != "workers"}, spelling: 0}
            ),
            assets,
        ).cells()
        for spelling in ("num-workers", "num_workers", "workers")
    }
    assert {c[0].options["workers"] for c in cells.values()} == {0}
    assert len({tuple(sorted(c[0].options)) for c in cells.values()}) == 1
    # A cell recorded with the old spellings is the same cell as today's (not refused as changed).
    old = ["--crop", "32", "--num-workers", "0", "--amp", "none", "--no-progress"]
    new = ["--img-size", "32", "--workers", "0", "--precision", "fp32", "--no-progress"]
    assert canonical_options(old) == canonical_options(new)
    assert canonical_options(new) != canonical_options(
        ["--img-size", "64", "--workers", "0", "--no-progress"]
    )


def tomllib_load(path: Path) -> dict:
    from unip_analysis.command import read_config_file

    return read_config_file(path)


def test_random_init_is_a_seeded_timm_file(tmp_path: Path):
    a, b, c = random_init_bytes(TINY, 0), random_init_bytes(TINY, 0), random_init_bytes(TINY, 1)
    assert a == b and a != c
    path = tmp_path / "r.safetensors"
    path.write_bytes(a)
    loaded = load_backbone("timm", TINY, path, img_size=32)  # an ordinary timm checkpoint
    assert loaded.depth == 4
    assert not torch.equal(load_file(str(path))["blocks.0.attn.qkv.weight"], torch.zeros(192, 64))


def _bad(assets: Path):
    """(what is wrong, plan change, expected message fragment): one per kind of bad input."""
    ok = base_plan(assets)
    rows = ok["backbones"]
    return [
        ("unknown family", {"backbones": [{"name": "x", "backbone": f"foo:{TINY}:{assets / 'tiny.safetensors'}"}]},
         r"backbones\[0\] 'x': .*unknown family 'foo'"),
        ("missing weights", {"backbones": [{"name": "x", "backbone": f"timm:{TINY}:nope.safetensors"}]},
         r"backbones\[0\] 'x': .*nope.safetensors not found"),
        ("run folder without json", {"backbones": [{"name": "x", "backbone": str(assets / "soda")}]},
         r"backbones\[0\] 'x': .*must hold student.safetensors \+ student.json"),
        ("not a timm model", {"backbones": [{"name": "x", "backbone": "random:vit_nonexistent_patch16"}]},
         r"backbones\[0\] 'x': architecture 'vit_nonexistent_patch16' is not a timm model"),
        ("backbone without name", {"backbones": [{"backbone": f"random:{TINY}"}]},
         r"backbones\[0\]: needs 'name' and 'backbone'"),
        ("duplicate name", {"backbones": [rows[0], rows[0]]}, r"backbones\[1\]: name 'random' is used twice"),
        ("name not usable as a folder", {"backbones": [{"name": "a/b", "backbone": f"random:{TINY}"}]},
         r"backbones\[0\]: name 'a/b' must be letters"),
        ("unknown dataset", {"datasets": [{"dataset": "cityscapes", "root": str(assets)}]},
         r"datasets\[0\]: dataset 'cityscapes' is not a unip-finetune layout"),
        ("missing root", {"datasets": [{"dataset": "soda", "root": str(assets / "nowhere")}]},
         r"datasets\[0\] 'soda': root .*nowhere is not a folder"),
        ("root of another layout", {"datasets": [{"dataset": "mfnet", "root": str(assets / "soda")}]},
         r"datasets\[0\] 'mfnet': .*train.txt not found"),
        ("unknown mode", {"modes": ["finetune"]}, r"modes\[0\]: mode 'finetune': expected ft"),
        ("layer-wise fine-tuning", {"modes": [{"mode": "ft", "layerwise": [1]}]}, r"modes\[0\]: layerwise is for mode lp"),
        ("layer too deep", {"modes": [{"mode": "lp", "layers": [2, 9]}]}, r"modes\[0\] 'lp': layer 9 is deeper than backbone 'random' \(4 blocks\)"),
        ("row mode not in the plan", {"backbones": [{**rows[0], "modes": ["lp"]}]},
         r"backbones\[0\] 'random': modes 'lp' not in the plan's modes \(ft\)"),
        ("row modes not a list", {"backbones": [{**rows[0], "modes": "ft"}]},
         r"backbones\[0\] 'random': modes must be a list"),
        ("baseline not a row", {"baseline": "mae"}, r"baseline 'mae' is not the name of a backbones entry"),
        ("seeds", {"seeds": [0, 0]}, r"seeds must be a list of distinct"),
        ("unknown option", {"finetune": {"iterations": 4}}, r"\[finetune\]: --iterations is not a unip-finetune option"),
        ("option compare sets", {"finetune": {"seed": 3}}, r"\[finetune\]: option 'seed' is set by the plan's seeds"),
        ("option value", {"finetune": {"iters": "many"}}, r"\[finetune\]: --iters 'many': expected an integer$"),
        ("flag value", {"backbones": [{**rows[0], "options": {"resplit-last-heads": "yes"}}]},
         r"backbones\[0\] 'random': --resplit-last-heads is a flag"),
        ("unknown key", {"backbones": [{**rows[0], "weights": "x"}]}, r"backbones\[0\]: unknown key\(s\) weights"),
        ("unknown top-level key", {"seed": [0]}, r"top level: unknown key\(s\) seed"),
        ("missing selection file", {"layer_selection": "none.json"}, r"layer_selection: .*none.json: selection file not found"),
        ("selection model absent", {"layer_selection": str(assets / "layer_selection.json"),
                                    "backbones": [{**rows[0], "selection_model": "mae"}]},
         r"backbones\[0\] 'random': selection_model 'mae' is not in"),
    ]  # fmt: skip


def test_every_kind_of_bad_plan_is_one_line_naming_the_entry_and_exit_2(assets: Path, tmp_path: Path, capsys):
    for what, change, message in _bad(assets):
        path = write_plan(tmp_path / "plans", base_plan(assets, **change), f"{what.replace(' ', '_')}.json")
        with pytest.raises(PlanError, match=message):
            load_plan(path)
        out = tmp_path / "out"
        assert main(["--plan", str(path), "--out", str(out)]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith(f"unip-compare: error: {path.name}: ") and err.count("\n") == 1, (what, err)
        assert not out.exists(), what  # checked before anything ran or was written

    syntax = tmp_path / "broken.toml"
    syntax.write_text("seeds = [0\n")
    assert main(["--plan", str(syntax), "--out", str(tmp_path / "out")]) == 2
    assert "broken.toml: cannot parse the plan" in capsys.readouterr().err
    assert main(["--plan", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.toml: plan file not found" in capsys.readouterr().err
    no_rows = write_plan(tmp_path, {k: v for k, v in base_plan(assets).items() if k != "backbones"})
    with pytest.raises(PlanError, match="no 'backbones' list"):
        load_plan(no_rows)


# --- statistics against a hand computation ---------------------------------------------------------


def hand_results() -> pd.DataFrame:
    rows = []
    for backbone, mious in {
        "rand": [0.50, 0.52, 0.54],
        "dist": [0.55, 0.56, 0.60],  # +0.05 +0.04 +0.06 at seeds 0 1 2
        "mixed": [0.49, 0.53, 0.55],  # -0.01 +0.01 +0.01
    }.items():
        for seed, m in enumerate(mious):
            rows.append(
                {
                    "backbone": backbone,
                    "dataset": "soda",
                    "mode": "ft",
                    "layer": None,
                    "seed": seed,
                    "miou": m,
                }
            )
    rows.append({"backbone": "late", "dataset": "soda", "mode": "ft", "layer": None, "seed": 2, "miou": 0.40})
    for layer, (a, b) in {1: (0.30, 0.20), 2: (0.34, 0.25)}.items():
        for seed in (0, 1):
            rows.append(
                {
                    "backbone": "rand",
                    "dataset": "soda",
                    "mode": "lpw",
                    "layer": layer,
                    "seed": seed,
                    "miou": b + 0.01 * seed,
                }
            )
            rows.append(
                {
                    "backbone": "dist",
                    "dataset": "soda",
                    "mode": "lpw",
                    "layer": layer,
                    "seed": seed,
                    "miou": a - 0.02 * seed,
                }
            )
    return pd.DataFrame(rows)


def test_summary_means_intervals_and_paired_differences_match_a_hand_computation():
    s = summarize(hand_results(), baseline="rand")
    row = {(r.backbone, r.mode, None if pd.isna(r.layer) else int(r.layer)): r for r in s.itertuples()}
    dist = row[("dist", "ft", None)]
    # mean 0.57; sd = sqrt((0.02^2 + 0.01^2 + 0.03^2) / 2) = sqrt(0.0007)
    half = T_975_DF2 * math.sqrt(0.0007) / math.sqrt(3)
    assert dist.miou_mean == pytest.approx(0.57) and dist.n_seeds == 3
    assert (dist.miou_ci95_lo, dist.miou_ci95_hi) == pytest.approx((0.57 - half, 0.57 + half))
    # differences 0.05 0.04 0.06: mean 0.05, sd 0.01
    dhalf = T_975_DF2 * 0.01 / math.sqrt(3)
    assert dist.diff_mean == pytest.approx(0.05)
    assert (dist.diff_ci95_lo, dist.diff_ci95_hi) == pytest.approx((0.05 - dhalf, 0.05 + dhalf))
    assert dist.diff_per_seed == "0:+0.0500 1:+0.0400 2:+0.0600"
    # t = 0.05 / (0.01 / sqrt(3)) = 8.66 on 2 degrees of freedom: p = 0.0131; the interval excludes 0
    assert dist.diff_p == pytest.approx(0.013072457560346393, rel=1e-9)
    assert dist.verdict == "higher" and dist.test == "paired t-test over 3 seeds, 95% interval"
    mixed = row[("mixed", "ft", None)]  # -0.01 +0.01 +0.01: two of three seeds higher, interval spans 0
    assert mixed.verdict == "no clear difference"
    assert mixed.diff_mean == pytest.approx(0.01 / 3)
    assert mixed.diff_ci95_lo < 0 < mixed.diff_ci95_hi and mixed.diff_p > 0.05
    late = row[("late", "ft", None)]  # one seed, paired with the baseline's seed 2 only
    assert late.n_paired == 1 and late.diff_mean == pytest.approx(-0.14)
    assert math.isnan(late.miou_ci95_lo) and math.isnan(late.diff_ci95_lo) and math.isnan(late.diff_p)
    assert late.verdict == "too few seeds" and late.test == ""
    base = row[("rand", "ft", None)]
    assert base.verdict == "baseline" and base.n_paired == 0 and math.isnan(base.diff_mean)
    # layer-wise cells are paired layer by layer: dist - rand = 0.10 - 0.03 * seed at layer 1
    l1 = row[("dist", "lpw", 1)]
    # both seeds higher, but 2 seeds are too few to call it
    assert l1.diff_per_seed == "0:+0.1000 1:+0.0700" and l1.verdict == "too few seeds"
    assert row[("dist", "lpw", 2)].diff_mean == pytest.approx((0.09 + 0.06) / 2)
    # without a baseline: means only
    alone = summarize(hand_results(), baseline=None)
    assert (alone["verdict"] == "").all() and alone["diff_mean"].isna().all()


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy, constant differences
def test_paired_t_matches_scipys_ttest_rel_and_calls_only_what_the_interval_supports():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.6, 5)
    seen = set()
    for shift, noise in [(0.02, 0.01), (-0.03, 0.02), (0.0, 0.02), (0.004, 0.03)]:
        row = base + shift + rng.normal(0, noise, 5)
        test = paired_t(row - base)
        ref = stats.ttest_rel(row, base)
        ci = ref.confidence_interval(0.95)
        assert test.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert (test.lo, test.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)
        expected = "higher" if ci.low > 0 else "lower" if ci.high < 0 else "no clear difference"
        assert test.verdict == expected and (test.p < 0.05) == (expected != "no clear difference")
        seen.add(expected)
    assert seen == {"higher", "lower", "no clear difference"}
    # a constant +1 at every seed: the interval is the point 1, p 0 (ttest_rel says the same)
    const = paired_t([1.0, 1.0, 1.0])
    assert (const.lo, const.hi, const.verdict) == (1.0, 1.0, "higher")
    assert const.p == stats.ttest_rel([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]).pvalue == 0.0
    assert paired_t([-1.0, -1.0, -1.0, -1.0]).verdict == "lower"
    # symmetric noise: as many seeds lower as higher, by as much
    sym = paired_t([0.02, -0.02, 0.01, -0.01])
    assert sym.mean == pytest.approx(0.0, abs=1e-12) and sym.lo < 0 < sym.hi
    assert sym.p == pytest.approx(1.0) and sym.verdict == "no clear difference"
    assert paired_t([0.0, 0.0, 0.0]).verdict == "no clear difference"
    # every seed the same sign is not enough: 2 seeds are too few, 3 agreeing seeds can still be unclear
    assert paired_t([0.05, 0.04]).verdict == "too few seeds"
    spread = paired_t([0.001, 0.002, 0.05])
    assert spread.lo < 0 and spread.verdict == "no clear difference"
    assert paired_t([]).verdict == "no paired seeds"
    assert paired_t([0.1, 0.2, 0.15]).name == "paired t-test over 3 seeds, 95% interval"


def test_report_and_printed_lines_name_the_test_and_its_p_value():
    from unip_train.compare.cli import _verdicts
    from unip_train.compare.report import render_html

    results = hand_results().assign(pixel_acc=0.9, run_dir="cells")
    summary = summarize(results, baseline="rand")
    html = render_html([], results, summary, {}, "plan", "plan.json", "rand")
    assert "paired t-test over the seeds both rows share" in html
    assert "every paired seed has the same sign" not in html
    dist = re.search(r"<tr[^>]*><td>dist</td>.*?</tr>", html, re.S).group(0)
    assert ">0.013<" in dist and ">higher<" in dist and "paired t-test over 3 seeds, 95% interval" in dist
    lines = {line.split(":")[0].split()[-1]: line for line in _verdicts(summary)}
    assert lines["dist"].endswith(
        "+0.0500 vs rand: higher (paired t-test over 3 seeds, 95% interval: +0.0252 to +0.0748, p = 0.013)"
    )
    assert lines["late"].endswith("-0.1400 vs rand: too few seeds")


def test_t_interval_is_the_textbook_formula():
    mean, lo, hi = t_interval([1.0, 2.0, 6.0])
    sd = np.std([1.0, 2.0, 6.0], ddof=1)
    assert mean == pytest.approx(3.0) and hi - mean == pytest.approx(T_975_DF2 * sd / math.sqrt(3))
    assert lo == pytest.approx(2 * mean - hi)
    assert math.isnan(t_interval([0.4])[1]) and t_interval([0.4])[0] == 0.4


# --- figures ------------------------------------------------------------------------------------------


def test_figures_draw_the_summary_and_the_selection_files_nmi(tmp_path: Path):
    results = hand_results()
    summary = summarize(results, baseline="rand")
    nmis = [0.30, 0.12, 0.06, 0.01]
    doc = selection_doc({"teacher_a": nmis, "other": [0.5, 0.4, 0.3, 0.2]})
    figs = render_figures(results, summary, "rand", doc, {"dist": "teacher_a"})
    assert set(figs) == {"miou.png", "layerwise_soda_lpw.png"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000 for png in figs.values())

    fig = plot_layerwise(summary, results, "soda", "lpw", doc, {"dist": "teacher_a"})
    dist_ax = fig.axes[1]  # panels in summary order: rand (no NMI), dist (NMI + its mIoU twin axis)
    curves = [list(np.round(ln.get_ydata(), 6)) for ln in dist_ax.get_lines() if len(ln.get_ydata()) == 4]
    assert nmis in curves, "the NMI drawn must be the selection file's"
    assert [0.5, 0.4, 0.3, 0.2] not in curves
    twin = [ax for ax in fig.axes if ax is not dist_ax and ax.bbox.bounds == dist_ax.bbox.bounds][0]
    means = summary[(summary["backbone"] == "dist") & (summary["mode"] == "lpw")]["miou_mean"].tolist()
    assert any(np.allclose(ln.get_ydata(), means) for ln in twin.get_lines() if len(ln.get_ydata()) == 2)
    assert "over NMI of 'teacher_a'" in dist_ax.get_title()
    assert "no NMI" in fig.axes[0].get_title()
    # the NMI is named by the definition the file records; files without the field are Park et al.'s
    assert "park NMI" in dist_ax.get_title() and "park definition" in dist_ax.get_ylabel()
    fig = plot_layerwise(
        summary, results, "soda", "lpw", doc | {"nmi_definition": "unip"}, {"dist": "teacher_a"}
    )
    assert "unip NMI" in fig.axes[1].get_title() and "unip definition" in fig.axes[1].get_ylabel()
    assert any("NMI (unip)" in t.get_text() for t in fig.axes[1].get_legend().get_texts())


# --- real cells ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_jobs(assets: Path, tmp_path_factory):
    """The base plan (2 cells) run by the command with --jobs 2."""
    folder = tmp_path_factory.mktemp("compare")
    plan = write_plan(folder, base_plan(assets))
    out = folder / "results"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the runs compared with this one use one thread too
        code = main(["--plan", str(plan), "--out", str(out), "--jobs", "2"])
    return plan, out, code, buf.getvalue()


def test_two_jobs_run_side_by_side_and_write_every_output(two_jobs):
    plan, out, code, log = two_jobs
    assert code == 0, log
    lines = log.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("start soda/")]
    dones = [i for i, ln in enumerate(lines) if ln.startswith("done soda/")]
    assert len(starts) == 2 and len(dones) == 2 and max(starts) < min(dones), log  # both ran at once
    assert (
        "2 at a time on this machine (CPU, 1 thread)" in log
        and "1 of 2 done, 1 left, about" in log
        and "to go" in log
    )
    for name in ("random", "tiny"):
        cell = out / "cells" / "soda" / name / "ft" / "seed0"
        assert {"metrics.json", "model.pt", "checkpoint.pt", "log.jsonl", RECORD} <= {
            p.name for p in cell.iterdir()
        }
    assert (out / "random_init" / "random" / "seed0.safetensors").is_file()

    results = pd.read_csv(out / "results.csv")
    assert list(results.columns[:6]) == ["backbone", "dataset", "mode", "layer", "seed", "miou"]
    assert "iou_person" in results and list(results["backbone"]) == ["random", "tiny"]
    metrics = json.loads((out / "cells/soda/tiny/ft/seed0/metrics.json").read_text())
    assert results.loc[1, "miou"] == pytest.approx(metrics["miou"])
    assert results.loc[1, "iou_person"] == pytest.approx(metrics["per_class_iou"]["person"])
    summary = pd.read_csv(out / "summary.csv")
    tiny = summary[summary["backbone"] == "tiny"].iloc[0]
    assert tiny["diff_mean"] == pytest.approx(results.loc[1, "miou"] - results.loc[0, "miou"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "2 of 2 cells finished" in html
    assert not re.search(r"src=\"(?!data:)", html), "report.html must not load anything"
    # Links go to the cells' own pictures only, relative to the report (never out of the folder).
    hrefs = re.findall(r"href=\"([^\"]*)\"", html)
    assert (
        "cells/soda/tiny/ft/seed0/curves.png" in hrefs and "cells/soda/random/ft/seed0/samples.png" in hrefs
    )
    assert all(h.startswith("cells/") and (out / h).is_file() for h in hrefs), hrefs
    assert "Per-class IoU (mean over seeds)" in html
    assert (out / "figures" / "miou.png").read_bytes().startswith(b"\x89PNG")


def test_rerun_skips_finished_cells(two_jobs, capsys):
    plan, out, code, _ = two_jobs
    metrics = out / "cells/soda/tiny/ft/seed0/metrics.json"
    before = metrics.stat().st_mtime_ns
    assert main(["--plan", str(plan), "--out", str(out)]) == 0
    assert "all 2 cells finished earlier; nothing to run" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == before
    assert len(json.loads((metrics.parent / RECORD).read_text())["attempts"]) == 1


def test_changed_plan_is_refused_before_anything_runs(two_jobs, assets: Path, capsys):
    plan, out, code, _ = two_jobs
    changed = write_plan(
        plan.parent, base_plan(assets, finetune={**CELL_OPTIONS, "iters": 6}), "changed.json"
    )
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    assert main(["--plan", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cells/soda/random/ft/seed0: was run with other settings (--iters 4 -> 6)" in err
    assert "(and 1 more cell folders)" in err and err.count("\n") == 1
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == before


def test_results_folder_of_another_command_or_inside_a_dataset_is_refused(
    assets: Path, tmp_path: Path, capsys
):
    plan = write_plan(tmp_path / "plans", base_plan(assets))
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "run.json").write_text(json.dumps({"command": "unip-predict", "identity": {}, "files": []}))
    assert main(["--plan", str(plan), "--out", str(preds), "--dry-run"]) == 2
    assert "holds a unip-predict run" in capsys.readouterr().err
    assert main(["--plan", str(plan), "--out", str(assets / "soda" / "results"), "--overwrite"]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err
    assert not (assets / "soda" / "results").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).parts[0].startswith("previous-")
    }


def test_overwrite_moves_cell_folders_of_other_settings_aside(two_jobs, assets: Path, tmp_path: Path, capsys):
    """The no-overwrite rule for cells: a cell folder of other settings is refused (one line saying
    --overwrite), --dry-run --overwrite shows it as replaced and moves nothing, --overwrite keeps the
    old run byte for byte in previous-<time>/ and runs the cell with the plan's settings."""
    _, reference, _, _ = two_jobs
    out = tmp_path / "results"
    shutil.copytree(reference, out)
    cell = out / "cells/soda/random/ft/seed0"
    before = _files(cell)
    changed = write_plan(tmp_path, base_plan(assets, finetune={**CELL_OPTIONS, "iters": 6}), "changed.json")
    assert main(["--plan", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was run with other settings (" in err and "--iters 4 -> 6)" in err and "pass --overwrite" in err
    assert main(["--plan", str(changed), "--out", str(out), "--dry-run", "--overwrite"]) == 0
    assert "replace  soda/random/ft/seed0" in capsys.readouterr().out
    assert _files(cell) == before and not any(p.name.startswith("previous-") for p in cell.iterdir())

    assert main(["--plan", str(changed), "--out", str(out), "--overwrite"]) == 0
    (aside,) = [p for p in cell.iterdir() if p.name.startswith("previous-")]
    assert _files(aside) == before  # the old run, every byte of it
    assert json.loads((cell / "metrics.json").read_text())["iters"] == 6
    assert len(json.loads((cell / RECORD).read_text())["attempts"]) == 1  # a new record for the new run


def test_a_cell_that_died_before_its_first_checkpoint_starts_again(
    assets: Path, tmp_path: Path, monkeypatch, capsys
):
    """An attempt killed before its first checkpoint leaves log.jsonl (a run unip-finetune would not
    start over): the next attempt moves that attempt's files aside and starts the cell anew."""
    from unip_train.finetune.engine import KILL_ENV

    plan = write_plan(
        tmp_path, base_plan(assets, backbones=base_plan(assets)["backbones"][1:], baseline=None)
    )
    out = tmp_path / "results"
    cell = out / "cells/soda/tiny/ft/seed0"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(KILL_ENV, "1")  # killed after iteration 1; the first checkpoint is at 2
    assert main(["--plan", str(plan), "--out", str(out)]) == 1
    assert (cell / "log.jsonl").is_file() and not (cell / "checkpoint.pt").exists()
    monkeypatch.delenv(KILL_ENV)
    assert main(["--plan", str(plan), "--out", str(out)]) == 0, capsys.readouterr()
    (aside,) = [p for p in cell.iterdir() if p.name.startswith("previous-")]
    assert (aside / "log.jsonl").is_file() and (cell / "metrics.json").is_file()
    attempts = json.loads((cell / RECORD).read_text())["attempts"]
    assert [(a["resumed"], a["exit"]) for a in attempts] == [(False, -9), (False, 0)]


def test_killed_cell_resumes_and_ends_equal_to_the_uninterrupted_run(
    two_jobs, assets: Path, tmp_path: Path, monkeypatch, capsys
):
    from unip_train.finetune.engine import KILL_ENV

    _, reference, _, _ = two_jobs
    plan = write_plan(
        tmp_path, base_plan(assets, backbones=base_plan(assets)["backbones"][1:], baseline=None)
    )
    out = tmp_path / "results"
    cell = out / "cells/soda/tiny/ft/seed0"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the reference: bit-equal results need equal threads
    monkeypatch.setenv(KILL_ENV, "3")  # the cell SIGKILLs itself after iteration 3 (checkpoint at 2)
    assert main(["--plan", str(plan), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAILED soda/tiny/ft/seed0: killed by signal 9" in captured.out
    assert "1 cell(s) have no results" in captured.err
    assert torch.load(cell / "checkpoint.pt", weights_only=True)["iter"] == 2
    assert not (cell / "metrics.json").exists()
    assert "cells without results" in (out / "report.html").read_text().lower()

    monkeypatch.delenv(KILL_ENV)
    assert main(["--plan", str(plan), "--out", str(out), "--dry-run"]) == 0
    assert "resume   soda/tiny/ft/seed0" in capsys.readouterr().out
    assert main(["--plan", str(plan), "--out", str(out)]) == 0
    assert "resume from checkpoint soda/tiny/ft/seed0" in capsys.readouterr().out
    attempts = json.loads((cell / RECORD).read_text())["attempts"]
    assert [(a["resumed"], a["exit"]) for a in attempts] == [(False, -9), (True, 0)]

    want = torch.load(reference / "cells/soda/tiny/ft/seed0/model.pt", weights_only=True)["state_dict"]
    got = torch.load(cell / "model.pt", weights_only=True)["state_dict"]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a = json.loads((reference / "cells/soda/tiny/ft/seed0/metrics.json").read_text())
    b = json.loads((cell / "metrics.json").read_text())
    assert (a["miou"], a["per_class_iou"]) == (b["miou"], b["per_class_iou"])


def test_cells_through_submitit_local_executor(two_jobs, assets: Path, tmp_path: Path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, reference, _, _ = two_jobs
    plan = plan_from_dict(
        base_plan(assets, backbones=base_plan(assets)["backbones"][1:], baseline=None), tmp_path
    )
    out = tmp_path / "results"
    executor = submitit.LocalExecutor(folder=str(out / "submitit"))
    executor.update_parameters(timeout_min=10)
    said: list[str] = []
    outcomes = run_plan(plan, out, jobs=1, executor=executor, say=said.append)
    assert [o.exit for o in outcomes] == [0], said
    assert any("as submitit jobs (LocalExecutor" in s for s in said)
    got = json.loads((out / "cells/soda/tiny/ft/seed0/metrics.json").read_text())
    want = json.loads((reference / "cells/soda/tiny/ft/seed0/metrics.json").read_text())
    assert got["miou"] == want["miou"] and got["per_class_iou"] == want["per_class_iou"]
    outputs = build_outputs(plan, out, outcomes)
    assert len(outputs.results) == 1 and outputs.results.loc[0, "miou"] == want["miou"]


# --- scheduling helpers ------------------------------------------------------------------------------


def test_device_slots_give_one_gpu_per_cell_or_split_cpu_threads(monkeypatch):
    envs = [env for _, env in device_slots(3, gpus=["2", "5"])]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("unip_train.compare.execution.available_cores", lambda: 8)
    assert [env["OMP_NUM_THREADS"] for _, env in device_slots(2, gpus=[])] == ["4", "4"]
    assert [env["OMP_NUM_THREADS"] for _, env in device_slots(16, gpus=[])][:1] == ["1"]


def test_time_left_comes_from_finished_cells():
    assert estimate_remaining([], 5, [], 2) is None
    # mean 10 s; 4 queued + one running for 4 s (6 s left), 2 at a time: (40 + 6) / 2
    assert estimate_remaining([8.0, 12.0], 4, [4.0], 2) == pytest.approx(23.0)
    assert estimate_remaining([10.0], 0, [30.0], 2) == pytest.approx(0.0)


def test_slurm_options_reach_the_sbatch_script(tmp_path: Path, monkeypatch):
    """No cluster here: a stand-in ``srun`` on PATH lets submitit build its SLURM executor, whose
    sbatch script must carry the command's options."""
    pytest.importorskip("submitit")
    from unip_train.compare.cli import COMMAND, make_executor

    args = ["--plan", "p.toml", "--out", str(tmp_path), "--executor", "slurm", "--slurm-partition", "gpu"]
    args += ["--gpus-per-job", "1", "--cpus-per-job", "8", "--timeout-min", "600"]
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnipError, match='--executor slurm: Could not detect "srun"'):
        make_executor(COMMAND.parse(args))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    executor = make_executor(COMMAND.parse(args))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=600"):
        assert f"#SBATCH {line}" in script, script
