"""Infrared segmentation datasets (method.md section 5) as released and as UNIP prepares them:
SODA, MFNet (thermal), SCUT-Seg and a generic folder layout. One table (:data:`LAYOUTS`) says where
each layout keeps images, label maps and split files; the synthetic generator writes the same
layouts (:mod:`unip_train.synthetic`).

What the real files hold, and how each is read:

- SODA: palette PNGs (read as class indices, never as colours); the split lists hold copies
  named ``X (1)`` and ``~temp_X`` next to ``X``: they are skipped and counted.
- MFNet: UNIP's ``thermal_imgs/`` (the thermal channel, grey) or the release's 4-channel RGB-T
  ``images/`` (the 4th channel is read); splits train / val / test, ``val_test`` (UNIP's
  evaluation list), ``test_day`` and ``test_night``.
- SCUT-Seg: labels in Cityscapes label IDs (the release) or 0-9 (UNIP's preparation), detected
  from the values or named by ``--label-map``; split lines of one column (image name) or two
  (image path, label path); ``val.txt`` is the test split when there is no ``test.txt``.

Every such decision is recorded in :attr:`SegDataset.notes` for the run to log. Label 255 is ignored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from unip_analysis.errors import ImageError, UnipError
from unip_analysis.images import IMAGE_SUFFIXES, NORMALIZATIONS, read_unit_array

from ..sampling import KeyedDataset, sample_generator

IGNORE_INDEX = 255

SODA_CLASSES = (
    "background", "person", "building", "tree", "road", "pole", "grass", "door", "table", "chair",
    "car", "bicycle", "lamp", "monitor", "trafficCone", "trash can", "animal", "fence", "sky",
    "river", "sidewalk",
)  # fmt: skip
MFNET_CLASSES = (
    "unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump",
)  # fmt: skip
SCUT_CLASSES = (
    "background", "road", "person", "rider", "car", "truck", "fence", "tree", "bus", "pole",
)  # fmt: skip
# The Cityscapes label ID of each SCUT-Seg class, in SCUT_CLASSES order (vegetation is "tree").
SCUT_CITYSCAPES_IDS = (0, 7, 24, 25, 26, 27, 13, 21, 28, 17)

# --label-map values: detect (auto), class indices as stored (none), Cityscapes label IDs.
LABEL_MAPS = ("auto", "none", "cityscapes")


@dataclass(frozen=True)
class Layout:
    """Where a dataset layout keeps its files, relative to the data root.

    A split file lists one sample per line: an image name (``image_dir/STEM + image_suffix``,
    label ``label_dir/STEM + label_suffix``; other image suffixes are accepted), or two columns,
    image path and label path, relative to the data root. ``image_dirs`` are tried in order.
    ``split_fallbacks`` name the split read when a split's file is absent. ``label_ids`` are the
    label values the release stores for each class, when they are not the class indices.
    ``classes`` is ``None`` for the folder layout (``classes.txt`` or ``--num-classes``).
    """

    name: str
    image_dirs: tuple[str, ...]
    image_suffix: str
    label_dir: str
    label_suffix: str
    splits: dict[str, str]
    classes: tuple[str, ...] | None
    thermal_channel: bool = False  # 4-channel RGB+thermal images: take the 4th channel
    split_fallbacks: dict[str, str] = field(default_factory=dict)
    label_ids: tuple[int, ...] | None = None
    skip_copies: bool = False  # split lists hold "X (1)" / "~temp_X" copies of X

    @property
    def image_dir(self) -> str:
        return self.image_dirs[0]


LAYOUTS: dict[str, Layout] = {
    "soda": Layout(
        "soda", ("JPEGImages",), ".jpg", "SegmentationClassPNG", ".png",
        {"train": "train_infrared.txt", "test": "test_infrared.txt"}, SODA_CLASSES, skip_copies=True,
    ),
    "mfnet": Layout(
        "mfnet", ("thermal_imgs", "images"), ".png", "labels", ".png",
        {
            "train": "train.txt", "val": "val.txt", "test": "test.txt", "val_test": "val_test.txt",
            "test_day": "test_day.txt", "test_night": "test_night.txt",
        },
        MFNET_CLASSES, thermal_channel=True,
    ),
    "scut": Layout(
        "scut", ("images",), ".jpg", "labels", ".png", {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
        SCUT_CLASSES, split_fallbacks={"test": "val"}, label_ids=SCUT_CITYSCAPES_IDS,
    ),
    "folder": Layout(
        "folder", ("images",), ".png", "masks", ".png", {"train": "train.txt", "test": "test.txt"}, None,
    ),
}  # fmt: skip

# The split each layout evaluates on by default.
EVAL_SPLIT = {"soda": "test", "mfnet": "test", "scut": "test", "folder": "test"}


class DatasetError(UnipError):
    """A segmentation dataset is missing files, or its files do not agree with each other."""


def dataset_classes(name: str, root: str | Path, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names of a dataset: the layout's table, or the folder layout's ``classes.txt`` /
    ``num_classes`` (names ``class0``, ``class1``, ... when only a count is given)."""
    layout = get_layout(name)
    if layout.classes is not None:
        if num_classes is not None and num_classes != len(layout.classes):
            raise DatasetError(
                f"--num-classes {num_classes} does not match {name}, which has {len(layout.classes)} classes; "
                "leave --num-classes out for this dataset"
            )
        return layout.classes
    path = Path(root) / "classes.txt"
    if path.exists():
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not names:
            raise DatasetError(f"{path}: empty; list one class name per line, background first")
        if num_classes is not None and num_classes != len(names):
            raise DatasetError(f"{path}: lists {len(names)} classes but --num-classes is {num_classes}")
        return names
    if num_classes is None:
        raise DatasetError(
            f"{path}: not found and --num-classes not given; the folder layout needs one of them"
        )
    if num_classes < 2:
        raise DatasetError(f"--num-classes {num_classes}: need at least 2 classes")
    return tuple(f"class{i}" for i in range(num_classes))


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# --- split files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: an image name, or an image path and a label path (two columns)."""

    image: str
    label: str | None = None

    @property
    def stem(self) -> str:
        p = Path(self.image)
        return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name


