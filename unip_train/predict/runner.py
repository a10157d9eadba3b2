"""Segment a list of images with a :class:`~unip_train.predict.inference.Segmenter` and write the
outputs of :mod:`unip_train.predict.outputs`.

Images are read in loader workers while the model runs; images of the same size are batched (up to
``batch_size``) through the sliding window. Re-running into the same folder skips images whose files
are all there (with labels, their confusion is recomputed from ``pred/REL.png``, so metrics cover every
image). An image that cannot be read or segmented is named on one line and the others still run.
Label maps are matched by the image's relative path and stem; a bad label map stops the run.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unip_analysis.errors import ImageError, error_line
from unip_analysis.images import IMAGE_SUFFIXES, find_images

from ..finetune.dataset import SegDataset, layout_lut, read_label
from ..finetune.evaluation import confusion_matrix
from ..finetune.layouts import DatasetError, find_file, get_layout
from ..finetune.pictures import error_panel, overlay
from .inference import ModelInfo, PredictError, Segmenter, prepare
from .outputs import (
    Targets,
    image_row,
    read_mask,
    write_failed,
    write_mask,
    write_metrics,
    write_probs,
    write_rgb,
)

PROG = "unip-predict"


@dataclass(frozen=True)
class Item:
    """One image to segment: its file, its path under the image root without suffix, its label map."""

    image: Path
    rel: Path
    label: Path | None = None


# --- which images ------------------------------------------------------------------------------------


def _absolute(path: Path) -> Path:
    """The path made absolute without following links: a linked image keeps its place under the root."""
    return Path(os.path.abspath(path))


def _common_root(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(_absolute(p.parent)) for p in paths]))


def _items(paths: Sequence[Path], root: Path | None = None) -> list[Item]:
    root = root if root is not None else _common_root(paths)
    items, seen = [], {}
    for p in paths:
        rel = _absolute(p).relative_to(_absolute(root)).with_suffix("")
        if rel in seen:
            raise PredictError(
                f"{p} and {seen[rel]} would both be written as {rel}.png; rename one (outputs are named by stem)"
            )
        seen[rel] = p
        items.append(Item(p, rel))
    return items


def list_images(spec: str | Path) -> list[Item]:
    """``DIR`` (recursive), a glob pattern (``**`` allowed), a ``.txt`` list (one path a line, relative to
    the list's folder) or one image file."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return _items(find_images(path), path)
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        files = [
            Path(ln) if Path(ln).is_absolute() else path.parent / ln
            for ln in lines
            if ln and not ln.startswith("#")
        ]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PredictError(
                f"{path}: lists {len(missing)} missing file(s), first {missing[0]}; fix the list"
            )
        if not files:
            raise PredictError(f"{path}: the list names no images")
        return _items(files)
    if any(ch in text for ch in "*?["):
        files = sorted(
            Path(f)
            for f in glob.glob(text, recursive=True)
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file()
        )
        if not files:
            raise PredictError(
                f"--images {text!r}: the pattern matches no image ({', '.join(IMAGE_SUFFIXES)})"
            )
        return _items(files)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [Item(path, Path(path.stem))]
    raise PredictError(
        f"--images {text}: not found; pass a folder, a glob pattern, a .txt list or an image file"
    )


def match_labels(items: Sequence[Item], labels: str | Path) -> list[Item]:
    """Each image's label map: ``LABELS/REL.png`` (any image suffix), else ``LABELS/STEM.*``."""
    labels = Path(labels)
    if not labels.is_dir():
        raise PredictError(f"--labels {labels}: folder not found; pass the folder of label maps")
    out, missing = [], []
    for it in items:
        found = find_file(labels / it.rel.parent, it.rel.name, ".png") or find_file(
            labels, it.rel.name, ".png"
        )
        if found is None:
            missing.append(it)
        out.append(Item(it.image, it.rel, found))
    if missing:
        first = labels / missing[0].rel.parent / (missing[0].rel.name + ".png")
        raise PredictError(
            f"--labels {labels}: no label map for {len(missing)} of {len(items)} images (first: {missing[0].image}, "
            f"looked for {first}); label maps are named by the image's path and stem"
        )
    return out


def dataset_items(
    seg: Segmenter, dataset: str | None, data_root: str | None, split: str | None
) -> list[Item]:
    """The images and label maps of a dataset split (default: the run's dataset, root and split), read
    as fine-tuning reads them (:class:`~unip_train.finetune.dataset.SegDataset`: files and label values
    checked)."""
    info = seg.info
    ds = SegDataset(
        data_root or info.data_root, dataset or info.dataset, split or info.eval_split, info.num_classes,
        label_map=info.label_map,
    )  # fmt: skip
    if tuple(ds.classes) != info.classes:
        raise PredictError(
            f"{ds.root}: dataset {ds.layout.name} has classes {list(ds.classes)[:4]}..., the model "
            f"{list(info.classes)[:4]}...; pass the dataset the model was trained on"
        )
    images = [s.image for s in ds.samples]
    return [Item(it.image, it.rel, s.label) for it, s in zip(_items(images), ds.samples)]


# --- reading (in loader workers) ------------------------------------------------------------------------


class ReadSet(torch.utils.data.Dataset):
    """Item ``i`` as a dict: ``input`` and ``image`` (to segment), or ``pred`` (done before), ``label``
    when there is one, ``error`` when the image cannot be used. Label problems raise (they stop the run)."""

    def __init__(self, info: ModelInfo, items: Sequence[Item], done: Sequence[Path | None]):
        # The model info only, not the model: workers need no weights (nor an ONNX session).
        self.info, self.items, self.done = info, list(items), list(done)
        self.lut = layout_lut(get_layout(info.dataset), info.label_map)
        self.hint = f"the model has {info.num_classes} classes ({', '.join(info.classes[:4])}, ...)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        rec: dict = {"i": i}
        try:
            if self.done[i] is not None:
                rec["pred"] = read_mask(self.done[i])
                size = rec["pred"].shape
            else:
                rec["input"], image = prepare(it.image, self.info)
                rec["image"] = image.numpy()
                size = rec["image"].shape[-2:]
        except (ImageError, DatasetError, PredictError) as e:
            rec["error"] = error_line(e)
            return rec
        if it.label is not None:
            label = read_label(it.label, self.info.num_classes, self.lut, self.hint)
            if label.shape != size:
                raise DatasetError(
                    f"{it.label}: label map is {label.shape[0]}x{label.shape[1]} but image {it.image} is "
                    f"{size[0]}x{size[1]}; they must be the same size"
                )
            rec["label"] = label
        return rec


def _keep(x):
    return x


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Result:
    segmented: int = 0
    skipped: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    metrics: dict | None = None


def check_options(batch_size: int, opacity: float) -> None:
    """Refuse a batch size below 1 and an overlay opacity outside [0, 1]."""
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: expected 1 or more")
    if not 0.0 <= opacity <= 1.0:
        raise PredictError(f"--opacity {opacity}: expected a value in [0, 1]")


def finished_masks(targets: Sequence[Targets], items: Sequence[Item], save_probs: bool) -> list[Path | None]:
    """Per image, its mask when a run before wrote every output it needs (the image is not redone)."""
    return [
        t.pred if all(p.is_file() for p in t.expected(save_probs, it.label is not None)) else None
        for t, it in zip(targets, items)
    ]


class Batcher:
    """One run's state as the loader's records come in: images of one size are batched, segmented
    and written together; failures are listed and scored images counted in the confusion matrix."""

    def __init__(
        self,
        seg: Segmenter,
        items: Sequence[Item],
        targets: Sequence[Targets],
        batch_size: int,
        opacity: float,
        save_probs: bool,
        bar: tqdm,
    ):
        self.seg, self.items, self.targets, self.bar = seg, items, targets, bar
        self.batch_size, self.opacity, self.save_probs = batch_size, opacity, save_probs
        self.palette = seg.info.palette_array()
        self.classes = seg.info.classes
        self.result = Result()
        self.conf = np.zeros((len(self.classes), len(self.classes)), dtype=np.int64)
        self.rows: list[dict] = []
        self.pending: list[dict] = []

    def take(self, rec: dict) -> None:
        """One loader record: a failure, an image done before (scored again), or one to segment."""
        if "error" in rec:
            self.fail(rec, rec["error"])
        elif "pred" in rec:
            self.score(rec, rec["pred"])
            self.result.skipped += 1
            self.bar.update(1)
        else:
            pending = self.pending
            # Same input size and same image size (grey [H, W] or colour [3, H, W]): one batch.
            key = (rec["input"].shape, rec["image"].shape)
            if pending and (
                key != (pending[0]["input"].shape, pending[0]["image"].shape)
                or len(pending) >= self.batch_size
            ):
                self.flush()
            pending.append(rec)

    def score(self, rec: dict, pred: np.ndarray) -> None:
        """Add a labelled image's confusion matrix to the run's, and its row to the per-image table."""
        if "label" in rec:
            n = len(self.classes)
            c = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(rec["label"]), n).numpy()
            self.conf += c
            self.rows.append(image_row(str(self.items[rec["i"]].rel), c, self.classes))

    def flush(self) -> None:
        """Segment the pending batch and write each image's outputs, the mask last."""
        pending = self.pending
        if not pending:
            return
        batch = torch.stack([r["input"] for r in pending])
        try:
            logits = self.seg.logits(batch, pending[0]["image"].shape[-2:])
        except RuntimeError as e:  # out of memory and the like: these images fail, the rest still run
            for r in pending:
                self.fail(r, f"inference failed ({error_line(e)})")
            pending.clear()
            return
        for r, lg in zip(pending, logits):
            pred = lg.argmax(0).to(torch.uint8).cpu().numpy()
            t = self.targets[r["i"]]
            if self.save_probs:
                write_probs(t.prob, torch.softmax(lg, 0).cpu().numpy())
            write_rgb(t.overlay, overlay(r["image"], pred, self.palette, self.opacity), "JPEG")
            if "label" in r:
                write_rgb(t.errors, error_panel(r["image"], r["label"], pred, self.palette), "PNG")
            write_mask(t.pred, pred, self.palette)  # last: its presence with the others marks the image done
            self.score(r, pred)
            self.result.segmented += 1
            self.bar.update(1)
        pending.clear()

    def fail(self, rec: dict, why: str) -> None:
        """List an image that could not be segmented, and say so."""
        path = self.items[rec["i"]].image
        self.result.failures.append((path, why))
        self.bar.write(
            f"{PROG}: {why if why.startswith(str(path)) else f'{path}: {why}'} (skipped)", file=sys.stderr
        )
        self.bar.update(1)


