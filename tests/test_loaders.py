"""The trainers' data loaders: batches of (epoch, index) keys, workers that start once and never
restart, exact resume with them alive, the default worker count, and loader-worker errors as one
line in every CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image
from safetensors.torch import load_file, save_file

from unip_analysis import images as imgs
from unip_analysis import workers
from unip_analysis.checkpoints import build_vit
from unip_train.finetune import cli as finetune
from unip_train.finetune import config as finetune_config
from unip_train.finetune import dataset as finetune_dataset
from unip_train.finetune.dataset import SegDataset, read_grey
from unip_train.finetune.engine import KILL_ENV
from unip_train.pretrain import cli as pretrain
from unip_train.pretrain.data import InfMix
from unip_train.sampling import EpochSampler, KeyBatches, KeyedDataset, keyed_loader
from unip_train.synthetic import generate, generate_unlabelled

REPO = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)"
IMG = 32


def env(**extra: str) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def run(module: str, *args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(**(extra_env or {})))


def record_worker_pids(monkeypatch, cls: type, log: Path) -> None:
    """Make ``cls.item`` append the loader worker's pid to ``log`` (forked workers inherit the patch)."""
    item = cls.item

    def logged(self, index, epoch):
        if torch.utils.data.get_worker_info() is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return item(self, index, epoch)

    monkeypatch.setattr(cls, "item", logged)


def pids(log: Path) -> set[int]:
    return {int(x) for x in log.read_text().split()}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "tiny.safetensors"
    model = build_vit(ARCH, img_size=IMG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return generate(tmp_path / "data", "folder", n_train=8, n_test=2, size=40, seed=0)


# --- keys and the loader --------------------------------------------------------------------------


class Keys(KeyedDataset):
    """Each sample is its own key, as a tensor."""

    def __len__(self) -> int:
        return 5

    def item(self, index: int, epoch: int) -> torch.Tensor:
        return torch.tensor([epoch, index])


def test_key_batches_follow_each_epochs_order_and_start_anywhere():
    sampler = EpochSampler(5, seed=3)
    stream = KeyBatches(sampler, 2)  # 5 images, batches of 2: 2 batches an epoch, the 5th image dropped
    stream.set_range(0, 6)
    batches = list(stream)
    assert len(stream) == 6 and len(batches) == 6
    for b, batch in enumerate(batches):
        epoch, pos = divmod(b, 2)
        assert batch == [(epoch, i) for i in sampler.indices(epoch)[2 * pos : 2 * pos + 2]]
    assert sampler.indices(0) != sampler.indices(1)  # another epoch, another order
    stream.set_range(3, 6)  # a resumed run: mid-epoch 1
    assert list(stream) == batches[3:]
    stream.set_range(5)  # without end
    it = iter(stream)
    assert [next(it) for _ in range(3)] == batches[5:] + [list(zip([3, 3], sampler.indices(3)[:2]))] + [
        list(zip([3, 3], sampler.indices(3)[2:4]))
    ]
    with pytest.raises(ValueError, match="do not fit"):
        KeyBatches(sampler, 2, per_epoch=3)


def test_loader_workers_start_once_across_epochs_and_iterations(tmp_path, monkeypatch):
    log = tmp_path / "pids"
    record_worker_pids(monkeypatch, Keys, log)
    stream = KeyBatches(EpochSampler(5, seed=1), 2)
    loader = keyed_loader(Keys(), stream, num_workers=2)
    stream.set_range(0, 8)  # 4 epochs in one pass
    first = [b.tolist() for b in loader]
    stream.set_range(3, 8)  # the loader iterated again (persistent workers)
    again = [b.tolist() for b in loader]
    plain = KeyBatches(EpochSampler(5, seed=1), 2)
    plain.set_range(0, 8)
    expected = [[list(k) for k in keys] for keys in plain]
    assert first == expected and again == expected[3:]  # each item is its key: the epoch reached the worker
    assert len(pids(log)) == 2 and os.getpid() not in pids(log)  # two workers, for 4 epochs and 2 passes


def test_read_grey_equals_the_mean_of_read_images_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    files = {
        "g8.png": rng.integers(0, 256, (48, 64), dtype=np.uint8),
        "g16.png": rng.integers(0, 65536, (48, 64), dtype=np.uint16),
        "rgb.png": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        "g8.jpg": rng.integers(0, 256, (48, 64), dtype=np.uint8),
    }
    for name, arr in files.items():
        Image.fromarray(arr).save(tmp_path / name)
        want = imgs.read_image(tmp_path / name).mean(dim=0).mul_(255.0).numpy()
        got = read_grey(tmp_path / name)
        assert got.dtype == np.float32 and np.array_equal(got, want), name  # bit for bit


# --- fine-tuning: workers alive for the whole run, exact resume -----------------------------------------


def finetune_args(backbone: Path, data: Path, out: Path, workers: int) -> list[str]:
    args = ["--backbone", f"timm:{ARCH}:{backbone}", "--dataset", "folder", "--data-root", data]
    args += ["--out", out, "--img-size", IMG, "--iters", 8, "--batch-size", 4, "--head-channels", 8]
    args += ["--aux-channels", 8, "--lr", 1e-3, "--ckpt-every", 3, "--log-every", 1, "--no-progress"]
    return [str(a) for a in args + ["--workers", workers]]


def test_finetune_sigkill_and_resume_with_persistent_workers_is_bit_identical(
    tiny_vit, folder, tmp_path, monkeypatch
):
    """8 images at batch 4: 2 iterations an epoch, 8 iterations. The killed run (2 workers) dies after
    iteration 5 and resumes from its checkpoint at 3 (2 workers), mid-epoch; the uninterrupted run
    has no workers. The resumed run's 5 iterations span 3 epochs with the same 2 worker processes."""
    whole, killed, log = tmp_path / "whole", tmp_path / "killed", tmp_path / "pids"
    assert finetune.main(finetune_args(tiny_vit, folder, whole, 0)) == 0
    died = run("unip_train.finetune", *finetune_args(tiny_vit, folder, killed, 2), extra_env={KILL_ENV: "5"})
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iter"] == 3
    record_worker_pids(monkeypatch, SegDataset, log)
    assert finetune.main(finetune_args(tiny_vit, folder, killed, 2) + ["--resume"]) == 0
    assert len(pids(log)) == 2 and os.getpid() not in pids(log)
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run_dir: Path) -> dict:
        lines = map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
        return {r["iter"]: r["loss"] for r in lines if "loss" in r}

    assert list(losses(whole)) == list(range(1, 9)) and losses(whole) == losses(killed)
    assert (
        json.loads((whole / "metrics.json").read_text())["miou"]
        == json.loads((killed / "metrics.json").read_text())["miou"]
    )


