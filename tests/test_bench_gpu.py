"""benchmarks/bench_gpu.py --dry-run: every GPU check runs on the CPU at toy sizes and reports the
keys the GPU run reports, and its RESULTS.md section replaces only the text between the markers."""

import json
import subprocess
import sys
from pathlib import Path

from unip_analysis.attention import DEFAULT_BLOCK_BYTES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_dry_run_reports_every_part(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# head\n\n<!-- bench_gpu: start -->\nold text\n<!-- bench_gpu: end -->\n\n## kept\n")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--threads", "1", "--results-md", str(md)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    parts = report["parts"]
    assert report["dry_run"] and report["device"] == "cpu"
    assert set(parts) == {"analysis", "pretrain_step", "pretrain_loop", "finetune", "predict"}
    # three sizes, each at the CPU's block size and the GPU's
    cpu_mib = DEFAULT_BLOCK_BYTES / 2**20
    assert [(r["tokens"], r["block_mib"]) for r in parts["analysis"]] == [
        (t, b) for t in (17, 65, 257) for b in (cpu_mib, 64)
    ]
    for r in parts["analysis"]:
        assert r["ratio_stream_over_plain"] > 0 and "peak_gpu_mib" in r and "stream" in r["extra_peak_mib"]
    step = parts["pretrain_step"]
    assert step["ratio_ours_over_bare"] > 0 and step["ratio_ours_over_naive"] > 0 and "peak_gpu_mib" in step
    loop = parts["pretrain_loop"]
    assert loop["images_per_s"] > 0 and loop["ratio_real_over_bare"] > 0 and "peak_gpu_mib" in loop
    assert [r["head"] for r in parts["finetune"]] == ["upernet", "linear"]
    assert all(r["ratio_real_over_bare"] > 0 and r["images_per_s"] > 0 for r in parts["finetune"])
    pred = parts["predict"]
    assert pred["predict_images_per_s"] > 0 and pred["ratio_predict_over_bare"] > 0
    text = md.read_text()
    assert text.startswith("# head\n\n<!-- bench_gpu: start -->") and text.endswith(
        "<!-- bench_gpu: end -->\n\n## kept\n"
    )
    assert (
        "old text" not in text
        and "| NMI-HAD step" in text
        and "| unip-predict" in text
        and "error" not in text
    )


def test_bench_gpu_refuses_a_markdown_file_without_markers_and_cuda_where_there_is_none(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# no markers\n")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    try:
        bench_gpu.write_section(md, "x")
    except SystemExit as e:
        assert "markers" in str(e)
    else:
        raise AssertionError("write_section accepted a file without markers")
    assert md.read_text() == "# no markers\n"
    import torch

    if not torch.cuda.is_available():
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--parts", "predict"], capture_output=True, text=True
        )
        assert run.returncode == 2 and "CUDA is not available" in run.stderr and "--dry-run" in run.stderr
