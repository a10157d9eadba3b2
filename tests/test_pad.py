"""PAD (unip-pretrain --method pad): the adapter block, the MAE objective, what trains and what
stays frozen, the run folder, exact resume across the scale-predictor unfreeze point, torchrun,
and the round trip through the ``pad`` family into unip-finetune and unip-analyze."""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUDA, write_images
from safetensors.torch import load_file, save_file
from test_pretrain import read_log, run_cli, subprocess_env

from unip_analysis import pad_vit
from unip_analysis.checkpoints import build_vit, load_backbone, safetensors_metadata
from unip_analysis.errors import SpecError
from unip_analysis.files import sha256_file
from unip_analysis.images import find_images
from unip_train import synthetic
from unip_train.pretrain import cli as pretrain
from unip_train.pretrain import mae, rois
from unip_train.pretrain.cli import CHECKPOINT
from unip_train.pretrain.pad import default_scale_frozen_epochs

ARCH = "vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=2,patch_size=8)"
IMG = 32
DEC = {"dim": 32, "depth": 1, "heads": 4}


def mae_model(seed: int = 0) -> tuple[torch.nn.Module, mae.MaeDecoder]:
    """A tiny MAE encoder and decoder with random, non-trivial weights (LayerNorms too)."""
    torch.manual_seed(seed)
    encoder = build_vit(ARCH, img_size=IMG)
    decoder = mae.MaeDecoder(64, (4, 4), 8, DEC["dim"], DEC["depth"], DEC["heads"]).mae_init()
    with torch.no_grad():
        for name, p in list(encoder.named_parameters()) + list(decoder.named_parameters()):
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return encoder, decoder


def mae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    encoder, decoder = mae_model(seed)
    return {**encoder.state_dict(), **decoder.state_dict()}


def write_mae_file(path: Path, seed: int = 0) -> Path:
    """MAE's pre-training checkpoint format: ckpt["model"] with the encoder, decoder_* and mask_token."""
    torch.save({"model": mae_state(seed), "epoch": 799}, path)
    return path


