"""unip-finetune: layer-decay groups, sliding-window inference, a short CPU fine-tune that beats chance,
frozen linear probing, eval-only, resume, head re-splitting, CLI errors and a torchrun smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from unip_analysis.checkpoints import build_vit, load_backbone
from unip_train.finetune.cli import main
from unip_train.finetune.config import FinetuneConfig
from unip_train.finetune.dataset import SegDataset
from unip_train.finetune.evaluation import slide_logits, summarize, upsampled_logits
from unip_train.finetune.layouts import IGNORE_INDEX
from unip_train.finetune.ll_fpn import Segmentor
from unip_train.finetune.model_file import build_backbone
from unip_train.finetune.trainer import build_optimizer, run
from unip_train.optim import set_lr
from unip_train.synthetic import generate

TINY = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"


def tiny_segmentor(mode: str = "ft", **kw) -> Segmentor:
    torch.manual_seed(0)
    backbone = build_vit(TINY, img_size=32)
    if mode == "ft":
        backbone.train().requires_grad_(True)
    return Segmentor(backbone, num_classes=5, mode=mode, head_channels=16, **kw)


def config(ckpt: tuple[str, Path], data: Path, out: Path, **kw) -> FinetuneConfig:
    arch, path = ckpt
    base = dict(
        backbone=f"timm:{arch}:{path}", dataset="folder", data_root=str(data), out=str(out), img_size=32,
        head_channels=16, batch_size=4, workers=0, lr=1e-3, progress=False, log_every=5,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture
def synthetic_folder(tmp_path: Path) -> Path:
    return generate(tmp_path / "data", "folder", n_train=8, n_test=3, size=48, seed=0)


def test_layer_decay_groups_carry_expected_scales():
    model = tiny_segmentor()
    cfg = FinetuneConfig(backbone="x", dataset="folder", data_root=".", out=".", layer_decay=0.5)
    opt = build_optimizer(cfg, model)
    scale_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[id(p)] = g["lr_scale"]
    named = dict(model.named_parameters())
    depth = 4  # scale = 0.5 ** (depth + 1 - layer_id); embeddings are layer 0, block i is i + 1
    assert scale_of[id(named["backbone.patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale_of[id(named["backbone.pos_embed"])] == 0.5 ** (depth + 1)
    assert scale_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.5**4
    assert scale_of[id(named["backbone.blocks.3.mlp.fc1.weight"])] == 0.5**1
    assert scale_of[id(named["decode_head.classifier.weight"])] == 1.0
    assert scale_of[id(named["neck.up2.weight"])] == 1.0
    assert len(scale_of) == sum(p.requires_grad for p in model.parameters())
    set_lr(opt, 1e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    # Weight decay: none on biases, norms, pos_embed.
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert (
        wd[id(named["backbone.pos_embed"])] == 0.0 and wd[id(named["backbone.blocks.0.attn.qkv.bias"])] == 0.0
    )
    assert wd[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.05


def test_sliding_window_equals_whole_image_when_it_fits_one_window():
    model = tiny_segmentor().eval()
    fn = upsampled_logits(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slide_logits(fn, x, 5, window=32, stride=21), fn(x))
        # Smaller than the window: padded to it, then cropped back.
        small = torch.randn(1, 3, 24, 32)
        padded = torch.nn.functional.pad(small, (0, 0, 0, 8))
        assert torch.equal(slide_logits(fn, small, 5, 32, 21), fn(padded)[:, :, :24])


def test_sliding_window_averages_overlaps_exactly():
    """For a per-pixel model, averaging overlapping windows must reproduce whole-image output."""
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(conv, x, 4, window=32, stride=21), conv(x))


def chance_mious(ds: SegDataset) -> tuple[float, float]:
    """mIoU of two label-blind predictors on ``ds``: always the majority class, and a random class
    drawn per pixel from the class frequencies (expected confusion n_i * p_j)."""
    counts = np.zeros(ds.num_classes)
    for i in range(len(ds)):
        lab = ds.load(i)[1].numpy()
        counts += np.bincount(lab[lab != IGNORE_INDEX], minlength=ds.num_classes)
    p = counts / counts.sum()
    majority = np.zeros((ds.num_classes, ds.num_classes))
    majority[:, counts.argmax()] = counts
    return summarize(majority, ds.classes)["miou"], summarize(np.outer(counts, p), ds.classes)["miou"]


@pytest.mark.slow
def test_short_cpu_finetune_beats_chance_and_reevaluates(tiny_timm_checkpoint, tmp_path: Path, capsys):
    data = generate(tmp_path / "data", "folder", n_train=32, n_test=8, size=96, seed=0)
    out = tmp_path / "run"
    # The published recipe's parts (LayerScale, drop path, raw features, mmseg head init, aux head
    # 256 wide), a higher lr than its 1e-4 for a 250-iteration toy run: with mmseg's head init,
    # lr 1e-3 reached 0.20 here, 3e-3 0.50 (PyTorch's default head init reached 0.54 at 1e-3).
    cfg = config(
        tiny_timm_checkpoint, data, out, img_size=64, head_channels=32, iters=250, log_every=50, lr=3e-3
    )
    metrics = run(cfg)
    majority, prior = chance_mious(SegDataset(data, "folder", "test"))
    with capsys.disabled():
        print(f"\nmIoU {metrics['miou']:.3f} vs chance: majority {majority:.3f}, class prior {prior:.3f}")
    # Measured: mIoU 0.50 vs chance 0.12 (majority) / 0.12 (class prior).
    assert metrics["miou"] > 0.35 and metrics["miou"] > 2.5 * max(majority, prior)
    assert metrics["per_class_iou"]["person"] > 0.2 and metrics["pixel_acc"] > 0.85

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["miou"] == pytest.approx(metrics["miou"]) and saved["iters"] == 250
    assert set(saved) >= {"dataset", "mode", "neck", "layers", "iters", "miou", "per_class_iou", "pixel_acc"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["config"]["mode"] == "ft" and "decode_head.classifier.weight" in model["state_dict"]

    capsys.readouterr()
    assert (
        main(
            ["--eval-only", "--model", str(out / "model.pt"), "--out", str(tmp_path / "re"), "--no-progress"]
        )
        == 0
    )
    again = json.loads((tmp_path / "re" / "metrics.json").read_text())
    assert again["miou"] == pytest.approx(metrics["miou"], abs=1e-9)


def test_precision_and_memory_order_options_on_cpu(tiny_timm_checkpoint, synthetic_folder, tmp_path, capsys):
    """--precision auto is float32 on the CPU (bit-identical to fp32), bf16 autocasts, fp16 is refused
    in one line; --channels-last trains the same weights up to summation order; the old spellings
    (--amp, --no-amp, --amp none) and a config file of an earlier version (amp true / false) still read."""

    def weights(name: str, **kw) -> dict[str, torch.Tensor]:
        run(config(tiny_timm_checkpoint, synthetic_folder, tmp_path / name, iters=3, **kw))
        return torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]

    auto, fp32 = weights("auto", precision="auto"), weights("fp32", precision="fp32")
    assert all(torch.equal(auto[k], fp32[k]) for k in auto)
    bf16 = weights("bf16", precision="bf16")
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32)  # the bf16 forward moved the weights
    weights("cl", channels_last=True, log_every=1)
    weights("contiguous", channels_last=False, log_every=1)

    def losses(name: str) -> list[float]:
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in log if "loss" in r]

    # Compared by the loss of each step: Adam turns summation-order noise in the ~0 gradients of the
    # biases before BatchNorm into lr-sized steps, which change no output.
    assert losses("cl") == pytest.approx(losses("contiguous"), rel=1e-5) and len(losses("cl")) == 3

    arch, path = tiny_timm_checkpoint
    common = ["--backbone", f"timm:{arch}:{path}", "--dataset", "folder", "--data-root", str(synthetic_folder),
              "--img-size", "32", "--iters", "1", "--workers", "0", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "unip-finetune: error: --precision fp16 needs CUDA; this run is on cpu; use --precision bf16 or fp32"
    )
    # The old spelling still works, with a notice on its own line before the same error.
    assert main([*common, "--out", str(tmp_path / "fp16"), "--amp", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[0]
        == "unip-finetune: note: --amp is deprecated; use --precision (the old name goes in the next release)"
    )
    assert err[-1].startswith("unip-finetune: error: --precision fp16 needs CUDA")
    for old_flags, name in ((["--no-amp"], "no-amp"), (["--amp", "none"], "amp-none")):
        assert main([*common, *old_flags, "--out", str(tmp_path / name)]) == 0
        assert "deprecated; use --precision" in capsys.readouterr().err
        assert json.loads((tmp_path / name / "config.json").read_text())["precision"] == "fp32"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"amp": True, "head_channels": 16, "aux_channels": 16, "batch_size": 4}))
    assert main([*common, "--config", str(old), "--out", str(tmp_path / "old")]) == 0
    assert json.loads((tmp_path / "old" / "config.json").read_text())["precision"] == "auto"
    old.write_text(json.dumps({"amp": False, "crop": 32, "num_workers": 0, "batch_size": 4}))
    assert main([*common, "--config", str(old), "--out", str(tmp_path / "old-false")]) == 0
    assert json.loads((tmp_path / "old-false" / "config.json").read_text())["precision"] == "fp32"


def test_linear_probe_leaves_backbone_bit_identical(tiny_timm_checkpoint, synthetic_folder, tmp_path: Path):
    arch, path = tiny_timm_checkpoint
    out = tmp_path / "lp"
    metrics = run(config(tiny_timm_checkpoint, synthetic_folder, out, mode="lp", layers=[2, 4], iters=6))
    assert metrics["mode"] == "lp" and metrics["layers"] == [2, 4]
    original = load_file(str(path))
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    assert backbone.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(backbone[k], v), k
    head = state["decode_head.classifier.weight"]
    assert head.shape == (6, 2 * 64, 1, 1)  # 6 classes, 2 layers x 64 channels

    # The optimizer never sees backbone parameters and training mode keeps the backbone in eval.
    model = tiny_segmentor("lp", layers=[4])
    model.train()
    assert not model.backbone.training and model.decode_head.training
    cfg = FinetuneConfig(backbone="x", dataset="folder", data_root=".", out=".", mode="lp")
    params = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert params == {id(p) for p in model.decode_head.parameters()}


def test_multi_layer_neck_and_resume(tiny_timm_checkpoint, synthetic_folder, tmp_path: Path):
    out = tmp_path / "ml"
    run(config(tiny_timm_checkpoint, synthetic_folder, out, neck="multi-layer", iters=6, ckpt_every=3))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["iter"] == 6
    metrics = run(
        config(tiny_timm_checkpoint, synthetic_folder, out, neck="multi-layer", iters=10, resume="auto")
    )
    assert metrics["neck"] == "multi-layer" and metrics["layers"] is None
    iters = [r["iter"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert iters == [5, 6, 10]  # the resumed run continued from iteration 6


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(
    tiny_timm_checkpoint, synthetic_folder, tmp_path: Path
):
    """8 train images, batch 4: 2 iterations per data epoch. Checkpoint every 3 iterations; the killed
    run dies right after iteration 5, so the resumed run restarts mid-epoch from iteration 3 and
    redoes 4 and 5. It uses loader workers, the uninterrupted run none: crops must not depend on it."""
    from unip_train.finetune.engine import KILL_ENV

    arch, path = tiny_timm_checkpoint
    kw = dict(iters=8, ckpt_every=3, log_every=1, head_channels=8)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    want = run(config(tiny_timm_checkpoint, synthetic_folder, whole, **kw))

    cmd = [sys.executable, "-m", "unip_train.finetune", "--backbone", f"timm:{arch}:{path}"]
    cmd += ["--dataset", "folder", "--data-root", str(synthetic_folder), "--out", str(killed), "--crop", "32"]
    cmd += ["--iters", "8", "--batch-size", "4", "--workers", "0", "--head-channels", "8", "--lr", "1e-3"]
    cmd += ["--ckpt-every", "3", "--log-every", "1", "--no-progress"]
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": "1"}
    died = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1]
    )
    assert died.returncode == -9, died.stderr[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iter"] == 3
    assert not (killed / "model.pt").exists()

    got = run(config(tiny_timm_checkpoint, synthetic_folder, killed, resume="auto", workers=2, **kw))
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["miou"] == want["miou"] and got["per_class_iou"] == want["per_class_iou"]

    def losses(run_dir: Path) -> dict:
        lines = map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
        return {r["iter"]: r["loss"] for r in lines if "loss" in r}  # the resumed run's records win

    assert losses(whole) == losses(killed)


def test_resume_refuses_other_data_settings(tiny_timm_checkpoint, synthetic_folder, tmp_path: Path):
    from unip_analysis.errors import CheckpointError, SpecError

    out = tmp_path / "run"
    run(config(tiny_timm_checkpoint, synthetic_folder, out, iters=2, head_channels=8))
    # The run folder's record refuses it first, naming what differs ...
    with pytest.raises(SpecError, match=r"other settings \(batch_size: 4 -> 2; head_channels: 8 -> 16\)"):
        run(config(tiny_timm_checkpoint, synthetic_folder, out, iters=4, batch_size=2, resume="auto"))
    # ... and its checkpoint continued into a new folder is refused by the checkpoint's own check.
    with pytest.raises(CheckpointError, match="saved with batch_size=4, this run has 2"):
        run(
            config(
                tiny_timm_checkpoint, synthetic_folder, tmp_path / "new", iters=4, batch_size=2, head_channels=8,
                resume=str(out / "checkpoint.pt"),
            )
        )  # fmt: skip
    (out / "other.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="other.pt: cannot read"):
        run(
            config(
                tiny_timm_checkpoint,
                synthetic_folder,
                out,
                iters=4,
                head_channels=8,
                resume=str(out / "other.pt"),
            )
        )


def test_resplit_last_heads_of_a_unip_student(tiny_timm_checkpoint, tmp_path: Path):
    arch, path = tiny_timm_checkpoint
    student = tmp_path / "student.safetensors"
    save_file(load_file(str(path)), str(student), metadata={"heads_per_layer": "[2, 2, 2, 4]"})
    base = dict(dataset="folder", data_root=".", out=".", img_size=32)
    kept, info = build_backbone(FinetuneConfig(backbone=f"unip:{arch}:{student}", **base))
    assert info["heads_per_layer"] == [2, 2, 2, 4] and kept.training
    assert all(p.requires_grad for p in kept.parameters())
    resplit, info = build_backbone(
        FinetuneConfig(backbone=f"unip:{arch}:{student}", resplit_last_heads=True, **base)
    )
    assert info["heads_per_layer"] == [2, 2, 2, 2]
    x = torch.randn(1, 3, 32, 32)
    kept.eval(), resplit.eval()
    with torch.no_grad():
        assert not torch.allclose(kept(x), resplit(x))  # same weights, different head split
    frozen = load_backbone("unip", arch, student, img_size=32).model
    with torch.no_grad():
        torch.testing.assert_close(kept(x), frozen(x))


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([*args, "--no-progress"])
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line_and_exit_2(tiny_timm_checkpoint, synthetic_folder, tmp_path: Path, capsys):
    arch, path = tiny_timm_checkpoint
    common = [
        "--backbone",
        f"timm:{arch}:{path}",
        "--data-root",
        str(synthetic_folder),
        "--out",
        str(tmp_path / "r"),
    ]
    common += [
        "--img-size",
        "32",
        "--iters",
        "2",
        "--workers",
        "0",
        "--head-channels",
        "8",
        "--batch-size",
        "2",
    ]

    code, err = cli([*common, "--dataset", "cityscapes"], capsys)
    assert (
        code == 2
        and err
        == "unip-finetune: error: unknown dataset 'cityscapes'; known: soda, mfnet, scut, folder, nyuv2, sunrgbd, ade20k, mfnet-rgb\n"
    )

    code, err = cli([*common, "--dataset", "soda"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(
        f"unip-finetune: error: {synthetic_folder / 'train_infrared.txt'}: split file not found"
    )

    code, err = cli([*common, "--dataset", "folder", "--layers", "2,9"], capsys)
    assert (
        code == 2
        and err.count("\n") == 1
        and "--layers 2,9: layer numbers are 1-based and must lie in 1..4" in err
    )

    missing = tmp_path / "nope.safetensors"
    code, err = cli([*common, "--dataset", "folder", "--backbone", f"timm:{arch}:{missing}"], capsys)
    assert code == 2 and err == f"unip-finetune: error: {missing}: checkpoint file not found\n"
    code, err = cli([*common, "--dataset", "folder", "--backbone", "oops"], capsys)
    assert code == 2 and err.startswith("unip-finetune: error: --backbone 'oops': expected FAMILY:ARCH:PATH")

    stem = (synthetic_folder / "train.txt").read_text().split()[0]
    label = synthetic_folder / "masks" / f"{stem}.png"
    arr = np.asarray(Image.open(label)).copy()
    arr[3, 3] = 42
    Image.fromarray(arr).save(label)
    code, err = cli([*common, "--dataset", "folder"], capsys)
    assert (
        code == 2 and err.count("\n") == 1 and f"{label}: label values [42] are outside the 6 classes" in err
    )

    code, err = cli([*common[:2], "--dataset", "folder", "--data-root", str(synthetic_folder)], capsys)
    assert code == 2 and "missing --out" in err

    code, err = cli([*common, "--dataset", "nope", "--debug"], capsys)
    assert (
        code == 2
        and "Traceback" in err
        and err.endswith(
            "unknown dataset 'nope'; known: soda, mfnet, scut, folder, nyuv2, sunrgbd, ade20k, mfnet-rgb\n"
        )
    )
    code, err = cli([*common, "--dataset", "folder", "--mode", "xx"], capsys)  # a bad value: one line
    assert code == 2 and err.count("\n") == 1 and err.startswith("unip-finetune: error: ") and "mode" in err
    code, err = cli([*common, "--dataset", "folder", "--no-such-option"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--no-such-option" in err


@pytest.mark.slow
def test_torchrun_two_process_cpu_smoke(tiny_timm_checkpoint, synthetic_folder, tmp_path: Path):
    arch, path = tiny_timm_checkpoint
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "unip_train.finetune"]
    cmd += ["--backbone", f"timm:{arch}:{path}", "--dataset", "folder", "--data-root", str(synthetic_folder)]
    cmd += ["--out", str(out), "--crop", "32", "--iters", "4", "--batch-size", "4", "--workers", "0"]
    cmd += ["--head-channels", "8", "--log-every", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iters"] == 4 and metrics["num_images"] == 3
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["world"] == 2 and [r["iter"] for r in log if "loss" in r] == [2, 4]

    # The no-overwrite rule under torchrun: every process refuses alike (none waits for the others),
    # and with --overwrite only the first moves the old files aside.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1]
    )
    assert again.returncode != 0 and f"{out} already holds a unip-finetune run" in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    replaced = subprocess.run(
        [*cmd, "--overwrite"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert (aside / "metrics.json").read_bytes() == before[out / "metrics.json"]
