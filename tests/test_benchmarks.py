"""Smoke tests of the benchmark scripts at tiny size: they run and report their numbers.

No time is asserted here; measured ratios live in benchmarks/RESULTS.md.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1", *extra],
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
    assert set(res["peak_extra_mib"]) == set(res["seconds"])
    assert "stream_extra_over_plain_in_layer_maps" in res and "stacked_extrapolated_from_depth" not in res
    assert res["ratio_cpu_stream_over_plain"] > 0 and set(res["cpu_seconds"]) == {"plain", "stream"}
    assert res["ratio_paired_median"] > 0 and res["ratio_best_over_best"] > 0
    assert set(res["peak_live_extra_mib"]) == set(res["seconds"]) and res["peak_live_extra_mib"]["plain"] > 0
    assert "stream_live_extra_over_plain_in_layer_maps" in res


def test_live_peak_counts_tensors_alive_at_once():
    """The memory rule's measure: the peak of tensors alive together, above those alive before."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_analysis
    finally:
        sys.path.pop(0)
    kept = torch.ones(2**20)  # alive before: not counted

    def work():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**19)  # 2 MiB: 6 MiB alive together
        del a, b
        c = torch.empty(2**20)  # 4 MiB again, after both were freed
        del c

    assert bench_analysis.live_peak_mib(work) == pytest.approx(6.0, abs=0.01)
    assert kept.sum() == 2**20


def test_bench_analysis_extrapolates_the_stacked_variant_by_depth():
    """Where (c) would not fit, it runs on fewer blocks; the depth it ran at is chosen from the
    memory limit, and the whole model is run when it fits."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_analysis
    finally:
        sys.path.pop(0)
    plain = {"heads": 12, "tokens": 4097, "depth": 12}  # ViT-B/16 at 1024 px: 768 MiB of maps a layer
    assert bench_analysis.stacked_depth(plain, 1, max_gib=4.0) == 1
    assert bench_analysis.stacked_depth(plain, 1, max_gib=60.0) is None
    assert bench_analysis.stacked_depth({"heads": 6, "tokens": 197, "depth": 12}, 8, 4.0) is None


def test_bench_explorer_quick():
    report = run_quick("bench_explorer.py")
    assert [c["weights"] for c in report["cases"]] == ["random", "trained-like"]
    for case in report["cases"]:
        assert case["report_bytes"] > 0 and case["encoding"] in case["per_encoding"]
        assert set(case["per_encoding"]) == {"rows-u8", "qk-f16", "qk-i8"}
        assert (
            case["measured_error"] <= 0.01
            and case["checked_error_image0"] <= case["measured_error"] * 1.01 + 1e-5
        )
        assert 0 < case["qk_view"]["mb"] <= 2 and case["qk_view"]["method"] == "pca"
        if "browser" in case:  # chromium present
            assert case["browser"]["load_ms_median"] > 0 and case["browser"]["click_to_frame_ms_median"] > 0
            assert case["browser"]["head_or_layer_switch_to_frame_ms_median"] > 0


def test_bench_predict_quick():
    report = run_quick("bench_predict.py")
    assert report["benchmark"] == "predict" and report["images"] == 4
    assert report["predict_images_per_s"] > 0 and report["bare_images_per_s"] > 0
    assert report["ratio_predict_over_bare"] > 0 and report["ratio_ort_over_torch"] > 0
    assert report["onnx_max_abs_diff"] <= 1e-3 and report["onnx_vs_torch_mask_agreement"] > 0.99


def test_bench_analysis_profile_groups_the_operators():
    report = run_quick("bench_analysis.py", "--profile")
    (res,) = report["results"]
    plain, stream = res["self_cpu_s"]["plain"], res["self_cpu_s"]["stream"]
    assert plain["linear layers"] > 0 and "q.k, p.v and p(k) products" not in plain
    assert stream["q.k, p.v and p(k) products"] > 0 and "fused attention (plain)" not in stream
    # the kernel's calls (C through ctypes, unseen by the profiler) are a group of their own
    assert stream["softmax kernel with its statistics"] > 0 and isinstance(report["softmax_kernel"], bool)
