"""Segmentation datasets: each layout read from a generated replica, class counts, ignore handling,
augmentation shapes, and errors that name the file at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unip_train.finetune.datasets import (
    IGNORE_INDEX,
    LAYOUTS,
    DatasetError,
    EvalResize,
    SegDataset,
    TrainAugment,
    dataset_classes,
)
from unip_train.finetune.evaluation import confusion_matrix, summarize
from unip_train.synthetic import CLASSES, LAYOUT_CLASS_MAP, generate, make_scene

SIZE = (40, 48)
EXPECTED = {"soda": 21, "mfnet": 9, "scut": 10, "folder": len(CLASSES)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_its_replica(tmp_path: Path, layout: str):
    root = generate(tmp_path / layout, layout, n_train=5, n_test=3, size=SIZE, seed=1)
    train = SegDataset(root, layout, "train")
    test = SegDataset(root, layout, "test")
    assert (len(train), len(test)) == (5, 3)
    assert train.num_classes == EXPECTED[layout]
    if layout == "soda":
        assert train.classes[1] == "person" and train.classes[20] == "sidewalk"
    if layout == "mfnet":
        assert len(SegDataset(root, layout, "val")) == 3
    seen = set()
    for i in range(len(train)):
        img, label = train[i]
        assert img.shape == (3, *SIZE) and img.dtype == torch.float32
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])  # grey replicated
        assert label.shape == SIZE and label.dtype == torch.int64
        values = set(label.unique().tolist())
        assert values <= set(range(train.num_classes)) | {IGNORE_INDEX}
        seen |= values
    # Synthetic classes land on the layout's indices (person / car at least, in every layout).
    mapping = LAYOUT_CLASS_MAP[layout]
    assert mapping[CLASSES.index("person")] in seen and mapping[CLASSES.index("car")] in seen
    assert IGNORE_INDEX in seen  # some object borders carry the ignore band


def test_labels_and_grey_levels_round_trip(tmp_path: Path):
    """The loader returns exactly the label map written, and the image normalized as documented."""
    root = generate(tmp_path, "folder", 2, 1, size=SIZE, seed=3)
    ds = SegDataset(root, "folder", "train")
    img, label = ds[0]
    stem = (root / "train.txt").read_text().split()[0]
    written = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
    assert np.array_equal(label.numpy(), written)
    grey = np.asarray(Image.open(root / "images" / f"{stem}.png"), dtype=np.float32)
    np.testing.assert_allclose(img[0].numpy(), (grey - 96.9255) / 47.8976, rtol=1e-5, atol=1e-5)


def test_mfnet_takes_the_thermal_channel(tmp_path: Path):
    root = generate(tmp_path, "mfnet", 2, 1, size=SIZE, seed=2)
    ds = SegDataset(root, "mfnet", "train")
    stem = (root / "train.txt").read_text().split()[0]
    rgbt = np.asarray(Image.open(root / "images" / f"{stem}.png"))
    assert rgbt.shape[-1] == 4
    img, _ = ds[0]
    np.testing.assert_allclose(img[0].numpy() * 47.8976 + 96.9255, rgbt[..., 3], atol=1e-3)
    # A plain grey PNG in the same layout is read as grey.
    Image.fromarray(rgbt[..., 3]).save(root / "images" / f"{stem}.png")
    img2, _ = SegDataset(root, "mfnet", "train")[0]
    assert torch.allclose(img, img2, atol=1e-5)


def test_ignore_label_is_left_out_of_the_confusion_matrix():
    label = torch.tensor([[0, 1], [IGNORE_INDEX, 1]])
    pred = torch.tensor([[0, 0], [1, 1]])
    conf = confusion_matrix(pred, label, 3)
    assert conf.sum() == 3  # the 255 pixel is not counted
    m = summarize(conf, ["a", "b", "c"])
    assert m["per_class_iou"] == {"a": 0.5, "b": 0.5, "c": None}  # c absent from GT and prediction
    assert m["miou"] == pytest.approx(0.5) and m["pixel_acc"] == pytest.approx(2 / 3)


def test_train_augment_crops_pads_and_keeps_label_values():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img, label = make_scene(rng, (30, 50))
    aug = TrainAugment.for_crop(64)
    for _ in range(5):
        out_img, out_label = aug(torch.from_numpy(img).float(), torch.from_numpy(label).long())
        assert out_img.shape == (64, 64) and out_label.shape == (64, 64)
        assert set(out_label.unique().tolist()) <= set(np.unique(label).tolist()) | {IGNORE_INDEX}
        assert out_img.min() >= 0 and out_img.max() <= 255
    # A 30x50 scene scaled to fit (256, 64) * ratio <= 2 can be smaller than the crop: padded with 255.
    small = TrainAugment(crop=64, scale=(64, 16), ratio_range=(1.0, 1.0))
    _, padded = small(torch.from_numpy(img).float(), torch.from_numpy(label).long())
    assert (padded[20:, :] == IGNORE_INDEX).all()


def test_eval_resize_keeps_ratio_and_label():
    img, label = torch.rand(30, 60) * 255, torch.zeros(30, 60, dtype=torch.long)
    out_img, out_label = EvalResize.for_crop(32)(img, label)
    assert out_img.shape == (32, 64) and out_label.shape == (30, 60)


# --- errors --------------------------------------------------------------------------------------


def test_missing_split_file_names_the_file(tmp_path: Path):
    root = generate(tmp_path, "soda", 2, 1, size=SIZE)
    (root / "test_infrared.txt").unlink()
    with pytest.raises(DatasetError, match="test_infrared.txt: split file not found"):
        SegDataset(root, "soda", "test")


def test_label_value_outside_class_range_names_the_file(tmp_path: Path):
    root = generate(tmp_path, "scut", 2, 1, size=SIZE)
    stem = (root / "train.txt").read_text().split()[0]
    path = root / "labels" / f"{stem}.png"
    lab = np.asarray(Image.open(path)).copy()
    lab[0, 0] = 10  # SCUT-Seg has classes 0..9
    Image.fromarray(lab).save(path)
    with pytest.raises(DatasetError, match=rf"{stem}\.png: label values \[10\] are outside the 10 classes"):
        SegDataset(root, "scut", "train")


def test_image_label_size_mismatch_names_both_files(tmp_path: Path):
    root = generate(tmp_path, "folder", 2, 1, size=SIZE)
    stem = (root / "train.txt").read_text().split()[0]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / f"{stem}.png")
    with pytest.raises(
        DatasetError, match=rf"masks/{stem}\.png: label map is \(20, 20\).*images/{stem}\.png"
    ):
        SegDataset(root, "folder", "train")


def test_missing_image_and_unknown_dataset(tmp_path: Path):
    root = generate(tmp_path, "folder", 2, 1, size=SIZE)
    stem = (root / "test.txt").read_text().split()[0]
    (root / "images" / f"{stem}.png").unlink()
    with pytest.raises(DatasetError, match=rf"test.txt: lists '{stem}' but image .*does not exist"):
        SegDataset(root, "folder", "test")
    with pytest.raises(DatasetError, match="unknown dataset 'cityscapes'"):
        SegDataset(root, "cityscapes", "train")


def test_folder_classes_from_file_or_count(tmp_path: Path):
    root = generate(tmp_path, "folder", 2, 1, size=SIZE)
    assert dataset_classes("folder", root) == tuple(CLASSES)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt: not found and --num-classes not given"):
        dataset_classes("folder", root)
    assert dataset_classes("folder", root, 7)[-1] == "class6"
    with pytest.raises(DatasetError, match="does not match soda, which has 21 classes"):
        dataset_classes("soda", root, 5)
