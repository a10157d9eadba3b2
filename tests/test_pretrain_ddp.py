"""unip-pretrain under torchrun: 2 CPU processes (gloo) agree on the weights and resume exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file
from test_pretrain import (
    ARCH,
    CHECKPOINT,
    IMG,
    TENSORBOARD,
    base_args,
    local_teacher,
    read_log,
    selection_doc,
    subprocess_env,
)

from unip_analysis import selection
from unip_analysis.checkpoints import load_backbone
from unip_train.checkpointing import weights_digest
from unip_train.pretrain import cli as pretrain

pytestmark = pytest.mark.slow


def torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "unip_train.pretrain", *args]
    return subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=300)


def test_two_processes_agree_on_weights_and_resume_exactly(tmp_path: Path):
    images = write_images(tmp_path / "images", n=12)
    teacher = local_teacher(tmp_path / "teacher.safetensors")
    sel = selection.write(tmp_path / "layer_selection.json", selection_doc(teacher, images))

    def args(out: Path, *extra: str) -> list[str]:
        # 12 images / 2 processes / batch 2 = 3 optimizer steps per epoch, 6 in all.
        opts = dict(epochs=2, batch_size=2, accum_iter=1, ckpt_every_steps=2, drop_path=0.1)
        return base_args(sel, images, out, **opts) + list(extra)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = torchrun(args(whole))
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((whole / "student.json").read_text())
    digests = info["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    student = load_backbone("unip", ARCH, whole / "student.safetensors", img_size=IMG)
    assert weights_digest(student.model) == digests[0]
    assert info["recipe"]["world_size"] == 2 and info["recipe"]["effective_batch"] == 4
    log = read_log(whole)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated lines
    ckpt = torch.load(whole / CHECKPOINT, weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 6
    assert sorted(p.name for p in whole.iterdir()) == sorted(
        [
            "checkpoint-2.pt",
            "checkpoint.pt",
            "config.json",
            "log.jsonl",
            "run.json",
            "student.json",
            "student.safetensors",
        ]
        + TENSORBOARD
    )

    # Both processes SIGKILL themselves after step 5 (checkpoint at step 4, mid-epoch 2); resume.
    died = torchrun(args(killed), env=subprocess_env(**{pretrain.KILL_ENV: "5"}))
    assert died.returncode != 0
    assert torch.load(killed / CHECKPOINT, weights_only=True)["step"] == 4
    resumed = torchrun(args(killed, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(whole / "student.safetensors"), load_file(killed / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(killed)] == [r["loss"] for r in log]
