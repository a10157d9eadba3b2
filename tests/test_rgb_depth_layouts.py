"""The RGB / depth datasets UNIP's repository reads (method.md section 9): NYUDv2 and SUN RGB-D depth,
ADE20K and MFNet's RGB channels, each read from a generated replica as the reference configs read
them (class counts and names, palettes, zero-label rule, split files or folders, channels, depth PNGs
of one or three channels, 16-bit files refused), palettes of every layout, --norm and the per-dataset
defaults, a few iterations of fine-tuning and probing on each, and layer-wise probing through
unip-compare."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unip_analysis import selection
from unip_analysis.checkpoints import build_vit
from unip_analysis.images import NORMALIZATIONS
from unip_train.finetune.augment import TrainAugment
from unip_train.finetune.classes import voc_colours
from unip_train.finetune.config import FinetuneConfig, FinetuneError, resolve
from unip_train.finetune.dataset import SegDataset, read_colour, read_pixels
from unip_train.finetune.layouts import LAYOUTS, DatasetError, dataset_palette, palette_source
from unip_train.finetune.model_file import load_model
from unip_train.finetune.trainer import run
from unip_train.synthetic import generate

TINY = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"
SIZE = (40, 48)
NEW = ("nyuv2", "sunrgbd", "ade20k", "mfnet-rgb")
IMAGENET_255 = (np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375]))


def replica(tmp_path: Path, layout: str, variant: str = "release", n_train: int = 4, n_test: int = 2) -> Path:
    return generate(
        tmp_path / f"{layout}_{variant}", layout, n_train, n_test, size=SIZE, seed=1, variant=variant
    )


# --- reading each layout ------------------------------------------------------------------------------


def test_nyuv2_and_sunrgbd_read_depth_and_keep_class_zero(tmp_path: Path):
    for layout, n, label_dir, eleventh in (
        ("nyuv2", 41, "Lable_single_channel", "picture"),
        ("sunrgbd", 38, "labels", "picture"),
    ):
        root = replica(tmp_path, layout)
        assert {p.name for p in root.iterdir()} >= {"Depth", label_dir, "train_depth.txt", "test_depth.txt"}
        train = SegDataset(root, layout, "train")
        assert (train.num_classes, train.classes[0], train.classes[11], train.channels) == (
            n,
            "_background_",
            eleventh,
            3,
        )
        assert train.split_path.name == "train_depth.txt" and len(SegDataset(root, layout, "test")) == 2
        assert train.palette[:2] == [(120, 120, 120), (180, 120, 120)] and len(train.palette) == n
        for i, s in enumerate(train.samples):
            img, label = train.load(i)
            stored = np.asarray(Image.open(s.image))
            # Even stems: single-channel PNGs (replicated), odd stems: three-channel ones (as stored).
            assert stored.ndim == (2 if i % 2 == 0 else 3)
            depth = stored if stored.ndim == 2 else stored[..., 0]
            assert img.shape == (*SIZE, 3) and img.dtype == torch.uint8  # what the 8-bit augmentation takes
            for c in range(3):
                assert np.array_equal(img[..., c].numpy(), depth)
            # Class 0 (_background_) is a class: labels are read as stored, no zero reduction.
            raw = np.asarray(Image.open(root / label_dir / f"{s.stem}.png"))
            assert np.array_equal(label.numpy(), raw) and (raw == 0).any()


def test_ade20k_folders_zero_label_and_both_roots(tmp_path: Path):
    release = replica(tmp_path, "ade20k", "release")
    base = release / "ADEChallengeData2016"
    assert (base / "images" / "training").is_dir() and (base / "annotations" / "validation").is_dir()
    assert not list(base.glob("*.txt"))  # no split files: the folders are the splits
    train = SegDataset(release, "ade20k", "train")
    val = SegDataset(release, "ade20k", "val")
    assert (len(train), len(val), train.num_classes, train.classes[:3]) == (
        4,
        2,
        150,
        ("wall", "building", "sky"),
    )
    assert train.classes[7] == "bed" and train.palette[149] == (92, 0, 255) and train.channels == 3
    assert train.split_path == base / "images" / "training"
    assert any("reduce_zero_label" in n for n in train.notes)
    for i, s in enumerate(train.samples):
        _, label = train.load(i)
        raw = np.asarray(Image.open(s.label)).astype(np.int64)
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)  # mmseg's reduce_zero_label
        assert np.array_equal(label.numpy(), expected) and (raw == 0).any()
    # The data root may be ADEChallengeData2016 itself (the reference's data_root), or hold it.
    unip = replica(tmp_path, "ade20k", "unip")
    assert (unip / "images" / "training").is_dir()
    assert [s.stem for s in SegDataset(unip, "ade20k", "train").samples] == [s.stem for s in train.samples]
    with pytest.raises(DatasetError, match=r"images/validation: image folder of split 'val' not found"):
        import shutil

        shutil.rmtree(base / "images" / "validation")
        SegDataset(release, "ade20k", "val")


def test_mfnet_rgb_reads_the_rgb_channels_of_the_release(tmp_path: Path):
    root = replica(tmp_path, "mfnet-rgb", "release")
    ds = SegDataset(root, "mfnet-rgb", "train")
    assert (ds.num_classes, ds.channels, ds.split_path.name) == (9, 3, "train.txt")
    assert ds.palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    rgbt = np.asarray(Image.open(ds.samples[0].image))
    assert rgbt.shape[-1] == 4
    img, _ = ds.load(0)
    assert np.array_equal(img.numpy(), rgbt[..., :3])
    assert not np.array_equal(rgbt[..., 0], rgbt[..., 3])  # not the thermal channel
    # The uint8 [H, W, C] reader: RGB for the colour layouts, the thermal channel for the infrared one.
    colour, thermal = read_pixels(ds.samples[0].image, 3), read_pixels(ds.samples[0].image, 1, True)
    assert colour.dtype == thermal.dtype == np.uint8 and (colour.shape[-1], thermal.shape[-1]) == (3, 1)
    assert np.array_equal(colour, rgbt[..., :3]) and np.array_equal(thermal[..., 0], rgbt[..., 3])
    # UNIP's preparation: 3-channel RGB files, the same pixels.
    unip = replica(tmp_path, "mfnet-rgb", "unip")
    assert np.array_equal(SegDataset(unip, "mfnet-rgb", "train").load(0)[0].numpy(), img.numpy())
    assert len(SegDataset(unip, "mfnet-rgb", "val_test")) == 4


def test_sixteen_bit_depth_and_colour_pngs_are_refused_naming_the_file(tmp_path: Path):
    root = replica(tmp_path, "nyuv2")
    ds = SegDataset(root, "nyuv2", "train")
    grey16, rgb16 = ds.samples[0].image, ds.samples[1].image
    Image.fromarray(np.full(SIZE, 3000, dtype=np.uint16)).save(grey16)
    cv2.imwrite(str(rgb16), np.full((*SIZE, 3), 3000, dtype=np.uint16))  # Pillow would read it as 8-bit
    for i, path in ((0, grey16), (1, rgb16)):
        with pytest.raises(DatasetError) as e:
            ds.load(i)
        msg = str(e.value)
        assert (
            msg.startswith(f"{path}: 16-bit image")
            and "convert the file to 8 bits" in msg
            and "\n" not in msg
        )
    assert read_colour(ds.samples[2].image).dtype == np.uint8


# --- palettes and normalization ---------------------------------------------------------------------


def test_every_layout_has_a_palette_and_the_folder_one_reads_palette_txt(tmp_path: Path):
    for name, layout in LAYOUTS.items():
        if layout.classes is not None:
            palette = dataset_palette(name)
            assert len(palette) == len(layout.classes) and all(len(c) == 3 for c in palette), name
    assert dataset_palette("soda") == voc_colours(21) and dataset_palette("soda")[1] == (128, 0, 0)
    assert dataset_palette("scut")[2] == (220, 20, 60)  # Cityscapes person, in RGB
    root = generate(tmp_path / "folder", "folder", 2, 1, size=SIZE)
    assert dataset_palette("folder", root) == voc_colours(6)
    assert palette_source("folder", root).startswith("generated: the VOC colour map")
    assert any(n.startswith("palette: generated") for n in SegDataset(root, "folder", "train").notes)
    (root / "palette.txt").write_text("# RGB\n" + "".join(f"{i} {2 * i},{3 * i}\n" for i in range(6)))
    assert dataset_palette("folder", root) == [(i, 2 * i, 3 * i) for i in range(6)]
    assert palette_source("folder", root) == str(root / "palette.txt")
    (root / "palette.txt").write_text("0 0 0\n1 2\n")
    with pytest.raises(DatasetError, match=r"palette.txt:2: '1 2' is not a colour"):
        dataset_palette("folder", root)


def test_imagenet_norm_per_channel_and_padding_is_zero_once_normalized(tmp_path: Path):
    root = replica(tmp_path, "ade20k")
    ds = SegDataset(root, "ade20k", "train", norm=NORMALIZATIONS["imagenet"])
    raw, _ = ds.load(0)
    img, _ = ds[0]
    mean, std = IMAGENET_255
    expected = (raw.numpy().transpose(2, 0, 1).astype(np.float64) - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(img.numpy(), expected, rtol=1e-5, atol=1e-5)
    # A grey (infrared) layout under ImageNet's norm: grey replicated, normalized per channel.
    soda = generate(tmp_path / "soda", "soda", 2, 1, size=SIZE)
    grey_ds = SegDataset(soda, "soda", "train", norm=NORMALIZATIONS["imagenet"])
    grey, _ = grey_ds.load(0)
    out, _ = grey_ds[0]
    for c in range(3):
        np.testing.assert_allclose(
            out[c].numpy(), (grey.numpy()[..., 0] - mean[c]) / std[c], rtol=1e-5, atol=1e-5
        )
    # Padding is 0 after normalization (mmseg pads the normalized image), for colour and for grey
    # under a per-channel mean.
    aug = TrainAugment(crop=64, scale=(48, 40), ratio_range=(1.0, 1.0))
    for ds_ in (ds, grey_ds):
        ds_.transform = aug
        x, label = ds_[0]
        assert x.shape == (3, 64, 64) and (label[40:] == 255).all()
        assert torch.allclose(x[:, 40:, :], torch.zeros(()), atol=1e-5)


def test_dataset_defaults_and_norm_resolution(tmp_path: Path):
    def cfg(dataset: str, backbone: str = f"timm:{TINY}:x.safetensors", **kw) -> FinetuneConfig:
        return resolve(FinetuneConfig(backbone=backbone, dataset=dataset, data_root=".", out=".", **kw))

    table = {
        "nyuv2": (480, 9_800, 1_000, "imagenet", "test"),
        "sunrgbd": (480, 65_000, 6_000, "imagenet", "test"),
        "ade20k": (512, 75_000, 1_500, "imagenet", "val"),
        "mfnet-rgb": (512, 9_800, 1_000, "imagenet", "test"),
        "soda": (512, 14_400, 1_500, "infrared", "test"),
    }
    for dataset, (crop, iters, warmup, norm, split) in table.items():
        c = cfg(dataset)
        assert (c.img_size, c.iters, c.warmup_iters, c.norm, c.eval_split) == (
            crop,
            iters,
            warmup,
            norm,
            split,
        )
        assert (c.eval_window, c.eval_stride) == (crop, 341)  # the configs' slide stride at 480 and 512
    assert (cfg("nyuv2", img_size=64).eval_stride, cfg("nyuv2", norm="0.5,0.25").norm) == (42, "0.5,0.25")
    # auto: the norm the backbone's pre-training run recorded beside it.
    (tmp_path / "student.json").write_text(json.dumps({"arch": TINY, "recipe": {"norm": "infmix"}}))
    assert cfg("nyuv2", backbone=f"unip:{TINY}:{tmp_path / 'student.safetensors'}").norm == "infmix"
    assert cfg("nyuv2", backbone=f"unip:{TINY}:{tmp_path / 'student.safetensors'}", norm="imagenet").norm == (
        "imagenet"
    )
    with pytest.raises(FinetuneError, match="--norm: normalization 'grey'"):
        cfg("soda", norm="grey")


# --- a few iterations of fine-tuning and probing on each ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit(TINY, img_size=32).state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("layout", NEW)
def test_finetune_and_probe_a_few_iterations(tmp_path: Path, tiny_backbone: Path, layout: str):
    root = replica(tmp_path, layout)
    for mode in ("ft", "lp"):
        out = tmp_path / f"run_{mode}"
        cfg = FinetuneConfig(
            backbone=f"timm:{TINY}:{tiny_backbone}", dataset=layout, data_root=str(root), out=str(out),
            mode=mode, iters=2, img_size=32, batch_size=2, workers=0, head_channels=8, aux_channels=8,
            progress=False, log_every=1, ckpt_every=2,
        )  # fmt: skip
        metrics = run(cfg)
        n = len(LAYOUTS[layout].classes)
        assert len(metrics["per_class_iou"]) == n and metrics["norm"]["name"] == "imagenet"
        assert metrics["palette"] == [list(c) for c in LAYOUTS[layout].palette]
        model, saved_cfg, ckpt = load_model(out / "model.pt")
        assert (saved_cfg.norm, saved_cfg.img_size, ckpt["channels"], len(ckpt["classes"])) == (
            "imagenet",
            32,
            3,
            n,
        )
        assert ckpt["palette"] == [list(c) for c in LAYOUTS[layout].palette]
        assert ckpt["norm"]["mean"] == pytest.approx(list(NORMALIZATIONS["imagenet"][0]))
        assert json.loads((out / "config.json").read_text())["norm"] == "imagenet"


def test_model_file_without_palette_or_norm_still_loads(tmp_path: Path, tiny_backbone: Path):
    root = generate(tmp_path / "data", "folder", 4, 2, size=SIZE)
    out = tmp_path / "run"
    cfg = FinetuneConfig(
        backbone=f"timm:{TINY}:{tiny_backbone}", dataset="folder", data_root=str(root), out=str(out),
        mode="lp", iters=1, img_size=32, batch_size=2, workers=0, progress=False,
    )  # fmt: skip
    run(cfg)
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["palette"] == [list(c) for c in voc_colours(6)] and ckpt["norm"]["name"] == "infrared"
    for key in ("palette", "norm", "channels"):
        del ckpt[key]
    del ckpt["config"]["norm"]  # as written before --norm existed
    torch.save(ckpt, out / "old.pt")
    _, old_cfg, old = load_model(out / "old.pt")
    assert (old["palette"], old["norm"], old["channels"], old_cfg.norm) == (None, None, None, "infrared")


# --- layer-wise probing through unip-compare ------------------------------------------------------------


def test_layerwise_probing_over_a_new_dataset_through_unip_compare(tmp_path: Path):
    from unip_train.compare import build_outputs, plan_from_dict, plot_layerwise, run_plan

    arch = "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)"
    root = replica(tmp_path, "ade20k", n_train=2, n_test=1)
    doc = json.loads(json.dumps(selection_doc_for(arch, [0.3, 0.1])))
    selection.write(tmp_path / "layer_selection.json", doc)
    plan = plan_from_dict(
        {
            "finetune": {"iters": 1, "img-size": 32, "batch-size": 2, "workers": 0, "head-channels": 8},
            "layer_selection": "layer_selection.json",
            "backbones": [{"name": "rand", "backbone": f"random:{arch}", "selection_model": "m"}],
            "datasets": [{"dataset": "ade20k", "root": str(root)}],
            "modes": [{"mode": "lp", "layerwise": "all"}],
        },
        tmp_path,
    )
    cells = plan.cells()
    assert [(c.dataset.dataset, c.layer) for c in cells] == [("ade20k", 1), ("ade20k", 2)]
    # Cells run in this process (the command they would run, without two interpreter start-ups).
    outcomes = run_plan(plan, tmp_path / "out", executor=InProcess(tmp_path), say=lambda *a: None)
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    out = build_outputs(plan, tmp_path / "out", outcomes)
    layered = out.summary[out.summary["layer"].notna()]
    assert sorted(layered["layer"].astype(int)) == [1, 2] and set(layered["dataset"]) == {"ade20k"}
    assert out.figures["layerwise_ade20k_lp-layerwise.png"].startswith(b"\x89PNG")
    fig = plot_layerwise(
        out.summary, out.results, "ade20k", "lp-layerwise", plan.selection_doc, {"rand": "m"}
    )
    assert "over NMI of 'm'" in fig.axes[0].get_title()  # the NMI-over-depth panel, as for SODA


class InProcess:
    """A submitit-like executor running each cell's ``unip-finetune ARGV`` in this process."""

    def __init__(self, folder: Path):
        self.folder = folder

    def submit(self, fn, argv: list[str], run_dir: str) -> Future:
        from unip_train.finetune.cli import main

        job: Future = Future()
        job.job_id = Path(run_dir).name
        job.set_result(main([*argv, "--no-progress"]))
        return job


def selection_doc_for(arch: str, nmis: list[float]) -> dict:
    """A layer_selection.json document naming one model ``m`` of ``arch`` with these layer NMIs."""
    layers = [
        {"layer": i + 1, "nmi": v, "nmi_ci95": [v * 0.9, v * 1.1], "attn_distance": 4.0 + i, "pattern": "hybrid",
         "head_nmi": [v, v]}
        for i, v in enumerate(nmis)
    ]  # fmt: skip
    model = {
        "family": "timm", "arch": arch, "weights": "x.safetensors", "weights_sha256": "0" * 64,
        "depth": len(nmis), "embed_dim": 32, "patch_size": 8, "num_prefix_tokens": 1,
        "heads_per_layer": [2] * len(nmis), "layers": layers, "selected_layer": len(nmis),
        "selected_heads": 2, "selection_rule": "deepest hybrid layer",
    }  # fmt: skip
    doc = {
        "schema_version": 1, "generator": "test", "created": "2025-01-01T00:00:00Z",
        "thresholds": {"global_max": 0.02, "local_min": 0.5},
        "images": {"dir": "imgs", "count": 4, "img_size": 32, "norm": "imagenet"}, "models": {"m": model},
    }  # fmt: skip
    return selection.validate(doc)
