"""unip-export's graph and self-check, and unip-predict's precision, on an untrained tiny segmentor saved
as ``model.pt`` (no training run: these cases need a model file, not a good model): a graph checked on
one image still takes any batch, ``--out`` gets its suffix, ONNX Runtime's errors are one line, the
sidecar's 16-bit rule is the reader's, and ``--precision auto`` is the shared rule."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH
from PIL import Image

from unip_train.export.cli import main as export_main
from unip_train.finetune.config import FinetuneConfig, resolve
from unip_train.finetune.dataset import read_pixels
from unip_train.finetune.model_file import build_backbone, build_segmentor, save_model
from unip_train.predict.cli import main as predict_main
from unip_train.predict.inference import PredictError, open_model, sidecar_path
from unip_train.synthetic import generate

ort = pytest.importorskip("onnxruntime")


def save_tiny(root: Path, precision: str = "fp32", seed: int = 1) -> Path:
    """An untrained LL-FPN + UperNet on the SODA layout (grey, 21 classes) as ``root/model.pt``, its
    logits spread (classifier weights std 0.5) so that argmax agreement means something."""
    from safetensors.torch import save_file

    from unip_analysis.checkpoints import build_vit

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    save_file(
        {k: v.contiguous() for k, v in build_vit(TINY_ARCH, img_size=32).state_dict().items()}, str(ckpt)
    )
    cfg = resolve(
        FinetuneConfig(
            backbone=f"timm:{TINY_ARCH}:{ckpt}", dataset="soda", data_root=str(root / "nowhere"),
            out=str(root), img_size=32, head_channels=16, precision=precision,
        )
    )  # fmt: skip
    backbone, info = build_backbone(cfg)
    torch.manual_seed(seed)
    model = build_segmentor(cfg, backbone, 21)
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=0.5)
    path = root / "model.pt"
    save_model(
        path, model, cfg, [f"c{i}" for i in range(21)], info, [[i, 2 * i, 3 * i] for i in range(21)], 1
    )
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    data = generate(root / "soda", "soda", n_train=1, n_test=3, size=(48, 64), seed=0)
    images = sorted((data / "JPEGImages").glob("*.jpg"))
    return {"model": save_tiny(root / "run"), "images": images, "root": root}


@pytest.fixture(scope="module")
def exported(tiny) -> dict:
    """``unip-export --out DIR/model`` (no suffix) checked on one image."""
    out = tiny["root"] / "exported" / "model"
    out.parent.mkdir()
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        rc = export_main(
            ["--model", str(tiny["model"]), "--out", str(out), "--images", str(tiny["images"][0])]
        )
    return {"rc": rc, "said": said.getvalue(), "dir": out.parent, "onnx": out.parent / "model.onnx"}


def test_export_checked_on_one_image_runs_any_batch(tiny, exported):
    """The graph of an export checked on one image takes batch 3 and agrees with PyTorch there; the
    check itself ran a batch of two different windows of that image."""
    assert exported["rc"] == 0
    check = json.loads(sidecar_path(exported["onnx"]).read_text())["check"]
    assert check["window_contents"] == 2 and [s[0] for s in check["batch_shapes"]] == [2, 1, 3]
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named (dynamic) batch axis
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    got = session.run(None, {"input": x.numpy()})[0]
    model = open_model(tiny["model"], device="cpu", precision="fp32")
    with torch.no_grad():
        expected = model.fn(x).numpy()
    assert got.shape == (3, 21, 32, 32)
    assert np.abs(got - expected).max() <= 1e-3


def test_export_out_without_suffix_gets_it(tiny, exported, tmp_path: Path):
    assert exported["onnx"].is_file() and sidecar_path(exported["onnx"]).is_file()
    assert sorted(p.name for p in exported["dir"].iterdir()) == ["model.onnx", "model.onnx.json"]
    assert f"unip-export: {exported['onnx']} " in exported["said"]
    # ... and unip-predict reads it (auto backend: by the suffix), a batch of three images at once.
    out = tmp_path / "preds"
    argv = ["--model", str(exported["onnx"]), "--images", str(tiny["images"][0].parent), "--out", str(out)]
    assert predict_main([*argv, "--no-progress", "--workers", "0", "--batch-size", "3"]) == 0
    assert len(list((out / "pred").glob("*.png"))) == len(tiny["images"])


def test_onnx_runtime_errors_are_one_line(tiny, exported, tmp_path: Path, capsys):
    """A graph that takes only batch 1 (as exports before this version could be), run on two images of
    one size: one line naming the graph, and the traceback with --debug."""
    import onnx

    graph = onnx.load(str(exported["onnx"]))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a batch of 1 only
    fixed = tmp_path / "fixed.onnx"
    onnx.save(graph, str(fixed))
    sidecar_path(fixed).write_text(sidecar_path(exported["onnx"]).read_text())
    argv = ["--model", str(fixed), "--images", str(tiny["images"][0].parent), "--batch-size", "2",
            "--no-progress", "--workers", "0"]  # fmt: skip
    assert predict_main([*argv, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unip-predict: error: ") and str(fixed) in err[0]
    assert "INVALID_ARGUMENT" in err[0] and "export the model again" in err[0]
    assert predict_main([*argv, "--out", str(tmp_path / "q"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_sidecar_states_the_readers_16_bit_rule(exported, tmp_path: Path):
    """The sidecar's rule for 16-bit grey files is what read_pixels does: the high byte (>> 8)."""
    rule = json.loads(sidecar_path(exported["onnx"]).read_text())["channel_rule"]
    assert "16-bit grey its high byte (v >> 8)" in rule and "65535" not in rule
    values = np.array([[0, 255, 256, 32767, 32768, 65280, 65535, 511]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert read_pixels(path, 1, False)[..., 0].tolist() == (values >> 8).astype(np.uint8).tolist()


def test_no_import_changes_opencv_threads():
    """Importing the prediction, fine-tuning and export modules leaves OpenCV's thread count alone."""
    code = (
        "import cv2; before = cv2.getNumThreads(); "
        "import unip_train.predict.inference, unip_train.finetune.augment, unip_train.finetune.trainer, "
        "unip_train.export.onnx, unip_train.predict.runner; "
        "print(before, cv2.getNumThreads())"
    )
    env_path = str(Path(__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "OMP_NUM_THREADS": "2"},
    )
    assert res.returncode == 0, res.stderr
    before, after = map(int, res.stdout.split())
    assert before > 0 and after == before


@pytest.mark.parametrize("trained_as", ["bf16", "fp16"])
def test_precision_auto_is_the_shared_rule(tiny, tmp_path: Path, capsys, trained_as: str):
    """A bf16- or fp16-trained run on the CPU: auto is float32 (the shared rule), not the run's own
    precision; --precision run asks for that (bf16 runs on the CPU, fp16 is refused there)."""
    path = save_tiny(tmp_path / trained_as, precision=trained_as)
    seg = open_model(path, device="cpu", precision="auto")
    assert seg.amp is None
    if trained_as == "bf16":
        assert open_model(path, device="cpu", precision="run").amp == torch.bfloat16
    else:
        with pytest.raises(Exception, match="fp16 needs CUDA"):
            open_model(path, device="cpu", precision="run")
    out = tmp_path / "p"
    argv = ["--model", str(path), "--images", str(tiny["images"][0]), "--out", str(out), "--no-progress",
            "--workers", "0"]  # fmt: skip
    assert predict_main(argv) == 0
    assert "(torch, cpu, fp32)" in capsys.readouterr().out


def test_opencv_runs_single_threaded_only_inside_the_augmentation(monkeypatch):
    """The 8-bit augmentation's OpenCV calls run with OpenCV's pool off; the count is restored after."""
    import cv2

    from unip_train.finetune import augment

    seen = []
    real_resize = cv2.resize
    monkeypatch.setattr(
        cv2, "resize", lambda *a, **k: (seen.append(cv2.getNumThreads()), real_resize(*a, **k))[1]
    )
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        img = np.zeros((40, 60, 1), np.uint8)
        augment.EvalResize((64, 32))(img, None)
        augment.TrainAugment.for_crop(16)(img, np.zeros((40, 60), np.uint8), torch.Generator().manual_seed(0))
        assert seen and set(seen) == {1} and cv2.getNumThreads() == 3  # 0: OpenCV's pool off, one thread
    finally:
        cv2.setNumThreads(before)


def test_a_graph_with_a_fixed_batch_is_refused(tiny, tmp_path: Path, monkeypatch):
    """Traced on one window (as before this version), torch.export fixes the batch to 1: the check
    refuses the graph and nothing is written."""
    from unip_train.export import onnx as export

    one_window = export.check_windows
    monkeypatch.setattr(
        export, "check_windows", lambda seg, images: (one_window(seg, images)[0][:1], "one window")
    )
    out = tmp_path / "fixed.onnx"
    with pytest.raises(PredictError, match=r"batch axis is fixed to 1.*nothing written"):
        export.export_onnx(tiny["model"], out, images=str(tiny["images"][0]))
    assert list(tmp_path.iterdir()) == []
