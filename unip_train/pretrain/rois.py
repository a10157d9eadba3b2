"""Object proposals for PAD's object-sensitive random RoI cropping (method.md section 7): where the
proposal files live, their format, and the training-time crop rule.

Files are PAD's: one text file per image, one ``x,y,w,h`` line (integers, pixels) per proposal, at
``ROIS/<subset>/roi/<stem>.txt`` for the image ``IMAGES/<subset>/thermal/<stem>.<ext>`` (MSIP's
layout; PAD's ``roi.py`` writes them beside ``thermal/``, so ``ROIS = IMAGES`` reads PAD's own
files). An image not in a ``thermal/`` folder maps to ``ROIS/<its folder>/roi/<stem>.txt``. The
stem is the name up to its first dot, as PAD's loader takes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unip_analysis.errors import UnipError
from unip_analysis.files import atomic_write_text

ROI_FOLDER = "roi"
THERMAL_FOLDER = "thermal"
# Training-time crop rule (PAD's RandomRoiCrop with --random --ratio_p 0.85).
TRIES = 20
MIN_PROPOSAL_SIDE = 40  # proposals narrower than this are never used
MIN_CROP_SIDE = 60
CENTRE_JITTER = 0.4  # centre moves by up to +-40% of the proposal's side
SIDE_SCALE = (0.7, 1.5)
LARGE_CROP_PROB = 0.15  # with this probability the crop must also cover
LARGE_CROP_AREA = 0.15  # at least this fraction of the image


class ProposalError(UnipError):
    """A proposal file that cannot be read as ``x,y,w,h`` lines."""


def proposal_file(rois_root: Path, images_root: Path, image: Path) -> Path:
    """Where the proposals of ``image`` (found under ``images_root``) are stored under ``rois_root``."""
    folder = image.parent.relative_to(images_root)
    subset = folder.parent if folder.name == THERMAL_FOLDER else folder
    return rois_root / subset / ROI_FOLDER / (image.name.split(".")[0] + ".txt")


def read_proposals(path: Path) -> np.ndarray:
    """[K, 4] int64 boxes (x, y, w, h) of one file; an empty file gives K = 0.
    A line that is not four comma-separated integers is refused with the file and line named."""
    boxes = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        try:
            if len(parts) != 4:
                raise ValueError
            boxes.append([int(p) for p in parts])
        except ValueError:
            raise ProposalError(
                f"{path}: line {n} is {line.strip()[:40]!r}, expected x,y,w,h integers; fix or delete the "
                "file (unip-rois writes it anew)"
            ) from None
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def write_proposals(path: Path, boxes: Sequence[Sequence[int]]) -> Path:
    """PAD's format, written atomically: ``x,y,w,h`` per line."""
    return atomic_write_text(path, "".join(f"{x},{y},{w},{h}\n" for x, y, w, h in boxes))


def uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=g, dtype=torch.float64).item()


def roi_crop_box(h: int, w: int, boxes: np.ndarray, g: torch.Generator) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of a crop around a random proposal, or None when no proposal
    gives one in ``TRIES`` draws (the caller then takes a random resized crop).

    Per try: draw a proposal (skipped if outside the image or a side < 40 px); move its centre by
    up to +-40% of each side; scale each side by U(0.7, 1.5), at least 60 px; clip to the image;
    keep it if both sides are still >= 60 px and, when the image-level draw (probability 0.15)
    asked for a large crop, it covers >= 15% of the image.
    """
    if len(boxes) == 0:
        return None
    need_large = torch.rand(1, generator=g).item() < LARGE_CROP_PROB
    for _ in range(TRIES):
        x, y, bw, bh = (int(v) for v in boxes[int(torch.randint(len(boxes), (1,), generator=g))])
        if x < 0 or y < 0 or x + bw > w or y + bh > h or bw < MIN_PROPOSAL_SIDE or bh < MIN_PROPOSAL_SIDE:
            continue
        cx = round(x + bw / 2) + round(bw * uniform(g, -CENTRE_JITTER, CENTRE_JITTER))
        cy = round(y + bh / 2) + round(bh * uniform(g, -CENTRE_JITTER, CENTRE_JITTER))
        sw = max(bw * uniform(g, *SIDE_SCALE), MIN_CROP_SIDE)
        sh = max(bh * uniform(g, *SIDE_SCALE), MIN_CROP_SIDE)
        x1, x2 = max(0, round(cx - sw / 2)), min(w, round(cx + sw / 2))
        y1, y2 = max(0, round(cy - sh / 2)), min(h, round(cy + sh / 2))
        if x2 - x1 < MIN_CROP_SIDE or y2 - y1 < MIN_CROP_SIDE:
            continue
        if need_large and (x2 - x1) * (y2 - y1) < LARGE_CROP_AREA * h * w:
            continue
        return y1, x1, y2 - y1, x2 - x1
    return None


def load_all(
    images: Sequence[tuple[Path, Path]], rois_root: Path | None
) -> tuple[list[np.ndarray | None], int]:
    """Proposals of every ``(image, images_root)``: from ``rois_root``, or beside the images (PAD's
    own layout) when it is None. (per-image boxes or None where there is no file, files found)."""
    out, found = [], 0
    for image, root in images:
        path = proposal_file(rois_root if rois_root is not None else root, root, image)
        if path.is_file():
            out.append(read_proposals(path))
            found += 1
        else:
            out.append(None)
    return out, found