def test_mean_teacher_stream_with_workers_equals_no_workers_and_starts_them_once(tmp_path, monkeypatch):
    from fake_loop import TinySegmentor, fake_context

    from unip_train.finetune.semi import MeanTeacherExtension, UnlabelledFile, UnlabelledSet

    folder = generate_unlabelled(tmp_path / "u", 5, size=24, seed=3)
    files = [UnlabelledFile(p) for p in sorted(folder.iterdir())]
    torch.manual_seed(0)
    model = TinySegmentor().train()
    log = tmp_path / "pids"
    record_worker_pids(monkeypatch, UnlabelledSet, log)
    seqs = []
    for n in (0, 2):
        ext = MeanTeacherExtension(files, workers=n)
        ext.setup(fake_context(model))  # 5 images, batch 2: 2 iterations an epoch
        seqs.append([ext.extra_images(it) for it in range(7)])  # 4 epochs
    assert all(torch.equal(a, b) for a, b in zip(*seqs))
    assert len(pids(log)) == 2 and os.getpid() not in pids(log)
    resumed = MeanTeacherExtension(files, workers=2)
    resumed.setup(fake_context(model))
    resumed.load_state_dict(ext.state_dict())
    assert all(torch.equal(resumed.extra_images(it), seqs[0][it]) for it in range(3, 7))  # mid-epoch


# --- pre-training ----------------------------------------------------------------------------------


def pad_args(base: Path, images: Path, out: Path, workers: int, *extra: str) -> list[str]:
    args = ["--method", "pad", "--init", f"mae:{ARCH}:{base}", "--decoder", "random", "--decoder-heads", "4"]
    args += ["--decoder-dim", "32", "--decoder-depth", "1", "--infrared", images, "--rois", "none"]
    args += ["--img-size", IMG, "--epochs", 2, "--batch-size", 2, "--accum-iter", 1, "--lr", 1e-3]
    args += ["--warmup-epochs", 0, "--ckpt-every", 2, "--workers", workers, "--out", out]
    return [str(a) for a in args + ["--no-progress", *extra]]


