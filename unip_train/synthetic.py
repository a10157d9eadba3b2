"""A small synthetic infrared segmentation dataset: warm objects on a cooler textured background.

Every class has a characteristic shape *and* a characteristic temperature (grey-level) range, so a
small model can learn it in a few hundred iterations on CPU:

| class | shape | grey level (0-255) |
|---|---|---|
| background | smooth low-frequency noise + gradient | 30-90 |
| person | upright ellipse body + round head | 200-240 |
| car | wide rounded rectangle, hot wheels | 150-180 |
| pole | thin vertical bar | 125-145 |
| bicycle | two rings joined by a frame | 170-195 |
| building | large block from the top edge, window grid | 100-120 |

Scenes get slight blur and sensor noise. Label maps carry a thin 255 (ignore) band on the border
of some objects, as hand-labelled infrared sets do.

:func:`generate` writes the dataset in one of the layouts of :mod:`unip_train.finetune.layouts`
(SODA, MFNet, SCUT-Seg, folder; NYUDv2 and SUN RGB-D depth, ADE20K, MFNet RGB), as released or as
UNIP prepares them, with the real files' quirks (palette PNGs, duplicate entries, Cityscapes label
IDs, two-column split files, 4-channel or extracted thermal images, depth PNGs of one or three
channels, NYUDv2's ``Lable_single_channel`` folder, ADE20K's split folders and zero label), mapping
these classes into the layout's class list (:data:`LAYOUT_CLASS_MAP`); the scene's grey level is
the depth of the depth layouts and is tinted into colour for the RGB ones (:func:`colourise`).
:func:`generate_unlabelled` writes a plain image folder.

    python -m unip_train.synthetic --layout scut --variant release --out DIR --train 40 --test 20 --size 128
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .finetune.classes import ADE20K_CLASSES, NYUV2_CLASSES, SUNRGBD_CLASSES, voc_palette
from .finetune.layouts import IGNORE_INDEX, LAYOUTS, SCUT_CITYSCAPES_IDS

CLASSES: list[str] = ["background", "person", "car", "pole", "bicycle", "building"]

# Grey-level (temperature) range of each class; background is drawn separately.
TEMPERATURE: dict[str, tuple[int, int]] = {
    "person": (200, 240),
    "car": (150, 180),
    "pole": (125, 145),
    "bicycle": (170, 195),
    "building": (100, 120),
}


def _indices(classes: tuple[str, ...], *names: str) -> list[int]:
    return [classes.index(n) for n in names]


# Synthetic class index -> class index in each layout. Classes a layout lacks become its
# background (index 0): MFNet has no pole or building class, SCUT-Seg no building; the indoor sets
# take the nearest class they have. ADE20K has no background class: the scene's background is
# stored as label 0, which the layout ignores (IGNORE_INDEX here).
LAYOUT_CLASS_MAP: dict[str, list[int]] = {
    "soda": [0, 1, 10, 5, 11, 2],  # background, person, car, pole, bicycle, building
    "mfnet": [0, 2, 1, 0, 3, 0],  # unlabelled, person, car, -, bike, -
    "scut": [0, 2, 4, 9, 3, 0],  # background, person, car, pole, rider (bicycle + rider), -
    "folder": list(range(len(CLASSES))),
    "nyuv2": [0, *_indices(NYUV2_CLASSES, "person", "box", "otherstructure", "otherfurniture", "wall")],
    "sunrgbd": [0, *_indices(SUNRGBD_CLASSES, "person", "box", "lamp", "chair", "wall")],
    "ade20k": [IGNORE_INDEX, *_indices(ADE20K_CLASSES, "person", "car", "pole", "bicycle", "building")],
    "mfnet-rgb": [0, 2, 1, 0, 3, 0],
}


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled with cubic splines."""
    coarse = rng.random((cells, cells))
    fine = ndimage.zoom(coarse, (h / cells, w / cells), order=3, mode="reflect")[:h, :w]
    fine = np.pad(fine, ((0, h - fine.shape[0]), (0, w - fine.shape[1])), mode="edge")
    lo, hi = fine.min(), fine.max()
    return (fine - lo) / max(hi - lo, 1e-6)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1.0) / 2.0
    tex = 0.6 * _smooth_noise(rng, h, w, 5) + 0.4 * _smooth_noise(rng, h, w, 12)
    lo = rng.uniform(30, 45)
    return lo + (90 - lo) * (0.5 * tex + 0.5 * grad)


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _rounded_rect(yy, xx, top, left, hh, ww, r) -> np.ndarray:
    inside = (yy >= top) & (yy < top + hh) & (xx >= left) & (xx < left + ww)
    # Cut the corners: distance to the nearest inner-corner point must stay below r.
    cy = np.clip(yy, top + r, top + hh - r)
    cx = np.clip(xx, left + r, left + ww - r)
    return inside & ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