def _parse_line(line: str) -> SplitEntry:
    parts = line.split()
    # Two columns only when both look like image files: SODA names such as "X (1).jpg" hold spaces.
    if len(parts) == 2 and all(Path(p).suffix.lower() in IMAGE_SUFFIXES for p in parts):
        return SplitEntry(parts[0], parts[1])
    return SplitEntry(line)


def split_file(root: str | Path, layout: Layout, split: str) -> tuple[Path, list[str]]:
    """The file listing ``split`` (following the layout's fallbacks) and notes on any fallback."""
    if split not in layout.splits:
        raise DatasetError(f"{layout.name} has no split {split!r}; splits: {', '.join(layout.splits)}")
    path = Path(root) / layout.splits[split]
    fallback = layout.split_fallbacks.get(split)
    if not path.exists() and fallback is not None and (Path(root) / layout.splits[fallback]).exists():
        other = Path(root) / layout.splits[fallback]
        note = (
            f"{path.name} not found in {root}: split {split!r} reads {other.name}, as UNIP's preparation does"
        )
        return other, [note]
    if not path.exists():
        raise DatasetError(
            f"{path}: split file not found; the {layout.name} layout expects "
            f"{', '.join(layout.splits.values())} in the data root, one image name (or image and label "
            "path) per line"
        )
    return path, []


def read_split(root: str | Path, layout: Layout, split: str) -> list[SplitEntry]:
    """Entries of a split file (blank lines and ``#`` comments skipped)."""
    path, _ = split_file(root, layout, split)
    return _read_entries(path)


def _read_entries(path: Path) -> list[SplitEntry]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(_parse_line(line))
    if not entries:
        raise DatasetError(f"{path}: split file lists no images")
    return entries


_COPY_PATTERNS = (re.compile(r"^~temp_(.+)$"), re.compile(r"^(.+) \(\d+\)$"))


def drop_copies(entries: list[SplitEntry]) -> tuple[list[SplitEntry], dict[str, int]]:
    """Entries without SODA's duplicates: ``X (1)`` and ``~temp_X`` when ``X`` is listed too, and
    repeated lines. Returns the kept entries and a count per kind of copy."""
    stems = {e.stem for e in entries}
    kept, seen = [], set()
    counts = {"X (n)": 0, "~temp_X": 0, "repeated line": 0}
    for e in entries:
        base = None
        for kind, rx in zip(("~temp_X", "X (n)"), _COPY_PATTERNS):
            m = rx.match(e.stem)
            if m and m.group(1) in stems:
                base = kind
                break
        if base is not None:
            counts[base] += 1
        elif e.stem in seen:
            counts["repeated line"] += 1
        else:
            seen.add(e.stem)
            kept.append(e)
    return kept, {k: v for k, v in counts.items() if v}


