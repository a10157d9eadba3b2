"""Checkpoint files in the formats their authors publish, built from timm reference models with
the real key names (method.md section 6). Shared by the family and CLI tests."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
from attention_reference import randomize
from safetensors.torch import save_file

SMALL = "depth=2,embed_dim=64,num_heads=2,patch_size=8"
IMG = 32


def timm_model(arch: str, img: int = IMG, **kwargs) -> torch.nn.Module:
    """A reference model made by timm alone (no unip_analysis code), random non-trivial weights."""
    name, _, args = arch.partition("(")
    overrides = dict(kv.split("=") for kv in args.rstrip(")").split(",")) if args else {}
    overrides = {k: eval(v) for k, v in overrides.items()}  # literal test values only
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img, **overrides, **kwargs)
    return randomize(model.eval())


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def crossmae_file(path: Path, sd: dict, depth: int = 2, dec_dim: int = 32, dec_depth: int = 2) -> Path:
    """A released CrossMAE "wfm" checkpoint: encoder without norm, dec_norms, wfm, cross decoder."""
    model = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    dim = sd["cls_token"].shape[-1]
    for i in range(dec_depth):
        model[f"dec_norms.{i}.weight"], model[f"dec_norms.{i}.bias"] = torch.randn(dim), torch.randn(dim)
        p = f"decoder_blocks.{i}."
        model |= {
            p + "norm1.weight": torch.ones(dec_dim),
            p + "norm1.bias": torch.zeros(dec_dim),
            p + "cross_attn.q.weight": torch.randn(dec_dim, dec_dim),
            p + "cross_attn.q.bias": torch.zeros(dec_dim),
            p + "cross_attn.kv.weight": torch.randn(2 * dec_dim, dim),
            p + "cross_attn.kv.bias": torch.zeros(2 * dec_dim),
            p + "cross_attn.proj.weight": torch.randn(dec_dim, dec_dim),
            p + "cross_attn.proj.bias": torch.zeros(dec_dim),
            p + "norm2.weight": torch.ones(dec_dim),
            p + "norm2.bias": torch.zeros(dec_dim),
            p + "mlp.fc1.weight": torch.randn(4 * dec_dim, dec_dim),
            p + "mlp.fc1.bias": torch.zeros(4 * dec_dim),
            p + "mlp.fc2.weight": torch.randn(dec_dim, 4 * dec_dim),
            p + "mlp.fc2.bias": torch.zeros(dec_dim),
        }
    model["wfm.linear.weight"] = torch.randn(dec_depth, depth)  # weights over the encoder's feature maps
    model["mask_token"] = torch.zeros(1, 1, dec_dim)
    model["decoder_pos_embed"] = torch.zeros(1, sd["pos_embed"].shape[1], dec_dim)
    model["decoder_norm.weight"], model["decoder_norm.bias"] = torch.ones(dec_dim), torch.zeros(dec_dim)
    model["decoder_pred.weight"], model["decoder_pred.bias"] = torch.randn(192, dec_dim), torch.zeros(192)
    args = argparse.Namespace(model="mae_vit_base_patch16", weight_fm=True, use_fm=[-1], kept_mask_ratio=0.25)
    torch.save({"model": model, "optimizer": {"state": {}}, "epoch": 799, "scaler": {}, "args": args}, path)
    return path


def dinov2_release(sd: dict, stored_grid: int, registers: bool) -> dict:
    """timm's DINOv2 layout -> the facebookresearch/dinov2 file: cls carries a position, the
    registers are ``register_tokens``, and the file keeps ``mask_token``; pos stored for 518 px."""
    out = {k: v for k, v in sd.items() if k not in ("reg_token",)}
    dim = sd["cls_token"].shape[-1]
    pos = sd["pos_embed"]
    if registers:
        patch_pos = pos
        cls_pos = torch.randn(1, 1, dim)
        out["cls_token"] = sd["cls_token"] - cls_pos
        out["register_tokens"] = sd["reg_token"]
    else:
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    grid = int(round(patch_pos.shape[1] ** 0.5))
    big = torch.nn.functional.interpolate(
        patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
        size=(stored_grid, stored_grid),
        mode="nearest",
    )
    out["pos_embed"] = torch.cat([cls_pos, big.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    out["mask_token"] = torch.zeros(1, dim)
    return out


def hf_encoder(sd: dict, depth: int, prefix: str, style: str) -> dict:
    """timm weights under the names transformers writes (ViT / ViTMAE / DeiT: layernorm_before,
    intermediate.dense; DINOv2: norm1, mlp.fc1, layer_scale1.lambda1)."""
    out = {
        f"{prefix}embeddings.cls_token": sd["cls_token"],
        f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": sd["norm.weight"],
        f"{prefix}layernorm.bias": sd["norm.bias"],
    }
    if "dist_token" in sd:
        out[f"{prefix}embeddings.distillation_token"] = sd["dist_token"]
    for i in range(depth):
        b, layer = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{part}"].chunk(3)
            out |= {
                layer + f"attention.attention.query.{part}": q,
                layer + f"attention.attention.key.{part}": k,
                layer + f"attention.attention.value.{part}": v,
                layer + f"attention.output.dense.{part}": sd[b + f"attn.proj.{part}"],
            }
            if style == "vit":
                out |= {
                    layer + f"intermediate.dense.{part}": sd[b + f"mlp.fc1.{part}"],
                    layer + f"output.dense.{part}": sd[b + f"mlp.fc2.{part}"],
                    layer + f"layernorm_before.{part}": sd[b + f"norm1.{part}"],
                    layer + f"layernorm_after.{part}": sd[b + f"norm2.{part}"],
                }
            else:
                out |= {
                    layer + f"mlp.fc1.{part}": sd[b + f"mlp.fc1.{part}"],
                    layer + f"mlp.fc2.{part}": sd[b + f"mlp.fc2.{part}"],
                    layer + f"norm1.{part}": sd[b + f"norm1.{part}"],
                    layer + f"norm2.{part}": sd[b + f"norm2.{part}"],
                }
        if style == "dinov2":
            out[layer + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
            out[layer + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def hf_config(model_type: str, architecture: str, eps: float, image_size: int, **extra) -> dict:
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": eps,
        "image_size": image_size,
        "patch_size": 8,
        "num_channels": 3,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.3",
    }
    return config | extra


def write_hf_folder(folder: Path, config: dict, weights: dict, safetensors: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if safetensors:
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


def hf_case(kind: str, tmp_path: Path):
    """(arch, folder, reference model, LayerNorm eps) for one transformers model class."""
    dim = 64
    if kind in ("ViTModel", "ViTMAEForPreTraining"):
        eps = 1e-12
        arch = f"vit_tiny_patch16_224({SMALL})"
        reference = timm_model(arch, norm_layer=partial(torch.nn.LayerNorm, eps=eps))
        if kind == "ViTModel":
            weights = hf_encoder(state(reference), 2, "", "vit")
            weights |= {"pooler.dense.weight": torch.randn(dim, dim), "pooler.dense.bias": torch.zeros(dim)}
            config = hf_config("vit", kind, eps, IMG, intermediate_size=256, encoder_stride=8)
        else:
            weights = hf_encoder(state(reference), 2, "vit.", "vit")
            weights |= {
                "decoder.decoder_embed.weight": torch.randn(32, dim),
                "decoder.decoder_embed.bias": torch.zeros(32),
                "decoder.mask_token": torch.zeros(1, 1, 32),
                "decoder.decoder_pos_embed": torch.zeros(1, 17, 32),
                "decoder.decoder_layers.0.attention.attention.query.weight": torch.randn(32, 32),
                "decoder.decoder_norm.weight": torch.ones(32),
                "decoder.decoder_pred.weight": torch.randn(192, 32),
            }
            config = hf_config(
                "vit_mae", kind, eps, IMG, intermediate_size=256, mask_ratio=0.75, decoder_hidden_size=32
            )
        return arch, write_hf_folder(tmp_path / kind, config, weights), reference, eps
    if kind == "DeiTForImageClassificationWithTeacher":
        eps = 1e-12
        arch = f"deit_tiny_distilled_patch16_224({SMALL})"
        reference = timm_model(arch, norm_layer=partial(torch.nn.LayerNorm, eps=eps))
        weights = hf_encoder(state(reference), 2, "deit.", "vit")
        weights |= {
            "cls_classifier.weight": torch.randn(1000, dim),
            "cls_classifier.bias": torch.zeros(1000),
            "distillation_classifier.weight": torch.randn(1000, dim),
            "distillation_classifier.bias": torch.zeros(1000),
        }
        config = hf_config("deit", kind, eps, IMG, intermediate_size=256)
        return arch, write_hf_folder(tmp_path / kind, config, weights, safetensors=False), reference, eps
    # DINOv2: the folder stores a larger grid (37x37 for 518 px in the release; 6x6 here)
    eps = 1e-6
    registers = kind == "Dinov2WithRegistersModel"
    arch = f"vit_small_patch14_reg4_dinov2({SMALL})" if registers else f"vit_small_patch14_dinov2({SMALL})"
    at48 = state(timm_model(arch, img=48, norm_layer=partial(torch.nn.LayerNorm, eps=eps)))
    release = dinov2_release(at48, stored_grid=6, registers=registers)
    weights = hf_encoder({k: v for k, v in release.items() if k != "register_tokens"}, 2, "", "dinov2")
    weights["embeddings.mask_token"] = torch.zeros(1, dim)
    extra = {"mlp_ratio": 4, "layerscale_value": 1.0, "use_swiglu_ffn": False, "drop_path_rate": 0.0}
    if registers:
        weights["embeddings.register_tokens"] = release["register_tokens"]
        config = hf_config("dinov2_with_registers", kind, eps, 48, num_register_tokens=4, **extra)
    else:
        config = hf_config("dinov2", kind, eps, 48, **extra)
    reference = timm.create_model(
        arch.split("(")[0], num_classes=0, img_size=IMG, depth=2, embed_dim=64, num_heads=2, patch_size=8,
        norm_layer=partial(torch.nn.LayerNorm, eps=eps),
    )  # fmt: skip
    reference.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(dict(release), reference))
    return arch, write_hf_folder(tmp_path / kind, config, weights), reference.eval(), eps


def hub_cache(root: Path, repo: str, weights: dict) -> Path:
    """The hub cache layout: models--ORG--NAME/{refs/main, snapshots/REV/model.safetensors}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"