def predict(
    seg: Segmenter,
    items: Sequence[Item],
    out: str | Path,
    batch_size: int = 4,
    workers: int = 0,
    opacity: float = 0.5,
    save_probs: bool = False,
    progress: bool = True,
    record: dict | None = None,
) -> Result:
    """Segment ``items`` into ``out`` (continuing a folder written before); with labels, score them."""
    check_options(batch_size, opacity)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labelled = any(it.label is not None for it in items)
    targets = [Targets(out, it.rel) for it in items]
    done = finished_masks(targets, items, save_probs)
    loader = torch.utils.data.DataLoader(
        ReadSet(seg.info, items, done), batch_size=None, num_workers=workers, collate_fn=_keep,
        pin_memory=seg.device.type == "cuda",
    )  # fmt: skip
    bar = tqdm(total=len(items), desc=PROG, unit="img", disable=not progress, dynamic_ncols=True)
    run = Batcher(seg, items, targets, batch_size, opacity, save_probs, bar)
    try:
        for rec in loader:
            run.take(rec)
        run.flush()
    finally:
        bar.close()
    write_failed(out, run.result.failures)
    if labelled:
        run.result.metrics = write_metrics(out, run.conf, run.classes, run.rows, dict(record or {}))
    return run.result


def run_summary(result: Result, out: Path) -> str:
    """The closing line: counts, mIoU when scored, where the failures are listed."""
    parts = [f"{result.segmented} segmented", f"{result.skipped} already done"]
    if result.failures:
        parts.append(f"{len(result.failures)} failed (listed in {out / 'failed.txt'})")
    line = ", ".join(parts)
    m = result.metrics
    if m is not None and m.get("miou") is not None and m["miou"] == m["miou"]:
        line += f"; mIoU {m['miou']:.4f}  pixel acc {m['pixel_acc']:.4f} ({m['num_images']} images)"
    return f"{line} -> {out}"