def to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMSelfSup 1.x / MMPretrain key names of an MAE (mmcls TransformerEncoderLayer)."""
    out = {}
    for k, v in sd.items():
        enc = not k.startswith(("decoder_", "mask_token"))
        k = {"norm.weight": "ln1.weight", "norm.bias": "ln1.bias"}.get(k, k)
        k = {"decoder_norm.weight": "ln1.weight", "decoder_norm.bias": "ln1.bias"}.get(k, k)
        k = re.sub(r"^blocks\.", "layers.", k)
        k = k.replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
        k = k.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        out[("backbone." if enc else "neck.") + k] = v
    return out


def msip(root: Path, n: int = 8) -> Path:
    """MSIP's layout: ROOT/<subset>/thermal/*, images of mixed sizes larger than the crop, with PAD's
    proposal files beside the images of ds1 (ROOT/ds1/roi/<stem>.txt); ds2 has none."""
    write_images(root / "ds1" / "thermal", n=n // 2, sizes=((80, 96), (64, 64)))
    write_images(root / "ds2" / "thermal", n=n - n // 2, seed=1, sizes=((72, 100),))
    for image in find_images(root / "ds1" / "thermal"):
        rois.write_proposals(rois.proposal_file(root, root, image), [(4, 6, 48, 44), (10, 2, 40, 60)])
    return root


def pad_args(base: Path, images: Path, out: Path, *extra: str, **overrides) -> list[str]:
    opts = {
        "--method": "pad",
        "--init": f"mae:{ARCH}:{base}",
        "--infpre": images,
        "--input-size": IMG,
        "--epochs": 2,
        "--batch-size": 2,
        "--accum-iter": 1,
        "--warmup-epochs": 0,
        "--lr": 1e-3,
        "--decoder-heads": DEC["heads"],
        "--scale-frozen-epochs": 1,
        "--num-workers": 0,
        "--save-every": 1,
        "--out": out,
    }
    opts.update({"--" + k.replace("_", "-"): v for k, v in overrides.items()})
    args = [str(x) for k, v in opts.items() if v is not None for x in (k, v)]
    return args + list(extra) + ["--no-progress"]


def fail(capsys, args: list[str]) -> str:
    assert pretrain.main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("unip-pretrain: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pad")
    return {"root": root, "base": write_mae_file(root / "mae.pth"), "images": msip(root / "MSIP")}


@pytest.fixture(scope="module")
def trained(files) -> dict:
    """One short PAD run: 2 epochs x 4 steps, scale predictors frozen for epoch 0."""
    out = files["root"] / "run"
    assert pretrain.main(pad_args(files["base"], files["images"], out, rois="none")) == 0
    return {**files, "run": out}


# --- the adapter block -------------------------------------------------------------------------------


def test_wrapped_model_equals_the_base_model_in_train_and_eval_mode():
    encoder, _ = mae_model()
    base = copy.deepcopy(encoder)
    pad_vit.add_adapters(encoder, 16)
    x = torch.randn(3, 3, IMG, IMG)
    for mode in (True, False):
        encoder.train(mode)
        base.train(mode)
        torch.testing.assert_close(encoder.forward_features(x), base.forward_features(x), atol=1e-6, rtol=0)
    tokens = base.patch_embed(x)
    _, s = encoder.blocks[0].forward_with_scale(torch.cat([base.cls_token.expand(3, -1, -1), tokens], 1))
    assert torch.equal(s, torch.full_like(s, 0.5))  # every scale starts at 0.5
    # The adapted block stays a timm Block with timm's Attention: attention capture keeps working.
    assert all(isinstance(b, pad_vit.Block) for b in encoder.blocks)
    assert type(encoder.blocks[0].attn).__name__ == "Attention"
    pad_vit.drop_adapters(encoder)
    assert encoder.state_dict().keys() == base.state_dict().keys()


def test_block_computes_the_formula_of_method_md():
    """out = h + s * a + m with h = x + Attn(LN1(x)), m = MLP(LN2(h)), a = Up(ReLU(Down(LN_a(h)))),
    s = sigmoid(W_s [m; a]); checked op by op with non-zero adapter and scale weights."""
    encoder, _ = mae_model()
    pad_vit.add_adapters(encoder, 8)
    blk = encoder.blocks[0].eval()
    with torch.no_grad():
        for p in [blk.adapter.up.weight, blk.adapter.up.bias, blk.scale_pred.weight]:
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        h = x + blk.attn(blk.norm1(x))
        m = blk.mlp(blk.norm2(h))
        ln = torch.nn.functional.layer_norm(h, (64,), blk.adapter.norm.weight, blk.adapter.norm.bias, 1e-5)
        a = torch.relu(ln @ blk.adapter.down.weight.T + blk.adapter.down.bias) @ blk.adapter.up.weight.T
        a = a + blk.adapter.up.bias
        s = torch.sigmoid(torch.cat([m, a], -1) @ blk.scale_pred.weight.T)
        out, got_s = blk.forward_with_scale(x)
    torch.testing.assert_close(out, h + s * a + m)
    torch.testing.assert_close(got_s, s)
    assert blk.adapter.drop.p == 0.1 and blk.scale_pred.bias is None


@pytest.mark.parametrize("dim,width,depth", [(64, 16, 2), (64, 64, 2), (192, 32, 12), (384, 64, 12)])
def test_adapter_parameter_count_follows_the_formula(dim, width, depth):
    with torch.device("meta"):
        model = build_vit(f"vit_tiny_patch16_224(depth={depth},embed_dim={dim},num_heads=2)")
        pad_vit.add_adapters(model, width)
    added = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n or ".scale_pred." in n)
    assert added == depth * (2 * dim + (dim * width + width) + (width * dim + dim) + 2 * dim)
    assert added == pad_vit.adapter_parameter_count(dim, width, depth)


def test_adapter_parameter_count_of_vit_b_is_the_papers_1_23m():
    with torch.device("meta"):
        model = pad_vit.add_adapters(build_vit("vit_base_patch16_224"))
    added = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n or ".scale_pred." in n)
    assert added == 1_226_496 and round(added / 1e6, 2) == 1.23


# --- the MAE objective ----------------------------------------------------------------------------


def test_masking_keeps_the_exact_number_of_tokens_and_restores_order():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = mae.random_masking(3, 16, 0.75, torch.device("cpu"))
    assert ids_keep.shape == (3, 4) and mask.sum(1).tolist() == [12.0, 12.0, 12.0]
    for b in range(3):
        assert mask[b, ids_keep[b]].sum() == 0  # the kept tokens are the unmasked ones
    shuffled = torch.arange(16).expand(3, -1).gather(1, ids_restore.argsort(1))
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(16).expand(3, -1))
    assert mae.random_masking(1, 196, 0.75, torch.device("cpu"))[0].shape[1] == 49  # int(196 * 0.25)


def test_mae_loss_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 8, 8))
    pred = rng.normal(size=(2, 4, 4 * 4 * 3))
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=np.float64)
    total, count = 0.0, 0
    for b in range(2):
        for li, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            patch = images[b, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4].transpose(1, 2, 0).reshape(-1)
            target = (patch - patch.mean()) / math.sqrt(patch.var(ddof=1) + 1e-6)
            if mask[b, li]:
                total += float(np.mean((pred[b, li] - target) ** 2))
                count += 1
    got = mae.mae_loss(torch.tensor(images), torch.tensor(pred), torch.tensor(mask), 4)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(total / count, rel=1e-5)


def test_mmpretrain_and_mae_files_give_the_same_weights(tmp_path):
    sd = mae_state()
    torch.save(
        {"meta": {"epoch": 1600, "mmpretrain_version": "1.0.0"}, "state_dict": to_mmpretrain(sd)},
        tmp_path / "mm.pth",
    )
    a = mae.read_mae_checkpoint(write_mae_file(tmp_path / "mae.pth"))
    b = mae.read_mae_checkpoint(tmp_path / "mm.pth")
    assert (a.layout, b.layout) == ("mae", "mmpretrain")
    assert a.encoder.keys() == b.encoder.keys() and a.decoder.keys() == b.decoder.keys()
    assert all(torch.equal(a.encoder[k], b.encoder[k]) for k in a.encoder)
    assert all(torch.equal(a.decoder[k], b.decoder[k]) for k in a.decoder)
    assert b.decoder_shape() == (DEC["dim"], DEC["depth"])


# --- the command line ----------------------------------------------------------------------------


def test_pad_switches_the_defaults_to_pads_recipe(files):
    args, method = pretrain.parse_args(["--method", "pad", "--init", f"mae:{ARCH}:{files['base']}",
                                        "--infrared", str(files["images"]), "--out", "o"])  # fmt: skip
    assert (args.epochs, args.warmup_epochs, args.blr, args.weight_decay) == (100, 30, 1e-4, 0.05)
    assert (args.grey, args.mask_ratio, args.adapter_width, args.scale_frozen_epochs) == (
        "none",
        0.75,
        64,
        61,
    )
    assert default_scale_frozen_epochs(100) == 61  # PAD's main_pretrain.py: epoch <= round(0.6 * 100)
    assert args.selection is None and args.student is None  # nmi-had's options: not PAD's
    nmi_argv = ["--selection", "s", "--teacher", "t", "--infrared", "d", "--out", "o"]
    nmi, _ = pretrain.parse_args(nmi_argv)
    assert (nmi.warmup_epochs, nmi.blr, nmi.grey) == (5, 1.5e-4, "all") and nmi.init is None
    with pytest.raises(SpecError, match="--init is an option of --method pad, not of --method nmi-had"):
        pretrain.parse_args(nmi_argv + ["--init", f"mae:{ARCH}:x.pth"])


def test_frozen_tensors_stay_bit_identical_and_the_scale_predictors_unfreeze_at_their_epoch(trained):
    base = torch.load(trained["base"], weights_only=True)["model"]
    run = trained["run"]
    after = {e: torch.load(run / f"checkpoint-{e}.pt", weights_only=True)["model"] for e in (1, 2)}
    for e, state in after.items():
        for k, v in base.items():
            key = ("decoder." if k.startswith(("decoder_", "mask_token")) else "encoder.") + k
            frozen = key.startswith("encoder.") or k.startswith(("decoder_embed.", "decoder_pos_embed"))
            assert torch.equal(state[key], v) == frozen, (e, key)  # frozen: unchanged; the rest trained
        for i in range(2):
            assert state[f"encoder.blocks.{i}.adapter.up.weight"].abs().sum() > 0
        scale_moved = any(state[f"encoder.blocks.{i}.scale_pred.weight"].abs().sum() > 0 for i in range(2))
        assert scale_moved == (e == 2)  # frozen at zero through epoch 0, trained in epoch 1
    log = read_log(run)
    assert len(log) == 8 and all(len(r["scale_mean"]) == 2 and len(r["scale_std"]) == 2 for r in log)
    assert all(r["scale_mean"] == [0.5, 0.5] and r["scale_std"] == [0.0, 0.0] for r in log[:4])
    assert any(m != 0.5 for r in log[5:] for m in r["scale_mean"])


def test_run_folder_holds_the_backbone_without_decoder_and_its_description(trained):
    run = trained["run"]
    names = {p.name for p in run.iterdir()}
    assert {"backbone.safetensors", "backbone.json", "config.json", "log.jsonl", CHECKPOINT} <= names
    sd = load_file(run / "backbone.safetensors")
    timm_keys = set(build_vit(ARCH, img_size=IMG).state_dict())
    extra = set(sd) - timm_keys
    assert timm_keys <= set(sd) and not any(k.startswith(("decoder", "mask_token")) for k in sd)
    assert extra == {f"blocks.{i}.{n}" for i in range(2) for n in (
        "adapter.norm.weight", "adapter.norm.bias", "adapter.down.weight", "adapter.down.bias",
        "adapter.up.weight", "adapter.up.bias", "scale_pred.weight")}  # fmt: skip
    meta = safetensors_metadata(run / "backbone.safetensors")
    assert meta["format"] == "unip-pad" and meta["arch"] == ARCH and meta["adapter_width"] == "64"
    doc = json.loads((run / "backbone.json").read_text())
    assert (doc["method"], doc["arch"], doc["adapter_width"]) == ("pad", ARCH, 64)
    assert "patch-wise" in doc["scale_mode"] and doc["scale_frozen_epochs"] == 1
    assert doc["base"]["path"] == str(trained["base"]) and doc["base"]["sha256"] == sha256_file(
        trained["base"]
    )
    assert doc["decoder"] == {"source": "base file", "dim": 32, "depth": 1, "heads": 4}
    assert doc["departures_from_pad"] == [
        "--rois none: random resized crops instead of object-sensitive RoI crops"
    ]
    assert doc["adapter_parameters"] == pad_vit.adapter_parameter_count(64, 64, 2)
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "pad" and config["started_from"]["base"]["sha256"] == doc["base"]["sha256"]


def test_pad_family_loads_the_backbone_strictly(trained, tmp_path):
    path = trained["run"] / "backbone.safetensors"
    loaded = load_backbone("pad", ARCH, path, img_size=IMG)
    saved = load_file(path)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved.items())
    assert pad_vit.adapter_width(loaded.model) == 64
    broken = {k: v for k, v in saved.items() if k != "blocks.1.scale_pred.weight"}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Exception, match="missing 1 backbone keys .*blocks.1.scale_pred.weight"):
        load_backbone("pad", ARCH, tmp_path / "broken.safetensors")
    plain = build_vit(ARCH, img_size=IMG).state_dict()
    save_file({k: v.contiguous() for k, v in plain.items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(Exception, match="no PAD adapters"):
        load_backbone("pad", ARCH, tmp_path / "plain.safetensors")


def test_pads_own_checkpoint_names_load_in_the_pad_family(trained, tmp_path):
    """casiatao/PAD's training checkpoints name the adapter adaptmlp.* and the predictor scalar_pred."""
    sd = load_file(trained["run"] / "backbone.safetensors")
    renamed = {
        k.replace(".adapter.norm.", ".adaptmlp.adapter_layer_norm_before.").replace(".adapter.down.", ".adaptmlp.down_proj.")
        .replace(".adapter.up.", ".adaptmlp.up_proj.").replace(".scale_pred.", ".scalar_pred."): v
        for k, v in sd.items()
    }  # fmt: skip
    torch.save(
        {"model": {**renamed, **{k: v for k, v in mae_state().items() if k.startswith("decoder_")}}},
        tmp_path / "c.pth",
    )
    loaded = load_backbone("pad", ARCH, tmp_path / "c.pth", img_size=IMG)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in sd.items())


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------


