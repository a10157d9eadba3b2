"""The demo task: deterministic from its seed, readable as SODA, and not solvable from grey level alone."""

import numpy as np

from unip_train import demo_task
from unip_train.finetune.dataset import SegDataset
from unip_train.finetune.layouts import LAYOUTS


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    a = demo_task.generate_labelled(tmp_path / "a", 3, 2, size=32, seed=5)
    b = demo_task.generate_labelled(tmp_path / "b", 3, 2, size=32, seed=5)
    c = demo_task.generate_labelled(tmp_path / "c", 3, 2, size=32, seed=6)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    u1 = demo_task.generate_unlabelled(tmp_path / "u1", 4, size=32, seed=1)
    u2 = demo_task.generate_unlabelled(tmp_path / "u2", 4, size=32, seed=1)
    assert _files(u1) == _files(u2) and len(_files(u1)) == 4


def test_labelled_set_reads_as_soda_with_soda_class_indices(tmp_path):
    root = demo_task.generate_labelled(tmp_path / "soda", 4, 3, size=48, seed=0)
    train = SegDataset(root, "soda", "train")
    test = SegDataset(root, "soda", "test")
    assert (len(train), len(test)) == (4, 3)
    assert train.classes == LAYOUTS["soda"].classes
    seen = set()
    for i in range(len(train)):
        img, label = train.load(i)
        assert img.shape == (48, 48, 1) and label.shape == (48, 48)
        seen |= set(np.unique(label.numpy()).tolist())
    assert seen <= set(demo_task.CLASS_INDEX.values())
    assert {0, demo_task.CLASS_INDEX["person"]} <= seen  # every scene holds at least one person


def test_grey_level_does_not_tell_object_classes_apart():
    """A classifier that sees only a pixel's grey level (the best one: majority class per level,
    fitted on the very pixels it is scored on) barely beats always guessing the most common object
    class; and warm pixels are not all objects. Shape and context have to do the work."""
    images, labels = demo_task.scenes(80, size=64, seed=3)
    objects = [v for k, v in demo_task.CLASS_INDEX.items() if k != "background"]
    is_object = np.isin(labels, objects)
    grey, cls = images[is_object], labels[is_object]
    table = np.zeros((256, 256))
    np.add.at(table, (grey, cls), 1)
    best_by_grey = table.max(axis=1).sum() / len(cls)
    majority = np.bincount(cls).max() / len(cls)
    assert len(set(cls.tolist())) == len(objects)  # every object class occurs
    assert best_by_grey - majority < 0.08
    warm = images >= demo_task.OBJECT_TEMPERATURE[0]
    assert (warm & ~is_object).sum() / warm.sum() > 0.1  # warm clutter belongs to the background


def test_lamp_is_the_spot_on_a_pole():
    """A lamp is defined by context: the pole it sits on runs on below it (unless a nearer object
    hides that part), while the same round spot elsewhere is background or a person's head."""
    _, labels = demo_task.scenes(60, size=64, seed=4)
    lamp, pole = demo_task.CLASS_INDEX["lamp"], demo_task.CLASS_INDEX["pole"]
    on_pole = lamps = 0
    for lab in labels:
        ys, xs = np.nonzero(lab == lamp)
        if len(ys) < 5:
            continue
        lamps += 1
        below = lab[ys.max() + 1 : ys.max() + 4, xs.min() : xs.max() + 1]
        on_pole += bool((below == pole).any())
    assert lamps >= 10
    assert on_pole / lamps > 0.8


def test_test_split_does_not_depend_on_the_number_of_training_scenes(tmp_path):
    few = demo_task.generate_labelled(tmp_path / "few", 2, 3, size=32, seed=7)
    many = demo_task.generate_labelled(tmp_path / "many", 5, 3, size=32, seed=7)
    test_files = {k: v for k, v in _files(few).items() if "test" in k.name}
    assert len(test_files) == 7  # 3 images, 3 label maps, the split file
    assert all(_files(many)[k] == v for k, v in test_files.items())


def _teacher_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_teachers.py"
    spec = importlib.util.spec_from_file_location("train_demo_teachers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_script_writes_a_float16_timm_checkpoint_with_its_command(tmp_path):
    import json

    import torch

    from unip_analysis.checkpoints import load_backbone, safetensors_metadata

    script = _teacher_script()
    for objective in ("mim", "sup"):
        argv = ["--objective", objective, "--steps", "2", "--batch", "4", "--pool", "8"]
        assert script.main([*argv, "--probe-every", "1", "--out", str(tmp_path)]) == 0
        path = tmp_path / f"demo_teacher_{objective}.safetensors"
        meta = safetensors_metadata(path)
        assert meta["made_by"].endswith(f"--out {tmp_path}") and f"--objective {objective}" in meta["made_by"]
        assert json.loads(path.with_suffix(".json").read_text()) == meta
        assert len(meta["probe_nmi_by_layer"].split()) == 8
        loaded = load_backbone("timm", meta["arch"], path, img_size=int(meta["img_size"]))
        assert loaded.depth == 8 and loaded.model.pos_embed.dtype == torch.float32
