"""Segmentation datasets: each layout read from a generated replica (as released and as UNIP prepares
it), class counts, ignore handling, the real files' quirks (SCUT-Seg Cityscapes IDs and two-column
splits, MFNet thermal_imgs/ and its extra splits, SODA palette PNGs and duplicate entries), and
errors that name the file at fault. The augmentation: tests/test_augment.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unip_train.finetune.dataset import SegDataset
from unip_train.finetune.evaluation import confusion_matrix, summarize
from unip_train.finetune.layouts import (
    EVAL_SPLIT,
    IGNORE_INDEX,
    LAYOUTS,
    SCUT_CITYSCAPES_IDS,
    DatasetError,
    dataset_classes,
)
from unip_train.synthetic import CLASSES, LAYOUT_CLASS_MAP, generate

SIZE = (40, 48)
EXPECTED = {
    "soda": 21, "mfnet": 9, "scut": 10, "folder": len(CLASSES), "nyuv2": 41, "sunrgbd": 38, "ade20k": 150,
    "mfnet-rgb": 9,
}  # fmt: skip


@pytest.mark.parametrize("variant", ["release", "unip"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_its_replica(tmp_path: Path, layout: str, variant: str):
    root = generate(tmp_path / layout, layout, n_train=5, n_test=3, size=SIZE, seed=1, variant=variant)
    train = SegDataset(root, layout, "train")
    test = SegDataset(root, layout, EVAL_SPLIT[layout])
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
        grey = torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
        assert grey == (LAYOUTS[layout].channels == 1 or layout in ("nyuv2", "sunrgbd"))  # depth: replicated
        assert label.shape == SIZE and label.dtype == torch.int64
        values = set(label.unique().tolist())
        assert values <= set(range(train.num_classes)) | {IGNORE_INDEX}
        seen |= values
    # Synthetic classes land on the layout's indices (person / car at least, in every layout).
    mapping = LAYOUT_CLASS_MAP[layout]
    assert mapping[CLASSES.index("person")] in seen and mapping[CLASSES.index("car")] in seen
    assert len(train.palette) == train.num_classes
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


# --- errors --------------------------------------------------------------------------------------


def test_missing_split_file_names_the_file(tmp_path: Path):
    root = generate(tmp_path, "soda", 2, 1, size=SIZE)
    (root / "test_infrared.txt").unlink()
    with pytest.raises(DatasetError, match="test_infrared.txt: split file not found"):
        SegDataset(root, "soda", "test")


def test_label_value_outside_class_range_names_the_file_value_and_option(tmp_path: Path):
    root = generate(tmp_path / "scut", "scut", 2, 1, size=SIZE, variant="unip")
    stem = (root / "train.txt").read_text().split()[0]
    path = root / "labels" / f"{stem}.png"
    lab = np.asarray(Image.open(path)).copy()
    lab[0, 0] = 30  # neither a SCUT-Seg class index (0..9) nor one of its Cityscapes IDs
    Image.fromarray(lab).save(path)
    with pytest.raises(DatasetError) as info:
        SegDataset(root, "scut", "train")
    msg = str(info.value)
    assert msg.startswith(f"{path}: label values [30] are outside the 10 classes 0..9")
    assert "--label-map" in msg
    # The folder layout names the options that set its classes.
    root = generate(tmp_path / "folder", "folder", 2, 1, size=SIZE)
    stem = (root / "train.txt").read_text().split()[0]
    path = root / "masks" / f"{stem}.png"
    lab = np.asarray(Image.open(path)).copy()
    lab[0, 0] = 6
    Image.fromarray(lab).save(path)
    with pytest.raises(
        DatasetError, match=rf"{stem}\.png: label values \[6\] are outside the 6 classes.*--num-classes"
    ):
        SegDataset(root, "folder", "train")


# --- the real layouts' quirks (method.md section 5) -------------------------------------------------


def test_scut_cityscapes_ids_are_detected_and_mapped(tmp_path: Path):
    """The release stores Cityscapes label IDs in two-column split files; UNIP's copy stores 0-9.
    The same seed writes the same scenes, so both must read as the same class maps."""
    release = generate(tmp_path / "release", "scut", 4, 3, size=SIZE, seed=5, variant="release")
    prepared = generate(tmp_path / "unip", "scut", 4, 3, size=SIZE, seed=5, variant="unip")
    line = (release / "train.txt").read_text().splitlines()[0]
    assert line == "images/00000.jpg labels/00000_labelIds.png"  # two columns, label not named by the stem
    stored = np.unique(np.asarray(Image.open(release / "labels" / "00000_labelIds.png")))
    assert set(stored.tolist()) - {0, IGNORE_INDEX} <= set(SCUT_CITYSCAPES_IDS) and stored.max() >= 24

    a, b = SegDataset(release, "scut", "train"), SegDataset(prepared, "scut", "train")
    assert a.label_map == "cityscapes" and b.label_map == "none"
    assert any("Cityscapes label IDs" in n and "--label-map cityscapes" in n for n in a.notes)
    assert any("class indices 0..9" in n for n in b.notes)  # never silent, either way
    for i in range(len(a)):
        assert torch.equal(a.load(i)[1], b.load(i)[1])
    # Named explicitly, the same; named wrongly, one line naming the file, the values and the option.
    assert torch.equal(SegDataset(release, "scut", "train", label_map="cityscapes").load(0)[1], b.load(0)[1])
    with pytest.raises(DatasetError, match=r"labelIds\.png: label values \[.*24.*\] .*--label-map none"):
        SegDataset(release, "scut", "train", label_map="none")
    with pytest.raises(DatasetError, match="--label-map cityscapes: only SCUT-Seg"):
        SegDataset(
            generate(tmp_path / "f", "folder", 2, 1, size=SIZE), "folder", "train", label_map="cityscapes"
        )


def test_scut_val_list_is_the_test_split_when_there_is_no_test_list(tmp_path: Path):
    root = generate(tmp_path, "scut", 3, 2, size=SIZE, variant="unip")
    assert not (root / "test.txt").exists()
    test = SegDataset(root, "scut", "test")
    assert test.split_path.name == "val.txt" and len(test) == 2
    assert any("test.txt not found" in n and "val.txt" in n for n in test.notes)
    (root / "test.txt").write_text((root / "train.txt").read_text())  # a real test list wins
    assert SegDataset(root, "scut", "test").split_path.name == "test.txt"


def test_mfnet_thermal_imgs_and_unip_splits(tmp_path: Path):
    release = generate(tmp_path / "release", "mfnet", 4, 4, size=SIZE, seed=2, variant="release")
    prepared = generate(tmp_path / "unip", "mfnet", 4, 4, size=SIZE, seed=2, variant="unip")
    assert (prepared / "thermal_imgs").is_dir() and not (prepared / "images").exists()
    a, b = SegDataset(release, "mfnet", "train"), SegDataset(prepared, "mfnet", "train")
    assert any("images/" in n and "4th channel" in n for n in a.notes)
    assert any("thermal_imgs/" in n for n in b.notes)
    for i in range(len(a)):  # the extracted thermal channel is the 4-channel image's 4th channel
        # (grey PNGs are read through the 0-1 scale: equal up to float rounding)
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=1e-5)
        assert torch.equal(a[i][1], b[i][1])
    sizes = {
        s: len(SegDataset(prepared, "mfnet", s))
        for s in ("val", "test", "val_test", "test_day", "test_night")
    }
    assert sizes == {"val": 4, "test": 4, "val_test": 8, "test_day": 2, "test_night": 2}
    assert len(SegDataset(release, "mfnet", "test_night")) == 2
    with pytest.raises(DatasetError, match="val_test.txt: split file not found"):
        SegDataset(release, "mfnet", "val_test")  # the release has no val_test list


def test_soda_palette_labels_and_duplicate_entries(tmp_path: Path):
    root = generate(tmp_path, "soda", 4, 3, size=SIZE, seed=4)
    stem = (root / "train_infrared.txt").read_text().splitlines()[0]
    lines = (root / "train_infrared.txt").read_text().splitlines()
    assert (
        f"{stem} (1).jpg" in lines
        and f"~temp_{stem}.jpg" in lines
        and (root / "JPEGImages" / f"~temp_{stem}.jpg").exists()
    )
    with Image.open(root / "SegmentationClassPNG" / f"{stem}.png") as im:
        assert im.mode == "P"  # as SODA ships them: colours in the palette, class indices in the pixels
        indices = np.asarray(im).copy()
        grey = np.asarray(im.convert("L"))
    train = SegDataset(root, "soda", "train")
    label = train.load(0)[1].numpy()
    assert np.array_equal(label, indices) and not np.array_equal(label, grey)
    assert len(train) == 4 and [s.stem for s in train.samples] == [f"{i:05d}" for i in range(4)]
    assert any("train_infrared.txt: skipped 2 duplicate entries" in n for n in train.notes)
    test = SegDataset(root, "soda", "test")
    assert len(test) == 3 and any("skipped 1 duplicate entries" in n for n in test.notes)


def test_split_lines_with_spaces_and_two_columns(tmp_path: Path):
    from unip_train.finetune.layouts import SplitEntry, _parse_line, drop_copies

    assert _parse_line("img 01 (1).jpg") == SplitEntry("img 01 (1).jpg")  # a name with spaces, one column
    assert _parse_line("a/x.jpg\tb/x_labelIds.png") == SplitEntry("a/x.jpg", "b/x_labelIds.png")
    kept, counts = drop_copies([SplitEntry(n) for n in ("x", "x (1).jpg", "~temp_x", "y (2)", "x")])
    # "y (2)" is kept: it is the only copy of y.
    assert [e.stem for e in kept] == ["x", "y (2)"]
    assert counts == {"X (n)": 1, "~temp_X": 1, "repeated line": 1}


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
