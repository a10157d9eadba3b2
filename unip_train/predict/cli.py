"""``unip-predict``: segment images with a fine-tuned model (``unip-export``: :mod:`unip_train.export.cli`).

    unip-predict --model runs/soda_ft --images new_frames/ --out preds/
    unip-predict --model runs/soda_ft --data-root /data/SODA --split test --out preds_test/   # + metrics
    unip-predict --model runs/soda_ft --images 'flight/**/*.png' --labels flight_masks/ --out preds/
    unip-export --model runs/soda_ft --format onnx --out soda_ft.onnx
    unip-predict --backend onnx --model soda_ft.onnx --images new_frames/ --out preds_onnx/

The library: :func:`unip_train.predict.inference.open_model`, :func:`unip_train.predict.runner.predict`,
:func:`unip_train.export.onnx.export_onnx`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unip_analysis import command, output_folder
from unip_analysis.device import precision_name
from unip_analysis.errors import SpecError

from ..runs import default_num_workers
from .inference import RUN_PRECISION, Segmenter, describe, open_model
from .outputs import CONFUSION_CSV, CONFUSION_PNG, ERRORS, FAILED, METRICS, OVERLAY, PER_IMAGE, PRED, PROB
from .runner import Item, dataset_items, list_images, match_labels, predict, run_summary

EXIT_FAILED = 1  # some images could not be segmented (listed in failed.txt)
OUTPUTS = (PRED, OVERLAY, PROB, ERRORS, METRICS, PER_IMAGE, CONFUSION_CSV, CONFUSION_PNG, FAILED)
# Options that do not change the masks: the folder of a run continues with other values of these.
NOT_IDENTITY = ("batch_size", "device", "precision", "model", "backend")


@dataclass(kw_only=True)
class PredictOptions:
    model: str = command.option(
        help="a unip-finetune run folder, its model.pt, or an exported .onnx (with its .onnx.json)",
        group="model", metavar="PATH",
    )  # fmt: skip
    backend: Literal["auto", "torch", "onnx"] = command.option(
        "auto", help="torch (model.pt), onnx (an exported graph, ONNX Runtime) or auto (by the file's suffix)",
        group="model",
    )  # fmt: skip
    images: str | None = command.option(
        None, help="images to segment: a folder (recursive), a glob pattern ('dir/**/*.png') or a .txt list",
        group="data", metavar="DIR|GLOB|LIST",
    )  # fmt: skip
    labels: str | None = command.option(
        None, help="folder of label maps named like the images: adds metrics.json, per_image.csv, the confusion "
        "matrix and errors/ panels", group="data", metavar="DIR",
    )  # fmt: skip
    dataset: str | None = command.option(
        None, help="segment and score a dataset split instead of --images (default: the run's dataset)",
        group="data",
    )  # fmt: skip
    data_root: str | None = command.option(
        None, help="the dataset's folder (default: the run's --data-root)", group="data", metavar="DIR"
    )
    split: str | None = command.option(
        None, help="the split to segment and score (default: the run's evaluation split)", group="data"
    )
    opacity: float = command.option(0.5, help="mask opacity in overlay/ images (0-1)", group="outputs")
    save_probs: bool = command.option(
        False, help="also write prob/REL.npy: float16 class probabilities [C, H, W]", group="outputs"
    )
    out: Path = command.out(
        "output folder; the same run again (model, backend, options) continues it: images already done "
        "are skipped; another run there is refused"
    )
    overwrite: bool = command.overwrite()
    batch_size: int = command.batch_size(4, "images (of one size) per sliding-window batch")
    workers: int | None = command.workers()
    device: str = command.device()
    precision: str = command.precision(
        help="run: the run's own --precision, as its evaluation ran (the ONNX backend: auto or fp32)",
        extra=(RUN_PRECISION,),
    )
    progress: bool = command.progress()
    debug: bool = command.debug()


COMMAND = command.Command(
    "unip-predict",
    PredictOptions,
    description="Segment images with a fine-tuned model (the run's own evaluation settings): indexed PNG "
    "masks with the dataset's palette, overlays, optional probabilities; metrics with labels.",
)


def run_predict(o: PredictOptions) -> int:
    dataset_mode = any(v is not None for v in (o.dataset, o.data_root, o.split))
    if dataset_mode and (o.images is not None or o.labels is not None):
        raise SpecError(
            "--images/--labels and --dataset/--data-root/--split: pass one way of choosing images"
        )
    if not dataset_mode and o.images is None:
        raise SpecError(
            "no images: pass --images DIR|GLOB|LIST, or --data-root / --split for a dataset split"
        )
    seg = open_model(o.model, o.backend, o.device, o.precision)
    if dataset_mode:
        items = dataset_items(seg, o.dataset, o.data_root, o.split)
    else:
        items = list_images(o.images)
        if o.labels is not None:
            items = match_labels(items, o.labels)
    folder = output_folder.check(
        o.out, prediction_run(o, seg, items, dataset_mode), resume=not o.overwrite, overwrite=o.overwrite,
        continue_legacy=False,
    )  # fmt: skip
    if folder.begin() is not None:
        print(f"unip-predict: --overwrite: the previous predictions moved to {folder.aside}", flush=True)
    print(f"unip-predict: {describe(seg)}; {len(items)} images", flush=True)
    record = {
        "model": str(seg.source), "backend": seg.backend, "device": str(seg.device),
        "precision": precision_name(seg.amp),
        "eval_window": seg.info.window, "eval_stride": seg.info.stride,
        "labels": o.labels, "dataset": o.dataset or (seg.info.dataset if dataset_mode else None),
        "data_root": o.data_root or (seg.info.data_root if dataset_mode else None),
        "split": o.split or (seg.info.eval_split if dataset_mode else None),
    }  # fmt: skip
    workers = o.workers if o.workers is not None else default_num_workers(str(seg.device))
    result = predict(
        seg, items, o.out, batch_size=o.batch_size, workers=workers, opacity=o.opacity,
        save_probs=o.save_probs, progress=o.progress, record=record,
    )  # fmt: skip
    print(run_summary(result, Path(o.out)))
    return EXIT_FAILED if result.failures else 0


def prediction_run(
    o: PredictOptions, seg: Segmenter, items: Sequence[Item], dataset_mode: bool
) -> output_folder.Run:
    """What makes a prediction folder: the model file (and the ONNX sidecar) by sha256, the backend,
    the precision it runs in, the images and the options that change the outputs. Inputs: the model,
    the image folder (or a glob's fixed folder, or the listed files), the labels, the dataset root."""
    sidecar = seg.source.with_name(seg.source.name + ".json") if seg.backend == "onnx" else None
    options = {f: getattr(o, f) for f in PredictOptions.__dataclass_fields__}
    ident = output_folder.identity(
        options, skip=NOT_IDENTITY, digests=(seg.source, sidecar), paths=("images", "labels", "data_root")
    )
    ident |= {"backend": seg.backend, "precision": precision_name(seg.amp)}
    inputs = [Path(o.model), seg.source]
    if o.images is not None:
        inputs += image_inputs(o.images, [it.image for it in items])
    inputs += [
        Path(p) for p in (o.labels, o.data_root or (seg.info.data_root if dataset_mode else None)) if p
    ]
    return output_folder.Run("unip-predict", ident, OUTPUTS, inputs, markers=(PRED,), what="predictions")


def image_inputs(spec: str, files: Sequence[Path]) -> list[Path]:
    """The folders (or files) ``--images`` reads: the folder; a glob's folder before its first
    wildcard (a run there would read its own masks next time); a list's or a single file's images."""
    path = Path(spec)
    if path.is_dir():
        return [path]
    if not path.is_file() and any(ch in spec for ch in "*?["):
        fixed = []
        for part in path.parts:
            if any(ch in part for ch in "*?["):
                break
            fixed.append(part)
        return [Path(*fixed) if fixed else Path(".")]
    return list(files)


def main(argv: Sequence[str] | None = None) -> int:
    return command.main(COMMAND, run_predict, argv)


if __name__ == "__main__":
    sys.exit(main())
