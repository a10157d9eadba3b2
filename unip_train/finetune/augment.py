"""Training augmentation and evaluation resizing of segmentation samples, in 8 bits as mmsegmentation
0.x does it (method.md section 4; docs/parity.md names the mmseg / mmcv function behind each step).

Images are uint8 arrays [H, W, C]: C = 1 (grey infrared) or C = 3 (RGB); labels uint8 [H, W].
Train: ``Resize`` (ratio 0.5-2.0 of the scale, keep ratio, OpenCV bilinear on uint8; labels nearest),
``RandomCrop`` with ``cat_max_ratio`` (up to 10 checks), ``RandomFlip``, ``PhotoMetricDistortion``
(every step rounds back to uint8), then ``Normalize`` and ``Pad`` (:func:`to_input`). Evaluation:
``Resize`` to fit the scale (:class:`EvalResize`). The random draws are ours (a generator per sample,
for exact resume) and are made where mmseg makes its ``numpy.random`` draws, in the same order."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch

from .layouts import IGNORE_INDEX

_opencv_lock = threading.Lock()
_opencv_users = 0
_opencv_threads = 0  # OpenCV's thread count before the first user in


@contextlib.contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV's own thread pool off while the block runs, its thread count as it was after.

    One sample's OpenCV calls are small, and they run beside torch's threads (in the training process)
    or in loader workers: OpenCV's pool only competes with those (on 2 busy cores a 128 px sample took
    twice as long with it). mmsegmentation's later 0.x releases turn it off for the whole process
    (``setup_multi_processes``: ``opencv_num_threads`` 0); here it is off only during our calls, so
    importing this module changes nothing for the rest of the process. Results do not depend on it.
    Setting the count costs about a microsecond; the count of users keeps overlapping blocks (threads)
    from restoring it early."""
    global _opencv_users, _opencv_threads
    with _opencv_lock:
        if _opencv_users == 0:
            _opencv_threads = cv2.getNumThreads()
            cv2.setNumThreads(0)
        _opencv_users += 1
    try:
        yield
    finally:
        with _opencv_lock:
            _opencv_users -= 1
            if _opencv_users == 0:
                cv2.setNumThreads(_opencv_threads)


# --- geometry (mmcv.image.geometric) -------------------------------------------------------------


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio size that fits ``scale`` = (long, short) edge limits: ``mmcv.rescale_size``,
    ``int(edge * factor + 0.5)`` with ``factor = min(long / max(h, w), short / min(h, w))``."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV bilinear resize of a uint8 image [H, W, C] to ``size`` = (h, w), as ``mmcv.imresize``
    (``cv2.resize``, ``INTER_LINEAR``); the channel axis is kept for C = 1."""
    out = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(size[0], size[1], img.shape[2])


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map [H, W] (``mmcv.imresize(..., 'nearest')``)."""
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


# --- photometric steps (mmseg PhotoMetricDistortion.convert) -----------------------------------------

_LEVELS = np.arange(256, dtype=np.float32)


def shift_table(beta: float) -> np.ndarray:
    """The uint8 -> uint8 table of ``convert(img, beta=beta)``: ``float32(v) + float32(beta)``,
    clipped to 0-255, truncated to uint8 (``astype``)."""
    return np.clip(_LEVELS + np.float32(beta), 0, 255).astype(np.uint8)


def scale_table(alpha: float) -> np.ndarray:
    """The uint8 -> uint8 table of ``convert(img, alpha=alpha)``: ``float32(v) * float32(alpha)``,
    clipped to 0-255, truncated to uint8."""
    return np.clip(_LEVELS * np.float32(alpha), 0, 255).astype(np.uint8)