def _find_file(folder: Path, stem: str, preferred: str) -> Path | None:
    for suffix in (preferred, *IMAGE_SUFFIXES):
        for s in (suffix, suffix.upper()):
            p = folder / f"{stem}{s}"
            if p.exists():
                return p
    return None


def image_folder(root: Path, layout: Layout) -> tuple[str, list[str]]:
    """The first of the layout's image folders present under ``root``, and a note when there is a choice."""
    for name in layout.image_dirs:
        if (root / name).is_dir():
            if len(layout.image_dirs) == 1:
                return name, []
            what = (
                "grey thermal images" if name == "thermal_imgs" else "4-channel RGB-T images: the 4th channel"
            )
            return name, [f"images from {name}/ ({what})"]
    return layout.image_dirs[0], []  # missing: the first sample names the path that was expected


# --- reading files ---------------------------------------------------------------------------------


def read_grey(path: Path, thermal_channel: bool = False) -> np.ndarray:
    """A single-channel infrared image as float32 [H, W] on the 0-255 scale.

    4-channel images hold RGB + thermal (MFNet): the 4th channel is the thermal one. Colour images
    are averaged to grey; 16-bit images are scaled by 65535 (:func:`unip_analysis.images.read_image`).
    """
    if thermal_channel:
        try:
            with Image.open(path) as im:
                if len(im.getbands()) == 4:
                    return np.asarray(im, dtype=np.float32)[..., 3].copy()
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{path}: cannot decode image ({e}); remove or replace the file") from None
    try:
        arr = read_unit_array(path)
    except ImageError as e:
        raise DatasetError(str(e)) from None
    if arr.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).mean(dim=0).mul_(255.0).numpy()
    # Grey: the float32 mean of the three replicated channels, (v + v + v) / 3, without the copies
    # (bit for bit what averaging read_image's output gives, so crops do not depend on the path).
    v = torch.from_numpy(arr)
    return (((v + v) + v) / 3).mul_(255.0).numpy()


