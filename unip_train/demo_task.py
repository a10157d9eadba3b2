"""The demo's synthetic infrared task: every object equally warm, so class needs shape and context.

The paper's setting is many unlabelled infrared images, a few labelled ones, and classes that
differ in shape and surroundings more than in temperature. This miniature keeps those three
properties (docs/demo.md says why each matters):

| class (SODA index) | what it is | what tells it apart |
|---|---|---|
| background (0) | cool textured ground, plus warm clutter: irregular blobs and lone round spots | the clutter is as warm as any object; only its shape says "background" |
| person (1) | tall ellipse with a round head on top | shape: taller than wide |
| building (2) | large block from the top edge with a window grid | size, windows |
| pole (5) | thin vertical bar | shape |
| car (10) | wide rounded box | shape: wider than tall |
| bicycle (11) | two rings joined by a frame | shape |
| lamp (12) | round spot on top of a pole | context: the same spot is a person's head on a body, background alone |

Every object draws its temperature from the same range (:data:`OBJECT_TEMPERATURE`), so a pixel's
grey level says "warm thing" but not which thing. Scenes are written in the SODA layout with SODA's
class indices (``unip-finetune --dataset soda``), or as a plain folder of unlabelled images
(``unip-pretrain --infrared``, ``unip-analyze --images``). Same seed, same bytes.

    python -m unip_train.demo_task --out DIR --unlabelled 2000 --train 32 --test 100 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import synthetic
from .finetune.layouts import LAYOUTS, SODA_CLASSES
from .synthetic import _background, _ellipse, _ring, _rounded_rect, _segment, _smooth_noise

# Class name -> SODA class index (the label value written).
CLASS_INDEX: dict[str, int] = {
    name: SODA_CLASSES.index(name)
    for name in ("background", "person", "building", "pole", "car", "bicycle", "lamp")
}
# One grey-level range (0-255) for every object class: temperature carries no class information.
OBJECT_TEMPERATURE = (140.0, 220.0)
# Windows glow this much above their building's wall.
WINDOW_EXCESS = (15.0, 30.0)
# Radius of a round spot (a person's head, a lamp, or clutter), as a fraction of the image side.
SPOT_RADIUS = (0.045, 0.065)
DEFAULT_SIZE = 64

# Painter's order (far to near) and how many of each a scene holds (inclusive range).
_COUNTS: tuple[tuple[str, int, int], ...] = (
    ("building", 0, 1),
    ("blob", 0, 2),
    ("pole", 0, 2),
    ("car", 0, 2),
    ("bicycle", 0, 1),
    ("person", 1, 3),
    ("spot", 0, 2),
)


def _surface(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An object's grey levels: one temperature from the shared range plus a little smooth texture."""
    temp = rng.uniform(*OBJECT_TEMPERATURE)
    return temp + 10.0 * (_smooth_noise(rng, h, w, 4) - 0.5)


def _spot(rng: np.random.Generator, yy, xx, cy: float, cx: float, side: int) -> np.ndarray:
    r = rng.uniform(*SPOT_RADIUS) * side
    return _ellipse(yy, xx, cy, cx, r, r)


def _paint(
    name: str, rng: np.random.Generator, yy, xx, h: int, w: int
) -> list[tuple[np.ndarray, str, float]]:
    """The parts of one object: (mask, class name, extra warmth over the object's surface)."""
    side = min(h, w)
    if name == "person":
        height = rng.uniform(0.3, 0.5) * h
        cx, foot = rng.uniform(0.08, 0.92) * w, rng.uniform(0.55, 0.98) * h
        ry, rx = 0.36 * height, rng.uniform(0.32, 0.42) * 0.36 * height
        cy = foot - ry
        r = rng.uniform(*SPOT_RADIUS) * side
        head = _ellipse(yy, xx, cy - ry - 0.7 * r, cx, r, r)
        return [(_ellipse(yy, xx, cy, cx, ry, rx) | head, "person", 0.0)]
    if name == "car":
        cw = rng.uniform(0.3, 0.45) * w
        ch = rng.uniform(0.4, 0.55) * cw
        left, top = rng.uniform(-0.1, 0.95) * w - cw / 2, rng.uniform(0.45, 0.95) * h - ch
        return [(_rounded_rect(yy, xx, top, left, ch, cw, 0.3 * ch), "car", 0.0)]
    if name == "pole":
        pw = max(2.0, rng.uniform(0.035, 0.05) * w)
        left = rng.uniform(0.05, 0.92) * w
        bottom = rng.uniform(0.75, 1.0) * h
        top = bottom - rng.uniform(0.45, 0.7) * h
        parts = [((xx >= left) & (xx < left + pw) & (yy >= top) & (yy < bottom), "pole", 0.0)]
        if rng.random() < 0.75:
            parts.append((_spot(rng, yy, xx, top, left + pw / 2, side), "lamp", 0.0))
        return parts
    if name == "bicycle":
        r = rng.uniform(0.07, 0.1) * side
        t = max(1.5, 0.3 * r)
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.6, 0.9) * h
        a, b = cx - 1.3 * r, cx + 1.3 * r
        frame = _segment(yy, xx, cy, a, cy - 1.1 * r, cx, t) | _segment(yy, xx, cy - 1.1 * r, cx, cy, b, t)
        return [(_ring(yy, xx, cy, a, r, t) | _ring(yy, xx, cy, b, r, t) | frame, "bicycle", 0.0)]
    if name == "building":
        bw = rng.uniform(0.3, 0.55) * w
        left = rng.uniform(-0.1, 0.9) * w - bw / 2
        bottom = rng.uniform(0.35, 0.6) * h
        wall = (xx >= left) & (xx < left + bw) & (yy < bottom)
        step = max(4.0, 0.1 * side)
        windows = wall & ((yy % step) < 0.45 * step) & (((xx - left) % step) < 0.45 * step)
        return [(wall, "building", 0.0), (windows, "building", rng.uniform(*WINDOW_EXCESS))]
    if name == "blob":
        # Sun-warmed ground or exhaust: an irregular warm patch that belongs to the background.
        cy, cx = rng.uniform(0.3, 1.0) * h, rng.uniform(0.0, 1.0) * w
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.08, 0.2) * w
        wobble = _smooth_noise(rng, h, w, 6)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 0.6 + 0.8 * wobble
        return [(mask, "background", 0.0)]
    if name == "spot":
        # A lone round spot: looks like a head or a lamp, but nothing holds it up.
        return [
            (
                _spot(rng, yy, xx, rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w, side),
                "background",
                0.0,
            )
        ]
    raise ValueError(f"unknown demo object {name!r}")


