"""Smoke test of benchmarks/bench_pretrain.py at tiny size: it runs and reports its numbers.

No time is asserted; measured ratios live in benchmarks/RESULTS.md.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_pretrain_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pretrain.py"), "--quick", "--threads", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = [r for r in report["results"] if r["device"] == "cpu"]
    assert cpu
    for res in cpu:
        assert set(res["images_per_s"]) == {"ours", "naive", "bare"}
        assert all(v > 0 for v in res["images_per_s"].values())
        assert res["ratio_ours_over_naive"] > 0
        # The bare step is ours' teacher forward plus the student's step, timed in the same run.
        step = res["median_step_s"]
        assert step["bare_teacher"] > 0 and step["bare_student"] > 0
        assert abs(step["bare"] - step["bare_teacher"] - step["bare_student"]) <= 2e-4
        assert (
            abs(res["ratio_ours_over_bare"] - step["ours"] / step["bare"])
            <= 0.01 * res["ratio_ours_over_bare"] + 0.02
        )
        assert res["ratio_cpu_ours_over_bare"] > 0 and res["median_step_cpu_s"]["bare"] > 0
        # Both variants compute the same loss from the same weights: the naive one is a fair baseline.
        loss = res["loss_at_init"]
        assert abs(loss["ours"] - loss["naive"]) <= 1e-4 * abs(loss["ours"]) + 1e-6
