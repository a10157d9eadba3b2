"""``unip-export``'s work: a fine-tuned ``model.pt`` as an ONNX graph of one sliding window, checked
against PyTorch before it is kept.

The graph maps a normalized float32 batch of windows [B, 3, win, win] (B dynamic) to per-class logits
at input size [B, C, win, win]: the segmentor's logits resized bilinearly, exactly what evaluation's
window function computes (:func:`~unip_train.finetune.evaluation.upsampled_logits`). Everything around
it (reading, resize, normalization, windows, averaging, argmax) is in the sidecar ``OUT.json``
(:meth:`~unip_train.predict.inference.ModelInfo.sidecar`) and in ``unip-predict --backend onnx``,
which runs the same code as the PyTorch backend around the graph.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export) at opset 18 with a dynamic batch axis.
The TorchScript exporter (``dynamo=False``) cannot write UperNet's pyramid pooling with a dynamic batch
(``adaptive_avg_pool2d``: "input size not accessible" once timm's reshapes lose the static shape).
The graph is traced on a batch of two different windows: torch.export turns a batch of 1 into a
constant. The check runs ONNX Runtime (CPU) on windows of real images (the run's evaluation split, or
``images``) at batches of 2, 1 and 3 and refuses the export when the batch axis is fixed or the largest
absolute logit difference exceeds ``tolerance`` (1e-3 for float32).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unip_analysis.files import atomic_write, atomic_write_text

from ..finetune.evaluation import upsampled_logits
from ..predict.inference import PredictError, Segmenter, load_torch_model, sidecar_path
from ..predict.runner import dataset_items, list_images

OPSET = 18  # the lowest the torch.export-based exporter writes
TOLERANCE = 1e-3  # float32 logits: ONNX Runtime's kernels sum in another order than PyTorch's


class WindowLogits(torch.nn.Module):
    """The exported function: a window batch -> logits at input size (the Segmentor's main head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.fn = upsampled_logits(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def check_windows(seg: Segmenter, images: Sequence[Path], count: int = 2) -> tuple[torch.Tensor, str]:
    """At least two different windows (prepared as prediction prepares them: padded with 0, the
    normalized mean, as the sliding window pads) and where they came from.

    The first window of up to ``count`` images; with one image, its last window too (bottom right),
    or when it fits one window, the window flipped. The export traces a batch of two: torch.export
    specializes a batch of 1 to a constant, which would leave a graph that takes one window only."""
    win = seg.info.window

    def window(x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        crop = x[:, top : top + win, left : left + win]
        return F.pad(crop, (0, win - crop.shape[-1], 0, win - crop.shape[-2]))

    windows, names = [], []
    for path in images[:count]:
        x, _ = seg.prepare(path)
        windows.append(window(x, 0, 0))
        names.append(str(path))
    if len(windows) == 1:
        h, w = x.shape[-2:]
        last = window(x, max(h - win, 0), max(w - win, 0))
        windows.append(last if not torch.equal(last, windows[0]) else windows[0].flip(-1, -2))
        names[0] += " (two windows)"
    return torch.stack(windows), ", ".join(names)


def check_batches(windows: torch.Tensor) -> list[torch.Tensor]:
    """The batches the check runs: the traced one, one window alone, and three (the first repeated):
    a batch axis that is not dynamic fails at 1 or 3."""
    return [windows, windows[:1], torch.cat([windows, windows[:1]])]


def onnx_path(out: str | Path) -> Path:
    """``out`` with the suffix ``.onnx`` (added when missing: unip-predict tells backends by it)."""
    out = Path(out)
    return out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")


def _check_images(seg: Segmenter, given: str | None) -> list[Path]:
    if given:
        return [it.image for it in list_images(given)]
    try:
        return [it.image for it in dataset_items(seg, None, None, None)]
    except Exception as e:  # the data may be elsewhere now: say so, and ask for images
        raise PredictError(
            f"the run's evaluation split ({seg.info.dataset} at {seg.info.data_root}) cannot be read to check "
            f"the export ({str(e).splitlines()[0]}); pass --images with a few images"
        ) from None


def export_onnx(
    model_path: str | Path,
    out: str | Path,
    images: str | None = None,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
) -> dict:
    """Write ``out`` (ONNX; ``.onnx`` added when missing) and ``out.json`` (sidecar) when ONNX Runtime
    agrees with PyTorch within ``tolerance`` at batches of 2, 1 and 3 windows (:func:`check_batches`);
    returns the check's numbers (``max_abs_diff``, ``argmax_agreement``, ``opset``, ``onnx``)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise PredictError(
            "unip-export needs onnx and onnxruntime: pip install 'unip-toolkit[export]'"
        ) from None
    model, info, path = load_torch_model(model_path)
    model = model.float().eval()
    seg = Segmenter(info, upsampled_logits(model), torch.device("cpu"), None, "torch", path)
    windows, source = check_windows(seg, _check_images(seg, images))
    wrapper = WindowLogits(model).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes
        program = torch.onnx.export(
            wrapper, (windows,), input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamic_shapes={"x": {0: batch}}, dynamo=True, verbose=False,
        )  # fmt: skip
        batches = check_batches(windows)
        expected = [wrapper(b).numpy() for b in batches]
    check: dict = {}

    def write_checked(tmp: Path) -> None:
        """Save the graph to the temp file and run it there: a failing check leaves nothing behind."""
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        dims = session.get_inputs()[0].shape
        if not isinstance(dims[0], str):
            raise PredictError(
                f"{path}: the exported graph's batch axis is fixed to {dims[0]} (input {dims}); nothing written"
            )
        got = [session.run(None, {"input": b.numpy()})[0] for b in batches]
        check["diff"] = float(max(np.abs(g - e).max() for g, e in zip(got, expected)))
        check["agree"] = float((got[0].argmax(1) == expected[0].argmax(1)).mean())
        if not check["diff"] <= tolerance:
            raise PredictError(
                f"{path}: ONNX Runtime's logits differ from PyTorch's by up to {check['diff']:.3g} "
                f"(> tolerance {tolerance:g}) on {source}; nothing written"
            )

    out = onnx_path(out)
    atomic_write(out, write_checked)
    diff, agree = check["diff"], check["agree"]
    report = {
        "onnx": str(out),
        "sidecar": str(sidecar_path(out)),
        "opset": opset,
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "argmax_agreement": agree,
        "checked_on": source,
        "window": info.window,
        "window_contents": len(windows),
        "batch_shapes": [list(b.shape) for b in batches],
    }
    atomic_write_text(
        sidecar_path(out), json.dumps({**info.sidecar(opset), "check": report}, indent=2) + "\n"
    )
    return report
