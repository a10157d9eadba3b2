"""unip-pretrain (NMI-HAD distillation): the loss, the student, the data, the CLI end to end, exact resume."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUDA, write_images
from PIL import Image
from safetensors.torch import load_file, save_file

from unip_analysis import analyze, selection
from unip_analysis import checkpoints as ckpts
from unip_analysis import images as imgs
from unip_analysis.attention import qk_logits
from unip_analysis.checkpoints import build_vit, load_backbone
from unip_analysis.errors import ImageError
from unip_analysis.files import sha256_file
from unip_analysis.patterns import default_thresholds
from unip_train import sampling
from unip_train.pretrain import cli as pretrain
from unip_train.pretrain import data as data_pretrain
from unip_train.pretrain import nmi_had as distill
from unip_train.pretrain.cli import CHECKPOINT
from unip_train.pretrain.nmi_had import sincos_pos_embed_2d

# Two blocks keep every run short; patch 8 at 64 px gives an 8x8 token grid, enough for locality.
ARCH = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
IMG = 64
REPO = Path(__file__).resolve().parents[1]
# The run folder's TensorBoard events folder exists when the optional package is installed.
TENSORBOARD = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def local_teacher(path: Path, sharpness: float = 2.0) -> Path:
    """A ViT whose block 1 attends to neighbouring tokens.

    Its tokens are dominated by a strong 2-D sin-cos position signal (each head's 32 channels
    carry a full 2-D code; the patch projection is scaled down), and q = k = sharpness * token,
    so q·k is largest for nearby positions.
    """
    torch.manual_seed(0)
    model = build_vit(ARCH, img_size=IMG)
    grid = tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        per_head = sincos_pos_embed_2d(32, grid, 1)
        model.pos_embed.copy_(torch.cat([per_head, per_head], dim=-1) * 4)
        model.patch_embed.proj.weight.mul_(0.01)
        attn = model.blocks[0].attn
        eye = torch.eye(64) * sharpness
        attn.qkv.weight[:64] = eye
        attn.qkv.weight[64:128] = eye
        attn.qkv.bias.zero_()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def analyse(family: str, weights: Path, images: Path, name: str) -> analyze.ModelAnalysis:
    backbone = load_backbone(family, ARCH, weights, img_size=IMG)
    data = analyze.image_dataset(images, IMG, "infmix")
    return analyze.analyze_backbone(backbone, data, name=name, progress=False)


def selection_doc(teacher: Path, images: Path, name: str = "t", layer: int = 1) -> dict:
    """A real layer_selection.json document for the teacher, with ``layer`` selected."""
    res = analyse("timm", teacher, images, name)
    th = default_thresholds(res.grid)
    entry = analyze.model_entry(res, th, layer=layer, n_boot=20)
    return {
        "schema_version": selection.SCHEMA_VERSION,
        "generator": "tests",
        "created": "2026-01-01T00:00:00Z",
        "thresholds": {"global_max": th.global_max, "local_min": th.local_min},
        "images": {"dir": str(images), "count": res.n_images, "img_size": IMG, "norm": "infmix"},
        "models": {name: entry},
    }


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def base_args(sel: Path, images: Path, out: Path, **overrides) -> list[str]:
    """A short CPU run: 12 images, batch 4, no workers, no progress bar."""
    opts = {
        "--selection": sel,
        "--teacher": "t",
        "--student": ARCH,
        "--img-size": IMG,
        "--infrared": images,
        "--epochs": 1,
        "--batch-size": 4,
        "--accum-iter": 1,
        "--warmup-epochs": 0,
        "--lr": 1e-3,
        "--workers": 0,
        "--out": out,
    }
    opts.update({k if k.startswith("--") else "--" + k.replace("_", "-"): v for k, v in overrides.items()})
    args = []
    for k, v in opts.items():
        if v is None:
            continue
        args += [k] if v is True else [k, str(v)]
    return args + ["--no-progress"]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "unip_train.pretrain", *args]
    return subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Images, the local-attention teacher and its selection file (layer 1), shared by the module."""
    root = tmp_path_factory.mktemp("pretrain")
    images = write_images(root / "images", n=12)
    teacher = local_teacher(root / "teacher.safetensors")
    doc = selection_doc(teacher, images)
    sel = root / "layer_selection.json"
    selection.write(sel, doc)
    return {"root": root, "images": images, "teacher": teacher, "doc": doc, "sel": sel}