def test_bad_base_files_are_refused_with_one_line(files, tmp_path, capsys):
    out = tmp_path / "run"
    missing = pad_args(tmp_path / "nope.pth", files["images"], out)
    assert "nope.pth: checkpoint file not found" in fail(capsys, missing)
    dino = tmp_path / "dino.pth"  # a ViT of another shape: not this MAE
    torch.save(build_vit("vit_tiny_patch16_224(depth=3,embed_dim=96,num_heads=3)").state_dict(), dino)
    assert "does not fit" in fail(capsys, pad_args(dino, files["images"], out))
    backbone_only = tmp_path / "mae_pretrain_vit_tiny.pth"  # MAE's backbone-only release: no decoder
    torch.save({"model": mae_model()[0].state_dict()}, backbone_only)
    line = fail(capsys, pad_args(backbone_only, files["images"], out))
    assert (
        "holds no MAE decoder" in line and "mae_visualize_vit_base.pth" in line and "--decoder random" in line
    )
    assert not out.exists()
    spec = pad_args(files["base"], files["images"], out)
    spec[spec.index("--init") + 1] = f"dino:{ARCH}:{files['base']}"
    assert "needs the MAE decoder" in fail(capsys, spec) and "--decoder random" in fail(capsys, spec)
    spec[spec.index("--init") + 1] = f"nosuch:{ARCH}:{files['base']}"
    assert "--init family 'nosuch': unknown" in fail(capsys, spec)
    spec[spec.index("--init") + 1] = f"mae:{ARCH[:-1]},reg_tokens=1):{files['base']}"
    assert "is not an MAE ViT" in fail(capsys, spec)
    nmi_opts = pad_args(files["base"], files["images"], out, "--selection", "sel.json")
    assert "--selection is an option of --method nmi-had, not of --method pad" in fail(capsys, nmi_opts)
    no_init = [a for a in pad_args(files["base"], files["images"], out) if not a.startswith("mae:")]
    no_init.remove("--init")
    assert "--method pad needs --init" in fail(capsys, no_init)
    (tmp_path / "empty").mkdir()
    assert "no <dataset>/thermal/ folders" in fail(capsys, pad_args(files["base"], tmp_path / "empty", out))
    assert not out.exists()


