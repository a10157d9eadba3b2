"""`make demo` end to end at tiny settings: every stage runs and hands its output to the next."""

import json

import pytest

from unip_analysis import selection


@pytest.mark.slow
def test_demo_quick_runs_the_whole_pipeline(tmp_path, capsys):
    from unip_train import demo

    result = demo.run(tmp_path / "demo", quick=True, figures_dir=tmp_path / "figures")
    out = capsys.readouterr().out
    doc = selection.read(tmp_path / "demo" / "analysis" / selection.FILENAME)
    assert set(doc["models"]) == {"mim", "sup"}
    student = json.loads((tmp_path / "demo" / "pretrain" / "student.json").read_text())
    assert student["heads_per_layer"][-1] == doc["models"]["mim"]["selected_heads"]
    for mode in ("ft", "lp"):
        for label in ("distilled", "random init"):
            assert 0.0 < result["finetune"][f"{mode} {label}"]["miou"] <= 1.0
    assert "linear probe (frozen backbone): distilled minus random init" in out
    assert "mim vs sup: NMI profiles" in out  # the comparison is stated either way
    assert (tmp_path / "demo" / "analysis" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "figures" / "nmi_curves.png").exists()


def test_paired_verdict_needs_every_seed_to_agree():
    import numpy as np

    from unip_train.demo import paired_verdict

    assert paired_verdict(np.array([0.03, 0.02, 0.05])).startswith("distillation helped")
    assert paired_verdict(np.array([-0.03, -0.02, -0.05])).startswith("distillation hurt")
    assert paired_verdict(np.array([0.10, -0.01, 0.05])).startswith("no clear difference")  # seeds disagree
    assert paired_verdict(np.array([0.004, 0.006])).startswith("no clear difference")  # below the margin
    assert "per seed +0.0300 +0.0200" in paired_verdict(np.array([0.03, 0.02]))
