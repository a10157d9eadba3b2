"""Infrared segmentation datasets (method.md section 5): SODA, MFNet (thermal channel), SCUT-Seg and a
generic folder layout. One table (:data:`LAYOUTS`) says where each layout keeps images, label maps
and split files; the synthetic generator writes the same layouts from it.

Label value 255 is ignored everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

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
