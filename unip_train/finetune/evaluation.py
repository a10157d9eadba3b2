"""Segmentation evaluation: sliding-window inference and IoU from a confusion matrix.

- Sliding window (method.md section 4: 512 x 512 windows, stride 341): windows tile the image,
  the last one in each direction is shifted back to end at the border, logits of overlapping
  windows are averaged. Windows larger than the image are padded (with 0, the normalized mean)
  so the backbone always sees its fixed input size, and the padding is cropped from the logits.
- IoU_c = TP_c / (TP_c + FP_c + FN_c) from a confusion matrix over pixels whose label is not 255.
  A class absent from both ground truth and prediction has no IoU (``None`` in JSON) and does not
  count towards mIoU: mIoU is the mean over classes present in the ground truth or the prediction
  (as mmsegmentation's ``nanmean``). Pixel accuracy = trace / labelled pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..precision import autocast
from .layouts import IGNORE_INDEX

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``length``; the last one ends at the border."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def slide_logits(fn: LogitsFn, img: torch.Tensor, num_classes: int, window: int, stride: int) -> torch.Tensor:
    """Average of ``fn`` over sliding ``window`` x ``window`` crops: [B, 3, H, W] -> [B, C, H, W].

    ``fn`` maps a [B, 3, window, window] batch to logits of the same spatial size.
    """
    b, _, h, w = img.shape
    out = img.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for top in window_starts(h, window, stride):
        for left in window_starts(w, window, stride):
            crop = img[:, :, top : top + window, left : left + window]
            ch, cw = crop.shape[-2:]
            if ch < window or cw < window:
                crop = F.pad(crop, (0, window - cw, 0, window - ch))
            logits = fn(crop)[:, :, :ch, :cw].float()
            out[:, :, top : top + ch, left : left + cw] += logits
            count[:, :, top : top + ch, left : left + cw] += 1
    return out / count


def upsampled_logits(model: torch.nn.Module) -> LogitsFn:
    """Logits of a :class:`~unip_train.finetune.ll_fpn.Segmentor` resized (bilinear) to its input size."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return fn


def full_size_logits(
    fn: LogitsFn,
    img: torch.Tensor,
    size: Sequence[int],
    num_classes: int,
    window: int,
    stride: int,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Sliding-window logits of a batch [B, 3, h, w] (the resized, normalized images) under autocast to
    ``amp``, resized bilinearly in float32 to ``size`` (the label's, which is the original image's):
    [B, C, *size]. What evaluation scores and ``unip-predict`` writes."""
    with autocast(img.device, amp):
        logits = slide_logits(fn, img, num_classes, window, stride)
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; label 255 skipped."""
    keep = label != IGNORE_INDEX
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of each class, NaN where the class is in neither ground truth nor prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def summarize(conf: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """``{miou, per_class_iou{name: iou or None}, pixel_acc}`` from a confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou)},
        "pixel_acc": float(np.trace(conf) / total) if total > 0 else float("nan"),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    num_classes: int,
    window: int,
    stride: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Confusion matrix of ``model`` over ``dataset`` (samples ``rank::world_size`` on each process,
    summed over processes). Logits are computed at the dataset's (resized) image size and resized
    bilinearly to the label's size before the argmax."""
    was_training = model.training
    model.eval()
    fn = upsampled_logits(model)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    indices = range(rank, len(dataset), world_size)
    for i in tqdm(indices, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        img, label = dataset[i]
        logits = full_size_logits(
            fn, img.unsqueeze(0).to(device), label.shape[-2:], num_classes, window, stride, amp
        )
        conf += confusion_matrix(logits.argmax(1)[0].cpu(), label, num_classes)
    if world_size > 1 and dist.is_initialized():
        conf_dev = conf.to(device)
        dist.all_reduce(conf_dev)
        conf = conf_dev.cpu()
    model.train(was_training)
    return conf.numpy()
