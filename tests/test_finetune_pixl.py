"""PiXL and the semi-supervised mode through unip-finetune itself (issue 11): the options reach the
loop as extensions, each loss term is logged, resume stays exact, bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unip_analysis.checkpoints import build_vit
from unip_train.finetune.cli import main
from unip_train.finetune.config import FinetuneConfig
from unip_train.finetune.engine import KILL_ENV
from unip_train.finetune.trainer import run
from unip_train.synthetic import generate

TINY = "vit_tiny_patch16_224(depth=2,embed_dim=32,num_heads=2,patch_size=8)"
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny timm checkpoint, SODA-layout data, a folder of extra label-free images)."""
    tmp = tmp_path_factory.mktemp("pixl")
    torch.manual_seed(0)
    ckpt = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit(TINY, img_size=32).state_dict().items()}, str(ckpt))
    data = generate(tmp / "soda", "soda", n_train=8, n_test=2, size=40, seed=0)
    extra = generate(tmp / "extra", "soda", n_train=4, n_test=1, size=40, seed=1) / "JPEGImages"
    return ckpt, data, extra


def argv(files, out: Path, *extra: str, iters: int = 4) -> list[str]:
    ckpt, data, _ = files
    return [
        "--backbone", f"timm:{TINY}:{ckpt}", "--dataset", "soda", "--data-root", str(data), "--out", str(out),
        "--img-size", "32", "--batch-size", "4", "--iters", str(iters), "--lr", "3e-3", "--workers", "0",
        "--log-every", "1", "--no-progress", *extra,
    ]  # fmt: skip


def cfg(files, out: Path, **kw) -> FinetuneConfig:
    ckpt, data, _ = files
    base = dict(
        backbone=f"timm:{TINY}:{ckpt}", dataset="soda", data_root=str(data), out=str(out), img_size=32,
        batch_size=4, iters=3, lr=3e-3, workers=0, progress=False, log_every=1,
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def train_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def test_pixl_weight_zero_trains_exactly_as_without_pixl(files, tmp_path):
    run(cfg(files, tmp_path / "none"))
    run(cfg(files, tmp_path / "zero", pixel_loss="pixl", pixl_weight=0.0))
    plain, zero = weights(tmp_path / "none"), weights(tmp_path / "zero")
    assert plain.keys() == zero.keys()
    for k in plain:
        assert torch.equal(plain[k], zero[k]), k
    logged = train_records(tmp_path / "zero")
    assert all(r["pixl"] == 0.0 for r in logged) and len(logged) == 3


def test_pixl_with_label_fraction_logs_every_term_and_writes_the_split(files, tmp_path):
    out = tmp_path / "run"
    metrics = run(cfg(files, out, pixel_loss="pixl", label_fraction="1/2", iters=4))
    records = train_records(out)
    assert len(records) == 4
    for r in records:
        for term in ("loss", "ce", "aux_ce", "semi_ce", "pixl"):
            assert term in r and r[term] == r[term] and abs(r[term]) < 1e6, (term, r)
    assert any(r["pixl"] > 0 for r in records)  # drift pixels pulled toward prototypes
    labelled = (out / "labelled.txt").read_text().split()
    unlabelled = (out / "unlabelled.txt").read_text().split()
    assert len(labelled) == 4 and len(unlabelled) == 4 and not set(labelled) & set(unlabelled)
    config = json.loads((out / "config.json").read_text())
    assert config["label_fraction"] == "1/2" and config["extensions"] == ["semi", "pixl"]
    assert 0.0 <= metrics["miou"] <= 1.0
    # the same seed gives the same split
    again = tmp_path / "again"
    run(cfg(files, again, label_fraction="1/2", iters=1))
    assert (again / "labelled.txt").read_text() == (out / "labelled.txt").read_text()


def test_unlabelled_folder_runs_the_mean_teacher(files, tmp_path):
    out = tmp_path / "run"
    run(cfg(files, out, unlabelled=[str(files[2])], iters=2))
    records = train_records(out)
    assert [r["iter"] for r in records] == [1, 2] and all("semi_ce" in r for r in records)
    assert not (out / "labelled.txt").exists()  # no split without --label-fraction


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_with_pixl_and_label_fraction(files, tmp_path):
    opts = ("--pixel-loss", "pixl", "--label-fraction", "1/2", "--ckpt-every", "2")
    cmd = [sys.executable, "-m", "unip_train.finetune"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        cmd + argv(files, whole, *opts, iters=5), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    died = subprocess.run(
        cmd + argv(files, killed, *opts, iters=5), env=_env(**{KILL_ENV: "3"}), capture_output=True, text=True
    )
    assert died.returncode != 0 and not (killed / "model.pt").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iter"] == 2
    again = subprocess.run(
        cmd + argv(files, killed, *opts, "--resume", iters=5), env=_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    a, b = weights(whole), weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in train_records(whole)] == [r["loss"] for r in train_records(killed)]
    # resuming without the options the run was made with is refused by its record (run.json), naming them
    refused = subprocess.run(
        cmd + argv(files, killed, "--resume", iters=6), env=_env(), capture_output=True, text=True
    )
    assert refused.returncode == 2 and "made with other settings" in refused.stderr
    assert (
        'label_fraction: "1/2" -> null' in refused.stderr and 'pixel_loss: "pixl" -> "none"' in refused.stderr
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--label-fraction", "0"), "--label-fraction 0"),
        (("--label-fraction", "1.5"), "--label-fraction 1.5"),
        (("--pixel-loss", "pixl", "--mode", "lp"), "--mode lp"),
        (("--pixl-weight", "-1", "--pixel-loss", "pixl"), "--pixl-weight -1"),
        (("--unlabelled", "EMPTY"), "--unlabelled"),
        (("--unlabelled", "MISSING"), "--unlabelled"),
    ],
)
def test_bad_semi_and_pixl_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [
        str(empty) if a == "EMPTY" else str(tmp_path / "missing") if a == "MISSING" else a for a in extra
    ]
    out = tmp_path / "run"
    assert main(argv(files, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unip-finetune: error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()
