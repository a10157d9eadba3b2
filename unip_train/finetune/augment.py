"""Training augmentation and evaluation resizing of segmentation samples (method.md section 4, after
mmsegmentation 0.x): rescale, crop with cat_max_ratio, flip, photometric distortion, padding.

Images are grey [H, W] or, for the RGB / depth layouts, colour [3, H, W] (0-255 float); every step
treats the channels alike (the photometric distortion is brightness and contrast only, also on
colour: mmsegmentation's saturation and hue steps are not applied here)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unip_analysis.images import NORMALIZATIONS

from .layouts import IGNORE_INDEX

# --- augmentation (method.md section 4) --------------------------------------------------


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio size that fits ``scale`` = (long, short) edge limits (mmseg ``keep_ratio``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


@functools.lru_cache(maxsize=4096)
def nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """The source index of each of ``n_out`` positions under ``F.interpolate(mode="nearest")`` from
    ``n_in``: PyTorch's own kernel applied to the indices (exact in float32 below 2**24), so that
    ``label[rows[:, None], cols]`` is the nearest resize of ``label``, any part of it on its own.
    Kept per size pair (a run sees a few hundred): callers only read the result."""
    src = torch.arange(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(src, size=n_out, mode="nearest")[0, 0].long()


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a grey image [H, W] or a colour one [3, H, W] (labels: :func:`nearest_indices`)."""
    if img.dim() == 3:
        return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.interpolate(img[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


@dataclass
class TrainAugment:
    """Random rescale (ratio 0.5-2.0 of ``scale``), random crop with ``cat_max_ratio``, flip,
    photometric distortion (brightness, contrast), pad to the crop (label padding 255).

    The real recipe uses ``scale = (2048, 512)`` with 512 crops; :meth:`for_crop` scales it as
    ``(4 * crop, crop)`` unless given. Random draws come from ``g`` (torch's global generator when
    None). ``pad_value``: the image's padding, per channel or one for all (0-255), the
    normalization's mean so that padding is 0 once normalized, as mmseg pads normalized images; a
    grey image padded under a per-channel mean becomes [3, H, W].
    """

    crop: int
    scale: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    pad_value: tuple[float, ...] = (NORMALIZATIONS["infrared"][0][0] * 255.0,)

    @classmethod
    def for_crop(
        cls, crop: int, scale: tuple[int, int] | None = None, mean: tuple[float, ...] | None = None
    ) -> TrainAugment:
        """``mean``: the normalization's mean (0-1 scale), padded with; default the infrared one."""
        pad = cls.pad_value if mean is None else tuple(m * 255.0 for m in mean)
        return cls(crop=crop, scale=scale or (4 * crop, crop), pad_value=pad)

    def __call__(
        self, img: torch.Tensor, label: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draws = Draws(g)
        r = draws.uniform(*self.ratio_range)
        h, w = img.shape[-2:]
        size = rescale_size(h, w, (self.scale[0] * r, self.scale[1] * r))
        img = resize(img, size)
        img, label = self._crop(img, label, nearest_indices(h, size[0]), nearest_indices(w, size[1]), draws)
        if draws.chance(self.flip_prob):
            img, label = img.flip(-1), label.flip(-1)
        img = self._photometric(img, draws)
        return self._pad(img, label)

    def _crop(
        self,
        img: torch.Tensor,
        label: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        draws: Draws,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A crop of the resized image and label (``label`` at its own size, resized through ``rows``
        and ``cols``: :func:`nearest_indices`, gathered once in numpy, each tried window a view).

        The ratio is formed in float32, as the same test on torch tensors did, so the decisions are
        unchanged."""
        h, w = img.shape[-2:]
        ch, cw = min(self.crop, h), min(self.crop, w)
        resized = label.numpy().take(rows.numpy(), 0).take(cols.numpy(), 1)
        limit = np.float32(self.cat_max_ratio)
        for _ in range(10):
            top, left = draws.randint(h - ch + 1), draws.randint(w - cw + 1)
            window = resized[top : top + ch, left : left + cw]
            if self.cat_max_ratio >= 1.0:
                break
            # Accept a crop unless one class fills more than cat_max_ratio of its labelled pixels.
            # Class 0 (the background of the infrared datasets) is counted first, with two
            # vectorised comparisons: if it alone reaches the ratio the largest class does too
            # (float32 division is monotonic), and the window is refused without a full count. On
            # background-heavy scenes most tried windows end here; a class count of a window that
            # is mostly one value is slow (every pixel adds to the same counter).
            labelled = window.size - np.count_nonzero(window == IGNORE_INDEX)
            if labelled == 0:
                continue
            if np.float32(window.size - np.count_nonzero(window)) / np.float32(labelled) >= limit:
                continue
            # Every value counted, then the ignore index's count dropped: the labelled pixels.
            counts = np.bincount(window.ravel())
            if len(counts) > IGNORE_INDEX:
                counts[IGNORE_INDEX] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and np.float32(counts.max()) / np.float32(counts.sum()) < limit:
                break
        return img[..., top : top + ch, left : left + cw], torch.from_numpy(np.ascontiguousarray(window))

    def _photometric(self, img: torch.Tensor, draws: Draws) -> torch.Tensor:
        if draws.chance(0.5):
            img = img + draws.uniform(-self.brightness_delta, self.brightness_delta)
        if draws.chance(0.5):
            img = img * draws.uniform(*self.contrast_range)
        return img.clamp(0.0, 255.0)

    def _pad(self, img: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = label.shape
        ph, pw = self.crop - h, self.crop - w
        if ph > 0 or pw > 0:
            # The mean becomes 0 after normalization, as mmseg pads normalized inputs.
            fill = self.pad_value
            if img.dim() == 2 and len(set(fill)) == 1:
                img = F.pad(img, (0, pw, 0, ph), value=fill[0])
            else:
                c = img.shape[0] if img.dim() == 3 else len(fill)
                fill = fill if len(fill) == c else fill[:1] * c
                src = img if img.dim() == 3 else img.expand(c, h, w)
                img = torch.tensor(fill, dtype=img.dtype)[:, None, None].repeat(1, self.crop, self.crop)
                img[:, :h, :w] = src
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return img, label


class Draws:
    """One sample's random draws from ``g`` (torch's global generator when None): the values, and the
    generator's state after them, of ``torch.rand(())`` (:meth:`rand`) and ``torch.randint(0, n, ())``
    (:meth:`randint`), drawn into two scalars made once (a third of a call's cost; one sample of
    :class:`TrainAugment` draws up to 25 times, 20 of them in its crop search)."""

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

    def chance(self, p: float) -> bool:
        """``torch.rand(()) < p``: compared in float32, as torch compares a float32 tensor with ``p``."""
        return self.rand() < float(np.float32(p))


@dataclass
class EvalResize:
    """Test-time keep-ratio resize of the image to ``scale`` (labels stay at full resolution)."""

    scale: tuple[int, int]

    @classmethod
    def for_crop(cls, crop: int, scale: tuple[int, int] | None = None) -> EvalResize:
        return cls(scale=scale or (4 * crop, crop))

    def __call__(
        self, img: torch.Tensor, label: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``g`` is accepted for the common transform signature; nothing here is random."""
        size = rescale_size(*img.shape[-2:], self.scale)
        if size != tuple(img.shape[-2:]):
            img = resize(img, size)
        return img, label