def _ring(yy, xx, cy, cx, r, t) -> np.ndarray:
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (d <= r) & (d >= r - t)


def _segment(yy, xx, y0, x0, y1, x1, t) -> np.ndarray:
    """Pixels within ``t`` of the segment (y0, x0)-(y1, x1)."""
    vy, vx = y1 - y0, x1 - x0
    n2 = max(vy * vy + vx * vx, 1e-6)
    s = np.clip(((yy - y0) * vy + (xx - x0) * vx) / n2, 0.0, 1.0)
    return (yy - (y0 + s * vy)) ** 2 + (xx - (x0 + s * vx)) ** 2 <= t * t


def _shape(
    name: str, rng: np.random.Generator, yy, xx, h: int, w: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask of one object, and an optional mask of a hotter part (wheels, windows, head)."""
    if name == "person":
        ph = rng.uniform(0.22, 0.38) * h
        cx, foot = rng.uniform(0.08, 0.92) * w, rng.uniform(0.55, 0.98) * h
        body_ry, body_rx = 0.38 * ph, rng.uniform(0.11, 0.15) * ph
        body_cy = foot - body_ry
        head_r = 0.11 * ph
        head_cy = body_cy - body_ry - 0.8 * head_r
        head = _ellipse(yy, xx, head_cy, cx, head_r, head_r)
        return _ellipse(yy, xx, body_cy, cx, body_ry, body_rx) | head, head
    if name == "car":
        cw = rng.uniform(0.25, 0.42) * w
        ch = rng.uniform(0.38, 0.55) * cw
        left, top = rng.uniform(-0.1, 0.95) * w - cw / 2, rng.uniform(0.45, 0.95) * h - ch
        body = _rounded_rect(yy, xx, top, left, ch, cw, 0.25 * ch)
        wr = 0.18 * ch
        wheels = _ellipse(yy, xx, top + ch - wr, left + 0.22 * cw, wr, wr) | _ellipse(
            yy, xx, top + ch - wr, left + 0.78 * cw, wr, wr
        )
        return body, wheels & body
    if name == "pole":
        pw = max(2.0, rng.uniform(0.025, 0.045) * w)
        left = rng.uniform(0.03, 0.95) * w
        bottom = rng.uniform(0.7, 1.0) * h
        top = bottom - rng.uniform(0.45, 0.8) * h
        return (xx >= left) & (xx < left + pw) & (yy >= top) & (yy < bottom), None
    if name == "bicycle":
        r = rng.uniform(0.06, 0.09) * min(h, w)
        t = max(1.5, 0.3 * r)
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.6, 0.9) * h
        gap = 2.6 * r
        a, b = cx - gap / 2, cx + gap / 2
        frame = _segment(yy, xx, cy, a, cy - 1.1 * r, cx, t) | _segment(yy, xx, cy - 1.1 * r, cx, cy, b, t)
        frame |= _segment(yy, xx, cy, a, cy, b, 0.7 * t)
        return _ring(yy, xx, cy, a, r, t) | _ring(yy, xx, cy, b, r, t) | frame, None
    if name == "building":
        bw = rng.uniform(0.25, 0.5) * w
        left = rng.uniform(-0.1, 0.9) * w - bw / 2
        bottom = rng.uniform(0.35, 0.6) * h
        mask = (xx >= left) & (xx < left + bw) & (yy < bottom)
        step = max(4.0, 0.08 * min(h, w))
        windows = mask & ((yy % step) < 0.45 * step) & (((xx - left) % step) < 0.45 * step)
        return mask, windows
    raise ValueError(f"unknown synthetic class {name!r}")


# Painter's order (far to near) and how many of each a scene holds (inclusive range).
_COUNTS: tuple[tuple[str, int, int], ...] = (
    ("building", 0, 1),
    ("pole", 0, 2),
    ("car", 1, 2),
    ("bicycle", 0, 1),
    ("person", 1, 3),
)


def make_scene(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic infrared scene: (uint8 image [H, W], uint8 label [H, W] over :data:`CLASSES`, 255 ignored)."""
    h, w = _size_hw(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    ignore = np.zeros((h, w), dtype=bool)
    for name, lo, hi in _COUNTS:
        for _ in range(int(rng.integers(lo, hi + 1))):
            mask, hot = _shape(name, rng, yy, xx, h, w)
            if not mask.any():
                continue
            t_lo, t_hi = TEMPERATURE[name]
            temp = rng.uniform(t_lo, t_hi)
            # Objects are not flat: a little smooth texture keeps them from being a pure threshold.
            surface = temp + 8.0 * (_smooth_noise(rng, h, w, 4) - 0.5)
            img = np.where(mask, surface, img)
            if hot is not None:
                img = np.where(hot, np.minimum(temp + rng.uniform(12, 25), 250.0), img)
            label[mask] = CLASSES.index(name)
            ignore &= ~mask
            if name in ("person", "car") and rng.random() < 0.5:
                border = mask & ~ndimage.binary_erosion(mask)
                ignore |= border
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.5, 1.0))
    img = img + rng.normal(0.0, 3.0, size=img.shape)
    label[ignore] = IGNORE_INDEX
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def colourise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] from a grey scene: three different tone curves of the grey level plus noise,
    so the channels differ from each other and from the grey."""
    g = img.astype(np.float32)
    rgb = np.stack([g, 255.0 - 0.8 * g, 0.5 * g + 60.0], axis=2) + rng.normal(0.0, 4.0, (*img.shape, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _write_image(
    path: Path, img: np.ndarray, rng: np.random.Generator, mfnet: str | None = None, kind: str = "grey"
) -> None:
    """``mfnet``: "rgbt" writes RGB + thermal as one 4-channel PNG (the release; the infrared loader
    must pick the 4th channel, the RGB one the first three), "thermal" the thermal channel alone
    (UNIP's ``thermal_imgs/``), "rgb" the RGB channels alone. The RGB channels are drawn either way,
    so every variant of one seed holds the same scenes. ``kind`` (other layouts): "grey",
    "colour" (:func:`colourise`), "depth1" / "depth3" (the grey level as an 8-bit depth PNG of one
    channel, or replicated to three)."""
    if mfnet is not None:
        rgb = np.clip(255 - img[..., None].astype(np.int16) + rng.integers(-20, 21, (*img.shape, 3)), 0, 255)
        if mfnet == "rgbt":
            arr = np.concatenate([rgb.astype(np.uint8), img[..., None]], axis=2)
            Image.fromarray(arr, mode="RGBA").save(path)
            return
        if mfnet == "rgb":
            Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(path)
            return
    if kind == "colour":
        Image.fromarray(colourise(img, rng), mode="RGB").save(
            path, **({"quality": 95} if path.suffix == ".jpg" else {})
        )
        return
    if kind == "depth3":
        Image.fromarray(np.repeat(img[..., None], 3, axis=2), mode="RGB").save(path)
        return
    if path.suffix == ".jpg":
        Image.fromarray(img, mode="L").save(path, quality=95)
    else:
        Image.fromarray(img, mode="L").save(path)


def _write_label(path: Path, label: np.ndarray, palette: bool) -> None:
    if palette:
        im = Image.fromarray(label, mode="P")
        im.putpalette(voc_palette())
        im.save(path)
    else:
        Image.fromarray(label, mode="L" if label.dtype == np.uint8 else "I;16").save(path)


VARIANTS = ("release", "unip")
# Splits whose scenes are drawn (in this order); the other split files are derived lists.
_SCENE_SPLITS = {
    "soda": ("train", "test"),
    "mfnet": ("train", "val", "test"),
    "scut": ("train", "val"),
    "folder": ("train", "test"),
    "nyuv2": ("train", "test"),
    "sunrgbd": ("train", "test"),
    "ade20k": ("train", "val"),
    "mfnet-rgb": ("train", "val", "test"),
}


def generate(
    out: str | Path,
    layout: str,
    n_train: int,
    n_test: int,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    variant: str = "release",
) -> Path:
    """Write ``n_train`` + ``n_test`` scenes in ``layout`` (soda | mfnet | scut | folder) under ``out``,
    with the files' real quirks (method.md section 5). ``variant``: the dataset as released, or as
    UNIP's preparation leaves it (``unip``). Stems are unique across splits. Returns ``out``.

    - soda (both variants): palette PNG labels (VOC colours, class indices); ``X (1).jpg`` and
      ``~temp_X.jpg`` copies of the first image of each split, listed and on disk.
    - mfnet: ``images/`` 4-channel RGB-T (release) or ``thermal_imgs/`` grey (unip, plus
      ``val_test.txt`` = val + test); ``val`` has ``n_test`` scenes; ``test_day.txt`` /
      ``test_night.txt`` split the test list in halves.
    - scut: labels in Cityscapes label IDs named ``STEM_labelIds.png`` and two-column split files
      (release), or 0-9 labels and one-column files (unip); ``train.txt`` and ``val.txt``, no ``test.txt``.
    - folder: ``images/``, ``masks/``, ``train.txt`` / ``test.txt`` and ``classes.txt``.
    - nyuv2 / sunrgbd: 8-bit depth PNGs in ``Depth/``, single-channel and three-channel in turn
      (even and odd scenes), labels in ``Lable_single_channel/`` (NYUDv2's spelling) or ``labels/``,
      ``train_depth.txt`` / ``test_depth.txt``.
    - ade20k: ``ADEChallengeData2016/`` (release) or the data root itself (unip, as the reference's
      data_root points into it) holding ``images/{training,validation}/ADE_*.jpg`` colour images and
      ``annotations/...`` PNGs with label 0 (the scene's background) and classes 1-150; no split files;
      ``n_test`` validation scenes.
    - mfnet-rgb: ``images/`` 4-channel RGB-T (release; the loader takes the RGB channels) or 3-channel
      RGB (unip), MFNet's split lists (unip: plus ``val_test.txt``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    spec = LAYOUTS[layout]
    out = Path(out)
    unip = variant == "unip"
    if layout == "ade20k":
        return _generate_ade20k(out if unip else out / spec.root_subdir, n_train, n_test, size, seed)
    image_dir = "thermal_imgs" if layout == "mfnet" and unip else spec.image_dirs[-1]
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    (out / spec.label_dir).mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_test, "test": n_test}
    lists = _write_scenes(out, layout, unip, image_dir, counts, size, seed)
    _write_split_files(out, layout, unip, lists)
    return out


def _stored_label_lut(layout: str, cityscapes: bool) -> np.ndarray:
    """Class index -> the value the layout's label files store (its class order; Cityscapes label
    IDs for SCUT's release); 255 (ignore) stays 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(CLASSES)] = LAYOUT_CLASS_MAP[layout]
    if cityscapes:
        ids = np.array([*SCUT_CITYSCAPES_IDS, *([0] * (256 - len(SCUT_CITYSCAPES_IDS)))], dtype=np.uint8)
        ids[IGNORE_INDEX] = IGNORE_INDEX
        lut = ids[lut]
    return lut


def _write_scenes(
    out: Path,
    layout: str,
    unip: bool,
    image_dir: str,
    counts: dict[str, int],
    size: int | tuple[int, int],
    seed: int,
) -> dict[str, list[str]]:
    """Draw and write each split's scenes in turn (one generator, stems numbered across splits);
    returns each split's list lines."""
    spec = LAYOUTS[layout]
    mfnet = {"mfnet": "thermal" if unip else "rgbt", "mfnet-rgb": "rgb" if unip else "rgbt"}.get(layout)
    depth = layout in ("nyuv2", "sunrgbd")
    cityscapes = layout == "scut" and not unip
    lut = _stored_label_lut(layout, cityscapes)
    rng = np.random.default_rng(seed)
    index = 0
    lists: dict[str, list[str]] = {}
    for split in _SCENE_SPLITS[layout]:
        lines = []
        for _ in range(counts[split]):
            stem = f"{index:05d}"
            index += 1
            img, label = make_scene(rng, size)
            label_name = f"{stem}_labelIds.png" if cityscapes else f"{stem}{spec.label_suffix}"
            kind = ("depth1" if int(stem) % 2 == 0 else "depth3") if depth else "grey"
            _write_image(out / image_dir / f"{stem}{spec.image_suffix}", img, rng, mfnet, kind)
            _write_label(out / spec.label_dir / label_name, lut[label], palette=layout == "soda")
            if cityscapes:
                lines.append(f"{image_dir}/{stem}{spec.image_suffix} {spec.label_dir}/{label_name}")
            else:
                lines.append(stem)
        lists[split] = lines
    return lists


def _write_split_files(out: Path, layout: str, unip: bool, lists: dict[str, list[str]]) -> None:
    """The layout's split files: SODA's copies, MFNet's day / night halves (and UNIP's val_test),
    and ``classes.txt`` for layouts that carry their own class list."""
    spec = LAYOUTS[layout]
    if layout == "soda":
        _add_soda_copies(out, spec, lists)
    if layout in ("mfnet", "mfnet-rgb"):
        half = len(lists["test"]) // 2
        lists["test_day"], lists["test_night"] = lists["test"][:half], lists["test"][half:]
        if unip:
            lists["val_test"] = lists["val"] + lists["test"]
    for split, lines in lists.items():
        (out / spec.splits[split]).write_text("".join(f"{line}\n" for line in lines))
    if spec.classes is None:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))