def fail(capsys, args: list[str], code: int = 2) -> str:
    """Run the CLI expecting failure; return the one error line."""
    assert pretrain.main(args) == code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("unip-pretrain: error:")]
    assert len(err) == 1, err
    return err[0]


# --- losses ------------------------------------------------------------------------------


def test_kl_and_ce_equal_the_formula_computed_by_hand():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 3, 4, 5)) * 2
    s = rng.normal(size=(2, 3, 4, 5)) * 2
    kl_rows, ce_rows = [], []
    for b, h, q in itertools.product(range(2), range(3), range(4)):
        p = [math.exp(v) for v in t[b, h, q]]
        p = [v / sum(p) for v in p]
        r = [math.exp(v) for v in s[b, h, q]]
        r = [v / sum(r) for v in r]
        kl_rows.append(sum(pk * math.log(pk / rk) for pk, rk in zip(p, r)))
        ce_rows.append(-sum(pk * math.log(rk) for pk, rk in zip(p, r)))
    tt, ss = torch.tensor(t), torch.tensor(s)
    assert distill.kl_loss(tt, ss).dtype == torch.float32
    assert distill.kl_loss(tt, ss).item() == pytest.approx(sum(kl_rows) / len(kl_rows), rel=1e-5)
    assert distill.ce_loss(tt, ss).item() == pytest.approx(sum(ce_rows) / len(ce_rows), rel=1e-5)
    assert distill.kl_loss(tt, tt).item() == pytest.approx(0.0, abs=1e-6)
    # bf16 inputs are computed in float32 too
    assert distill.kl_loss(tt.bfloat16(), ss.bfloat16()).dtype == torch.float32


# --- student ------------------------------------------------------------------------------


def test_student_has_teacher_heads_last_mae_init_and_frozen_unused_parts():
    torch.manual_seed(0)
    model = distill.build_student(ARCH, last_heads=4, img_size=IMG)
    assert [b.attn.num_heads for b in model.blocks] == [2, 4]
    assert model.blocks[-1].attn.head_dim == 16
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))
    assert torch.allclose(model.pos_embed[:, 1:], distill.sincos_pos_embed_2d(64, (8, 8), 0))
    assert model.cls_token.std().item() < 0.05
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(64))
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(192))
    bound = math.sqrt(6 / (64 + 192))  # xavier-uniform bound of qkv
    assert model.blocks[0].attn.qkv.weight.abs().max().item() <= bound
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.attn.qkv.weight" in trainable and "blocks.1.norm1.weight" in trainable
    assert not trainable & {"blocks.1.mlp.fc1.weight", "blocks.1.attn.proj.weight", "norm.weight"}
    # Every trainable parameter gets a gradient from the logits (DDP needs no unused search).
    logits = distill.Student(model)(torch.randn(2, 3, IMG, IMG))
    assert logits.shape == (2, 4, 65, 65)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sincos_neighbours_are_more_similar_than_far_tokens():
    pe = distill.sincos_pos_embed_2d(64, (8, 8), 0)[0]
    sim = pe @ pe.T
    assert sim[0, 1] > sim[0, 63] and sim[9, 10] > sim[9, 55]


# --- data ------------------------------------------------------------------------------------


def test_per_class_cap_and_source_cap(tmp_path):
    for cls in ("a", "b"):
        write_images(tmp_path / "rgb" / cls, n=5, seed=len(cls))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "rgb" / "flat.png")
    src = data_pretrain.collect_source(tmp_path / "rgb", "rgb", per_class_cap=2)
    assert src.found == 11 and len(src.files) == 5  # 2 per class + the file outside any class
    capped = data_pretrain.collect_source(tmp_path / "rgb", "rgb", max_images=3)
    assert len(capped.files) == 3 and capped.summary()["found"] == 11