def make_scene(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 grey image [size, size], uint8 label map of SODA class indices)."""
    h = w = int(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    for name, lo, hi in _COUNTS:
        for _ in range(int(rng.integers(lo, hi + 1))):
            surface = _surface(rng, h, w)
            for mask, cls, excess in _paint(name, rng, yy, xx, h, w):
                img = np.where(mask, np.minimum(surface + excess, 250.0), img)
                label[mask] = CLASS_INDEX[cls]
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.5, 0.9))
    img = img + rng.normal(0.0, 3.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def generate_labelled(
    out: str | Path, n_train: int, n_test: int, size: int = DEFAULT_SIZE, seed: int = 0
) -> Path:
    """Write ``n_train`` + ``n_test`` labelled scenes in the SODA layout under ``out``; returns ``out``.

    Each split draws from its own stream (seeded by ``seed`` and the split), so the test scenes do
    not change when ``n_train`` does: runs with fewer labels are scored on the same test set."""
    spec = LAYOUTS["soda"]
    out = Path(out)
    (out / spec.image_dir).mkdir(parents=True, exist_ok=True)
    (out / spec.label_dir).mkdir(parents=True, exist_ok=True)
    for split_id, (split, count) in enumerate((("train", n_train), ("test", n_test))):
        rng = np.random.default_rng([seed, split_id])
        stems = []
        for i in range(count):
            stem = f"{split}{i:05d}"
            img, label = make_scene(rng, size)
            # Lossless PNG under SODA's .jpg name would confuse readers; keep SODA's JPEG at quality 95.
            Image.fromarray(img, mode="L").save(
                out / spec.image_dir / f"{stem}{spec.image_suffix}", quality=95
            )
            Image.fromarray(label, mode="L").save(out / spec.label_dir / f"{stem}{spec.label_suffix}")
            stems.append(stem)
        (out / spec.splits[split]).write_text("".join(f"{s}\n" for s in stems))
    return out


def generate_unlabelled(out: str | Path, n: int, size: int = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Write ``n`` grey PNG scenes (no labels) into the folder ``out``; returns ``out``."""
    return synthetic.generate_unlabelled(out, n, size, seed, scene=make_scene)


def scenes(n: int, size: int = DEFAULT_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes in memory: uint8 images [n, size, size] and label maps [n, size, size]."""
    rng = np.random.default_rng(seed)
    pairs = [make_scene(rng, size) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unip_train.demo_task",
        description="Write the demo's synthetic infrared task: unlabelled scenes and a SODA-layout labelled set.",
    )
    p.add_argument("--out", required=True, type=Path, help="writes OUT/unlabelled and OUT/soda")
    p.add_argument("--unlabelled", type=int, default=2000, help="unlabelled scenes (2000)")
    p.add_argument("--train", type=int, default=32, help="labelled training scenes (32)")
    p.add_argument("--test", type=int, default=100, help="labelled test scenes (100)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels ({DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="unlabelled scenes use SEED, labelled ones SEED+1")
    args = p.parse_args(argv)
    for name in ("unlabelled", "train", "test"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must not be negative")
    if args.size < 16:
        p.error("--size must be at least 16")
    generate_unlabelled(args.out / "unlabelled", args.unlabelled, args.size, args.seed)
    generate_labelled(args.out / "soda", args.train, args.test, args.size, args.seed + 1)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
