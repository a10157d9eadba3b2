"""Digests of the OpenCV results the 8-bit augmentation depends on, to tell which OpenCV versions give
the same numbers (the pin of opencv-python-headless in pyproject.toml; docs/parity.md).

    python scripts/opencv_digest.py > a.json   # one OpenCV
    PYTHONPATH=/tmp/cv_4.5.5 python scripts/opencv_digest.py > b.json   # another (pip install --target)

Every call of :mod:`unip_train.finetune.augment` on uint8 images: bilinear and nearest resizes of grey and
colour images of eight sizes (odd ones included) at the recipe's ratios 0.5-2.0 of (512, 128) and
(2048, 512), ``cv2.LUT``, ``cv2.calcHist``, RGB / BGR <-> HSV round trips with and without a
saturation and hue change, on contiguous images and on crops and flipped crops of a larger one (views,
as the augmentation holds them). OpenCV's thread pool is off (``--threads``: on), as in the
augmentation. Inputs are arithmetic (no random generator), so the digests depend on OpenCV alone.
Prints one JSON line: the versions and a 12-hex-digit digest per result kind.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import cv2
import numpy as np

SIZES = [(33, 33), (37, 53), (32, 44), (55, 81), (64, 64), (128, 128), (480, 640), (512, 683)]
SCALES = ((512, 128), (2048, 512))
RATIOS = (0.5, 0.75, 1.0, 1.37, 2.0)


def image(h: int, w: int, c: int, salt: int) -> np.ndarray:
    """uint8 [h, w] (c = 1) or [h, w, c]: a hash of the pixel position, every level present."""
    i, j = np.meshgrid(np.arange(h, dtype=np.uint64), np.arange(w, dtype=np.uint64), indexing="ij")
    planes = [
        ((i * 2654435761 + j * 40503 + k * 97 + salt * 7919) * 2246822519 >> 13) % 256 for k in range(c)
    ]
    img = np.stack(planes, -1).astype(np.uint8)
    return np.ascontiguousarray(img[..., 0] if c == 1 else img)


def digests() -> dict[str, str]:
    found: dict[str, hashlib._Hash] = {}

    def add(name: str, arr: np.ndarray) -> None:
        found.setdefault(name, hashlib.sha256()).update(np.ascontiguousarray(arr).tobytes())

    table = ((np.arange(256) * 1.3) % 256).astype(np.uint8)
    for s, (h, w) in enumerate(SIZES):
        for c in (1, 3):
            img = image(h, w, c, s)
            grey = img if c == 1 else img[..., 0].copy()
            for scale in SCALES:
                for r in RATIOS:  # augment.rescale_size at int(edge * ratio)
                    long_e, short_e = int(scale[0] * r), int(scale[1] * r)
                    f = min(long_e / max(h, w), short_e / min(h, w))
                    size = (max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5)))
                    add(f"resize_linear_c{c}", cv2.resize(img, size, interpolation=cv2.INTER_LINEAR))
                    add("resize_nearest", cv2.resize(grey, size, interpolation=cv2.INTER_NEAREST))
            add(f"calcHist_c{c}", cv2.calcHist([grey], [0], None, [256], [0, 256]))
            add(f"LUT_c{c}", cv2.LUT(img, table))
            if c == 3:
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
                add(f"rgb2hsv_{h}x{w}", hsv)
                add(f"hsv2rgb_{h}x{w}", cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
                changed = hsv.copy()
                changed[..., 1] = (changed[..., 1].astype(np.float32) * 1.3).clip(0, 255).astype(np.uint8)
                changed[..., 0] = ((changed[..., 0].astype(int) + 7) % 180).astype(np.uint8)
                add(f"hsv2rgb_changed_{h}x{w}", cv2.cvtColor(changed, cv2.COLOR_HSV2RGB))
    big = image(300, 400, 3, 99)
    for h, w in SIZES[:5]:
        for top, left in ((0, 0), (5, 7), (300 - h, 400 - w)):
            crop = big[top : top + h, left : left + w]
            for view in (crop, crop[:, ::-1]):
                for to_hsv, back in (
                    (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB),
                    (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR),
                ):
                    hsv = cv2.cvtColor(view, to_hsv)
                    add(f"view_to_hsv_{h}x{w}", hsv)
                    add(f"view_back_{h}x{w}", cv2.cvtColor(hsv, back))
    return {k: v.hexdigest()[:12] for k, v in sorted(found.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", action="store_true", help="leave OpenCV's thread pool on")
    args = ap.parse_args()
    if not args.threads:
        cv2.setNumThreads(0)
    print(json.dumps({"opencv": cv2.__version__, "numpy": np.__version__, **digests()}))


if __name__ == "__main__":
    main()