def test_rgb_folders_become_grey_infrared_stay_as_read(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (tmp_path / "c").mkdir()
    Image.fromarray(rgb).save(tmp_path / "c" / "x.png")
    as_rgb = data_pretrain.InfMix(
        [data_pretrain.collect_source(tmp_path / "c", "rgb")], 16, (0,) * 3, (1,) * 3
    )
    as_ir = data_pretrain.InfMix(
        [data_pretrain.collect_source(tmp_path / "c", "infrared")], 16, (0,) * 3, (1,) * 3
    )
    grey = as_rgb.load(0)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert np.allclose(grey[0].numpy(), expected, atol=1e-5)
    assert not torch.equal(as_ir.load(0)[0], as_ir.load(0)[1])


def test_augmentation_depends_only_on_seed_epoch_and_index(image_dir):
    src = data_pretrain.collect_source(image_dir, "infrared")
    ds = data_pretrain.InfMix([src], 32, *imgs.NORMALIZATIONS["infmix"], seed=3)
    a, _ = ds[1]
    torch.manual_seed(123)  # global RNG history must not matter
    b, _ = ds[1]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a)
    # normalization: mean 0.3801 / std 0.1871
    raw = data_pretrain.augment(ds.load(1), 32, sampling.sample_generator(3, 0, 1))
    assert torch.allclose(a, (raw - 0.3801) / 0.1871, atol=1e-6)


