"""`make demo` end to end at tiny settings: every stage runs and hands its output to the next, and
the comparison ends in unip-compare's outputs."""

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from unip_analysis import selection


@pytest.mark.slow
def test_demo_quick_runs_the_whole_pipeline_into_a_comparison(tmp_path, capsys):
    from unip_train import demo

    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text(f"# demo\n{demo.TABLE_START}\nold\n{demo.TABLE_END}\nafter\n")
    result = demo.run(out, preset="quick", figures_dir=tmp_path / "figures", readme=readme)
    printed = capsys.readouterr().out
    doc = selection.read(out / "analysis" / selection.FILENAME)
    assert set(doc["models"]) == {"mim", "sup"}
    mim = doc["models"]["mim"]
    # the student distils the teacher's selected layer, with that layer's head count
    student = json.loads((out / f"pretrain_layer{mim['selected_layer']}" / "student.json").read_text())
    assert student["heads_per_layer"][-1] == mim["selected_heads"]

    plan = json.loads((out / "plan.json").read_text())
    assert [b["name"] for b in plan["backbones"]] == ["random", "selected", "mim_teacher", "sup_teacher"]
    with open(out / "compare" / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    cells = {(r["backbone"], r["mode"], r["layer"], r["seed"]) for r in results}
    # every row fine-tuned at every seed; only the teachers probed, at the preset's layers
    assert {("random", "ft", "", s) for s in ("0", "1")} <= cells
    assert {("selected", "ft", "", s) for s in ("0", "1")} <= cells
    assert {("mim_teacher", "lp-layerwise", "8", "1"), ("sup_teacher", "lp-layerwise", "1", "0")} <= cells
    assert not any(b == "random" and m != "ft" for b, m, _, _ in cells)
    assert len(results) == 12
    assert all(0.0 <= float(r["miou"]) <= 1.0 for r in results)

    selected = next(r for r in result["summary"] if r["backbone"] == "selected" and r["mode"] == "ft")
    assert len(selected["diff_per_seed"].split()) == 2  # paired against random init at both seeds
    assert "NMI-HAD, layer 8 (selected)" in printed and "vs random per seed" in printed
    assert "mim vs sup: NMI profiles" in printed
    assert "probing peaks at layer" in printed
    assert (out / "compare" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "figures" / "nmi_curves.png").exists()
    assert (tmp_path / "figures" / "miou.png").exists()
    assert (tmp_path / "figures" / "layerwise_soda_lp-layerwise.png").exists()
    # the README table: rendered from a copy of the run's summary.csv, beside the figures
    copy = tmp_path / demo.DEMO_SUMMARY
    assert copy.read_bytes() == (out / "compare" / "summary.csv").read_bytes()
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{demo.TABLE_END}\nafter\n")
    assert demo.readme_table(demo.read_summary(copy)) in text and "| selected |" in text


def test_ablation_layer_is_the_last_or_else_the_most_local():
    from unip_train.demo import distilled_layer

    model = {
        "selected_layer": 3,
        "depth": 4,
        "layers": [{"nmi": 0.1}, {"nmi": 0.3}, {"nmi": 0.05}, {"nmi": 0.2}],
    }
    assert distilled_layer(model, "selected") == 3
    assert distilled_layer(model, "last") == 4
    assert distilled_layer(model, "local") == 2


def test_table_reads_unip_compares_summary():
    from unip_train.demo import table

    summary = [
        {"backbone": "random", "mode": "ft", "layer": "", "miou_mean": "0.45", "miou_ci95_lo": "0.40",
         "miou_ci95_hi": "0.50", "diff_per_seed": "", "verdict": "baseline"},
        {"backbone": "selected", "mode": "ft", "layer": "", "miou_mean": "0.47", "miou_ci95_lo": "0.43",
         "miou_ci95_hi": "0.51", "diff_per_seed": "0:0.0200 1:0.0100", "verdict": "too few seeds"},
        {"backbone": "mim_teacher", "mode": "lp-layerwise", "layer": "3", "miou_mean": "0.3",
         "miou_ci95_lo": "", "miou_ci95_hi": "", "diff_per_seed": "", "verdict": ""},
    ]  # fmt: skip
    lines = table(summary, {"selected": "NMI-HAD (selected)"})
    assert len(lines) == 3  # header + the two fine-tuning rows; probes are not in this table
    assert "0.4700 [0.430, 0.510]" in lines[2] and "+0.0200 +0.0100" in lines[2]
    assert lines[2].startswith("NMI-HAD (selected)") and lines[2].endswith("too few seeds")


# --- the README's demo table ---------------------------------------------------------------------

REPO = Path(__file__).parents[1]


def hand_summary(tmp_path: Path) -> Path:
    """A summary.csv written by unip-compare's own summarize, from known mIoUs at 3 seeds."""
    from unip_train.compare import summarize

    mious = {"random": [0.50, 0.52, 0.54], "selected": [0.55, 0.56, 0.60], "local": [0.49, 0.53, 0.55]}
    rows = [
        {"backbone": b, "dataset": "soda", "mode": "ft", "layer": None, "seed": s, "miou": m}
        for b, values in mious.items()
        for s, m in enumerate(values)
    ]
    rows.append(
        {
            "backbone": "mim_teacher",
            "dataset": "soda",
            "mode": "lp-layerwise",
            "layer": 3,
            "seed": 0,
            "miou": 0.3,
        }
    )
    path = tmp_path / "compare" / "summary.csv"
    path.parent.mkdir(parents=True)
    summarize(pd.DataFrame(rows), baseline="random").to_csv(path, index=False)
    return path


def test_readme_table_is_rendered_between_the_markers_from_a_copy_of_the_summary(tmp_path):
    from unip_train import demo

    summary = hand_summary(tmp_path)
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    before, after = "# Title\n\nintro | not a row\n", "\n## Next\ntext\n"
    readme.write_text(f"{before}{demo.TABLE_START}\n| hand | pasted |\n{demo.TABLE_END}{after}")
    demo.write_readme_table(readme, summary)
    copy = readme.parent / "figures" / "demo_summary.csv"
    assert copy.read_bytes() == summary.read_bytes()
    text = readme.read_text()
    table = demo.readme_table(demo.read_summary(copy))
    assert text == f"{before}{demo.TABLE_START}\n{table}{demo.TABLE_END}{after}"
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"row", "random", "selected", "local"}  # fine-tuning rows only, no probes
    # selected - random = +0.05 +0.04 +0.06: t = 8.66 on 2 df, p = 0.013, interval excludes 0
    assert rows["selected"] == (
        "| selected | NMI-HAD student of the MIM teacher's selected (deepest hybrid) layer "
        "| 0.570 [0.504, 0.636] | +0.0500 +0.0400 +0.0600 | +0.0500 [+0.0252, +0.0748] | 0.013 | higher |"
    )
    assert rows["local"].endswith(
        "| -0.0100 +0.0100 +0.0100 | +0.0033 [-0.0254, +0.0320] | 0.67 | no clear difference |"
    )
    assert rows["random"].endswith("| 0.520 [0.470, 0.570] |  |  |  | baseline |")
    assert "paired t-test over 3 seeds, 95% interval" in table and "seeds 0, 1, 2" in table
    # run again: the same file, nothing appended
    demo.write_readme_table(readme, summary)
    assert readme.read_text() == text


