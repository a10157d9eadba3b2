"""Segmentation dataset layouts as released and as UNIP prepares them: the infrared sets SODA, MFNet
(thermal) and SCUT-Seg (method.md section 5), the RGB / depth sets UNIP's repository also reads
(NYUDv2 depth, SUN RGB-D depth, ADE20K, MFNet's RGB channels; method.md section 9) and a generic
folder layout. One table (:data:`LAYOUTS`) says where each layout keeps images, label maps and split
files, how many channels its images have and how its labels are numbered; the synthetic generator
writes the same layouts (:mod:`unip_train.synthetic`). Class names and palettes: :mod:`.classes`.

What the real files hold, and how each is read:

- SODA: palette PNGs (read as class indices, never as colours); the split lists hold copies
  named ``X (1)`` and ``~temp_X`` next to ``X``: they are skipped and counted.
- MFNet: UNIP's ``thermal_imgs/`` (the thermal channel, grey) or the release's 4-channel RGB-T
  ``images/`` (the 4th channel is read); splits train / val / test, ``val_test`` (UNIP's
  evaluation list), ``test_day`` and ``test_night``.
- SCUT-Seg: labels in Cityscapes label IDs (the release) or 0-9 (UNIP's preparation), detected
  from the values or named by ``--label-map``; split lines of one column (image name) or two
  (image path, label path); ``val.txt`` is the test split when there is no ``test.txt``.
- NYUDv2 / SUN RGB-D (depth): ``Depth/*.png`` read as 8-bit colour (a single-channel PNG replicated
  to three channels, as mmsegmentation's ``LoadImageFromFile`` reads it; 16-bit PNGs are refused),
  labels in ``Lable_single_channel/`` (NYUDv2, the reference's spelling) or ``labels/``; class 0
  ``_background_`` is a class.
- ADE20K: ``ADEChallengeData2016/images/{training,validation}`` and ``annotations/...`` (the data
  root may be ``ADEChallengeData2016`` itself); no split files, the folders are the splits (``train``,
  ``val``); label 0 is ignored and 1..150 become classes 0..149 (``reduce_zero_label``).
- MFNet RGB: ``images/`` of the release (the RGB channels of its 4-channel PNGs), MFNet's split lists.

Every such decision is recorded in :attr:`SegDataset.notes` for the run to log. Label 255 is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from unip_analysis.errors import UnipError
from unip_analysis.images import IMAGE_SUFFIXES

from .classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    MFNET_PALETTE,
    NYUV2_CLASSES,
    NYUV2_PALETTE,
    SCUT_PALETTE,
    SUNRGBD_CLASSES,
    SUNRGBD_PALETTE,
    Colour,
    voc_colours,
)

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
    ``channels``: 1 for the grey infrared layouts, 3 for the RGB / depth ones (read as 8-bit colour).
    ``reduce_zero_label``: label 0 is ignored and 1..N become classes 0..N-1 (mmsegmentation's rule).
    ``split_dirs``: the splits are sub-folders of ``image_dir`` / ``label_dir`` named by ``splits``
    (ADE20K), not list files. ``root_subdir``: the folder the layout may sit in under the data root.
    ``palette``: one colour per class (``None``: the folder layout, see :func:`dataset_palette`).
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
    channels: int = 1
    reduce_zero_label: bool = False
    split_dirs: bool = False
    root_subdir: str | None = None
    palette: tuple[Colour, ...] | None = None

    @property
    def image_dir(self) -> str:
        return self.image_dirs[0]


MFNET_SPLITS = {
    "train": "train.txt", "val": "val.txt", "test": "test.txt", "val_test": "val_test.txt",
    "test_day": "test_day.txt", "test_night": "test_night.txt",
}  # fmt: skip
DEPTH_SPLITS = {"train": "train_depth.txt", "test": "test_depth.txt"}

LAYOUTS: dict[str, Layout] = {
    "soda": Layout(
        "soda", ("JPEGImages",), ".jpg", "SegmentationClassPNG", ".png",
        {"train": "train_infrared.txt", "test": "test_infrared.txt"}, SODA_CLASSES, skip_copies=True,
        palette=tuple(voc_colours(len(SODA_CLASSES))),
    ),
    "mfnet": Layout(
        "mfnet", ("thermal_imgs", "images"), ".png", "labels", ".png", MFNET_SPLITS, MFNET_CLASSES,
        thermal_channel=True, palette=MFNET_PALETTE,
    ),
    "scut": Layout(
        "scut", ("images",), ".jpg", "labels", ".png", {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
        SCUT_CLASSES, split_fallbacks={"test": "val"}, label_ids=SCUT_CITYSCAPES_IDS, palette=SCUT_PALETTE,
    ),
    "folder": Layout(
        "folder", ("images",), ".png", "masks", ".png", {"train": "train.txt", "test": "test.txt"}, None,
    ),
    "nyuv2": Layout(
        "nyuv2", ("Depth",), ".png", "Lable_single_channel", ".png", DEPTH_SPLITS, NYUV2_CLASSES,
        channels=3, palette=NYUV2_PALETTE,
    ),
    "sunrgbd": Layout(
        "sunrgbd", ("Depth",), ".png", "labels", ".png", DEPTH_SPLITS, SUNRGBD_CLASSES,
        channels=3, palette=SUNRGBD_PALETTE,
    ),
    "ade20k": Layout(
        "ade20k", ("images",), ".jpg", "annotations", ".png", {"train": "training", "val": "validation"},
        ADE20K_CLASSES, channels=3, reduce_zero_label=True, split_dirs=True,
        root_subdir="ADEChallengeData2016", palette=ADE20K_PALETTE,
    ),
    "mfnet-rgb": Layout(
        "mfnet-rgb", ("images",), ".png", "labels", ".png", MFNET_SPLITS, MFNET_CLASSES, channels=3,
        palette=MFNET_PALETTE,
    ),
}  # fmt: skip

# The split each layout evaluates on by default (ADE20K: its validation folder, as the reference's
# val and test both read it).
EVAL_SPLIT = {name: "test" for name in LAYOUTS} | {"ade20k": "val"}
# Crop and Resize img_scale (long, short) of each dataset's config: 512 and (2048, 512), but 480 and
# (2048, 480) for the two depth sets. A crop other than the default scales img_scale with it.
DEFAULT_CROP = {name: 512 for name in LAYOUTS} | {"nyuv2": 480, "sunrgbd": 480}
REFERENCE_LONG_EDGE = 2048


def img_scale(dataset: str, crop: int) -> tuple[int, int]:
    """Resize ``img_scale`` (long, short) for ``crop``: the dataset config's (2048, crop) at its own
    crop, scaled with the crop otherwise ((4 * crop, crop) for the 512 sets)."""
    return round(REFERENCE_LONG_EDGE * crop / DEFAULT_CROP[dataset]), crop


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


PALETTE_FILE = "palette.txt"


def dataset_palette(
    name: str, root: str | Path | None = None, num_classes: int | None = None
) -> list[Colour]:
    """One (R, G, B) colour per class: the layout's palette (:mod:`.classes`), or for the folder
    layout ``ROOT/palette.txt`` (one ``R G B`` or ``R,G,B`` line per class) when present, else the
    first colours of the VOC colour map, generated (:func:`palette_source` says which)."""
    layout = get_layout(name)
    if layout.palette is not None:
        return list(layout.palette)
    path = None if root is None else Path(root) / PALETTE_FILE
    if root is None:
        if num_classes is None:
            raise DatasetError(f"the {name} layout's palette needs its data root or the class count")
        n = num_classes
    else:
        n = len(dataset_classes(name, root, num_classes))
    if path is not None and path.exists():
        return _read_palette(path, n)
    if n > 256:
        raise DatasetError(
            f"{n} classes: more than the 256 colours of a generated palette; write {PALETTE_FILE}"
        )
    return voc_colours(n)


def palette_source(name: str, root: str | Path | None = None) -> str:
    """Where :func:`dataset_palette`'s colours come from, in words (recorded next to the palette)."""
    layout = get_layout(name)
    if layout.palette is not None:
        return f"the {name} palette (unip_train.finetune.classes)"
    if root is not None and (Path(root) / PALETTE_FILE).exists():
        return str(Path(root) / PALETTE_FILE)
    return f"generated: the VOC colour map (no {PALETTE_FILE} in the data root)"


