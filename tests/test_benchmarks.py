"""Smoke tests of the benchmark scripts at tiny size: they run and report their numbers.

No time is asserted here; measured ratios live in benchmarks/RESULTS.md.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_analysis_quick():
    report = run_quick("bench_analysis.py")
    (res,) = report["results"]
    assert set(res["seconds"]) == {"plain", "stream", "stacked"}
    assert all(v > 0 for v in res["seconds"].values())
    assert res["one_layer_maps_mib"] > 0 and "ratio_stream_over_plain" in res
    assert set(res["peak_extra_mib"]) == set(res["peak_extra_mib_default_malloc"]) == set(res["seconds"])
