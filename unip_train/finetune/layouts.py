"""Segmentation dataset layouts (method.md section 5) as released and as UNIP prepares them:
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

import re
from dataclasses import dataclass, field
from pathlib import Path

from unip_analysis.errors import UnipError
from unip_analysis.images import IMAGE_SUFFIXES

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