def _read_palette(path: Path, n: int) -> list[Colour]:
    colours = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            rgb = tuple(int(p) for p in parts)
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise DatasetError(
                f"{path}:{i}: {line!r} is not a colour; write R G B (0-255) per line, one per class"
            )
        colours.append(rgb)
    if len(colours) != n:
        raise DatasetError(
            f"{path}: lists {len(colours)} colours for {n} classes; write one colour per class"
        )
    return colours


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


def layout_root(root: str | Path, layout: Layout) -> tuple[Path, list[str]]:
    """The folder the layout's paths are relative to: ``root``, or ``root/layout.root_subdir`` when
    that exists (ADE20K's ``ADEChallengeData2016``), with a note then."""
    root = Path(root)
    if layout.root_subdir is not None and (root / layout.root_subdir).is_dir():
        return root / layout.root_subdir, [f"{layout.name} read from {root / layout.root_subdir}"]
    return root, []


def split_source(root: str | Path, layout: Layout, split: str) -> Path:
    """The file (or, for ``split_dirs`` layouts, the image folder) that lists ``split`` (no fallback)."""
    if split not in layout.splits:
        raise DatasetError(f"{layout.name} has no split {split!r}; splits: {', '.join(layout.splits)}")
    base, _ = layout_root(root, layout)
    if layout.split_dirs:
        return base / layout.image_dir / layout.splits[split]
    return base / layout.splits[split]


