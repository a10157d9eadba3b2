"""The two notebooks run top to bottom (nbclient, a fresh kernel on this interpreter) and deliver what
they promise: a valid layer_selection.json, a distilled student whose last-layer NMI moved toward the
teacher's, and a fine-tuned segmentor with a positive mIoU. Outputs go to a temp folder (UNIP_NB_OUT)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from unip_analysis import selection

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "unip-notebook-test"
CELL_TIMEOUT = 600


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel spec that runs *this* interpreter (a user-level ``python3`` spec could point elsewhere),
    and the environment the kernel inherits: outputs under ``tmp_path/out``, one thread per kernel
    (xdist runs two workers on two cores), the inline matplotlib backend."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("UNIP_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return tmp_path / "out"


def execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell; a cell that raises fails the test with the cell and its traceback."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def text_of(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell printed (stdout streams and plain-text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def all_text(nb: nbformat.NotebookNode) -> str:
    return "".join(text_of(c) for c in nb.cells if c.cell_type == "code")


def png_count(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


def check_attention_patterns(nb: nbformat.NotebookNode, out: Path) -> dict:
    doc = selection.read(out / "attention_patterns" / selection.FILENAME)
    assert set(doc["models"]) == {"demo_mim", "demo_sup"}
    assert doc["images"]["count"] == 32 and doc["images"]["img_size"] == 64
    for m in doc["models"].values():
        assert m["depth"] == 8 and 1 <= m["selected_layer"] <= 8
    # The last cell reports what the file holds.
    last = text_of(nb.cells[-1])
    for name, m in doc["models"].items():
        assert f"{name}: selected layer {m['selected_layer']} of 8 (4 heads)" in last
    # Figures: sample images, NMI + distance, rows read back from the explorer, the heat-map.
    assert png_count(nb) >= 4
    # The explorer: a widget view, with the static HTML explorer for front ends without widgets,
    # and rows read back into Python for a query set from Python.
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    widget = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widget) == 1 and "data-unip-explorer" in widget[0]["data"]["text/html"]
    for name in ("demo_mim", "demo_sup"):
        assert re.search(rf"{name}: layer 8, query \(2, 5\): max 0\.\d+, prefix share 0\.\d+", all_text(nb))
    # The comparison states something about the pair.
    assert "demo_mim vs demo_sup: NMI profiles" in all_text(nb)
    return doc


def check_distill_and_finetune(nb: nbformat.NotebookNode, out: Path, expect_selection: Path) -> None:
    text = all_text(nb)
    assert f"selection file: {expect_selection}" in text
    selection.read(expect_selection)

    run = out / "distill_and_finetune" / "pretrain"
    assert (run / "student.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 * (192 // 16) and sum(losses[-3:]) < sum(losses[:3])

    # Distillation moved the student's last-layer NMI toward the teacher's selected layer.
    gap = re.search(r"gap (\d+\.\d+) -> (\d+\.\d+)", text)
    assert gap, "the NMI comparison line is missing"
    assert float(gap.group(2)) < float(gap.group(1))

    metrics = json.loads((out / "distill_and_finetune" / "finetune" / "metrics.json").read_text())
    assert metrics["dataset"] == "soda" and metrics["iters"] == 300
    final = re.search(r"mIoU (\d+\.\d+)", text_of(nb.cells[-1]))
    assert final and float(final.group(1)) == pytest.approx(metrics["miou"], abs=1e-4)
    # Well above zero: the synthetic classes are easy; a broken backbone or head gives ~0.1.
    assert metrics["miou"] > 0.2 and metrics["per_class_iou"]["person"] > 0.1
    assert png_count(nb) >= 3  # loss curves, NMI curves, fine-tuning loss + per-class IoU


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        dirty = [
            i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)
        ]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
def test_attention_patterns_then_distill_and_finetune(kernel_env: Path, tmp_path: Path):
    """The intended order: the second notebook picks up the selection file the first one wrote."""
    nb1 = execute("attention_patterns.ipynb", tmp_path)
    check_attention_patterns(nb1, kernel_env)
    nb2 = execute("distill_and_finetune.ipynb", tmp_path)
    check_distill_and_finetune(nb2, kernel_env, kernel_env / "attention_patterns" / selection.FILENAME)


@pytest.mark.slow
def test_distill_and_finetune_alone(kernel_env: Path, tmp_path: Path):
    """Without the first notebook's file, the second analyses its teacher itself."""
    nb = execute("distill_and_finetune.ipynb", tmp_path)
    check_distill_and_finetune(nb, kernel_env, kernel_env / "distill_and_finetune" / selection.FILENAME)
    doc = selection.read(kernel_env / "distill_and_finetune" / selection.FILENAME)
    assert list(doc["models"]) == ["demo_mim"]