def _generate_ade20k(base: Path, n_train: int, n_test: int, size: int | tuple[int, int], seed: int) -> Path:
    """ADE20K's folders under ``base`` (``ADEChallengeData2016``): colour JPEGs and label PNGs storing
    0 for the scene's background (ignored when read), class index + 1 for objects, 255 kept."""
    stored = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    stored[0] = 0
    stored[1 : len(CLASSES)] = np.asarray(LAYOUT_CLASS_MAP["ade20k"][1:]) + 1
    rng = np.random.default_rng(seed)
    for split, folder, n in (("train", "training", n_train), ("val", "validation", n_test)):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"ADE_{split}_{i + 1:08d}"
            img, label = make_scene(rng, size)
            _write_image(base / "images" / folder / f"{stem}.jpg", img, rng, kind="colour")
            _write_label(base / "annotations" / folder / f"{stem}.png", stored[label], palette=False)
    return base.parent if base.name == LAYOUTS["ade20k"].root_subdir else base


def _add_soda_copies(out: Path, spec, lists: dict[str, list[str]]) -> None:
    """SODA's lists name copies of some images (``X (1).jpg``, ``~temp_X.jpg``); so do the files."""
    for split, lines in lists.items():
        if not lines:
            continue
        stem = lines[0]
        copies = [f"{stem} (1)", f"~temp_{stem}"] if split == "train" else [f"{stem} (1)"]
        for copy in copies:
            shutil.copyfile(out / spec.image_dir / f"{stem}.jpg", out / spec.image_dir / f"{copy}.jpg")
            shutil.copyfile(out / spec.label_dir / f"{stem}.png", out / spec.label_dir / f"{copy}.png")
            lines.insert(1, f"{copy}.jpg")


