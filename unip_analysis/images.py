"""Reading image folders: any bit depth, grey or colour, scaled to [0, 1] by bit depth.

Grey images are replicated to three channels; colour stays colour. Normalization presets
live here too, so analysis, distillation and fine-tuning agree on them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import ImageError, SpecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# (mean, std) on the [0, 1] scale, per channel.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # method.md section 4: 96.9255 / 47.8976 on the 0-255 scale, all channels.
    "infrared": ((96.9255 / 255,) * 3, (47.8976 / 255,) * 3),
    # method.md section 2: the NMI-HAD pre-training statistics of InfMix.
    "infmix": ((0.3801,) * 3, (0.1871,) * 3),
}


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``imagenet`` | ``infrared`` | ``infmix`` | ``MEAN,STD`` (0-1 scale, or 0-255 if MEAN > 1)."""
    key = text.strip().lower()
    if key in NORMALIZATIONS:
        return NORMALIZATIONS[key]
    parts = key.split(",")
    try:
        mean, std = (float(p) for p in parts)
    except ValueError:
        raise SpecError(
            f"normalization {text!r}: expected one of {', '.join(NORMALIZATIONS)} or MEAN,STD "
            "(for example 0.38,0.19)"
        ) from None
    if mean > 1.0 or std > 1.0:  # given on the 0-255 scale
        mean, std = mean / 255.0, std / 255.0
    if std <= 0:
        raise SpecError(f"normalization {text!r}: STD must be positive")
    return (mean,) * 3, (std,) * 3


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root``, recursively, sorted; errors if there are none. Symbolic links
    (to files and to folders) are followed and named by where they sit under ``root``; a broken link
    or a link back into a folder above it is refused with its path."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"{root}: image folder not found; pass an existing folder with --images")
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder; pass the folder that holds the images")
    files = []
    for folder, _, names in os.walk(root, followlinks=True, onerror=_walk_error):
        here = Path(folder)
        if here != root:
            real = here.resolve()
            above = [here.parent, *here.parent.parents]
            if any(real == p.resolve() for p in above if p == root or p.is_relative_to(root)):
                raise ImageError(
                    f"{here}: a link back to a folder above it (a loop); remove the link or pass a folder without it"
                )
        for name in names:
            path = here / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_symlink() and not path.exists():
                raise ImageError(
                    f"{path}: a broken link (its target {os.readlink(path)} is missing); remove or fix it"
                )
            if path.is_file():
                files.append(path)
    files.sort()
    if not files:
        raise ImageError(f"{root}: no images found (searched recursively for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _walk_error(e: OSError) -> None:
    raise ImageError(f"{e.filename}: cannot list the folder ({e.strerror}); check its permissions") from None


def read_image(path: str | Path) -> torch.Tensor:
    """Decode one image to a float32 tensor [3, H, W] in [0, 1].

    8-bit images are divided by 255, 16-bit ones by 65535; grey is replicated to 3 channels.
    """
    arr = read_unit_array(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_unit_array(path: str | Path) -> np.ndarray:
    """Decode one image as stored: float32 [H, W] (grey) or [H, W, 3] (colour) in [0, 1], scaled
    as :func:`read_image` scales it (which replicates grey to three channels on top)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return _to_unit_array(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode image ({e}); remove or replace the file") from None


def _to_unit_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":  # 32-bit int container; PNG/TIFF 16-bit grey often decodes to this
        a = np.asarray(im, dtype=np.float32)
        return np.clip(a / (65535.0 if a.max() > 255 else 255.0), 0.0, 1.0)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return np.clip(a / 65535.0 if a.max() > 1.0 else a, 0.0, 1.0)
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop a square.

    Images already ``size`` x ``size`` are returned untouched (no resampling).
    """
    _, h, w = img.shape
    if h == size and w == size:
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top : top + size, left : left + size].clamp_(0.0, 1.0)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - m) / s


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder, resized/centre-cropped to ``size`` and normalized."""

    def __init__(self, files: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float]):
        self.files = list(files)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = resize_center_crop(read_image(self.files[i]), self.size)
        return normalize(img, self.mean, self.std)