def test_ablation_rows_pair_the_selected_and_last_layer_students_by_seed(tmp_path):
    """selected minus last per seed = (selected - random) - (last - random) at that seed."""
    from unip_train import demo
    from unip_train.compare import summarize

    mious = {
        "random": [0.50, 0.52, 0.54],
        "sup_selected": [0.56, 0.57, 0.61],
        "sup_last": [0.51, 0.55, 0.56],
        "selected": [0.55, 0.56, 0.60],  # no MIM last-layer row: no MIM ablation line
    }
    rows = [
        {"backbone": b, "dataset": "soda", "mode": "ft", "layer": None, "seed": s, "miou": m}
        for b, values in mious.items()
        for s, m in enumerate(values)
    ]
    path = tmp_path / "summary.csv"
    summarize(pd.DataFrame(rows), baseline="random").to_csv(path, index=False)
    summary = [r for r in demo.read_summary(path) if r["mode"] == "ft"]
    (line,) = demo.ablation_rows(summary)
    # 0.05 0.02 0.05: mean 0.04, sd 0.01732, t(2) 4.303 -> +-0.0430; p = 0.057
    assert (
        line
        == "| supervised | 0:+0.0500 1:+0.0200 2:+0.0500 | +0.0400 [-0.0030, +0.0830] | 0.057 | no clear difference |"
    )
    assert "| supervised |" in demo.readme_table(summary)


def test_readme_without_markers_is_refused_before_the_demo_runs(tmp_path, capsys):
    from unip_train import demo

    readme = tmp_path / "README.md"
    readme.write_text(f"# no markers\n{demo.TABLE_END}\n")
    out = tmp_path / "demo_out"
    assert demo.main(["--out", str(out), "--preset", "quick", "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"demo: error: {readme}: expected one <!-- demo-table:start -->")
        and err.count("\n") == 1
    )
    assert not out.exists() and readme.read_text() == f"# no markers\n{demo.TABLE_END}\n"


COMMITTED_SUMMARY = REPO / "figures" / "demo_summary.csv"


def test_committed_readme_holds_no_table_that_nothing_checks():
    """The README has the markers; without a committed summary, no table rows sit between them."""
    from unip_train import demo

    _, block, _ = demo.readme_block(REPO / "README.md")
    if not COMMITTED_SUMMARY.exists():
        assert not [line for line in block.splitlines() if line.startswith("|")]


@pytest.mark.skipif(
    not COMMITTED_SUMMARY.exists(),
    reason="figures/demo_summary.csv is not committed yet: `make figures` writes it and the README table",
)
def test_committed_readme_table_is_the_rendering_of_the_committed_summary(tmp_path):
    from unip_train import demo

    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    demo.write_readme_table(readme, COMMITTED_SUMMARY)
    assert readme.read_text() == (REPO / "README.md").read_text(), "README demo table: run make figures"
