"""One split of a segmentation dataset as tensors: files read (grey, 16-bit, 4-channel thermal; 8-bit
colour and depth for the RGB / depth layouts), label maps mapped and checked, decoded images cached,
samples transformed (:class:`SegDataset`). Where each layout keeps its files: :mod:`.layouts`; the
augmentation: :mod:`.augment`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unip_analysis.errors import ImageError
from unip_analysis.images import NORMALIZATIONS, read_unit_array

from ..sampling import KeyedDataset, sample_generator
from .layouts import (
    IGNORE_INDEX,
    LABEL_MAPS,
    DatasetError,
    Layout,
    SplitEntry,
    dataset_classes,
    dataset_palette,
    drop_copies,
    find_file,
    folder_split,
    get_layout,
    image_folder,
    layout_root,
    palette_source,
    read_entries,
    split_file,
)

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, 0-1 scale


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


# --- 8-bit readers: uint8 [H, W, C] (C = 1 grey infrared, C = 3 colour / depth) -----------------------


def read_pixels(path: Path, channels: int, thermal_channel: bool = False) -> np.ndarray:
    """An image as uint8 [H, W, ``channels``], what the 8-bit augmentation works on and what
    :class:`SegDataset` and ``unip-predict`` read: :func:`read_colour` for 3 channels (RGB),
    :func:`read_grey_u8` for 1."""
    if channels == 3:
        return read_colour(path)
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    return read_grey_u8(path, thermal_channel)


def png_bit_depth(path: Path) -> int | None:
    """Bits per sample a PNG's header declares (byte 24: after the signature and the IHDR length,
    type, width and height); ``None`` for a file too short to hold one."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else None


def read_colour(path: Path) -> np.ndarray:
    """An image as uint8 [H, W, 3] RGB, as mmsegmentation's ``LoadImageFromFile`` (OpenCV's
    ``IMREAD_COLOR``) reads it: single-channel files replicated to three channels, the alpha (4th)
    channel dropped (MFNet's RGB-T release: its RGB channels), palette images as their colours.

    16-bit images are refused: OpenCV would keep only their high byte (depth in millimetres mostly
    0-40 after that) and Pillow reads 16-bit colour PNGs as 8-bit silently; depth maps must be
    converted to 8 bits first, as the datasets UNIP's repository reads are prepared.
    """
    try:
        with Image.open(path) as im:
            bits = png_bit_depth(path) if im.format == "PNG" else None
            if bits == 16 or im.mode in ("I", "F") or im.mode.startswith("I;16"):
                raise DatasetError(
                    f"{path}: {'16' if bits == 16 or im.mode.startswith('I;16') else '32'}-bit image (mode "
                    f"{im.mode}); depth and colour images are read as 8-bit, as the reference's loader reads "
                    "them: convert the file to 8 bits (e.g. depth scaled to 0-255) first"
                )
            if im.mode == "RGB":
                return np.asarray(im).copy()
            if im.mode == "RGBA":
                return np.ascontiguousarray(np.asarray(im)[..., :3])
            if im.mode in ("L", "LA", "1"):
                grey = np.asarray(im.convert("L"))
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB")).copy()  # palette, CMYK, YCbCr
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e}); remove or replace the file") from None


def read_grey_u8(path: Path, thermal_channel: bool = False) -> np.ndarray:
    """The grey image as uint8 [H, W, 1], what the 8-bit augmentation works on, as mmseg's
    ``LoadImageFromFile`` (``cv2.imread``, colour) holds it in each of its three channels: 8-bit grey
    files and MFNet's thermal channel as stored; 16-bit grey the high byte (``v >> 8``, OpenCV's
    conversion). Colour files are averaged to grey and other depths scaled (:func:`read_grey`),
    rounded to the nearest level."""
    try:
        with Image.open(path) as im:
            if thermal_channel and len(im.getbands()) == 4:
                return np.array(im)[..., 3:]
            if im.mode == "L":
                return np.array(im)[..., None]
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)[..., None]
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e}); remove or replace the file") from None
    grey = np.rint(read_grey(path, thermal_channel))
    return np.clip(grey, 0, 255).astype(np.uint8)[..., None]