def read_label_values(path: Path) -> np.ndarray:
    """A label map as stored: uint8/uint16 [H, W]. Palette PNGs give their indices, not colours."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(
                    f"{path}: label map has mode {im.mode} ({len(im.getbands())} channels); "
                    "expected a single-channel or palette PNG of class indices"
                )
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot decode label map ({e}); remove or replace the file") from None


def label_lut(label_ids: tuple[int, ...] | None) -> np.ndarray | None:
    """Lookup table stored value -> class index (-1 for values no class has), 255 kept; None = identity."""
    if label_ids is None:
        return None
    lut = np.full(65536, -1, dtype=np.int32)
    lut[list(label_ids)] = np.arange(len(label_ids))
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def check_label_values(path: Path, values: np.ndarray, num_classes: int, hint: str) -> None:
    """Refuse label values outside ``0..num_classes-1`` and 255; the message names the file, the
    values and ``hint`` (the option that maps or sets the classes)."""
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = sorted({int(v) for v in bad})[:8]
        raise DatasetError(
            f"{path}: label values {shown} are outside the {num_classes} classes 0..{num_classes - 1} "
            f"(255 is the only other value allowed, meaning ignore); {hint}"
        )


def read_label(
    path: Path, num_classes: int, lut: np.ndarray | None = None, hint: str = "fix the label map"
) -> np.ndarray:
    """A label map as class indices uint8 [H, W]: stored values mapped by ``lut``, then checked."""
    arr = read_label_values(path)
    if lut is not None:
        arr = lut[arr]
    # One vectorised pass; the distinct values are gathered only to name the bad ones.
    if (((arr < 0) | (arr >= num_classes)) & (arr != IGNORE_INDEX)).any():
        check_label_values(path, np.unique(arr), num_classes, hint)
    return arr.astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot decode ({e}); remove or replace the file") from None


@dataclass
class Sample:
    stem: str
    image: Path
    label: Path


class SegDataset(KeyedDataset):
    """One split of a segmentation dataset: ``(image [3, H, W] normalized, label [H, W] int64)``.

    Files are checked when the dataset is built: every listed sample needs an image and a label map
    of the same size, and (``check_values``) label values within the class range or 255 after the
    label mapping. ``label_map`` is one of :data:`LABEL_MAPS`: ``auto`` detects SCUT-Seg's
    Cityscapes label IDs from the values (the result is :attr:`label_map` and a note).
    ``transform(img, label, g) -> (img, label)`` runs on the 0-255 grey image before normalization;
    its random draws come from ``g``, a generator seeded by (``seed``, epoch, index) (see
    :mod:`unip_train.sampling`), so augmentation does not depend on RNG history or loader workers;
    the training loader indexes it by ``(epoch, index)`` keys (:class:`~unip_train.sampling.KeyedDataset`).
    :attr:`notes` says what was decided about the files (fallback split, skipped copies, label IDs).
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        split: str,
        num_classes: int | None = None,
        transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        check_values: bool = True,
        seed: int = 0,
        label_map: str = "auto",
        cache_mb: float = 0.0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: data root not found; pass the folder that holds the {name} dataset"
            )
        self.layout = get_layout(name)
        self.classes = dataset_classes(name, self.root, num_classes)
        self.split = split
        self.transform = transform
        self.seed = seed
        self.mean, self.std = NORMALIZATIONS["infrared"]
        self.notes: list[str] = []
        path, notes = split_file(self.root, self.layout, split)
        self.split_path = path
        self.notes += notes
        entries = _read_entries(path)
        if self.layout.skip_copies:
            entries, copies = drop_copies(entries)
            if copies:
                what = ", ".join(f"{n} {kind}" for kind, n in copies.items())
                self.notes.append(f"{path.name}: skipped {sum(copies.values())} duplicate entries ({what})")
        image_dir, notes = image_folder(self.root, self.layout)
        self.notes += notes
        self.samples = [self._locate(e, path, image_dir) for e in entries]
        self.label_map = self._choose_label_map(label_map, check_values)
        self.lut = label_lut(self.layout.label_ids if self.label_map == "cityscapes" else None)
        self.cache_mb = cache_mb  # decoded images kept in memory (see load)
        self._cache: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def _locate(self, entry: SplitEntry, split_path: Path, image_dir: str) -> Sample:
        if entry.label is not None:
            img, lab = self.root / entry.image, self.root / entry.label
            for what, p in (("image", img), ("label map", lab)):
                if not p.is_file():
                    raise DatasetError(
                        f"{split_path}: lists {entry.image} {entry.label} but {what} {p} does not exist"
                    )
        else:
            img = _find_file(self.root / image_dir, entry.stem, self.layout.image_suffix)
            lab = _find_file(self.root / self.layout.label_dir, entry.stem, self.layout.label_suffix)
            for what, p, folder in (("image", img, image_dir), ("label map", lab, self.layout.label_dir)):
                if p is None:
                    raise DatasetError(
                        f"{split_path}: lists {entry.stem!r} but {what} "
                        f"{self.root / folder / (entry.stem + '.*')} does not exist"
                    )
        if _image_size(img) != _image_size(lab):
            raise DatasetError(
                f"{lab}: label map is {_image_size(lab)} (HxW) but image {img} is {_image_size(img)}; "
                "they must be the same size"
            )
        return Sample(entry.stem, img, lab)

    def _range_hint(self, label_map: str) -> str:
        if self.layout.label_ids is not None:
            ids = ", ".join(map(str, self.layout.label_ids))
            return (
                f"read with --label-map {label_map} ({self.layout.name} classes are 0..{self.num_classes - 1} "
                f"or, with --label-map cityscapes, the Cityscapes label IDs {ids})"
            )
        if self.layout.classes is None:
            return "set the classes with classes.txt or --num-classes, or fix the label map"
        return f"{self.layout.name} has {self.num_classes} classes; check --dataset or fix the label map"

    def _choose_label_map(self, label_map: str, check_values: bool) -> str:
        """Check every label map's values; with ``auto``, decide whether they are Cityscapes IDs."""
        if label_map not in LABEL_MAPS:
            raise DatasetError(f"--label-map {label_map!r}: expected one of {', '.join(LABEL_MAPS)}")
        ids = self.layout.label_ids
        if label_map == "cityscapes" and ids is None:
            raise DatasetError(
                f"--label-map cityscapes: only SCUT-Seg stores Cityscapes label IDs, not {self.layout.name}"
            )
        if not check_values:
            return "none" if label_map == "auto" else label_map
        values = {s.label: np.unique(read_label_values(s.label)) for s in self.samples}
        if label_map == "auto":
            label_map = "none"
            if ids is not None:
                found = np.unique(np.concatenate(list(values.values())))
                found = found[found != IGNORE_INDEX]
                as_indices = bool((found < self.num_classes).all())
                as_ids = bool(np.isin(found, ids).all())
                if as_ids and not as_indices:
                    label_map = "cityscapes"
                    self.notes.append(
                        f"{self.layout.name} labels are Cityscapes label IDs ({', '.join(map(str, found))} found); "
                        f"mapped to classes 0..{self.num_classes - 1} (--label-map cityscapes)"
                    )
                elif as_indices:
                    note = f"{self.layout.name} labels read as class indices 0..{self.num_classes - 1} (--label-map none)"
                    if as_ids:
                        note += (
                            "; these values are also Cityscapes IDs: pass --label-map cityscapes if they are"
                        )
                    self.notes.append(note)
        lut = label_lut(ids if label_map == "cityscapes" else None)
        hint = self._range_hint(label_map)
        for path, v in values.items():
            check_label_values(path, v if lut is None else lut[v], self.num_classes, hint)
        return label_map

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw grey image [H, W] (0-255 float) and label [H, W] (uint8 class indices, 255 ignored), before
        any transform.

        Decoded pairs are kept in memory up to :attr:`cache_mb` per training process (shared out
        among its loader workers, each of which holds its own), first come first kept: later epochs
        read them without decoding. The values are the decoded ones, so a run is the same with or
        without the cache. Transforms must not modify the image in place (none does)."""
        s = self.samples[i]
        hit = self._cache.get(s.image)  # keyed by file: subsets (labelled_subset) share the cache
        if hit is None:
            img = torch.from_numpy(read_grey(s.image, self.layout.thermal_channel))
            label = torch.from_numpy(
                read_label(s.label, self.num_classes, self.lut, self._range_hint(self.label_map))
            )
            hit = (img, label)
            size = img.nbytes + label.nbytes
            if self._cached_bytes + size <= self._cache_budget():
                self._cache[s.image] = hit
                self._cached_bytes += size
        return hit

    def _cache_budget(self) -> float:
        info = torch.utils.data.get_worker_info()
        return self.cache_mb * 2**20 / (info.num_workers if info is not None else 1)

    def item(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i`` transformed with the draws of (seed, ``epoch``, ``i``)."""
        img, label = self.load(i)
        if self.transform is not None:
            img, label = self.transform(img, label, sample_generator(self.seed, epoch, i))
        return to_input(img, self.mean[0] * 255.0, self.std[0] * 255.0), label.long()