def folder_split(root: Path, layout: Layout, split: str) -> tuple[Path, list[SplitEntry]]:
    """A ``split_dirs`` split: every ``image_suffix`` file under ``image_dir/SPLIT`` (recursively,
    sorted, as mmsegmentation scans it), paired with ``label_dir/SPLIT/same path`` + ``label_suffix``."""
    folder = split_source(root, layout, split)
    labels = folder.parent.parent / layout.label_dir / layout.splits[split]
    for what, path in (("image", folder), ("annotation", labels)):
        if not path.is_dir():
            dirs = f"{layout.image_dir}/{{{','.join(layout.splits.values())}}}"
            raise DatasetError(
                f"{path}: {what} folder of split {split!r} not found; the {layout.name} layout expects "
                f"{dirs} and {layout.label_dir}/... under the data root"
                + (f" (or under {layout.root_subdir}/ in it)" if layout.root_subdir else "")
            )
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(layout.image_suffix))
    if not images:
        raise DatasetError(f"{folder}: no {layout.image_suffix} images in split {split!r}")
    base = folder.parent.parent
    entries = []
    for img in images:
        rel = img.relative_to(folder)
        label = labels / rel.parent / (img.name[: -len(layout.image_suffix)] + layout.label_suffix)
        entries.append(SplitEntry(str(img.relative_to(base)), str(label.relative_to(base))))
    return folder, entries


def read_split(root: str | Path, layout: Layout, split: str) -> list[SplitEntry]:
    """Entries of a split file (blank lines and ``#`` comments skipped), or of a split folder."""
    if layout.split_dirs:
        return folder_split(layout_root(root, layout)[0], layout, split)[1]
    path, _ = split_file(root, layout, split)
    return read_entries(path)


def read_entries(path: Path) -> list[SplitEntry]:
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


def find_file(folder: Path, stem: str, preferred: str) -> Path | None:
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