def test_sampler_partitions_each_epoch_and_skips_for_resume():
    shards = [sampling.EpochSampler(10, world_size=3, rank=r, seed=1) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    parts = [list(s) for s in shards]
    assert all(len(p) == 4 for p in parts)  # padded to 12 = 3 x 4
    assert set(itertools.chain(*parts)) == set(range(10))
    again = sampling.EpochSampler(10, 3, 0, seed=1)
    again.set_epoch(2, start=2)
    assert list(again) == parts[0][2:]
    again.set_epoch(3)
    assert list(again) != parts[0]


# --- the command line, end to end ---------------------------------------------------------------


def test_distillation_lowers_the_loss_and_moves_attention_toward_the_teacher(setup, tmp_path):
    run = tmp_path / "run"
    args = base_args(setup["sel"], setup["images"], run, epochs=60, lr=5e-3, warmup_epochs=1)
    assert pretrain.main(args) == 0
    log = read_log(run)
    assert len(log) == 180 and log[-1]["step"] == 180
    assert set(log[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "data_time"}
    assert all(r["data_time"] >= 0 for r in log)
    first = log[0]["loss"]
    last = float(np.mean([r["loss"] for r in log[-3:]]))
    print(f"\nKL loss: first step {first:.4f}, last 3 steps {last:.4f} ({last / first:.2f} x)")
    assert last <= 0.3 * first

    # The student loads through the registry and its last layer's NMI moved toward the teacher's.
    meta = ckpts.safetensors_metadata(run / "student.safetensors")
    assert meta["format"] == "unip-student" and json.loads(meta["heads_per_layer"]) == [2, 2]
    teacher_nmi = analyse("timm", setup["teacher"], setup["images"], "t").layer_nmi()[0]
    after = analyse("unip", run / "student.safetensors", setup["images"], "s").layer_nmi()[-1]
    torch.manual_seed(0)
    init = distill.build_student(ARCH, last_heads=2, img_size=IMG)
    distill.save_student(tmp_path / "init.safetensors", init, ARCH)
    before = analyse("unip", tmp_path / "init.safetensors", setup["images"], "s0").layer_nmi()[-1]
    print(
        f"NMI last layer: student before {before:.4f}, after {after:.4f}; teacher layer 1 {teacher_nmi:.4f}"
    )
    assert teacher_nmi > before + 0.2  # the teacher is clearly local, the fresh student is not
    assert abs(after - teacher_nmi) < 0.25 * abs(before - teacher_nmi)  # 3/4 of the way or more

    info = json.loads((run / "student.json").read_text())
    assert info["arch"] == ARCH and info["heads_per_layer"] == [2, 2]
    assert info["teacher"]["layer"] == 1 and info["teacher"]["weights_sha256"] == sha256_file(
        setup["teacher"]
    )
    assert info["data"]["sources"][0]["used"] == 12 and info["data"]["skipped_unreadable"] == 0
    assert info["recipe"]["effective_batch"] == 4 and info["recipe"]["world_size"] == 1
    assert info["recipe"]["weight_decay"] == 0.05 and info["recipe"]["loss"] == "kl"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [
            "checkpoint-20.pt",
            "checkpoint-40.pt",
            "checkpoint-60.pt",
            "checkpoint.pt",
            "config.json",
            "log.jsonl",
            "run.json",
            "student.json",
            "student.safetensors",
        ]
        + TENSORBOARD
    )
    record = json.loads((run / "run.json").read_text())  # every file listed: --overwrite moves these
    assert record["command"] == "unip-pretrain"
    assert {p.name for p in run.iterdir()} - {"run.json"} <= set(record["files"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 60 and ckpt["step"] == 180


def test_unreadable_images_are_skipped_and_counted_rgb_made_grey_ce_loss(setup, tmp_path, capsys):
    data = write_images(tmp_path / "ir", n=6)
    (data / "broken.png").write_bytes(b"not a png")
    rgb = write_images(tmp_path / "rgb" / "cls", n=3, seed=1)
    run = tmp_path / "run"
    args = base_args(setup["sel"], data, run, loss="ce", rgb=rgb.parent, per_class_cap=2)
    assert pretrain.main(args) == 0
    assert "unreadable image skipped" in capsys.readouterr().err
    info = json.loads((run / "student.json").read_text())
    assert info["data"]["skipped_unreadable"] == 1
    assert [s["used"] for s in info["data"]["sources"]] == [7, 2]
    assert info["data"]["sources"][1]["kind"] == "rgb"
    assert info["recipe"]["loss"] == "ce"


def test_help_documents_every_option_and_the_effective_batch(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    for spec in pretrain.COMMAND.specs:
        assert spec.flag in out and spec.help.split()[0] in out
    assert "4096 = 256 x 8 x 2" in out and "--batch-size x --accum-iter x processes" in out
    assert "5 (nmi-had), 30 (pad)" in out  # the recipe defaults each method fills in
    defaults, _ = pretrain.parse_args(["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o"])
    assert (defaults.epochs, defaults.warmup_epochs, defaults.blr, defaults.weight_decay) == (
        100,
        5,
        1.5e-4,
        0.05,
    )
    assert (defaults.batch_size, defaults.accum_iter, defaults.img_size, defaults.drop_path) == (
        256,
        8,
        224,
        0.1,
    )
    assert (defaults.save_every, defaults.student, defaults.norm) == (20, "vit_small_patch16_224", "infmix")
    assert (defaults.ckpt_every, defaults.loss, defaults.temperature, defaults.grey) == (50, "kl", 1.0, "all")


# --- refusals -------------------------------------------------------------------------------------


def test_refuses_wrong_schema_version(setup, tmp_path, capsys):
    doc = dict(setup["doc"], schema_version=3)
    sel = write_json(tmp_path / "sel.json", doc)
    assert "schema_version is 3" in fail(capsys, base_args(sel, setup["images"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert pretrain.main(base_args(sel, setup["images"], tmp_path / "run") + ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_refuses_unknown_teacher(setup, tmp_path, capsys):
    args = base_args(setup["sel"], setup["images"], tmp_path / "run", teacher="mae_l")
    assert "no model named 'mae_l'" in fail(capsys, args)


def test_refuses_null_selected_layer_unless_layer_given(setup, tmp_path, capsys):
    doc = copy.deepcopy(setup["doc"])
    doc["models"]["t"].update(selected_layer=None, selected_heads=None)
    sel = write_json(tmp_path / "sel.json", doc)
    assert "pass --layer N" in fail(capsys, base_args(sel, setup["images"], tmp_path / "run"))
    assert pretrain.main(base_args(sel, setup["images"], tmp_path / "run", layer=1)) == 0
    assert json.loads((tmp_path / "run" / "student.json").read_text())["teacher"]["layer"] == 1
    # A finished run folder is not overwritten by accident.
    again = base_args(sel, setup["images"], tmp_path / "run", layer=1)
    assert "already holds a unip-pretrain run" in fail(capsys, again)


def test_refuses_teacher_whose_sha256_changed(setup, tmp_path, capsys):
    doc = copy.deepcopy(setup["doc"])
    doc["models"]["t"]["weights_sha256"] = "0" * 64
    sel = write_json(tmp_path / "sel.json", doc)
    assert "differs from 000000000000" in fail(capsys, base_args(sel, setup["images"], tmp_path / "run"))


def test_refuses_empty_dataset_and_too_few_images(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no images found" in fail(capsys, base_args(setup["sel"], tmp_path / "empty", tmp_path / "run"))
    args = base_args(setup["sel"], setup["images"], tmp_path / "run", batch_size=8, accum_iter=2)
    assert "fewer than one optimizer step of 8 x 2" in fail(capsys, args)


def test_refuses_student_with_a_different_token_grid(setup, tmp_path, capsys):
    other = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2)"  # patch 16: 4x4 grid
    args = base_args(setup["sel"], setup["images"], tmp_path / "run", student=other)
    assert "8x8 patch grid (patch 8)" in fail(capsys, args)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(setup, tmp_path, capsys):
    run = tmp_path / "run"
    args = base_args(setup["sel"], setup["images"], run, lr=1e30, ckpt_every_steps=1)
    line = fail(capsys, args, code=1)
    assert "at optimizer step 2 (epoch 0" in line
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 1 and ckpt["iter_in_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len(read_log(run)) == 1 and not (run / "student.safetensors").exists()


# --- exact resume ---------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(setup, tmp_path):
    """2 epochs x 3 optimizer steps (2 micro-batches each); checkpoint every 2 steps; the killed run
    dies right after step 5, so the resumed run restarts mid-epoch from step 4 and redoes step 5."""

    def args(out: Path, *extra: str) -> list[str]:
        common = dict(epochs=2, batch_size=2, accum_iter=2, ckpt_every_steps=2, drop_path=0.1)
        return base_args(setup["sel"], setup["images"], out, **common) + list(extra)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_cli(args(whole))
    assert done.returncode == 0, done.stderr
    died = run_cli(args(killed), env=subprocess_env(**{pretrain.KILL_ENV: "5"}))
    assert died.returncode == -signal.SIGKILL, died.stderr
    ckpt = torch.load(killed / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["step"]) == (1, 2, 4)
    assert len(read_log(killed)) == 5 and not (killed / "student.safetensors").exists()
    resumed = run_cli(args(killed, "--resume", str(killed / CHECKPOINT)))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a = load_file(whole / "student.safetensors")
    b = load_file(killed / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(whole / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(killed / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert [r["loss"] for r in read_log(whole)] == [r["loss"] for r in read_log(killed)]


def test_bf16_autocast_on_cpu_and_fp16_refused_without_cuda(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain.main(base_args(setup["sel"], setup["images"], run, amp="bf16")) == 0
    assert json.loads((run / "student.json").read_text())["recipe"]["amp_dtype"] == "bfloat16"
    assert all(math.isfinite(r["loss"]) for r in read_log(run))
    assert "fp16 needs CUDA" in fail(
        capsys, base_args(setup["sel"], setup["images"], tmp_path / "r2", amp="fp16")
    )


def test_resume_refuses_a_checkpoint_with_other_batch_settings(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain.main(base_args(setup["sel"], setup["images"], run)) == 0
    args = base_args(setup["sel"], setup["images"], run, batch_size=2, epochs=2, resume="auto")
    # The run folder's record refuses it first (another run), naming what differs.
    assert "made with other settings (batch_size: 4 -> 2)" in fail(capsys, args)
    # Its checkpoint, resumed into a new folder: the checkpoint's own check refuses it.
    args = base_args(
        setup["sel"],
        setup["images"],
        tmp_path / "new",
        batch_size=2,
        epochs=2,
        resume=str(run / "checkpoint.pt"),
    )
    assert "saved with batch_size=4, this run has 2" in fail(capsys, args)
    # Same settings, more epochs: continues from the end of epoch 1.
    assert pretrain.main(base_args(setup["sel"], setup["images"], run, epochs=2, resume="auto")) == 0
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]


# --- fidelity to the reference recipe (issue 9) ------------------------------------------------


def test_student_drop_path_is_the_same_rate_in_every_block():
    model = distill.build_student("vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2)", 2, 32, 0.1)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks]
    assert rates == [(0.1, 0.1)] * 4  # timm's ramp would give 0, 0.033, 0.067, 0.1
    plain = distill.build_student(ARCH, 2, IMG, 0.0)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in plain.blocks)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_distilled_logits_reach_the_loss_in_float32_under_bf16_autocast(setup, tmp_path, monkeypatch, device):
    """A full CLI step with --amp bf16: the blocks run in bf16, the distilled q·k logits never do."""
    seen = []

    def recording_kl(teacher_logits, student_logits):
        seen.append((teacher_logits.dtype, student_logits.dtype, torch.is_autocast_enabled(device)))
        return distill.kl_loss(teacher_logits, student_logits)

    monkeypatch.setitem(distill.LOSSES, "kl", recording_kl)
    run = tmp_path / "run"
    assert pretrain.main(base_args(setup["sel"], setup["images"], run, amp="bf16", device=device)) == 0
    assert len(seen) == 3  # 12 images / batch 4
    assert all(s == (torch.float32, torch.float32, True) for s in seen)  # autocast was on around them
    # Without the float32 guard the same autocast gives bf16 logits: the guard is what changes them.
    blk = distill.build_student(ARCH, 2, IMG).blocks[-1]
    tokens = torch.randn(2, 65, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qk_logits(blk.attn, blk.norm1(tokens)).dtype == torch.bfloat16
        guarded = distill.float32_qk_logits(blk, tokens)
    assert guarded.dtype == torch.float32
    torch.testing.assert_close(guarded, qk_logits(blk.attn, blk.norm1(tokens)), rtol=0, atol=0)


def test_weight_decay_follows_the_reference_cls_token_decays(setup):
    _, method = pretrain.parse_args(base_args(setup["sel"], setup["images"], Path("unused")))
    method.build(torch.device("cpu"))
    decay = {n: g["weight_decay"] for g in method.param_groups(0.05) for n in g["param_names"]}
    assert decay["cls_token"] == 0.05  # timm's param_groups_weight_decay, as UNIP's main_pretrain.py
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["patch_embed.proj.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == 0.0 and decay["blocks.0.norm1.weight"] == 0.0
    assert "pos_embed" not in decay  # fixed sin-cos, never trained


def data_args(**kw) -> argparse.Namespace:
    base = dict(infrared=[], infpre=[], rgb=[], per_class_cap=None, max_images_per_source=None, grey="all")
    return argparse.Namespace(**{**base, **kw})


def colour_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def is_grey(img: torch.Tensor) -> bool:
    return torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_every_image_is_grey_by_default_infrared_included(tmp_path):
    colour_image(tmp_path / "ir" / "pseudo_colour.png")
    colour_image(tmp_path / "rgb" / "c" / "x.png", seed=1)
    by_choice = {}
    for grey in ("all", "rgb", "none"):
        args = data_args(infrared=[tmp_path / "ir"], rgb=[tmp_path / "rgb"], grey=grey)
        ds = data_pretrain.InfMix(data_pretrain.collect_sources(args), 16, (0,) * 3, (1,) * 3)
        by_choice[grey] = [is_grey(ds.load(0)), is_grey(ds.load(1))]  # infrared, rgb
    assert by_choice == {"all": [True, True], "rgb": [False, True], "none": [False, False]}
    nmi, _ = pretrain.parse_args(["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o"])
    assert nmi.grey == "all"


def test_infpre_root_is_read_as_dataset_thermal_only(tmp_path, capsys):
    root = tmp_path / "InfPre"
    write_images(root / "ds1" / "thermal", n=3)
    write_images(root / "ds1" / "rgb", n=4, seed=1)  # paired visible images: not InfPre
    write_images(root / "ds2" / "thermal", n=2, seed=2, sizes=((32, 32),))
    (root / "ds3" / "thermal").mkdir(parents=True)  # no images
    write_images(root / "notes", n=2, seed=3)  # no thermal/ folder: not a dataset
    src = data_pretrain.collect_infpre(root)
    assert src.kind == "infpre" and src.found == 5 and len(src.files) == 5
    assert all("thermal" in f.relative_to(root).parts[1] for f in src.files)
    assert "ds3" in src.summary()["note"]
    # --per-class-cap is for ImageNet class folders: InfPre and --infrared folders are never capped.
    args = data_args(infpre=[root], infrared=[root / "ds1"], per_class_cap=1)
    assert [len(s.files) for s in data_pretrain.collect_sources(args)] == [7, 5]
    with pytest.raises(ImageError, match="no <dataset>/thermal/ folders"):
        data_pretrain.collect_infpre(root / "ds1" / "rgb")


def test_config_file_config_json_and_bare_resume(setup, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'selection = "{setup["sel"]}"\nteacher = "t"\nepochs = 1\nbatch-size = 4\n')
    run = tmp_path / "run"
    args = base_args(setup["sel"], setup["images"], run)
    args = [a for a in args if a not in ("--selection", str(setup["sel"]), "--teacher", "t")]
    args += ["--epochs", "2", "--ckpt-every-steps", "1"]
    killed = run_cli(["--config", str(cfg)] + args, env=subprocess_env(**{pretrain.KILL_ENV: "2"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    written = json.loads((run / "config.json").read_text())  # before the first step
    assert len(read_log(run)) == 2 and written["infrared"] == [str(setup["images"])]
    assert written["epochs"] == 2 and written["batch_size"] == 4 and written["selection"] == str(setup["sel"])
    assert written["method"] == "nmi-had" and written["effective_batch"] == 4
    assert written["started_from"]["teacher"]["layer"] == 1
    # The run's own config.json is a valid --config; a bare --resume continues this run folder.
    # --infrared on the command line replaces the file's list (it does not add the folder twice).
    again = ["--config", str(run / "config.json"), "--infrared", str(setup["images"]), "--no-progress"]
    assert pretrain.main(again + ["--resume"]) == 0
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / CHECKPOINT, weights_only=True)["recipe"]["images"] == 12


# --- the one grammar (issue 21) -------------------------------------------------------------------


def test_missing_teacher_is_named_before_missing_data(capsys):
    line = fail(capsys, ["--out", "o"])
    assert "--method nmi-had needs --selection and --teacher" in line and "no data" not in line
    assert "no data" in fail(capsys, ["--selection", "s", "--teacher", "t", "--out", "o"])


def test_old_spellings_still_work_with_a_notice(capsys):
    new, _ = pretrain.parse_args(
        ["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o", "--img-size", "64",
         "--precision", "fp32", "--workers", "3", "--ckpt-every", "7"]
    )  # fmt: skip
    assert capsys.readouterr().err == ""
    old, _ = pretrain.parse_args(
        ["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o", "--input-size", "64",
         "--amp", "none", "--num-workers", "3", "--ckpt-every-steps", "7"]
    )  # fmt: skip
    assert old == new
    err = capsys.readouterr().err
    for old_name, new_name in (("--input-size", "--img-size"), ("--amp", "--precision"),
                               ("--num-workers", "--workers"), ("--ckpt-every-steps", "--ckpt-every")):  # fmt: skip
        assert f"unip-pretrain: note: {old_name} is deprecated; use {new_name}" in err
    assert "--precision none is deprecated; use --precision fp32" in err


def test_config_json_given_back_reproduces_the_resolved_options(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain.main(base_args(setup["sel"], setup["images"], run, blr=2e-4, clip_grad=1.0)) == 0
    written = json.loads((run / "config.json").read_text())
    opts, _ = pretrain.parse_args(["--config", str(run / "config.json")])
    recorded = pretrain.record(opts)
    assert recorded == {k: v for k, v in written.items() if k not in pretrain.DERIVED}
    assert (recorded["warmup_epochs"], recorded["grey"], recorded["drop_path"]) == (0, "all", 0.1)
    assert "init" not in recorded and "resume" not in recorded  # PAD's options; this process' only
    # An old run's config.json (earlier option names) reads too, with a notice per renamed key.
    old = {OLD: written[NEW] for OLD, NEW in (("input_size", "img_size"), ("num_workers", "workers"),
                                               ("ckpt_every_steps", "ckpt_every"))}  # fmt: skip
    old.update(
        {k: v for k, v in written.items() if k not in ("img_size", "workers", "ckpt_every", "precision")}
    )
    old["amp"] = "none"
    write_json(tmp_path / "old.json", old)
    again, _ = pretrain.parse_args(["--config", str(tmp_path / "old.json")])
    assert pretrain.record(again) == {**recorded, "precision": "fp32"}
    assert "key input_size is deprecated" in capsys.readouterr().err


def test_a_finished_run_folder_is_never_reused_silently(setup, tmp_path, capsys):
    run = tmp_path / "run"
    args = base_args(setup["sel"], setup["images"], run)
    assert pretrain.main(args) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = fail(capsys, args)
    assert "already holds a unip-pretrain run" in line and "--resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # --resume and --overwrite together: one line.
    assert "together" in fail(capsys, args + ["--resume", "--overwrite"])
    # --overwrite: the old run moves to previous-<time>/, a new one is written.
    assert pretrain.main(args + ["--overwrite"]) == 0
    (aside,) = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert {p.name for p in aside.iterdir()} >= {"checkpoint.pt", "student.safetensors", "log.jsonl"}
    assert (aside / "student.safetensors").read_bytes() == before[run / "student.safetensors"]
    assert (run / "student.safetensors").exists() and len(read_log(run)) == 3
    # --resume with nothing to resume: one line, nothing written.
    line = fail(capsys, base_args(setup["sel"], setup["images"], tmp_path / "new") + ["--resume"])
    assert "nothing to resume (no checkpoint.pt)" in line and not (tmp_path / "new").exists()


def test_overwrite_keeps_the_teacher_and_selection_inside_out(setup, tmp_path, capsys):
    """run.json names the teacher the selection points to; --overwrite moves the run's own files
    only: a teacher checkpoint and selection file kept inside --out stay, and the new run reads them."""
    run = tmp_path / "run"
    run.mkdir()
    teacher = run / "teacher.safetensors"
    teacher.write_bytes(setup["teacher"].read_bytes())
    doc = json.loads(setup["sel"].read_text())
    doc["models"]["t"]["weights"] = str(teacher)
    sel = write_json(run / "layer_selection.json", doc)
    args = base_args(sel, setup["images"], run)
    assert pretrain.main(args) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["command"] == "unip-pretrain" and str(teacher) in record["identity"]["digests"]
    assert pretrain.main(args + ["--overwrite"]) == 0, capsys.readouterr().err
    (aside,) = run.glob("previous-*")
    assert teacher.is_file() and sel.is_file() and (aside / "student.safetensors").is_file()
    assert not (aside / teacher.name).exists() and not (aside / sel.name).exists()
    preds = tmp_path / "preds"  # another command's folder: refused, even with --overwrite
    write_json(preds.mkdir() or preds / "run.json", {"command": "unip-predict", "identity": {}, "files": []})
    line = fail(capsys, base_args(setup["sel"], setup["images"], preds, overwrite=True))
    assert "holds a unip-predict run" in line and sorted(p.name for p in preds.iterdir()) == ["run.json"]


def test_a_run_folder_of_an_earlier_version_resumes_from_checkpoint_last(setup, tmp_path):
    """Before issue 21 the resumable file was checkpoint-last.pt and its recipe used the old option
    names: such a folder continues with a bare --resume, into checkpoint.pt."""
    run = tmp_path / "run"
    assert pretrain.main(base_args(setup["sel"], setup["images"], run)) == 0
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    renames = {
        "img_size": "input_size",
        "precision": "amp",
        "workers": "num_workers",
        "ckpt_every": "ckpt_every_steps",
    }
    ckpt["recipe"] = {renames.get(k, k): v for k, v in ckpt["recipe"].items()}
    torch.save(ckpt, run / pretrain.OLD_CHECKPOINT)
    (run / CHECKPOINT).unlink()
    assert pretrain.main(base_args(setup["sel"], setup["images"], run, epochs=2) + ["--resume"]) == 0
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 6


def test_print_config_shows_the_options_as_yaml(capsys):
    import yaml

    argv = ["--method", "pad", "--init", "mae:a:b.pth", "--infrared", "d", "--infrared", "e", "--out", "o"]
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(argv + ["--print-config"])
    assert exit_.value.code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["infrared"] == ["d", "e"] and shown["out"] == "o" and shown["init"] == "mae:a:b.pth"