def to_input(grey: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Grey [H, W] 0-255 -> normalized [3, H, W] (grey replicated to three channels), written into one
    new tensor: ``(grey - mean) / std`` in its first channel, copied to the other two."""
    out = torch.empty((3, *grey.shape), dtype=grey.dtype)
    torch.sub(grey, mean, out=out[0]).div_(std)
    out[1:] = out[0]
    return out


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
    """Bilinear resize of a grey image [H, W] (labels: :func:`nearest_indices`)."""
    return F.interpolate(img[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


@dataclass
class TrainAugment:
    """Random rescale (ratio 0.5-2.0 of ``scale``), random crop with ``cat_max_ratio``, flip,
    photometric distortion (brightness, contrast), pad to the crop (label padding 255).

    The real recipe uses ``scale = (2048, 512)`` with 512 crops; :meth:`for_crop` scales it as
    ``(4 * crop, crop)``. Random draws come from ``g`` (torch's global generator when None).
    """

    crop: int
    scale: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)

    @classmethod
    def for_crop(cls, crop: int) -> TrainAugment:
        return cls(crop=crop, scale=(4 * crop, crop))

    def __call__(
        self, img: torch.Tensor, label: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draws = Draws(g)
        r = draws.uniform(*self.ratio_range)
        h, w = img.shape
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
        h, w = img.shape
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
        return img[top : top + ch, left : left + cw], torch.from_numpy(np.ascontiguousarray(window))

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
            # The mean grey level becomes 0 after normalization, as mmseg pads normalized inputs.
            img = F.pad(img, (0, pw, 0, ph), value=NORMALIZATIONS["infrared"][0][0] * 255.0)
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
    def for_crop(cls, crop: int) -> EvalResize:
        return cls(scale=(4 * crop, crop))

    def __call__(
        self, img: torch.Tensor, label: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``g`` is accepted for the common transform signature; nothing here is random."""
        size = rescale_size(*img.shape, self.scale)
        if size != tuple(img.shape):
            img = resize(img, size)
        return img, label
