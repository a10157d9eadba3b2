"""What ``unip-predict`` writes under ``--out``, each file atomically (temp + rename), named by the
source image's path relative to the image root without its suffix (``REL``: sub-folders mirrored):

- ``pred/REL.png``: indexed (P-mode) PNG, pixel value = class id, embedded palette = the model's;
- ``overlay/REL.jpg``: the image with the mask blended in (``opacity``);
- ``prob/REL.npy``: float16 [C, H, W] class probabilities (``--save-probs``);
- ``errors/REL.png``: image | ground truth | prediction | wrong pixels (with labels);
- ``metrics.json``, ``per_image.csv``, ``confusion_matrix.csv`` (counts) and ``.png`` (row-normalized),
  with labels; ``failed.txt`` when some images could not be segmented.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unip_analysis import plots
from unip_analysis.files import atomic_write, atomic_write_bytes, atomic_write_text

from ..finetune.evaluation import summarize
from ..finetune.pictures import confusion_csv, plot_confusion
from ..runs import plain
from .inference import PredictError

PRED, OVERLAY, PROB, ERRORS = "pred", "overlay", "prob", "errors"
METRICS, PER_IMAGE, CONFUSION_CSV, CONFUSION_PNG, FAILED = (
    "metrics.json", "per_image.csv", "confusion_matrix.csv", "confusion_matrix.png", "failed.txt",
)  # fmt: skip
JPEG_QUALITY = 92


@dataclass(frozen=True)
class Targets:
    """The files of one image under ``out`` (``rel``: its path under the image root, no suffix)."""

    out: Path
    rel: Path

    def _path(self, folder: str, suffix: str) -> Path:
        return self.out / folder / self.rel.parent / (self.rel.name + suffix)

    @property
    def pred(self) -> Path:
        return self._path(PRED, ".png")

    @property
    def overlay(self) -> Path:
        return self._path(OVERLAY, ".jpg")

    @property
    def prob(self) -> Path:
        return self._path(PROB, ".npy")

    @property
    def errors(self) -> Path:
        return self._path(ERRORS, ".png")

    def expected(self, probs: bool, errors: bool) -> list[Path]:
        """Every file this image gets with these options: all present = done (skipped on a re-run)."""
        return [self.pred, self.overlay] + ([self.prob] if probs else []) + ([self.errors] if errors else [])


def mask_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A P-mode image of class ids with ``palette`` [C, 3] embedded."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return im


def write_mask(path: Path, mask: np.ndarray, palette: np.ndarray) -> Path:
    im = mask_image(mask, palette)
    return atomic_write(path, lambda p: im.save(p, format="PNG"))


def read_mask(path: Path) -> np.ndarray:
    """Class ids of a ``pred/`` PNG written before (a re-run scores skipped images from them)."""
    try:
        with Image.open(path) as im:
            if im.mode != "P":
                raise PredictError(
                    f"{path}: not an indexed PNG of class ids; delete it to segment the image again"
                )
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise PredictError(f"{path}: cannot read ({e}); delete it to segment the image again") from None


def write_rgb(path: Path, rgb: np.ndarray, fmt: str) -> Path:
    im = Image.fromarray(rgb)
    kwargs = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    return atomic_write(path, lambda p: im.save(p, format=fmt, **kwargs))


def write_probs(path: Path, probs: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, probs.astype(np.float16))
    return atomic_write_bytes(path, buf.getvalue())


def image_row(name: str, conf: np.ndarray, classes: Sequence[str]) -> dict:
    """One line of ``per_image.csv``: pixel counts, pixel accuracy and mIoU of the image alone."""
    s = summarize(conf, classes)
    labelled = int(conf.sum())
    return {
        "image": name,
        "labelled_pixels": labelled,
        "wrong_pixels": labelled - int(np.trace(conf)),
        "pixel_acc": s["pixel_acc"],
        "miou": s["miou"],
    }


def write_metrics(
    out: Path, conf: np.ndarray, classes: Sequence[str], rows: Sequence[dict], record: dict
) -> dict:
    """``metrics.json`` (the fine-tuning rule: :func:`~unip_train.finetune.evaluation.summarize`),
    ``per_image.csv``, ``confusion_matrix.csv`` and ``.png``; returns the metrics."""
    metrics = {**summarize(conf, classes), "num_images": len(rows), **record}
    atomic_write_text(out / METRICS, json.dumps(plain(metrics), indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "labelled_pixels", "wrong_pixels", "pixel_acc", "miou"])
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["image"]):
        writer.writerow({k: ("" if v != v else v) for k, v in row.items()})  # NaN (no labelled pixel): empty
    atomic_write_text(out / PER_IMAGE, buf.getvalue())
    atomic_write_text(out / CONFUSION_CSV, confusion_csv(conf, classes))
    plots.save(plot_confusion(conf, classes), out / CONFUSION_PNG)
    return metrics


def write_failed(out: Path, failures: Sequence[tuple[Path, str]]) -> Path | None:
    """``failed.txt``: one ``path<TAB>reason`` line per image that failed; removed when none did."""
    path = out / FAILED
    if not failures:
        path.unlink(missing_ok=True)
        return None
    return atomic_write_text(path, "".join(f"{p}\t{why}\n" for p, why in failures))
