"""``unip-export``: a fine-tuned model as an ONNX graph of one sliding window, checked against PyTorch.

    unip-export --model runs/soda_ft --format onnx --out soda_ft.onnx
    unip-predict --backend onnx --model soda_ft.onnx --images new_frames/ --out preds_onnx/

The library: :func:`unip_train.export.onnx.export_onnx`; docs/predict.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unip_analysis import command
from unip_analysis.errors import SpecError

from .onnx import OPSET, TOLERANCE, export_onnx, onnx_path


@dataclass(kw_only=True)
class ExportOptions:
    model: str = command.option(
        help="a unip-finetune run folder or its model.pt", group="model", metavar="PATH"
    )
    format: Literal["onnx"] = command.option("onnx", help="export format", group="model")
    out: Path = command.option(
        help="the graph to write, .onnx added when missing (the sidecar JSON is OUT.json beside it)",
        group="run",
        metavar="FILE",
    )
    images: str | None = command.option(
        None, help="images whose windows check the export (default: the run's evaluation split)",
        group="check", metavar="DIR|GLOB|LIST",
    )  # fmt: skip
    opset: int = command.option(OPSET, help="ONNX opset (18 or newer)", group="model", check=command.positive)
    tolerance: float = command.option(
        TOLERANCE, help="refuse the export when ONNX Runtime's logits differ from PyTorch's by more",
        group="check",
    )  # fmt: skip
    overwrite: bool = command.option(False, help="replace an existing OUT and its sidecar", group="run")
    debug: bool = command.debug()


COMMAND = command.Command(
    "unip-export",
    ExportOptions,
    description="Export a fine-tuned model as an ONNX graph of one sliding window (dynamic batch) with a "
    "sidecar JSON, checked against PyTorch with ONNX Runtime.",
)


def run_export(o: ExportOptions) -> int:
    out = onnx_path(o.out)
    if out.exists() and not o.overwrite:
        raise SpecError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    report = export_onnx(o.model, out, images=o.images, opset=o.opset, tolerance=o.tolerance)
    print(
        f"unip-export: {out} (opset {report['opset']}), sidecar {report['sidecar']}; ONNX Runtime vs PyTorch on "
        f"{report['checked_on']}: max abs logit difference {report['max_abs_diff']:.3g} (tolerance "
        f"{report['tolerance']:g}), argmax agreement {report['argmax_agreement']:.4%}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command.main(COMMAND, run_export, argv)


if __name__ == "__main__":
    sys.exit(main())
