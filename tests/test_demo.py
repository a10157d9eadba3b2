"""`make demo` end to end at tiny settings: every stage runs and hands its output to the next, and
the comparison ends in unip-compare's outputs."""

import csv
import json

import pytest

from unip_analysis import selection


@pytest.mark.slow
def test_demo_quick_runs_the_whole_pipeline_into_a_comparison(tmp_path, capsys):
    from unip_train import demo

    out = tmp_path / "demo"
    result = demo.run(out, preset="quick", figures_dir=tmp_path / "figures")
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
         "miou_ci95_hi": "0.51", "diff_per_seed": "0:0.0200 1:0.0100", "verdict": "higher at all 2 seeds"},
        {"backbone": "mim_teacher", "mode": "lp-layerwise", "layer": "3", "miou_mean": "0.3",
         "miou_ci95_lo": "", "miou_ci95_hi": "", "diff_per_seed": "", "verdict": ""},
    ]  # fmt: skip
    lines = table(summary, {"selected": "NMI-HAD (selected)"})
    assert len(lines) == 3  # header + the two fine-tuning rows; probes are not in this table
    assert "0.4700 [0.430, 0.510]" in lines[2] and "+0.0200 +0.0100" in lines[2]
    assert lines[2].startswith("NMI-HAD (selected)") and lines[2].endswith("higher at all 2 seeds")


def test_an_unfinished_pretraining_folder_is_continued_or_replaced(tmp_path):
    """unip-pretrain refuses a folder that holds a run unless told: the demo continues one with a
    checkpoint (--resume, also an earlier version's checkpoint-last.pt) and replaces one without."""
    from unip_train import demo

    run = tmp_path / "pretrain_layer8"
    assert demo.continue_or_replace(run) == []  # a new folder
    run.mkdir()
    assert demo.continue_or_replace(run) == []  # an empty one
    (run / "config.json").write_text("{}")  # killed before its first checkpoint
    assert demo.continue_or_replace(run) == ["--overwrite"]
    (run / "checkpoint-last.pt").write_bytes(b"")
    assert demo.continue_or_replace(run) == ["--resume"]
    (run / "checkpoint-last.pt").unlink()
    (run / "checkpoint.pt").write_bytes(b"")
    assert demo.continue_or_replace(run) == ["--resume"]