def test_random_decoder_runs_and_records_the_departure(files, tmp_path):
    backbone_only = tmp_path / "mae_pretrain.pth"
    torch.save({"model": mae_model()[0].state_dict()}, backbone_only)
    out = tmp_path / "run"
    args = pad_args(backbone_only, files["images"], out, rois="none", epochs=1, decoder="random",
                    decoder_dim=32, decoder_depth=1)  # fmt: skip
    assert pretrain.main(args) == 0
    doc = json.loads((out / "backbone.json").read_text())
    assert doc["decoder"]["source"] == "random"
    assert any(d.startswith("--decoder random") for d in doc["departures_from_pad"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_random_decoder_continues_any_familys_encoder(files, tmp_path, device):
    """With --decoder random the base needs no MAE file: a timm safetensors encoder (the demo's MIM
    teacher is one) is read through the shared registry, frozen, and exported unchanged."""

    encoder = mae_model()[0]
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(sd, str(tmp_path / "enc.safetensors"))
    out = tmp_path / "run"
    args = pad_args(tmp_path / "enc.safetensors", files["images"], out, rois="none", epochs=1,
                    decoder="random", decoder_dim=32, decoder_depth=1, device=device)  # fmt: skip
    args[args.index("--init") + 1] = f"timm:{ARCH}:{tmp_path / 'enc.safetensors'}"
    assert pretrain.main(args) == 0
    doc = json.loads((out / "backbone.json").read_text())
    assert doc["base"]["family"] == "timm" and doc["base"]["layout"] == "timm family"
    exported = load_file(str(out / "backbone.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in sd.items())  # the encoder stayed frozen


def test_malformed_proposal_file_is_refused_naming_the_file(files, tmp_path, capsys):
    rois = tmp_path / "rois"
    (rois / "ds1" / "roi").mkdir(parents=True)
    (rois / "ds1" / "roi" / "g8_0.txt").write_text("10,10,50,50\n12,abc,40,40\n")
    out = tmp_path / "run"
    line = fail(capsys, pad_args(files["base"], files["images"], out, rois=rois))
    assert "g8_0.txt: line 2" in line and "x,y,w,h" in line and not out.exists()
    nothing = tmp_path / "rois_elsewhere"
    nothing.mkdir()
    assert "no proposal file for any of the 8 images" in fail(
        capsys, pad_args(files["base"], files["images"], out, rois=nothing)
    )


# --- exact resume, torchrun, round trip -------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_across_the_unfreeze_point_is_bit_identical(files, tmp_path):
    """2 epochs x 4 steps; scale predictors train from epoch 1 (step 5). Checkpoints every 3 steps.
    The first run dies after step 4 (resumes from step 3, before the unfreeze point), the resumed
    run dies after step 6 (resumes from step 6, after it); the end equals the uninterrupted run."""

    def args(out: Path, *extra: str) -> list[str]:
        return pad_args(files["base"], files["images"], out, *extra, ckpt_every_steps=3, save_every=2)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(args(whole)).returncode == 0
    for kill_at, resumed_from in ((4, 3), (6, 6)):
        extra = ("--resume",) if kill_at == 6 else ()
        died = run_cli(args(killed, *extra), env=subprocess_env(**{pretrain.KILL_ENV: str(kill_at)}))
        assert died.returncode == -signal.SIGKILL, died.stderr
        assert torch.load(killed / CHECKPOINT, weights_only=True)["step"] == resumed_from
    done = run_cli(args(killed, "--resume"))
    assert done.returncode == 0, done.stderr
    a, b = load_file(whole / "backbone.safetensors"), load_file(killed / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(r / CHECKPOINT, weights_only=True) for r in (whole, killed))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # decoder too
    opt_a, opt_b = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a
    )
    timeless = [
        [{k: v for k, v in r.items() if k not in ("images_per_s", "data_time")} for r in read_log(x)]
        for x in (whole, killed)
    ]
    assert len(timeless[0]) == 8 and timeless[0] == timeless[1]


@pytest.mark.slow
def test_torchrun_two_processes(files, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "unip_train.pretrain", *pad_args(files["base"], files["images"], out, rois="none")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "backbone.json").read_text())
    digests = doc["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert doc["recipe"]["world_size"] == 2 and doc["recipe"]["effective_batch"] == 4
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # 8 images / 2 processes / batch 2, 2 epochs
    assert log[0]["scale_mean"] == [0.5, 0.5] and log[-1]["scale_mean"] != [0.5, 0.5]


@pytest.mark.slow
def test_round_trip_into_finetune_and_analysis(trained, tmp_path):
    from unip_analysis import cli as analyze_cli
    from unip_train.finetune.cli import main as finetune
    from unip_train.finetune.trainer import evaluate_saved

    spec = f"pad:{ARCH}:{trained['run'] / 'backbone.safetensors'}"
    data = synthetic.generate(tmp_path / "seg", "folder", n_train=4, n_test=2, size=40, seed=0)
    common = ["--backbone", spec, "--dataset", "folder", "--data-root", str(data), "--crop", str(IMG),
              "--iters", "3", "--batch-size", "2", "--workers", "0", "--head-channels", "8", "--no-progress"]  # fmt: skip
    for adapters in ("keep", "drop"):
        out = tmp_path / f"ft_{adapters}"
        assert finetune(common + ["--out", str(out), "--adapters", adapters]) == 0
        state = torch.load(out / "model.pt", weights_only=True)
        has_adapters = any(".adapter." in k for k in state["state_dict"])
        assert has_adapters == (adapters == "keep")
        assert state["backbone"]["adapter_width"] == (64 if adapters == "keep" else None)
        again = evaluate_saved(out / "model.pt", out=tmp_path / f"re_{adapters}", progress=False)
        assert math.isfinite(again["miou"])  # model.pt rebuilds
    ckpt = f"p={spec}"
    report = tmp_path / "analysis"
    argv = ["--checkpoint", ckpt, "--images", str(trained["images"]), "--img-size", str(IMG),
            "--num-images", "4", "--out", str(report), "--norm", "infmix"]  # fmt: skip
    assert analyze_cli.main(argv) == 0
    doc = json.loads((report / "layer_selection.json").read_text())
    assert doc["models"]["p"]["family"] == "pad" and len(doc["models"]["p"]["layers"]) == 2


def test_help_shows_pads_options(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--method", "--init", "--rois", "--decoder", "--adapter-width", "--scale-frozen-epochs"):
        assert flag in out


def test_pad_vit_does_not_import_the_checkpoint_registry():
    """Issue 21: checkpoints.py imports pad_vit (the pad family); pad_vit importing checkpoints back
    made a circle. The dependency goes one way now."""
    import ast

    tree = ast.parse(Path(pad_vit.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.split(".")[-1] == "checkpoints" for m in imported), imported