def generate_unlabelled(
    out: str | Path, n: int, size: int | tuple[int, int] = 128, seed: int = 0, scene=None
) -> Path:
    """Write ``n`` grey PNG scenes (no labels) into the folder ``out``, for distillation or analysis.
    ``scene(rng, size) -> (image, label)`` draws one (default: this module's scenes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scene = scene or make_scene
    for i in range(n):
        img, _ = scene(rng, size)
        Image.fromarray(img, mode="L").save(out / f"{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unip_train.synthetic", description="Write a synthetic infrared segmentation dataset."
    )
    p.add_argument("--layout", required=True, choices=[*LAYOUTS, "unlabelled"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=40, help="training scenes (unlabelled: all scenes)")
    p.add_argument("--test", type=int, default=20, help="test scenes (MFNet: also val scenes)")
    p.add_argument("--size", type=int, nargs="+", default=[128], help="SIZE or H W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="release",
        help="files as released (default) or as UNIP prepares them",
    )
    args = p.parse_args(argv)
    if len(args.size) not in (1, 2) or min(args.size) < 16:
        p.error("--size takes one or two numbers, each at least 16")
    size = args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1])
    if args.layout == "unlabelled":
        out = generate_unlabelled(args.out, args.train, size, args.seed)
    else:
        out = generate(args.out, args.layout, args.train, args.test, size, args.seed, args.variant)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
