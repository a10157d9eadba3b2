"""The 8-bit augmentation against mmsegmentation 0.x: a reference written here step by step from
mmseg's transforms (``mmseg/datasets/pipelines/transforms.py``: Resize, RandomCrop, RandomFlip,
PhotoMetricDistortion, Normalize, Pad) and mmcv 1.x (``imrescale`` / ``rescale_size``,
``imnormalize_``, ``impad``, ``bgr2hsv``), on BGR uint8 images as mmseg loads them, its
``numpy.random`` calls answered by one torch call each on the sample's generator. TrainAugment,
EvalResize and to_input must give the same numbers bit for bit, from the same draws (the generator
state after them included), for grey images (C = 1, which mmseg sees replicated to 3 channels) and
RGB ones (C = 3). The reference calls the installed OpenCV where mmcv does (resize, HSV); what an
OpenCV of mmcv's time gives alike and apart is in docs/parity.md."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from unip_train.finetune.augment import EvalResize, TrainAugment
from unip_train.finetune.dataset import SegDataset, read_grey_u8, to_input
from unip_train.finetune.layouts import IGNORE_INDEX
from unip_train.sampling import sample_generator
from unip_train.synthetic import generate, make_scene

INFRARED = ([96.9255] * 3, [47.8976] * 3)  # _base_/datasets/soda.py, mfnet.py, scut_seg.py
IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])  # nyuv2.py, ade20k.py (RGB order)


# --- the reference: mmseg 0.x's train and test pipelines, written out --------------------------------


class NumpyRandom:
    """``numpy.random`` as mmseg calls it (``random_sample``, ``rand``, ``randint(low[, high])``,
    ``uniform(low, high) = low + (high - low) * random_sample()``), one torch call per draw on ``g``."""

    def __init__(self, g: torch.Generator | None):
        self.g = g

    def random_sample(self) -> float:
        return float(torch.rand((), generator=self.g))

    rand = random_sample

    def randint(self, low: int, high: int | None = None) -> int:
        if high is None:
            low, high = 0, low
        return low + int(torch.randint(0, high - low, (), generator=self.g))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random_sample()


def imrescale(img: np.ndarray, scale: tuple[int, int], interpolation: int) -> np.ndarray:
    """mmcv.imrescale: rescale_size((w, h), scale) then cv2.resize."""
    h, w = img.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    return cv2.resize(img, size, interpolation=interpolation)


def imnormalize(img: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """mmseg Normalize(to_rgb=True): mean / std as float32 arrays, then mmcv.imnormalize_: a float32
    copy, BGR -> RGB, ``cv2.subtract(img, float64(mean))``, ``cv2.multiply(img, 1 / float64(std))``,
    written out as OpenCV 4.x computes the two (checked against opencv-python-headless 4.5.5, the
    OpenCV of mmcv 1.3's time): the subtraction in float32, the product in float64 rounded to
    float32. (OpenCV 5 rounds the factor to float32 and multiplies in float32: last-bit differences.)"""
    img = img.copy().astype(np.float32)
    mean = np.float64(np.array(mean, dtype=np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(std, dtype=np.float32).reshape(1, -1))
    img = np.ascontiguousarray(img[..., ::-1])
    img = img - mean.astype(np.float32)
    return (img.astype(np.float64) * stdinv).astype(np.float32)


def impad(img: np.ndarray, shape: tuple[int, int], pad_val: float) -> np.ndarray:
    """mmcv.impad(shape=...): constant border at the bottom and right."""
    return cv2.copyMakeBorder(
        img, 0, shape[0] - img.shape[0], 0, shape[1] - img.shape[1], cv2.BORDER_CONSTANT, value=pad_val
    )


def mmseg_train(bgr, seg, random: NumpyRandom, aug: TrainAugment, norm, seen: set[str] | None = None):
    """mmseg 0.x's train pipeline after loading, as in UNIP's ``_base_/datasets/*.py``: Resize
    (img_scale, ratio_range), RandomCrop (crop_size, cat_max_ratio), RandomFlip(prob),
    PhotoMetricDistortion(), Normalize(to_rgb=True), Pad(size=crop, pad_val=0, seg_pad_val=255).
    Returns (RGB float32 [crop, crop, 3], uint8 label); ``seen`` collects the branches taken."""
    seen = set() if seen is None else seen
    crop = aug.crop
    # Resize.random_sample_ratio, _resize_img, _resize_seg
    lo, hi = aug.ratio_range
    ratio = random.random_sample() * (hi - lo) + lo
    scale = int(aug.scale[0] * ratio), int(aug.scale[1] * ratio)
    img = imrescale(bgr, scale, cv2.INTER_LINEAR)
    seg = imrescale(seg, scale, cv2.INTER_NEAREST)

    # RandomCrop.get_crop_bbox, __call__
    def crop_bbox():
        margin_h, margin_w = max(img.shape[0] - crop, 0), max(img.shape[1] - crop, 0)
        offset_h, offset_w = random.randint(0, margin_h + 1), random.randint(0, margin_w + 1)
        return offset_h, offset_h + crop, offset_w, offset_w + crop

    box = crop_bbox()
    if aug.cat_max_ratio < 1.0:
        for _ in range(10):
            labels, cnt = np.unique(seg[box[0] : box[1], box[2] : box[3]], return_counts=True)
            cnt = cnt[labels != IGNORE_INDEX]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < aug.cat_max_ratio:
                break
            box = crop_bbox()
        else:
            seen.add("crop: 10 refusals")
    img, seg = img[box[0] : box[1], box[2] : box[3], ...], seg[box[0] : box[1], box[2] : box[3], ...]
    # RandomFlip
    if random.rand() < aug.flip_prob:
        img, seg = np.flip(img, axis=1), np.flip(seg, axis=1).copy()
        seen.add("flip")

    # PhotoMetricDistortion
    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def contrast(img):
        if random.randint(2):
            seen.add(f"contrast, mode {mode}")
            return convert(img, alpha=random.uniform(*aug.contrast_range))
        return img

    if random.randint(2):
        seen.add("brightness")
        img = convert(img, beta=random.uniform(-aug.brightness_delta, aug.brightness_delta))
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    if random.randint(2):
        seen.add("saturation")
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(*aug.saturation_range))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if random.randint(2):
        seen.add("hue")
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-aug.hue_delta, aug.hue_delta)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    # Normalize, Pad
    img = imnormalize(np.ascontiguousarray(img), *norm)
    if img.shape[:2] != (crop, crop):
        seen.add("pad")
    return impad(img, (crop, crop), 0), impad(np.ascontiguousarray(seg), (crop, crop), IGNORE_INDEX)


def mmseg_test(bgr, scale: tuple[int, int], norm) -> np.ndarray:
    """mmseg 0.x's test pipeline: MultiScaleFlipAug(img_scale, flip=False) with Resize(keep_ratio),
    Normalize(to_rgb=True): RGB float32 [h, w, 3]."""
    return imnormalize(imrescale(bgr, scale, cv2.INTER_LINEAR), *norm)


def as_bgr(img: np.ndarray) -> np.ndarray:
    """What mmseg's LoadImageFromFile (cv2, 'color') holds for our image: grey replicated, RGB reversed."""
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else np.ascontiguousarray(img[..., ::-1])


def chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


# --- scenes --------------------------------------------------------------------------------------------

SIZES = [(480, 640), (512, 640), (60, 90), (300, 200)]


@functools.cache
def base_scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Eight synthetic scenes, two of each of :data:`SIZES`, made once."""
    return make_scene(np.random.default_rng(100 + i), SIZES[i % len(SIZES)])


def scene(rng: np.random.Generator, i: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``i % 8``; every third with class 0 not the background (every tried window takes the full
    class count), 5 % of pixels ignored (drawn from ``rng``). RGB: three different channels (the
    grey scene, a shifted copy, its negative), so that saturation and hue change it."""
    grey, label = base_scene(i % 8)
    h, w = label.shape
    label = (label + 1) % 7 if i % 3 == 1 else label.copy()
    label[rng.random((h, w)) < 0.05] = IGNORE_INDEX
    if channels == 1:
        return grey[..., None], label
    rgb = np.stack([grey, np.roll(grey, 7, axis=1) // 2 + 60, 255 - grey], axis=-1)
    return rgb.astype(np.uint8), label


# --- train pipeline --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("crop", [64, 128])
def test_train_augment_is_mmsegs_pipeline_bit_for_bit(crop: int, channels: int):
    """20 seeds per crop and channel count, over scenes of 4 sizes (some smaller than the crop:
    padded), the recipe's options and, for some seeds, no crop search with a flip probability of 0.7
    (not a float32 value) or torch's global generator. Image (after normalization and padding),
    label and the generator's state must equal the reference's; and the seeds must have taken every
    branch of the pipeline."""
    rng = np.random.default_rng(crop + channels)
    recipe = TrainAugment.for_crop(crop)
    norm = INFRARED if channels == 1 else IMAGENET
    seen: set[str] = set()
    for seed in range(20):
        img, label = scene(rng, seed, channels)
        aug = replace(recipe, cat_max_ratio=1.0, flip_prob=0.7) if seed % 5 == 4 else recipe
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        if seed == 7:  # torch's global generator
            ga = gb = None
            torch.manual_seed(seed)
        got_img, got_label = aug(img, label, ga)
        assert got_img.dtype == np.uint8 and got_img.shape[2] == channels and got_label.shape == (crop, crop)
        got = to_input(got_img, *norm, size=got_label.shape)
        state = torch.get_rng_state()
        if seed == 7:
            torch.manual_seed(seed)
        want, want_label = mmseg_train(as_bgr(img), label, NumpyRandom(gb), aug, norm, seen)
        assert torch.equal(got, chw(want)), seed
        assert np.array_equal(got_label, want_label), seed
        if seed == 7:
            assert torch.equal(state, torch.get_rng_state())  # the same draws, no more
        else:
            assert torch.equal(ga.get_state(), gb.get_state()), seed
    branches = {"flip", "brightness", "contrast, mode 0", "contrast, mode 1", "saturation", "hue", "pad"}
    assert branches <= seen, branches - seen
    if crop == 64:
        assert "crop: 10 refusals" in seen  # the 11th offset, unchecked, is the one cropped


def test_train_augment_at_the_recipes_crop_of_512():
    rng = np.random.default_rng(512)
    aug = TrainAugment.for_crop(512)
    assert aug.scale == (2048, 512)  # the configs' img_scale
    for seed, channels in [(0, 1), (1, 3), (2, 1)]:
        img, label = scene(rng, 0, channels)
        norm = INFRARED if channels == 1 else IMAGENET
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got_img, got_label = aug(img, label, ga)
        want, want_label = mmseg_train(as_bgr(img), label, NumpyRandom(gb), aug, norm)
        assert torch.equal(to_input(got_img, *norm, size=got_label.shape), chw(want))
        assert np.array_equal(got_label, want_label) and torch.equal(ga.get_state(), gb.get_state())


def test_saturation_and_hue_leave_grey_pixels_unchanged():
    """Why C = 1 skips them: on R = G = B, OpenCV's uint8 HSV has S = 0 (H = 0, V = the level), and
    back from HSV with S = 0 every channel is V, for every level, every hue shift mmseg draws
    (-18..17) and any saturation factor (S stays 0)."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    hsv = cv2.cvtColor(levels, cv2.COLOR_BGR2HSV)
    assert not hsv[..., :2].any() and np.array_equal(hsv[0, :, 2], np.arange(256))
    for shift in range(-18, 18):
        shifted = hsv.copy()
        shifted[..., 0] = (shifted[..., 0].astype(int) + shift) % 180
        assert np.array_equal(cv2.cvtColor(shifted, cv2.COLOR_HSV2BGR), levels), shift
    for factor in np.linspace(0.5, 1.5, 41):
        scaled = hsv.copy()
        scaled[..., 1] = np.clip(scaled[..., 1].astype(np.float32) * factor, 0, 255).astype(np.uint8)
        assert np.array_equal(cv2.cvtColor(scaled, cv2.COLOR_HSV2BGR), levels), factor


def test_train_augment_keeps_label_values_and_no_photometric_draws():
    rng = np.random.default_rng(0)
    img, label = make_scene(rng, (30, 50))
    aug = TrainAugment.for_crop(64)
    for seed in range(5):
        out_img, out_label = aug(img[..., None], label, torch.Generator().manual_seed(seed))
        assert out_img.shape[0] <= 64 and out_img.shape[1] <= 64 and out_label.shape == (64, 64)
        assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist()) | {IGNORE_INDEX}
    # A 30x50 scene scaled to fit (64, 16) stays below the crop: the label is padded with 255.
    small = TrainAugment(crop=64, scale=(64, 16), ratio_range=(1.0, 1.0))
    out_img, padded = small(img[..., None], label)
    assert out_img.shape == (16, 27, 1) and (padded[16:, :] == IGNORE_INDEX).all()
    # Without the distortion: the geometry of the full recipe, fewer draws, the image resized only.
    plain = replace(aug, photometric=False)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a_img, a_label = plain(img[..., None], label, ga)
    b_img, b_label = aug(img[..., None], label, gb)
    assert np.array_equal(a_label, b_label) and a_img.shape == b_img.shape
    assert not torch.equal(ga.get_state(), gb.get_state())


# --- normalization, padding, evaluation ----------------------------------------------------------------


@pytest.mark.parametrize("norm", [INFRARED, IMAGENET])
def test_to_input_is_mmcvs_normalize_then_pad(norm):
    """Bit for bit mmcv.imnormalize (to_rgb) then impad with 0, for grey and RGB images, whole, as a
    crop (a strided view) and flipped (negative strides); float32 [3, H, W], contiguous."""
    rng = np.random.default_rng(1)
    for channels in (1, 3):
        img = rng.integers(0, 256, (40, 50, channels), dtype=np.uint8)
        for view in (img, img[3:30, 7:41], img[3:30, 7:41][:, ::-1]):
            for size in (None, (48, 56)):
                got = to_input(view, *norm, size=size)
                want = imnormalize(as_bgr(np.ascontiguousarray(view)), *norm)
                if size is not None:
                    want = impad(want, size, 0)
                assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, chw(want))
    # One value for every channel, as the grey datasets' statistics are given.
    grey = rng.integers(0, 256, (8, 9, 1), dtype=np.uint8)
    assert torch.equal(to_input(grey, 96.9255, 47.8976), to_input(grey, *INFRARED))


def test_eval_resize_is_mmsegs_test_pipeline():
    rng = np.random.default_rng(2)
    resize = EvalResize.for_crop(32)
    for channels, norm in ((1, INFRARED), (3, IMAGENET)):
        whole, whole_label = scene(rng, 0, channels)
        for h, w in [(30, 60), (60, 30), (300, 200), (32, 128)]:
            img, label = whole, whole_label
            img, label = np.ascontiguousarray(img[:h, :w]), label[:h, :w]
            out, out_label = resize(img, label)
            assert out_label is label  # labels stay at full resolution
            assert torch.equal(to_input(out, *norm), chw(mmseg_test(as_bgr(img), resize.scale, norm)))
    assert resize(img[:30, :60], label[:30, :60])[0].shape[:2] == (32, 64)


# --- a dataset's samples, from the file on -----------------------------------------------------------------


def test_dataset_samples_are_mmsegs_from_the_file(tmp_path: Path):
    """SegDataset.item (8-bit grey PNGs, image cache on) equals mmseg's pipeline fed the file as
    mmseg reads it (cv2.imread, colour: the grey level in three channels), for every sample and
    epoch, drawn from the sample's (seed, epoch, index) generator."""
    root = generate(tmp_path, "folder", 4, 1, size=(120, 160), seed=6)
    aug = TrainAugment.for_crop(64)
    ds = SegDataset(root, "folder", "train", transform=aug, seed=4, cache_mb=64)
    for epoch in range(3):
        for i, s in enumerate(ds.samples):
            img, label = ds.item(i, epoch)
            bgr = cv2.imread(str(s.image), cv2.IMREAD_COLOR)
            assert np.array_equal(read_grey_u8(s.image), bgr[..., :1])
            seg = ds.load(i)[1].numpy()
            random = NumpyRandom(sample_generator(4, epoch, i))
            want, want_label = mmseg_train(bgr, seg, random, aug, INFRARED)
            assert torch.equal(img, chw(want)) and torch.equal(label, torch.from_numpy(want_label).long())
    assert len(ds._cache) == 4


def test_read_grey_u8_reads_levels_as_mmseg_and_rounds_the_rest(tmp_path: Path):
    from PIL import Image

    from unip_train.finetune.dataset import read_grey

    rng = np.random.default_rng(0)
    files = {
        "g8.png": np.arange(256, dtype=np.uint8).reshape(16, 16),
        "g16.png": rng.integers(0, 65536, (16, 16), dtype=np.uint16),
        "rgb.png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "rgbt.png": rng.integers(0, 256, (16, 16, 4), dtype=np.uint8),
        "g8.jpg": base_scene(2)[0][:16, :16],
        "grey_as_rgb.jpg": np.repeat(base_scene(2)[0][:16, :16, None], 3, axis=2),
    }
    for name, arr in files.items():
        Image.fromarray(arr).save(tmp_path / name)
        got = read_grey_u8(tmp_path / name, thermal_channel=name == "rgbt.png")
        assert got.dtype == np.uint8 and got.shape == (16, 16, 1), name
        if name == "g8.png":
            assert np.array_equal(got[..., 0], arr)
        elif name in ("g16.png", "g8.jpg", "grey_as_rgb.jpg"):  # as mmseg reads them (cv2, colour)
            assert np.array_equal(got, cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)[..., :1])
        elif name == "rgbt.png":
            assert np.array_equal(got[..., 0], arr[..., 3])
        else:
            assert np.array_equal(got[..., 0], np.rint(read_grey(tmp_path / name))), name
    rgb = files["rgb.png"].astype(int)
    np.testing.assert_array_equal(read_grey_u8(tmp_path / "rgb.png")[..., 0], (rgb.sum(axis=2) + 1) // 3)
