"""Selective search (Uijlings et al. 2013) for PAD's offline object proposals (method.md section 7).

1. Over-segment with Felzenszwalb's graph method (scikit-image; PAD: scale 600, sigma 0.9,
   min size 30 on the image scaled to [0, 1]).
2. Group hierarchically: describe each region by its size, bounding box, a colour histogram
   (25 bins per channel) and a texture histogram (uniform LBP, 10 bins per channel), both L1
   normalised; repeatedly merge the most similar pair of adjacent regions, where
   ``sim = colour + texture + size + fill``:
   colour / texture = histogram intersection ``sum_k min(h_a[k], h_b[k])``,
   size = ``1 - (|a| + |b|) / |image|``, fill = ``1 - (|box(a u b)| - |a| - |b|) / |image|``;
   every region ever formed (the initial ones and each merge) is a candidate box.
3. PAD's filters: region >= 600 pixels, both box sides >= 40 px, aspect <= 3; duplicates dropped.

Boxes are ``(x, y, w, h)`` with w, h the inclusive pixel extents of the region.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COLOUR_BINS = 25
LBP_POINTS = 8  # uniform LBP with 8 neighbours takes 10 values


@dataclass(frozen=True)
class ProposalSettings:
    """Felzenszwalb's parameters and PAD's filters (casiatao/PAD pre-training/dataset/roi.py)."""

    scale: float = 600.0
    sigma: float = 0.9
    min_size: int = 30
    min_area: int = 600
    min_side: int = 40
    max_aspect: float = 3.0


def require_scikit_image():
    """scikit-image, the optional ``rois`` extra; one line if it is missing."""
    try:
        from skimage.feature import local_binary_pattern
        from skimage.segmentation import felzenszwalb
    except ImportError:
        from unip_analysis.errors import UnipError

        raise UnipError(
            "object proposals need scikit-image: pip install 'unip-toolkit[rois]' (or scikit-image)"
        ) from None
    return felzenszwalb, local_binary_pattern


def _histograms(labels: np.ndarray, values: np.ndarray, bins: int, n: int) -> np.ndarray:
    """[n, channels * bins] per-region histograms of integer ``values`` [H, W, C] in 0..bins-1, L1 normalised."""
    channels = values.shape[2]
    offset = (np.arange(channels) * bins)[None, None, :]
    index = (labels[..., None] * channels * bins + offset + values).ravel()
    hist = np.bincount(index, minlength=n * channels * bins).reshape(n, channels * bins).astype(np.float64)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)


def _adjacent_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of region labels that touch horizontally or vertically."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
        pairs.update(zip(lo.tolist(), hi.tolist()))
    return pairs


def selective_search(image: np.ndarray, settings: ProposalSettings = ProposalSettings()) -> list[tuple]:
    """Every region of the hierarchy as ``(x, y, w, h, size)``; ``image`` is [H, W, C] in [0, 1]."""
    felzenszwalb, local_binary_pattern = require_scikit_image()
    if (
        image.shape[2] == 3
        and np.array_equal(image[..., 0], image[..., 1])
        and np.array_equal(image[..., 1], image[..., 2])
    ):
        image = image[..., :1]  # grey stored as 3 channels: one is enough, and 3x faster
    labels = felzenszwalb(
        image[..., 0] if image.shape[2] == 1 else image,
        scale=settings.scale,
        sigma=settings.sigma,
        min_size=settings.min_size,
        channel_axis=None if image.shape[2] == 1 else -1,
    )
    n = int(labels.max()) + 1
    h, w = labels.shape
    area = float(h * w)

    size = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    boxes = [  # x0, y0, x1, y1 inclusive
        (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1) for sl in ndimage.find_objects(labels + 1)
    ]
    colour = _histograms(
        labels, np.clip((image * COLOUR_BINS).astype(np.int64), 0, COLOUR_BINS - 1), COLOUR_BINS, n
    )
    grey8 = (image * 255).round().astype(np.uint8)
    lbp = np.stack(
        [local_binary_pattern(grey8[..., c], LBP_POINTS, 1, method="uniform") for c in range(image.shape[2])],
        axis=-1,
    ).astype(np.int64)
    texture = _histograms(labels, lbp, LBP_POINTS + 2, n)

    regions = {i: (size[i], boxes[i], colour[i], texture[i]) for i in range(n)}
    formed = [(boxes[i], size[i]) for i in range(n)]  # every region ever formed, in order
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in _adjacent_pairs(labels):
        neighbours[a].add(b)
        neighbours[b].add(a)

    def similarity(a: int, b: int) -> float:
        sa, ba, ca, ta = regions[a]
        sb, bb, cb, tb = regions[b]
        union = (max(ba[2], bb[2]) - min(ba[0], bb[0]) + 1) * (max(ba[3], bb[3]) - min(ba[1], bb[1]) + 1)
        return (
            np.minimum(ca, cb).sum()
            + np.minimum(ta, tb).sum()
            + (1.0 - (sa + sb) / area)
            + (1.0 - (union - sa - sb) / area)
        )

    heap = [(-similarity(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    next_id = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in regions or b not in regions:
            continue  # one of them was merged already (lazy deletion)
        sa, ba, ca, ta = regions.pop(a)
        sb, bb, cb, tb = regions.pop(b)
        merged_box = (min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3]))
        regions[next_id] = (
            sa + sb,
            merged_box,
            (ca * sa + cb * sb) / (sa + sb),
            (ta * sa + tb * sb) / (sa + sb),
        )
        around = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        neighbours[next_id] = around
        for k in around:
            neighbours[k] -= {a, b}
            neighbours[k].add(next_id)
            heapq.heappush(heap, (-similarity(k, next_id), k, next_id))
        formed.append((merged_box, sa + sb))
        next_id += 1
    return [(int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1), int(s)) for (x0, y0, x1, y1), s in formed]


def keep(
    regions: list[tuple], settings: ProposalSettings = ProposalSettings()
) -> list[tuple[int, int, int, int]]:
    """PAD's filters over ``selective_search`` output: region >= ``min_area`` pixels, both sides >=
    ``min_side``, aspect <= ``max_aspect``; each box once, in order of first appearance."""
    seen, out = set(), []
    for x, y, w, h, size in regions:
        if size < settings.min_area or w < settings.min_side or h < settings.min_side:
            continue
        if max(w / h, h / w) > settings.max_aspect or (x, y, w, h) in seen:
            continue
        seen.add((x, y, w, h))
        out.append((x, y, w, h))
    return out


def propose(
    image: np.ndarray, settings: ProposalSettings = ProposalSettings()
) -> list[tuple[int, int, int, int]]:
    """The proposals PAD's crops draw from for one [H, W, C] image in [0, 1]."""
    return keep(selective_search(image, settings), settings)