def test_pretrain_sigkill_and_resume_with_persistent_workers_is_bit_identical(
    tiny_vit, tmp_path, monkeypatch
):
    """6 images at batch 2: 3 steps an epoch, 2 epochs. The killed run (2 workers) dies after step 5
    and resumes from its checkpoint at step 4 (epoch 1, mid-epoch) with 2 workers; the uninterrupted
    run has none. In-process, both epochs are served by the one worker process started."""
    images = write_images(tmp_path / "images", n=6, sizes=((40, 48), (36, 44)))
    whole, killed, log = tmp_path / "whole", tmp_path / "killed", tmp_path / "pids"
    done = run("unip_train.pretrain", *pad_args(tiny_vit, images, whole, 0))
    assert done.returncode == 0, done.stderr[-2000:]
    died = run(
        "unip_train.pretrain", *pad_args(tiny_vit, images, killed, 2), extra_env={pretrain.KILL_ENV: "5"}
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert torch.load(killed / pretrain.CHECKPOINT, weights_only=True)["step"] == 4
    resumed = run("unip_train.pretrain", *pad_args(tiny_vit, images, killed, 2, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(whole / "backbone.safetensors"), load_file(killed / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(r / pretrain.CHECKPOINT, weights_only=True) for r in (whole, killed))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # the decoder too

    def losses(run_dir: Path) -> list:
        return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]

    assert len(losses(whole)) == 6 and losses(whole) == losses(killed)

    record_worker_pids(monkeypatch, InfMix, log)
    assert pretrain.main(pad_args(tiny_vit, images, tmp_path / "again", 1)) == 0
    assert len(pids(log)) == 1 and os.getpid() not in pids(log)  # 2 epochs, one worker process


# --- the default worker count ------------------------------------------------------------------------


def test_every_cli_defaults_to_the_machines_cores_and_takes_both_spellings(monkeypatch):
    """The declarations leave the count open (None); each CLI resolves it with its --device: the
    cores for a GPU run (tests/test_runs.py checks the CPU rule). Commands declared on
    unip_analysis.command name it --workers, with --num-workers as the old spelling."""
    from dataclasses import replace

    from unip_analysis import cli as analyze_cli
    from unip_train.pretrain import rois_cli

    def default(parser: argparse.ArgumentParser, dest: str) -> int:
        return next(a for a in parser._actions if a.dest == dest).default

    for command in (finetune.COMMAND, analyze_cli.COMMAND, pretrain.COMMAND, rois_cli.COMMAND):
        spec = command.by_name["workers"]
        assert spec.default is None and spec.flag == "--workers" and spec.aliases == ("--num-workers",)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", open(os.devnull, "w"))  # the deprecation notice
            assert command.parse(["--num-workers", "3", *REQUIRED[command.prog]]).workers == 3
        assert command.parse(["--workers", "2", *REQUIRED[command.prog]]).workers == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores in (1, 3):
        monkeypatch.setattr(workers, "available_cores", lambda cores=cores: cores)
        cfg = finetune_config.FinetuneConfig(
            backbone="timm:vit_tiny_patch16_224:w.safetensors", dataset="folder", data_root=".", out=".",
            device="cuda", num_classes=2,
        )  # fmt: skip
        assert cfg.workers is None and finetune_config.resolve(cfg).workers == cores
        assert finetune_config.resolve(replace(cfg, workers=0)).workers == 0
        args, _ = pretrain.parse_args(
            ["--selection", "s", "--teacher", "t", "--infrared", "d", "--device", "cuda", "--out", "o"]
        )
        assert args.workers == cores


# What each command needs besides --workers to parse.
REQUIRED = {
    "unip-finetune": [],
    "unip-analyze": ["--images", "i", "--out", "o"],
    "unip-pretrain": ["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o"],
    "unip-rois": ["--images", "i", "--out", "o"],
}


def test_no_worker_count_warning_with_the_default_on_a_two_core_machine(monkeypatch):
    """PyTorch warns when a loader has more workers than the process may use cores (its affinity
    mask, which the default reads too); with the default it never does."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    stream = KeyBatches(EpochSampler(5), 1)
    stream.set_range(0, 2)

    def warned(n: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            list(keyed_loader(Keys(), stream, num_workers=n))
        return [str(w.message) for w in caught if "worker" in str(w.message)]

    assert workers.default_num_workers("cuda") == 2 and warned(2) == []
    assert warned(3)  # the warning the default avoids


# --- worker errors: one line in every CLI ------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess, prog: str, message: str) -> None:
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [f"{prog}: error: {message}"], proc.stderr
    assert "Traceback" not in proc.stderr and "Original" not in proc.stderr


def test_pretrain_worker_error_is_one_line(tiny_vit, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"x{i}.png").write_bytes(b"not an image")
    proc = run("unip_train.pretrain", *pad_args(tiny_vit, bad, tmp_path / "run", 1))
    one_line_error(proc, "unip-pretrain", "none of the 4 pre-training images can be read")


def test_pretrain_error_under_an_open_progress_bar_stands_on_its_own_line(tiny_vit, tmp_path):
    """Issue 21, defect 6: the error used to land on the bar's line (``epoch 0:   0%|...| 0/2
    [...]unip-pretrain: error: ...``), then the bar was drawn again. The bar is forced on here
    (--progress after pad_args' --no-progress; tqdm draws to a pipe too)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"x{i}.png").write_bytes(b"not an image")
    proc = run("unip_train.pretrain", *pad_args(tiny_vit, bad, tmp_path / "run", 0, "--progress"))
    assert proc.returncode == 2
    error = "unip-pretrain: error: none of the 4 pre-training images can be read"
    assert "epoch 0:" in proc.stderr  # the bar was drawn
    lines = proc.stderr.split("\n")  # tqdm redraws with \r: only \n ends a line
    assert error in lines, proc.stderr  # a line that is exactly the error, nothing glued before it
    after = "\n".join(lines[lines.index(error) + 1 :])
    assert after.strip() == "", after  # no bar fragment after it


def test_finetune_worker_error_is_one_line(tiny_vit, folder, tmp_path):
    """A training image whose header reads (the dataset checks sizes at start) but whose pixels do not."""
    stem = (folder / "train.txt").read_text().split()[0]
    image = folder / "images" / f"{stem}.png"
    image.write_bytes(image.read_bytes()[:120])
    proc = run("unip_train.finetune", *finetune_args(tiny_vit, folder, tmp_path / "run", 1))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Original" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"unip-finetune: error: {image}: cannot decode image (image file is truncated")


def test_analyze_worker_error_is_one_line(tiny_vit, tmp_path):
    images = write_images(tmp_path / "images", n=4)
    bad = images / "zz_cut.png"
    bad.write_bytes(next(images.glob("g8_*.png")).read_bytes()[:60])
    args = ["--checkpoint", f"m=timm:{ARCH}:{tiny_vit}", "--images", images, "--out", tmp_path / "out"]
    args += ["--img-size", IMG, "--workers", 1, "--no-progress", "--bootstrap", 10]
    proc = run("unip_analysis.cli", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Original" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"unip-analyze: error: {bad}: cannot decode image")


# --- decoded images kept in memory ---------------------------------------------------------------


def test_cached_images_give_the_same_samples_within_the_budget(folder, monkeypatch):
    from unip_train.finetune.augment import TrainAugment
    from unip_train.finetune.semi import labelled_subset

    def dataset(cache_mb: float) -> SegDataset:
        return SegDataset(
            folder, "folder", "train", transform=TrainAugment.for_crop(32), seed=3, cache_mb=cache_mb
        )

    plain, cached = dataset(0), dataset(1024)
    decodes = []
    real_read = finetune_dataset.read_grey_u8
    monkeypatch.setattr(finetune_dataset, "read_grey_u8", lambda *a: decodes.append(a[0]) or real_read(*a))
    for epoch in range(3):
        for i in range(len(plain)):
            for a, b in zip(plain.item(i, epoch), cached.item(i, epoch)):
                assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(decodes) == 3 * len(plain) + len(plain)  # the cached dataset decoded each file once
    # A subset (label-fraction runs) shares the cache by file, never by index.
    sub = labelled_subset(cached, [cached.samples[5].stem])
    assert torch.equal(sub.load(0)[0], plain.load(5)[0])
    # The budget bounds it: one 40 x 40 pair is 3,200 bytes (uint8 image and label); room for 3.
    small = dataset(3 * 3200 / 2**20)
    for i in range(len(small)):
        small.load(i)
    assert len(small._cache) == 3 and small._cached_bytes == 9600
