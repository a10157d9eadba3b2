"""Infrared segmentation datasets (method.md section 5): SODA, MFNet (thermal channel), SCUT-Seg and a
generic folder layout. One table (:data:`LAYOUTS`) says where each layout keeps images, label maps
and split files; the synthetic generator writes the same layouts from it.

Label value 255 is ignored everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from unip_analysis.errors import ImageError, UnipError
from unip_analysis.images import IMAGE_SUFFIXES, NORMALIZATIONS, read_image

from ..sampling import sample_generator

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


@dataclass(frozen=True)
class Layout:
    """Where a dataset layout keeps its files, relative to the data root.

    Split files list one image stem per line; an image is ``image_dir/STEM + image_suffix`` and its
    label map ``label_dir/STEM + label_suffix`` (other image suffixes are accepted when reading).
    ``classes`` is ``None`` for the folder layout, whose classes come from ``classes.txt`` or
    ``--num-classes``.
    """

    name: str
    image_dir: str
    image_suffix: str
    label_dir: str
    label_suffix: str
    splits: dict[str, str]
    classes: tuple[str, ...] | None
    thermal_channel: bool = False  # 4-channel RGB+thermal images: take the 4th channel


LAYOUTS: dict[str, Layout] = {
    "soda": Layout(
        "soda", "JPEGImages", ".jpg", "SegmentationClassPNG", ".png",
        {"train": "train_infrared.txt", "test": "test_infrared.txt"}, SODA_CLASSES,
    ),
    "mfnet": Layout(
        "mfnet", "images", ".png", "labels", ".png",
        {"train": "train.txt", "val": "val.txt", "test": "test.txt"}, MFNET_CLASSES, thermal_channel=True,
    ),
    "scut": Layout(
        "scut", "images", ".jpg", "labels", ".png", {"train": "train.txt", "test": "test.txt"}, SCUT_CLASSES,
    ),
    "folder": Layout("folder", "images", ".png", "masks", ".png", {"train": "train.txt", "test": "test.txt"}, None),
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


def read_split(root: str | Path, layout: Layout, split: str) -> list[str]:
    """Image stems listed in a split file (blank lines and ``#`` comments skipped)."""
    if split not in layout.splits:
        raise DatasetError(f"{layout.name} has no split {split!r}; splits: {', '.join(layout.splits)}")
    path = Path(root) / layout.splits[split]
    if not path.exists():
        raise DatasetError(
            f"{path}: split file not found; the {layout.name} layout expects "
            f"{', '.join(layout.splits.values())} in the data root, one image name per line"
        )
    stems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            # Some releases list paths or names with suffixes; the stem is what identifies a sample.
            stems.append(Path(line).stem if Path(line).suffix.lower() in IMAGE_SUFFIXES else Path(line).name)
    if not stems:
        raise DatasetError(f"{path}: split file lists no images")
    return stems


def _find_file(folder: Path, stem: str, preferred: str) -> Path | None:
    for suffix in (preferred, *IMAGE_SUFFIXES):
        for s in (suffix, suffix.upper()):
            p = folder / f"{stem}{s}"
            if p.exists():
                return p
    return None


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
        return read_image(path).mean(dim=0).mul_(255.0).numpy()
    except ImageError as e:
        raise DatasetError(str(e)) from None


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """A label map as uint8 [H, W]; values must be < ``num_classes`` or 255 (ignored)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(
                    f"{path}: label map has mode {im.mode} ({len(im.getbands())} channels); "
                    "expected a single-channel PNG of class indices"
                )
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot decode label map ({e}); remove or replace the file") from None
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(arr[bad]))[:8]
        raise DatasetError(
            f"{path}: label values {values} are outside the {num_classes} classes 0..{num_classes - 1} "
            f"(255 is the only other value allowed, meaning ignore); fix the label map or the class list"
        )
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


class SegDataset(torch.utils.data.Dataset):
    """One split of a segmentation dataset: ``(image [3, H, W] normalized, label [H, W] int64)``.

    Files are checked when the dataset is built: every listed stem needs an image and a label map of
    the same size, and (``check_values``) label values within the class range or 255.
    ``transform(img, label, g) -> (img, label)`` runs on the 0-255 grey image before normalization;
    its random draws come from ``g``, a generator seeded by (``seed``, epoch, index) (see
    :mod:`unip_train.sampling`), so augmentation does not depend on RNG history or loader workers.
    Call :meth:`set_epoch` before each epoch (workers get a fresh copy of the dataset each epoch).
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
        self.seed, self.epoch = seed, 0
        self.mean, self.std = NORMALIZATIONS["infrared"]
        self.samples = []
        for stem in read_split(self.root, self.layout, split):
            img = _find_file(self.root / self.layout.image_dir, stem, self.layout.image_suffix)
            lab = _find_file(self.root / self.layout.label_dir, stem, self.layout.label_suffix)
            for what, p, folder in (
                ("image", img, self.layout.image_dir),
                ("label map", lab, self.layout.label_dir),
            ):
                if p is None:
                    raise DatasetError(
                        f"{self.root / self.layout.splits[split]}: lists {stem!r} but {what} "
                        f"{self.root / folder / (stem + '.*')} does not exist"
                    )
            if _image_size(img) != _image_size(lab):
                raise DatasetError(
                    f"{lab}: label map is {_image_size(lab)} (HxW) but image {img} is {_image_size(img)}; "
                    "they must be the same size"
                )
            self.samples.append(Sample(stem, img, lab))
        if check_values:
            for s in self.samples:
                read_label(s.label, len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw grey image [H, W] (0-255 float) and label [H, W] (int64), before any transform."""
        s = self.samples[i]
        img = torch.from_numpy(read_grey(s.image, self.layout.thermal_channel))
        label = torch.from_numpy(read_label(s.label, self.num_classes).astype(np.int64))
        return img, label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.load(i)
        if self.transform is not None:
            img, label = self.transform(img, label, sample_generator(self.seed, self.epoch, i))
        return to_input(img, self.mean[0] * 255.0, self.std[0] * 255.0), label


def to_input(grey: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Grey [H, W] 0-255 -> normalized [3, H, W] (grey replicated to three channels)."""
    return ((grey - mean) / std).unsqueeze(0).expand(3, -1, -1).contiguous()


# --- augmentation (method.md section 4) --------------------------------------------------


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio size that fits ``scale`` = (long, short) edge limits (mmseg ``keep_ratio``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize(img: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear for the image, nearest for the label."""
    out = F.interpolate(img[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    if label is None:
        return out, None
    lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return out, lab


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
        r = _uniform(*self.ratio_range, g)
        h, w = img.shape
        img, label = resize(img, label, rescale_size(h, w, (self.scale[0] * r, self.scale[1] * r)))
        img, label = self._crop(img, label, g)
        if torch.rand((), generator=g) < self.flip_prob:
            img, label = img.flip(-1), label.flip(-1)
        img = self._photometric(img, g)
        return self._pad(img, label)

    def _crop(
        self, img: torch.Tensor, label: torch.Tensor, g: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = label.shape
        ch, cw = min(self.crop, h), min(self.crop, w)
        for _ in range(10):
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            lab = label[top : top + ch, left : left + cw]
            if self.cat_max_ratio >= 1.0:
                break
            # Accept a crop unless one class fills more than cat_max_ratio of its labelled pixels.
            counts = torch.bincount(lab[lab != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return img[top : top + ch, left : left + cw], lab

    def _photometric(self, img: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if torch.rand((), generator=g) < 0.5:
            img = img + _uniform(-self.brightness_delta, self.brightness_delta, g)
        if torch.rand((), generator=g) < 0.5:
            img = img * _uniform(*self.contrast_range, g)
        return img.clamp(0.0, 255.0)

    def _pad(self, img: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = label.shape
        ph, pw = self.crop - h, self.crop - w
        if ph > 0 or pw > 0:
            # The mean grey level becomes 0 after normalization, as mmseg pads normalized inputs.
            img = F.pad(img, (0, pw, 0, ph), value=NORMALIZATIONS["infrared"][0][0] * 255.0)
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return img, label


def _uniform(lo: float, hi: float, g: torch.Generator | None = None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


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
            img, _ = resize(img, None, size)
        return img, label