@dataclass
class TrainAugment:
    """mmseg's train pipeline from ``Resize`` to ``PhotoMetricDistortion``: random rescale (ratio
    0.5-2.0 of ``scale``), random crop with ``cat_max_ratio``, flip, photometric distortion
    (brightness, contrast, saturation, hue). Returns the uint8 image [h, w, C] (h, w <= crop) and the
    label map padded to the crop with 255; the image is padded after normalization
    (:attr:`pads_image`, :func:`~unip_train.finetune.dataset.to_input`), as mmseg's ``Pad`` follows
    ``Normalize``.

    The real recipe uses ``scale = (2048, 512)`` with 512 crops; :meth:`for_crop` scales it as
    ``(4 * crop, crop)``. Random draws come from ``g`` (torch's global generator when None).
    ``photometric=False`` leaves the distortion out (and draws nothing for it).
    """

    crop: int
    scale: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    brightness_delta: float = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    photometric: bool = True

    pads_image: ClassVar[bool] = True  # the image is padded to the label's size after normalization

    @classmethod
    def for_crop(cls, crop: int, scale: tuple[int, int] | None = None) -> TrainAugment:
        """The recipe at ``crop``: ``scale`` the dataset's img_scale, (4 * crop, crop) unless given."""
        return cls(crop=crop, scale=tuple(scale) if scale is not None else (4 * crop, crop))

    @opencv_single_threaded()
    def __call__(
        self, img: np.ndarray, label: np.ndarray, g: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        draws = Draws(g)
        # Resize.random_sample_ratio: the scale's edges are truncated to integers.
        r = draws.uniform(*self.ratio_range)
        h, w = img.shape[:2]
        size = rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))
        img, label = resize(img, size), resize_label(label, size)
        top, left = self._crop_offset(label, draws)
        img = img[top : top + self.crop, left : left + self.crop]
        label = label[top : top + self.crop, left : left + self.crop]
        if draws.rand() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = self._photometric(img, draws)
        padded = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.uint8)
        padded[: label.shape[0], : label.shape[1]] = label
        return img, padded

    def _crop_offset(self, label: np.ndarray, draws: Draws) -> tuple[int, int]:
        """mmseg ``RandomCrop``: an offset, then up to 10 checks of its window, a new offset after each
        refused one (so 10 refusals end on an 11th, unchecked offset). A window is accepted when it
        holds more than one labelled class and the largest of them covers less than
        ``cat_max_ratio`` of its labelled pixels (the ratio in float64, as numpy divides counts)."""
        h, w = label.shape
        margin_h, margin_w = max(h - self.crop, 0), max(w - self.crop, 0)
        top, left = draws.randint(margin_h + 1), draws.randint(margin_w + 1)
        if self.cat_max_ratio >= 1.0:
            return top, left
        for _ in range(10):
            window = label[top : top + self.crop, left : left + self.crop]
            if self._accepts(window):
                break
            top, left = draws.randint(margin_h + 1), draws.randint(margin_w + 1)
        return top, left

    def _accepts(self, window: np.ndarray) -> bool:
        # Class 0 (the background of the infrared datasets) is counted first, with two vectorised
        # comparisons: if it alone reaches the ratio the largest class does too (division is
        # monotonic), and the window is refused without a full count. On background-heavy scenes
        # most tried windows end here; a class count of a window that is mostly one value is slow.
        labelled = window.size - np.count_nonzero(window == IGNORE_INDEX)
        if labelled == 0 or (window.size - np.count_nonzero(window)) / labelled >= self.cat_max_ratio:
            return False
        # OpenCV's histogram: a quarter of np.bincount's time; float32 counts, exact below 2**24.
        counts = cv2.calcHist([window], [0], None, [256], [0, 256]).reshape(-1)
        counts[IGNORE_INDEX] = 0
        return np.count_nonzero(counts) > 1 and int(counts.max()) / labelled < self.cat_max_ratio

    def _photometric(self, img: np.ndarray, draws: Draws) -> np.ndarray:
        """mmseg ``PhotoMetricDistortion``: brightness, then contrast first (mode 1) or last (mode 0),
        saturation and hue between, each with probability 1/2 (``randint(2)``), each rounding back
        to uint8. Brightness and contrast map every value on its own: their tables are composed and
        applied once. Saturation and hue go through OpenCV's HSV (``cvtColor``, uint8) each on its
        own, as mmseg converts twice, on the crop as mmseg holds it (flipped first: OpenCV's HSV to
        RGB is not the same function of every pixel wherever it sits in the image, so the order
        matters). On a grey image (C = 1, meaning R = G = B) both are exact no-ops (S = 0; tested
        over every level, shift and factor), so only their draws are made."""
        table: np.ndarray | None = None  # pending per-value steps, applied together

        def then(step: np.ndarray) -> None:
            nonlocal table
            table = step if table is None else step[table]

        def apply() -> np.ndarray:
            nonlocal table
            out = img if table is None else cv2.LUT(img, table).reshape(img.shape)
            table = None
            return out

        colour = img.shape[2] == 3
        if draws.randint(2):
            then(shift_table(draws.uniform(-self.brightness_delta, self.brightness_delta)))
        mode = draws.randint(2)
        if mode == 1 and draws.randint(2):
            then(scale_table(draws.uniform(*self.contrast_range)))
        if draws.randint(2):
            factor = draws.uniform(*self.saturation_range)
            if colour:
                img = apply()
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
                hsv[..., 1] = scale_table(factor)[hsv[..., 1]]
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if draws.randint(2):
            shift = draws.randint(2 * self.hue_delta) - self.hue_delta  # randint(-delta, delta)
            if colour:
                img = apply()
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
                hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if mode == 0 and draws.randint(2):
            then(scale_table(draws.uniform(*self.contrast_range)))
        return apply()


class Draws:
    """One sample's random draws from ``g`` (torch's global generator when None): the values, and the
    generator's state after them, of ``torch.rand(())`` (:meth:`rand`) and ``torch.randint(0, n, ())``
    (:meth:`randint`), drawn into two scalars made once (a third of a call's cost). They stand where
    mmseg calls ``numpy.random``: ``random_sample`` / ``rand`` (:meth:`rand`), ``randint(n)``,
    ``uniform(lo, hi) = lo + (hi - lo) * rand()``. A :class:`TrainAugment` sample draws 1 (ratio),
    2 to 22 (crop offsets), 1 (flip) and 4 to 9 (photometric) times."""

    __slots__ = ("g", "_int", "_float")

    def __init__(self, g: torch.Generator | None = None):
        self.g = g
        self._int = torch.empty((), dtype=torch.int64)
        self._float = torch.empty((), dtype=torch.float32)

    def rand(self) -> float:
        return self._float.uniform_(generator=self.g).item()

    def randint(self, n: int) -> int:
        return self._int.random_(0, n, generator=self.g).item()

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.rand()


@dataclass
class EvalResize:
    """Test-time keep-ratio resize of the image to fit ``scale`` (OpenCV bilinear on uint8, mmseg's
    ``Resize(keep_ratio=True)`` in its test pipeline); labels stay at full resolution."""

    scale: tuple[int, int]

    pads_image: ClassVar[bool] = False

    @classmethod
    def for_crop(cls, crop: int, scale: tuple[int, int] | None = None) -> EvalResize:
        return cls(scale=tuple(scale) if scale is not None else (4 * crop, crop))

    @opencv_single_threaded()
    def __call__(
        self, img: np.ndarray, label: np.ndarray, g: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``g`` is accepted for the common transform signature; nothing here is random."""
        size = rescale_size(*img.shape[:2], self.scale)
        if size != tuple(img.shape[:2]):
            img = resize(img, size)
        return img, label
