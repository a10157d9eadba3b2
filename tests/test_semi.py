"""Semi-supervised machinery without PiXL: the seeded label-fraction split and its files, unlabelled
image sources and their errors, the weak / student views, the mean-teacher formula, pseudo-labels with
DACS weighting, and the unlabelled stream's exact resume."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_loop import SegOutput, TinySegmentor, fake_context

from unip_train.finetune.augment import TrainAugment
from unip_train.finetune.dataset import SegDataset, read_grey_u8, to_input
from unip_train.finetune.layouts import IGNORE_INDEX
from unip_train.finetune.semi import (
    LabelSplit,
    MeanTeacherExtension,
    SemiError,
    UnlabelledFile,
    UnlabelledSet,
    ema_alpha,
    ema_update,
    parse_label_fraction,
    prepare_semi,
    pseudo_labels,
    split_labelled,
)
from unip_train.sampling import sample_generator
from unip_train.synthetic import generate, generate_unlabelled


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("semi") / "data", "folder", n_train=10, n_test=2, size=24, seed=0)


@pytest.fixture
def train_set(data: Path) -> SegDataset:
    return SegDataset(data, "folder", "train", transform=TrainAugment.for_crop(16), seed=0)


# --- the split ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value", [("1/8", 0.125), ("1/30", 1 / 30), ("0.25", 0.25), ("1", 1.0), (0.5, 0.5)]
)
def test_label_fraction_parses(text, value):
    assert parse_label_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "0/4", "1.5", "-1/8", "3/2", "abc", "1/0", ""])
def test_label_fraction_outside_0_1_is_one_clear_line(text):
    with pytest.raises(SemiError, match=r"--label-fraction .*expected a fraction in \(0, 1\]") as err:
        parse_label_fraction(text)
    assert "\n" not in str(err.value)


def test_split_is_seeded_sized_and_disjoint():
    stems = [f"img{i:03d}" for i in range(40)]
    a = split_labelled(stems, 1 / 8, seed=3)
    assert a == split_labelled(stems, 0.125, seed=3)  # the same seed gives the same split
    assert split_labelled(stems, 1 / 8, seed=4).labelled != a.labelled
    assert len(a.labelled) == 5 and len(a.unlabelled) == 35
    assert sorted(a.labelled + a.unlabelled) == stems
    assert a.labelled == sorted(a.labelled)  # the list's order is kept on both sides
    assert len(split_labelled(stems, 1 / 30, 0).labelled) == 1  # floor(40/30 + 1/2)
    assert len(split_labelled(stems[:7], 0.1, 0).labelled) == 1  # never zero
    assert split_labelled(stems, 1.0, 0).unlabelled == []
    dup = split_labelled(["a", "b", "a", "c"], 1 / 3, 0)  # a stem listed twice stays on one side
    assert len(dup.labelled) == 1 and sorted(dup.labelled + dup.unlabelled) == ["a", "b", "c"]


def test_prepare_semi_writes_split_and_takes_the_rest_unlabelled(train_set: SegDataset, tmp_path: Path):
    got = prepare_semi(train_set, "1/2", seed=7, out=tmp_path, min_labelled=2)
    assert got.split == split_labelled([s.stem for s in train_set.samples], 0.5, 7)
    assert (tmp_path / "labelled.txt").read_text().split() == got.split.labelled
    assert (tmp_path / "unlabelled.txt").read_text().split() == got.split.unlabelled
    assert [s.stem for s in got.train_set.samples] == got.split.labelled
    assert len(train_set) == 10  # the full set is untouched
    img, label = got.train_set[0]
    assert img.shape == (3, 16, 16) and label.shape == (16, 16)
    stems = {f.path.stem for f in got.files}
    assert stems == set(got.split.unlabelled) and len(got.files) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.txt", "unlabelled.txt"]  # no temp files


def test_prepare_semi_without_options_changes_nothing(train_set: SegDataset, tmp_path: Path):
    got = prepare_semi(train_set, None, (), out=tmp_path)
    assert got.train_set is train_set and got.split is None and got.files == []
    assert list(tmp_path.iterdir()) == []


def test_unlabelled_folder_adds_images_but_not_training_ones(
    train_set: SegDataset, data: Path, tmp_path: Path
):
    extra = generate_unlabelled(tmp_path / "thermal" / "sub", 3, size=20, seed=1).parent
    got = prepare_semi(train_set, None, [extra], out=tmp_path / "run")
    assert got.train_set is train_set and got.split is None
    assert sorted(f.path.name for f in got.files) == ["00000.png", "00001.png", "00002.png"]  # recursive
    assert not (tmp_path / "run").exists()  # no split: no split files
    # The dataset's own images folder (train + test): with half labelled, only the unlabelled half of
    # the training images may be used, and never the evaluation images.
    test_images = [s.image for s in SegDataset(data, "folder", "test").samples]
    got = prepare_semi(train_set, "1/2", [data / "images", extra], seed=0, eval_images=test_images)
    assert len(got.files) == 5 + 3 and got.left_out == 5 + 2
    used = {f.path.resolve() for f in got.files}
    assert not used & {s.image.resolve() for s in got.train_set.samples}
    assert not used & {p.resolve() for p in test_images}
    with pytest.raises(SemiError, match=f"--unlabelled {data / 'images'}: every image in it is a labelled"):
        prepare_semi(train_set, None, [data / "images"], eval_images=test_images)


def test_split_files_are_written_atomically(train_set: SegDataset, tmp_path: Path, monkeypatch):
    (tmp_path / "labelled.txt").write_text("old\n")
    real = Path.write_text

    def half_then_fail(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        prepare_semi(train_set, "1/2", out=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "labelled.txt").read_text() == "old\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.txt"]  # no half-written or temp file


# --- bad input --------------------------------------------------------------------------------------


def test_bad_unlabelled_folders_are_one_clear_line(train_set: SegDataset, tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    text_only = tmp_path / "notes"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("no images here")
    a_file = tmp_path / "image.png"
    a_file.write_bytes(b"x")
    cases = [
        (tmp_path / "missing", "folder not found"),
        (a_file, "not a folder"),
        (empty, "no images found"),
        (text_only, "no images found"),
    ]
    for folder, what in cases:
        with pytest.raises(SemiError, match=f"--unlabelled {folder}: {what}") as err:
            prepare_semi(train_set, "1/2", [folder], out=tmp_path / "run")
        assert "\n" not in str(err.value)
    real = os.listdir

    def refuse(path="."):  # root reads every folder: fake an unreadable one
        if Path(path) == empty:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(
        SemiError, match=f"--unlabelled {empty}: cannot read the folder \\(Permission denied\\)"
    ):
        prepare_semi(train_set, "1/2", [empty], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written on bad input


def test_too_few_labelled_images_for_a_batch(train_set: SegDataset, tmp_path: Path):
    with pytest.raises(SemiError, match="--label-fraction 1/10: keeps 1 of 10 .* batch of 4"):
        prepare_semi(train_set, "1/10", out=tmp_path, min_labelled=4)
    assert list(tmp_path.iterdir()) == []


def test_too_few_unlabelled_images_for_a_batch(tmp_path: Path):
    files = [UnlabelledFile(p) for p in sorted(generate_unlabelled(tmp_path, 3, size=20).iterdir())]
    ext = MeanTeacherExtension(files, workers=0)
    with pytest.raises(
        SemiError, match="3 unlabelled images give 3 per process, fewer than one unlabelled batch of 4"
    ):
        ext.setup(fake_context(TinySegmentor(), batch_size=4))
    with pytest.raises(SemiError, match="no unlabelled images"):
        MeanTeacherExtension([])
    with pytest.raises(SemiError, match="--ema-decay 1.0"):
        MeanTeacherExtension(files, decay=1.0)
    with pytest.raises(SemiError, match="--pseudo-threshold 1.5"):
        MeanTeacherExtension(files, threshold=1.5)


# --- the views ----------------------------------------------------------------------------------------


def test_views_share_geometry_and_follow_their_key(tmp_path: Path):
    folder = generate_unlabelled(tmp_path, 2, size=(12, 40), seed=2)  # short images: crops get padded
    files = [UnlabelledFile(p) for p in sorted(folder.iterdir())]
    ds = UnlabelledSet(files, crop=16, seed=5)
    same = UnlabelledSet(files, crop=16, seed=5, student_photometric=False)
    mean, std = 96.9255, 47.8976
    grey = read_grey_u8(files[1].path)
    blank = np.zeros(grey.shape[:2], dtype=np.uint8)
    distorted, padded = [], []
    for epoch in range(6):
        ds.set_epoch(epoch)
        same.set_epoch(epoch)
        student, weak, real = ds[1]
        assert (
            student.shape == weak.shape == (3, 16, 16) and real.shape == (16, 16) and real.dtype == torch.bool
        )
        s2, w2, r2 = same[1]
        assert torch.equal(w2, weak) and torch.equal(s2, weak) and torch.equal(r2, real)  # one geometry
        # Both views are the recipe's augmentation drawn from the (seed, epoch, index) key.
        ref = replace(TrainAugment.for_crop(16), cat_max_ratio=1.0)
        img, lab = ref(grey, blank, sample_generator(5, epoch, 1))
        assert torch.equal(student, to_input(img, mean, std, lab.shape))
        assert torch.equal(real, torch.from_numpy(lab != IGNORE_INDEX))
        distorted.append(not torch.equal(student, weak))
        padded.append(not bool(real.all()))
    assert any(distorted) and any(padded)  # photometric distortion on the student only; padding marked
    ds.set_epoch(0)
    again = UnlabelledSet(files, crop=16, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ds[1], again[1]))
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], again[1][1])  # another epoch, another crop


# --- the mean teacher -------------------------------------------------------------------------------


def test_ema_formula_for_parameters_and_buffers():
    assert [ema_alpha(t) for t in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert ema_alpha(5000) == 0.999 and ema_alpha(10, decay=0.5) == 0.5
    torch.manual_seed(0)
    teacher, student = TinySegmentor(), TinySegmentor()
    student.train()(torch.randn(4, 3, 8, 8))  # BN running statistics and counter move
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = student.state_dict()
    ema_update(teacher, student, 0.999)
    for k, t in teacher.state_dict().items():
        if t.is_floating_point():
            expected = 0.999 * t0[k].double() + 0.001 * s0[k].double()
            torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-7)
            assert not torch.equal(t, t0[k]) or torch.equal(t0[k], s0[k])
        else:
            assert torch.equal(t, s0[k])  # num_batches_tracked is copied
    assert int(teacher.state_dict()["body.1.num_batches_tracked"]) == 1
    same = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update(student, student, 0.37)  # equal inputs stay bit-exact
    assert all(torch.equal(v, same[k]) for k, v in student.state_dict().items())


def test_pseudo_labels_and_confidence_weight():
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 0, 0, 0] = 10.0  # confident class 0
    logits[0, 2, 0, 1] = 10.0  # confident class 2
    logits[0, 1, 0, 2] = 1.0  # class 1, unsure
    logits[0, 2, 1, :] = 10.0  # confident class 2, but the last pixel is padding
    real = torch.tensor([[[True, True, True], [True, True, False]]])
    labels, confident, weight = pseudo_labels(logits, real, threshold=0.968)
    assert labels.tolist() == [[[0, 2, 1], [2, 2, IGNORE_INDEX]]]
    assert confident.tolist() == [[[0, 2, IGNORE_INDEX], [2, 2, IGNORE_INDEX]]]
    assert float(weight) == pytest.approx(4 / 5)
    _, _, none = pseudo_labels(logits, torch.zeros_like(real))
    assert float(none) == 0.0


def _unlabelled_ext(tmp_path: Path, n: int = 5, **kw) -> tuple[MeanTeacherExtension, list[UnlabelledFile]]:
    folder = tmp_path / "u"
    if not folder.exists():
        generate_unlabelled(folder, n, size=24, seed=3)
    files = [UnlabelledFile(p) for p in sorted(folder.iterdir())]
    return MeanTeacherExtension(files, workers=0, **kw), files


def test_unlabelled_stream_is_a_function_of_the_iteration(tmp_path: Path):
    torch.manual_seed(0)
    model = TinySegmentor().train()
    straight, _ = _unlabelled_ext(tmp_path)
    straight.setup(fake_context(model))  # 5 images, 2 a batch: 2 iterations per epoch
    rng = torch.get_rng_state()
    seq = [straight.extra_images(it) for it in range(7)]
    assert torch.equal(torch.get_rng_state(), rng)  # the teacher and the loader draw nothing global
    assert all(s.shape == (2, 3, 16, 16) for s in seq)
    assert not torch.equal(seq[0], seq[2])  # the next epoch: another order and other crops
    resumed, _ = _unlabelled_ext(tmp_path)
    resumed.setup(fake_context(model))
    resumed.load_state_dict(straight.state_dict())
    assert all(torch.equal(resumed.extra_images(it), seq[it]) for it in range(3, 7))  # mid-epoch start
    # Two processes share each epoch's permutation (padded by wrapping, as the labelled sampler).
    ranks = []
    for rank in (0, 1):
        ext, _ = _unlabelled_ext(tmp_path)
        ext.setup(fake_context(model, batch_size=1, rank=rank, world_size=2))
        ranks.append(set(ext.sampler.indices()))
    assert ranks[0] | ranks[1] == set(range(5)) and len(ranks[0]) == len(ranks[1]) == 3


def test_loss_term_is_weighted_cross_entropy_of_teacher_labels(tmp_path: Path):
    torch.manual_seed(0)
    model = TinySegmentor().train()
    ext, _ = _unlabelled_ext(tmp_path, weight=2.0, threshold=0.34)
    ext.setup(fake_context(model))
    seen = []
    ext.teacher.register_forward_hook(lambda module, inputs, output: seen.append(output.logits))
    student = ext.extra_images(0)
    assert ext.loss_terms(0, torch.zeros(2, 16, 16, dtype=torch.long), None, None) == {}  # no extra images
    # The batch of iteration 0: the first two positions of epoch 0's permutation.
    views = [ext.dataset[i] for i in ext.sampler.indices()[:2]]
    assert torch.equal(student, torch.stack([v[0] for v in views]))
    real = torch.stack([v[2] for v in views])
    assert not bool(real.all())  # some padding, which the pseudo-labels must ignore
    up = F.interpolate(seen[0], size=(16, 16), mode="bilinear", align_corners=False)
    labels, confident, weight = pseudo_labels(up, real, 0.34)
    assert torch.equal(ext.confident_pseudo_labels(), confident)
    assert 0 < float(weight) < 1  # some pixels above 0.34, some below: the weighting matters
    out = model(student)
    term = ext.loss_terms(0, torch.zeros(2, 16, 16, dtype=torch.long), out, SegOutput(out.logits, None, None))
    up_student = F.interpolate(out.logits, size=(16, 16), mode="bilinear", align_corners=False)
    expected = 2.0 * weight * F.cross_entropy(up_student, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(term["semi_ce"], expected)


def test_resume_refuses_another_split_or_unlabelled_set(tmp_path: Path):
    model = TinySegmentor()
    ext, files = _unlabelled_ext(tmp_path, split=LabelSplit(0.5, ["a", "b"], ["c"]))
    ext.setup(fake_context(model))
    state = ext.state_dict()
    assert state["labelled"] == ["a", "b"] and state["num_files"] == 5
    other = MeanTeacherExtension(files, split=LabelSplit(0.5, ["a", "c"], ["b"]), workers=0)
    other.setup(fake_context(model))
    with pytest.raises(SemiError, match="split differs"):
        other.load_state_dict(state)
    fewer = MeanTeacherExtension(files[:4], split=LabelSplit(0.5, ["a", "b"], ["c"]), workers=0)
    fewer.setup(fake_context(model))
    with pytest.raises(SemiError, match=r"another set of unlabelled images \(5 then, 4 now\)"):
        fewer.load_state_dict(state)
