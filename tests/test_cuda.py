"""The CUDA paths: fine-tuning in each precision, channels-last and torch.compile against the plain
run, distillation and PAD under bf16 autocast, torchrun with more processes than GPUs.

Run on a GPU machine with ``pytest -m cuda`` (the default suite hides CUDA: see conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unip_train.finetune.config import FinetuneConfig
from unip_train.finetune.trainer import run
from unip_train.synthetic import generate

pytestmark = pytest.mark.cuda  # skipped without CUDA (conftest.py)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return generate(tmp_path / "data", "folder", n_train=8, n_test=3, size=48, seed=0)


def ft_config(ckpt, data: Path, out: Path, **kw) -> FinetuneConfig:
    arch, path = ckpt
    base = dict(
        backbone=f"timm:{arch}:{path}", dataset="folder", data_root=str(data), out=str(out), img_size=32,
        head_channels=16, aux_channels=16, batch_size=4, workers=0, lr=1e-3, progress=False, log_every=2,
        iters=4, device="cuda",
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")["state_dict"]


@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "fp32"])
def test_finetune_runs_in_each_precision(tiny_timm_checkpoint, folder, tmp_path, amp):
    out = tmp_path / amp
    metrics = run(ft_config(tiny_timm_checkpoint, folder, out, precision=amp))
    assert 0.0 <= metrics["miou"] <= 1.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2 and all(r["loss"] > 0 for r in steps)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")
    # Loss scaling runs with fp16 only; its scale is checkpointed for --resume.
    assert bool(ckpt["scaler"]) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in weights(out).values() if v.is_floating_point())


def test_channels_last_and_compile_train_as_the_plain_run(
    tiny_timm_checkpoint, folder, tmp_path, monkeypatch
):
    """float32 without TF32, drop path and the heads' dropout (compiled code draws its random numbers
    its own way): NHWC convolutions and the compiled step give the plain run's loss at every step (up
    to the kernels' summation order) and save the same weight names."""
    monkeypatch.setattr(torch.nn.Dropout2d, "forward", lambda self, x: x)

    def losses(out: Path) -> list[float]:
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in log if "loss" in r]

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        plain = tmp_path / "plain"
        run(
            ft_config(
                tiny_timm_checkpoint,
                folder,
                plain,
                precision="fp32",
                log_every=1,
                drop_path=0.0,
                channels_last=False,
            )
        )
        for name, kw in (
            ("cl", {"channels_last": True}),
            ("compiled", {"compile": True, "channels_last": False}),
        ):
            opts = dict(precision="fp32", log_every=1, drop_path=0.0, **kw)
            run(ft_config(tiny_timm_checkpoint, folder, tmp_path / name, **opts))
            assert weights(tmp_path / name).keys() == weights(plain).keys()  # no "_orig_mod." names
            assert losses(tmp_path / name) == pytest.approx(losses(plain), rel=1e-4), name
            assert len(losses(plain)) == 4
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_torchrun_with_more_processes_than_gpus_is_one_line(tiny_timm_checkpoint, folder, tmp_path):
    arch, path = tiny_timm_checkpoint
    n = torch.cuda.device_count() + 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
        "-m", "unip_train.finetune", "--backbone", f"timm:{arch}:{path}", "--dataset", "folder",
        "--data-root", str(folder), "--out", str(tmp_path / "run"), "--crop", "32", "--iters", "2",
        "--batch-size", str(2 * n), "--device", "cuda", "--no-progress",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    assert (
        f"which has {n - 1} GPU(s): one process per GPU (--nproc-per-node {n - 1}), or --device cpu"
        in res.stderr
    )
    assert "invalid device ordinal" not in res.stderr  # what CUDA said before: no hint what to change
