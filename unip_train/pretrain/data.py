"""InfMix-style pre-training data (method.md section 3): folders of unlabelled images mixed into
one dataset, made grey as the UNIP reference does, and the pre-training augmentation.

Three kinds of folder: ``--infrared DIR`` (every image under it), ``--infpre DIR`` (an InfPre or
MSIP root: ``<dataset>/thermal/*`` only, never the paired ``rgb/`` folders) and ``--rgb DIR``
(``--per-class-cap`` applies to its ImageNet-style class subfolders only). ``--grey all`` (the
reference, default for NMI-HAD) converts every image to grey, infrared included, since some
infrared sets are pseudo-coloured; ``rgb`` converts only ``--rgb`` folders; ``none`` reads
images as they are (PAD's reference).

Each sample's augmentation draws from :func:`unip_train.sampling.sample_generator` (seed, epoch,
index), and the epoch order from :class:`unip_train.sampling.EpochSampler`: nothing depends on
RNG history, so a resumed run can start mid-epoch by skipping positions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unip_analysis.errors import ImageError
from unip_analysis.images import find_images, normalize, read_unit_array

from ..sampling import KeyedDataset, sample_generator
from .rois import roi_crop_box

# ITU-R BT.601 luma, as PIL's "L" conversion.
LUMA = (0.299, 0.587, 0.114)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
GREY_CHOICES = ("all", "rgb", "none")
INFPRE_THERMAL = "thermal"


@dataclass
class Source:
    """One folder of the mix: ``kind`` is ``infrared``, ``infpre`` or ``rgb``; ``grey``: its
    images are converted to grey (luminance replicated to 3 channels)."""

    root: str
    kind: str
    found: int
    files: list[Path]
    grey: bool = False
    note: str = ""

    def summary(self) -> dict:
        out = {"dir": self.root, "kind": self.kind, "found": self.found, "used": len(self.files)}
        out["grey"] = self.grey
        if self.note:
            out["note"] = self.note
        return out


def cap_per_class(files: Sequence[Path], root: Path, cap: int) -> list[Path]:
    """At most ``cap`` images per immediate subfolder (class) of ``root``, the first ones in sorted
    order, as the InfMix ImageNet subset keeps 200 per class. Files directly in ``root`` belong to
    no class and are all kept, so a flat folder (COCO's train2017) passes unchanged."""
    kept, counts = [], {}
    for f in files:
        rel = f.relative_to(root).parts
        if len(rel) > 1:
            counts[rel[0]] = counts.get(rel[0], 0) + 1
            if counts[rel[0]] > cap:
                continue
        kept.append(f)
    return kept


def subsample(files: list[Path], max_images: int | None) -> list[Path]:
    """An evenly spread subset (a fixed seed-0 draw, sorted), so a capped source still covers all
    its subfolders."""
    if max_images is None or len(files) <= max_images:
        return files
    keep = np.sort(np.random.default_rng(0).choice(len(files), size=max_images, replace=False))
    return [files[i] for i in keep]


def collect_source(
    root: str | Path,
    kind: str,
    per_class_cap: int | None = None,
    max_images: int | None = None,
    grey: bool | None = None,
) -> Source:
    """List one folder's images (recursively) and apply the caps; ``grey=None``: only ``rgb`` folders."""
    root = Path(root)
    files = find_images(root)
    found = len(files)
    if per_class_cap is not None:
        files = cap_per_class(files, root, per_class_cap)
    grey = kind == "rgb" if grey is None else grey
    return Source(str(root), kind, found, subsample(files, max_images), grey)


def collect_infpre(root: str | Path, max_images: int | None = None, grey: bool = True) -> Source:
    """An InfPre / MSIP root: the images under ``<dataset>/thermal/`` for every dataset folder;
    paired ``rgb/`` folders and anything else are not read (method.md section 3)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(
            f"{root}: --infpre folder not found; pass the InfPre/MSIP root (<dataset>/thermal/*)"
        )
    thermal = [d / INFPRE_THERMAL for d in sorted(root.iterdir()) if (d / INFPRE_THERMAL).is_dir()]
    if not thermal:
        raise ImageError(
            f"{root}: no <dataset>/{INFPRE_THERMAL}/ folders found; --infpre expects the InfPre/MSIP layout "
            "(ROOT/<dataset>/thermal/*); pass a plain image folder with --infrared instead"
        )
    files, empty = [], []
    for folder in thermal:
        try:
            files += find_images(folder)
        except ImageError:
            empty.append(folder.parent.name)
    if not files:
        raise ImageError(f"{root}: the {len(thermal)} <dataset>/thermal/ folders hold no images")
    note = f"{len(thermal) - len(empty)} datasets" + (f"; no images in {', '.join(empty)}" if empty else "")
    return Source(str(root), "infpre", len(files), subsample(files, max_images), grey, note)


def collect_sources(args: argparse.Namespace) -> list[Source]:
    """The folders of ``--infrared``, ``--infpre`` and ``--rgb`` with their caps and ``--grey`` applied."""
    cap = args.max_images_per_source
    grey_all = args.grey == "all"
    grey_rgb = args.grey in ("all", "rgb")
    return (
        [collect_source(d, "infrared", max_images=cap, grey=grey_all) for d in args.infrared]
        + [collect_infpre(d, cap, grey=grey_all) for d in args.infpre]
        + [collect_source(d, "rgb", args.per_class_cap, cap, grey=grey_rgb) for d in args.rgb]
    )


def to_grey(img: torch.Tensor) -> torch.Tensor:
    """[3, H, W] colour -> luminance replicated to 3 channels; grey input is returned as is."""
    if torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]):
        return img
    y = LUMA[0] * img[0] + LUMA[1] * img[1] + LUMA[2] * img[2]
    return y.expand(3, -1, -1).contiguous()


def random_resized_crop_box(
    h: int, w: int, g: torch.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering ``scale`` of the area with aspect in ``ratio``
    (log-uniform); ten tries, then the largest central crop within ``ratio``."""
    area = h * w
    log_r = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = float(np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1]))
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[2] * (h - ch + 1)), h - ch)
            left = min(int(u[3] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(
    img: torch.Tensor, size: int, g: torch.Generator, proposals: np.ndarray | None = None
) -> torch.Tensor:
    """A crop resized to ``size`` x ``size`` (bicubic), then a horizontal flip (p 0.5). The crop is
    placed around an object proposal when ``proposals`` give one (PAD, :func:`.rois.roi_crop_box`),
    else it is RandomResizedCrop(scale 0.2-1)."""
    h, w = img.shape[1], img.shape[2]
    box = roi_crop_box(h, w, proposals, g) if proposals is not None else None
    top, left, ch, cw = box if box is not None else random_resized_crop_box(h, w, g)
    crop = img[None, :, top : top + ch, left : left + cw]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    out = out.clamp_(0.0, 1.0)
    if torch.rand(1, generator=g).item() < 0.5:
        out = out.flip(-1)
    return out


class InfMix(KeyedDataset):
    """The sources' images, one index space. ``__getitem__`` returns (image, unreadable paths).

    An unreadable image is replaced by the next readable one (index + 1, ...) so batches keep
    their shape on every process; the paths skipped travel with the sample to be counted.
    The training loader indexes it by ``(epoch, index)`` keys (:class:`~unip_train.sampling.KeyedDataset`).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        proposals: Sequence[np.ndarray | None] | None = None,
    ):
        self.items = [(f, s.grey) for s in sources for f in s.files]
        if not self.items:
            raise ImageError("the pre-training data is empty after the per-source caps; check the folders")
        self.size, self.mean, self.std, self.seed = size, tuple(mean), tuple(std), seed
        self.proposals = list(proposals) if proposals is not None else [None] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as [3, H, W] in [0, 1] (grey replicated, as :func:`unip_analysis.images.read_image` reads it)."""
        return self.pixels(index).expand(3, -1, -1)

    def pixels(self, index: int) -> torch.Tensor:
        """Image ``index`` in [0, 1] with the channels it has: [1, H, W] when grey (stored grey, or
        made grey by ``--grey``), [3, H, W] when colour. Grey images are cropped and resized once,
        not three times, and replicated when normalized: the same values as three equal channels."""
        path, grey = self.items[index]
        arr = read_unit_array(path)
        if arr.ndim == 2:
            return torch.from_numpy(arr)[None]
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return to_grey(img)[:1] if grey else img

    def item(self, index: int, epoch: int) -> tuple[torch.Tensor, list[str]]:
        """Sample ``index`` as drawn in ``epoch`` (the draws of its key, whichever image is read)."""
        skipped = []
        for tried in range(len(self.items)):
            i = (index + tried) % len(self.items)
            try:
                img = self.pixels(i)
            except ImageError:
                skipped.append(str(self.items[i][0]))
                continue
            g = sample_generator(self.seed, epoch, index)
            out = augment(img, self.size, g, self.proposals[i])
            return normalize(out.expand(3, -1, -1), self.mean, self.std), skipped
        raise ImageError(f"none of the {len(self.items)} pre-training images can be read")


def collate(batch: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([b[0] for b in batch]), [p for b in batch for p in b[1]]