# --- label maps-------------------------------------------------


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


def reduce_zero_lut() -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label`` as a lookup table: 0 -> 255 (ignored), v -> v - 1,
    255 stays 255 (it becomes 254 then 255 there)."""
    lut = np.arange(65536, dtype=np.int32) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def layout_lut(layout: Layout, label_map: str) -> np.ndarray | None:
    """Stored label value -> class index: Cityscapes IDs, mmsegmentation's zero reduction, or none."""
    if label_map == "cityscapes":
        return label_lut(layout.label_ids)
    return reduce_zero_lut() if layout.reduce_zero_label else None


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

    Images have :attr:`channels` channels as the layout says (1: grey infrared, replicated to three
    when normalized; 3: colour / depth, read by :func:`read_colour`), normalized by ``norm`` (mean,
    std per channel on the 0-1 scale; default: the infrared statistics). Labels of a
    ``reduce_zero_label`` layout (ADE20K) are read with 0 ignored and 1..N as classes 0..N-1.
    :attr:`palette` holds one colour per class (:func:`~.layouts.dataset_palette`).

    Files are checked when the dataset is built: every listed sample needs an image and a label map
    of the same size, and (``check_values``) label values within the class range or 255 after the
    label mapping. ``label_map`` is one of :data:`LABEL_MAPS`: ``auto`` detects SCUT-Seg's
    Cityscapes label IDs from the values (the result is :attr:`label_map` and a note).
    ``transform(img, label, g) -> (img, label)`` runs on numpy views of the uint8 image [H, W, C] (C = 1
    grey, 3 RGB) and label map before normalization (:mod:`.augment`, 8 bits as mmsegmentation); its
    random draws come from ``g``, a generator seeded by (``seed``, epoch, index) (see
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
        transform: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
        check_values: bool = True,
        seed: int = 0,
        label_map: str = "auto",
        cache_mb: float = 0.0,
        norm: Norm | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: data root not found; pass the folder that holds the {name} dataset")
        self.layout = get_layout(name)
        self.root, self.notes = layout_root(root, self.layout)
        self.classes = dataset_classes(name, self.root, num_classes)
        self.palette = dataset_palette(name, self.root, num_classes)
        self.palette_source = palette_source(name, self.root)
        self.channels = self.layout.channels
        self.split = split
        self.transform = transform
        self.seed = seed
        self.mean, self.std = norm if norm is not None else NORMALIZATIONS["infrared"]
        if self.layout.palette is None:
            self.notes.append(f"palette: {self.palette_source}")
        if self.layout.reduce_zero_label:
            n = self.num_classes
            self.notes.append(
                f"{name} labels: 0 ignored, 1..{n} read as classes 0..{n - 1} (reduce_zero_label, as the reference)"
            )
        if self.layout.split_dirs:
            path, entries = folder_split(self.root, self.layout, split)
        else:
            path, notes = split_file(self.root, self.layout, split)
            self.notes += notes
            entries = read_entries(path)
        self.split_path = path
        if self.layout.skip_copies:
            entries, copies = drop_copies(entries)
            if copies:
                what = ", ".join(f"{n} {kind}" for kind, n in copies.items())
                self.notes.append(f"{path.name}: skipped {sum(copies.values())} duplicate entries ({what})")
        image_dir, notes = image_folder(self.root, self.layout)
        self.notes += notes
        self.samples = [self._locate(e, path, image_dir) for e in entries]
        self.label_map = self._choose_label_map(label_map, check_values)
        self.lut = self._lut(self.label_map)
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
            img = find_file(self.root / image_dir, entry.stem, self.layout.image_suffix)
            lab = find_file(self.root / self.layout.label_dir, entry.stem, self.layout.label_suffix)
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

    def _lut(self, label_map: str) -> np.ndarray | None:
        return layout_lut(self.layout, label_map)

    def _range_hint(self, label_map: str) -> str:
        if self.layout.label_ids is not None:
            ids = ", ".join(map(str, self.layout.label_ids))
            return (
                f"read with --label-map {label_map} ({self.layout.name} classes are 0..{self.num_classes - 1} "
                f"or, with --label-map cityscapes, the Cityscapes label IDs {ids})"
            )
        if self.layout.classes is None:
            return "set the classes with classes.txt or --num-classes, or fix the label map"
        if self.layout.reduce_zero_label:
            return (
                f"{self.layout.name} stores 0 (ignored) and 1..{self.num_classes}; the values shown are the "
                "stored ones minus 1 (reduce_zero_label): check --dataset or fix the label map"
            )
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
        lut = self._lut(label_map)
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
        """Raw image uint8 [H, W, C] (C = 1 grey, 3 RGB) and label [H, W] (uint8 class indices, 255
        ignored), before any transform.

        Decoded pairs are kept in memory up to :attr:`cache_mb` per training process (shared out
        among its loader workers, each of which holds its own), first come first kept: later epochs
        read them without decoding. The values are the decoded ones, so a run is the same with or
        without the cache. Transforms must not modify the image in place (none does)."""
        s = self.samples[i]
        hit = self._cache.get(s.image)  # keyed by file: subsets (labelled_subset) share the cache
        if hit is None:
            img = torch.from_numpy(read_pixels(s.image, self.channels, self.layout.thermal_channel))
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
        """Sample ``i`` transformed with the draws of (seed, ``epoch``, ``i``), then normalized (and
        padded, after :class:`~unip_train.finetune.augment.TrainAugment`) by :func:`to_input`."""
        img, label = (t.numpy() for t in self.load(i))
        size = None
        if self.transform is not None:
            img, label = self.transform(img, label, sample_generator(self.seed, epoch, i))
            size = label.shape if getattr(self.transform, "pads_image", False) else None
        return to_input(img, *scaled_norm(self.mean, self.std), size), torch.from_numpy(
            label.astype(np.int64)
        )


def scaled_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[float | tuple, float | tuple]:
    """(mean, std) on the 0-255 scale for :func:`to_input`: one number each when every channel has
    the same value, else one per channel."""
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return mean[0] * 255.0, std[0] * 255.0
    return tuple(m * 255.0 for m in mean), tuple(s * 255.0 for s in std)


def to_input(
    img: np.ndarray,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 image [h, w, C] (C = 1 grey, replicated; C = 3 RGB) -> float32 input [3, H, W], as mmseg's
    ``Normalize`` then ``Pad``: ``(float32(v) - mean) * (1 / std)`` per channel, the subtraction in
    float32, the product in float64 with ``1 / std`` formed in float64, rounded to float32
    (``mmcv.imnormalize``: ``cv2.subtract``, ``cv2.multiply`` as OpenCV 4.x computes them);
    ``mean`` / ``std`` on the 0-255 scale (one value or one per channel, RGB); then padded at the
    bottom and right with 0 to ``size`` = (H, W) when given."""
    h, w, c = img.shape
    if c not in (1, 3):
        raise ValueError(f"to_input: expected an image [H, W, 1] or [H, W, 3], got {list(img.shape)}")
    height, width = size if size is not None else (h, w)
    if height < h or width < w:
        raise ValueError(f"to_input: cannot pad a {h} x {w} image to {height} x {width}")
    # mmseg holds mean and std as float32 arrays; imnormalize takes 1 / float64(std).
    means = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,))
    invs = np.broadcast_to(1.0 / np.asarray(std, dtype=np.float32).astype(np.float64), (3,))
    out = (np.zeros if (height, width) != (h, w) else np.empty)((3, height, width), dtype=np.float32)
    for k in range(3):
        if k > 0 and c == 1 and means[k] == means[0] and invs[k] == invs[0]:
            out[k] = out[0]  # grey with one normalization for all channels: the same values
            continue
        region = out[k, :h, :w]
        np.subtract(img[..., k if c == 3 else 0], means[k], out=region, dtype=np.float32)
        np.multiply(region, invs[k], out=region, dtype=np.float64, casting="same_kind")
    return torch.from_numpy(out)
