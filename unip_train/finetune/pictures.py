"""Pictures of a segmentation model: class colours on images, the panels ``unip-predict`` writes, and the
figures of a fine-tuning run folder (:func:`write_run_pictures`).

- Masks are drawn with the dataset's palette when the model has one; run pictures of a model without
  one use fixed display colours (:func:`display_palette`), named as such in the figure.
- ``curves.png``: loss terms, learning rate and the data-time share (seconds waiting for batches /
  seconds per iteration) from ``log.jsonl``; mIoU where the run was evaluated.
- ``confusion_matrix.png``: rows (ground truth) normalized to 1; ``confusion_matrix.csv``: counts.
- ``per_class_iou.png``: IoU of each class (``n/a``: in neither ground truth nor prediction).
- ``samples.png``: image | ground truth | prediction for :data:`SAMPLES` evaluation images spread
  evenly over the split (the same ones in every run on that split, so runs compare).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.patches import Patch
from PIL import Image, ImageDraw

from unip_analysis import plots
from unip_analysis.files import atomic_write_text

from .evaluation import full_size_logits, summarize, upsampled_logits
from .layouts import IGNORE_INDEX

plt = plots.plt
SAMPLES = 4
WRONG = (230, 30, 30)
IGNORED = (0, 0, 0)
CURVES, CONFUSION_PNG, CONFUSION_CSV, PER_CLASS_PNG, SAMPLES_PNG = (
    "curves.png", "confusion_matrix.png", "confusion_matrix.csv", "per_class_iou.png", "samples.png",
)  # fmt: skip
RUN_PICTURES = (CURVES, CONFUSION_PNG, PER_CLASS_PNG, SAMPLES_PNG)


# --- colours and panels (uint8 RGB arrays) ---------------------------------------------------------


def display_palette(num_classes: int) -> np.ndarray:
    """Fixed display colours [C, 3] (matplotlib's tab20, class 0 black) for a model without a palette."""
    colours = (np.asarray(plt.get_cmap("tab20").colors) * 255).round().astype(np.uint8)
    out = np.stack([colours[(i - 1) % len(colours)] for i in range(num_classes)])
    out[0] = 0
    return out


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class ids [H, W] -> RGB [H, W, 3] through ``palette`` [C, 3]; 255 (ignore) black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    lut[IGNORE_INDEX] = IGNORED
    return lut[mask]


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """A 0-255 float image as the dataset reads it, grey [H, W] or colour [3, H, W], as uint8 RGB."""
    g = np.clip(np.asarray(image, dtype=np.float32), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(g.transpose(1, 2, 0)) if g.ndim == 3 else np.repeat(g[..., None], 3, axis=2)


def overlay(grey: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """``(1 - opacity) * image + opacity * colour(class)`` for every pixel."""
    blend = (1.0 - opacity) * grey_rgb(grey).astype(np.float32) + opacity * colorize(mask, palette)
    return blend.round().astype(np.uint8)


def wrong_pixels(grey: np.ndarray, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image dimmed, wrongly predicted pixels red, pixels without a label (255) black."""
    out = (grey_rgb(grey) // 2).astype(np.uint8)
    out[(pred != label) & (label != IGNORE_INDEX)] = WRONG
    out[label == IGNORE_INDEX] = IGNORED
    return out


def panel(images: Sequence[np.ndarray], titles: Sequence[str], gap: int = 4, header: int = 14) -> np.ndarray:
    """Same-height RGB images side by side on white, each with its title above."""
    h = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, h + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, title in zip(images, titles):
        canvas.paste(Image.fromarray(im), (x, header))
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        x += im.shape[1] + gap
    return np.asarray(canvas)


def error_panel(grey: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction | wrong pixels (share of labelled pixels in the title)."""
    labelled = label != IGNORE_INDEX
    share = float((pred[labelled] != label[labelled]).mean()) if labelled.any() else 0.0
    return panel(
        [grey_rgb(grey), colorize(label, palette), colorize(pred, palette), wrong_pixels(grey, pred, label)],
        ["image", "ground truth", "prediction", f"wrong pixels ({share:.1%})"],
    )


# --- figures ------------------------------------------------------------------------------------------


def plot_confusion(conf: np.ndarray, classes: Sequence[str]):
    """Row-normalized confusion matrix (rows ground truth, columns prediction), class names on both axes."""
    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = len(classes)
    size = max(4.5, 0.42 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    colour = "white" if norm[i, j] > 0.6 else "black"
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion matrix (each row normalized to 1; rows without pixels blank)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_per_class_iou(per_class: Mapping[str, float | None], miou: float | None):
    """Horizontal bars of per-class IoU; classes in neither ground truth nor prediction read ``n/a``."""
    names = list(per_class)
    values = [per_class[n] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(names) + 1.4), layout="constrained")
    y = np.arange(len(names))
    ax.barh(y, [v or 0.0 for v in values], color="#4C72B0")
    for i, v in enumerate(values):
        ax.text((v or 0.0) + 0.01, i, "n/a" if v is None else f"{v:.3f}", va="center", fontsize=8)
    if miou is not None and np.isfinite(miou):
        ax.axvline(miou, color="#C44E52", ls="--", lw=1.2, label=f"mIoU {miou:.4f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("IoU")
    ax.set_title("IoU per class (n/a: in neither ground truth nor prediction)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl`` (unreadable lines skipped: a killed run may leave half a line)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(records: Sequence[Mapping]):
    """Loss terms, learning rate, data-time share per logging window; mIoU where evaluated."""
    train = [r for r in records if "loss" in r and "iter" in r]
    evals = [r for r in records if r.get("event") == "eval" and r.get("miou") is not None and "iter" in r]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), layout="constrained")
    it = [r["iter"] for r in train]
    terms = [k for k in train[0] if k in ("loss", "ce", "aux_ce") or k.endswith("_loss")] if train else []
    for k in terms:
        axes[0].plot(it, [r.get(k) for r in train], lw=1.4, label=k)
    axes[0].set_title("loss (mean over each logging window)", fontsize=10)
    if terms:
        axes[0].legend(fontsize=8)
    axes[1].plot(it, [r.get("lr") for r in train], color="#55A868", lw=1.4)
    axes[1].set_title("learning rate (base)", fontsize=10)
    share = [
        r["data_time"] / r["iter_time"] if r.get("iter_time") else None for r in train if "data_time" in r
    ]
    axes[2].plot([r["iter"] for r in train if "data_time" in r], share, color="#8172B2", lw=1.4)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("data-time share (waiting for batches)", fontsize=10)
    if evals:
        axes[3].plot([r["iter"] for r in evals], [r["miou"] for r in evals], "o-", color="#C44E52")
        axes[3].set_title(f"mIoU (last {evals[-1]['miou']:.4f})", fontsize=10)
    else:
        axes[3].text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=axes[3].transAxes)
        axes[3].set_title("mIoU", fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    return fig


def plot_samples(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    palette: np.ndarray,
    palette_note: str = "",
):
    """One row per (name, grey, label, prediction): image | ground truth | prediction, class legend."""
    fig, axes = plt.subplots(
        len(rows), 3, figsize=(10, 3.0 * len(rows) + 0.6), squeeze=False, layout="constrained"
    )
    for r, (name, grey, label, pred) in enumerate(rows):
        for c, (img, title) in enumerate(
            (
                (grey_rgb(grey), "image"),
                (colorize(label, palette), "ground truth"),
                (colorize(pred, palette), "prediction"),
            )
        ):
            axes[r, c].imshow(img, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=10)
        axes[r, 0].set_ylabel(name, fontsize=8)
    present = sorted(
        {int(v) for _, _, lab, pred in rows for v in np.unique(np.concatenate([lab.ravel(), pred.ravel()]))}
    )
    handles = [Patch(color=palette[i] / 255.0, label=classes[i]) for i in present if i < len(classes)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, max(1, len(handles))), fontsize=8)
    fig.suptitle(f"Evaluation samples (ignored pixels black){palette_note}", fontsize=10)
    return fig


def sample_indices(n: int, k: int = SAMPLES) -> list[int]:
    """``k`` indices spread evenly over ``0..n-1`` (first and last included): a fixed choice per split."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n)).round()}) if n else []


def confusion_csv(conf: np.ndarray, classes: Sequence[str]) -> str:
    """Counts: one row per ground-truth class, one column per predicted class, names as headers."""
    conf = np.asarray(conf, dtype=np.int64)
    quoted = [f'"{c}"' if "," in c else c for c in classes]
    lines = ["ground_truth\\prediction," + ",".join(quoted)]
    lines += [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(quoted, conf)]
    return "\n".join(lines) + "\n"


# --- a fine-tuning run folder ----------------------------------------------------------------------------


@torch.no_grad()
def write_run_pictures(
    run_dir: str | Path,
    model: torch.nn.Module,
    eval_set,
    conf: np.ndarray,
    window: int,
    stride: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    palette=None,
) -> list[Path]:
    """``curves.png``, ``confusion_matrix.png`` + ``.csv``, ``per_class_iou.png`` and ``samples.png`` in
    ``run_dir`` from the evaluation's confusion matrix and the model run on the sample images of
    ``eval_set`` (a :class:`~unip_train.finetune.dataset.SegDataset` read with ``EvalResize``)."""
    run_dir = Path(run_dir)
    classes = list(eval_set.classes)
    summary = summarize(conf, classes)
    written = [
        atomic_write_text(run_dir / CONFUSION_CSV, confusion_csv(conf, classes)),
        plots.save(plot_confusion(conf, classes), run_dir / CONFUSION_PNG),
        plots.save(plot_per_class_iou(summary["per_class_iou"], summary["miou"]), run_dir / PER_CLASS_PNG),
        plots.save(plot_curves(read_log(run_dir / "log.jsonl")), run_dir / CURVES),
    ]
    if palette is None:
        colours, note = display_palette(len(classes)), " (display colours: the model has no palette)"
    else:
        colours, note = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[: len(classes)], ""
    was_training = model.training
    model.eval()
    fn = upsampled_logits(model)
    rows = []
    for i in sample_indices(len(eval_set)):
        img, label = eval_set[i]
        logits = full_size_logits(fn, img[None].to(device), label.shape, len(classes), window, stride, amp)
        pixels = eval_set.load(i)[0].numpy()  # uint8 [H, W, C]
        grey = pixels[..., 0] if pixels.shape[-1] == 1 else pixels.transpose(2, 0, 1)
        rows.append(
            (
                eval_set.samples[i].stem,
                grey,
                label.numpy().astype(np.uint8),
                logits.argmax(1)[0].cpu().numpy().astype(np.uint8),
            )
        )
    model.train(was_training)
    if rows:
        written.append(plots.save(plot_samples(rows, classes, colours, note), run_dir / SAMPLES_PNG))
    return written
