"""Hugging Face ``transformers`` ViT folders, read without importing ``transformers``.

A folder written by ``save_pretrained`` holds ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``). The key names on disk are the same in transformers 4.x and 5.x
(method.md section 6); this module maps them onto timm's names for ViTModel, ViTMAEModel,
Dinov2Model, Dinov2WithRegistersModel and DeiT (with or without their task heads and the
``vit.`` / ``deit.`` / ``dinov2.`` prefixes of the task models), and turns the config into the
timm build arguments that change the numbers: LayerNorm eps (1e-12 for ViT / ViTMAE / DeiT,
1e-6 for DINOv2) and the activation.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, SpecError

StateDict = dict[str, torch.Tensor]

MODEL_TYPES = ("vit", "vit_mae", "deit", "dinov2", "dinov2_with_registers")
_TASK_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.")
# Task heads, the MAE decoder, the pooler and the masked-image-modelling token: not the encoder.
_NOT_ENCODER = re.compile(
    r"^(decoder\.|classifier\.|cls_classifier\.|distillation_classifier\.|pooler\.|embeddings\.mask_token$)"
)
_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "register_tokens",  # DINOv2's name; see dinov2_to_timm
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_IN_BLOCK = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",  # ViT / ViTMAE / DeiT
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # DINOv2 ViT-g SwiGLU, packed like timm's SwiGLUPacked
    "mlp.weights_out": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = ("query", "key", "value")


def weights_file(path: Path) -> Path:
    """The weights file of a transformers folder (the folder, its config.json, or the file itself)."""
    folder = path.parent if path.is_file() else path
    if path.is_file() and path.name != "config.json":
        weights = path
    else:
        if not folder.is_dir():
            raise CheckpointError(
                f"{path}: not found; pass a transformers model folder (config.json + weights)"
            )
        if (folder / "model.safetensors.index.json").exists() or (
            folder / "pytorch_model.bin.index.json"
        ).exists():
            raise CheckpointError(
                f"{folder}: the weights are sharded over several files; merge them into one "
                "model.safetensors (transformers: save_pretrained(..., max_shard_size='100GB'))"
            )
        found = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
        if not found:
            raise CheckpointError(
                f"{folder}: no model.safetensors or pytorch_model.bin; pass a folder written by save_pretrained"
            )
        weights = found[0]
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json beside the weights; the hf family needs the folder save_pretrained wrote"
        )
    return weights


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the transformers config ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {kind!r} is not one the hf family reads ({', '.join(MODEL_TYPES)})"
        )
    return config


def to_timm(sd: StateDict) -> StateDict:
    """transformers key names -> timm's: prefixes and heads dropped, q/k/v fused into qkv,
    DINOv2's register tokens in timm's layout. Unknown keys are kept, so the strict loader names them."""
    for prefix in _TASK_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if _NOT_ENCODER.match(k):
            continue
        if k in _TOP_LEVEL:
            out[_TOP_LEVEL[k]] = v
            continue
        m = _LAYER_KEY.match(k)
        if m is None:
            out[k] = v
            continue
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if module.startswith("attention.attention.") and module.rsplit(".", 1)[-1] in _QKV:
            qkv.setdefault((layer, kind), {})[module.rsplit(".", 1)[-1]] = v
        elif kind == "lambda1" and f"{module}.lambda1" in _IN_BLOCK:
            out[f"blocks.{layer}.{_IN_BLOCK[f'{module}.lambda1']}"] = v
        elif module in _IN_BLOCK:
            out[f"blocks.{layer}.{_IN_BLOCK[module]}.{kind}"] = v
        else:
            out[k] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise CheckpointError(
                f"layer {layer}: attention {kind} has {', '.join(sorted(parts))} but not all of query, key, value"
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in _QKV])
    return dinov2_to_timm(out)


def dinov2_to_timm(sd: StateDict) -> StateDict:
    """DINOv2's layout -> timm's ``vit_*_dinov2`` models: SwiGLU ``w12`` / ``w3`` -> ``fc1`` / ``fc2``;
    with registers, timm adds no position to prefix tokens, so the cls token absorbs its position
    (a constant) and the registers become ``reg_token``."""
    out = {
        re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v for k, v in sd.items()
    }
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


_ACTIVATIONS = {
    "gelu": None,
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


BUILD_KEYS = ("layer_norm_eps", "hidden_act", "use_swiglu_ffn")  # what timm_kwargs reads


def build_config(path: Path) -> dict[str, Any]:
    """The part of a folder's config.json that decides how the timm model is built (see
    :func:`timm_kwargs`); kept with a fine-tuned model so it can be rebuilt without the folder."""
    config = read_config(weights_file(path).parent / "config.json")
    return {k: config[k] for k in BUILD_KEYS if k in config}


def timm_kwargs(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """timm build arguments the config decides: LayerNorm eps, and the activation if not GELU."""
    eps = float(config.get("layer_norm_eps", 1e-12))
    kwargs: dict[str, Any] = {"norm_layer": partial(torch.nn.LayerNorm, eps=eps)}
    act = config.get("hidden_act", "gelu")
    if config.get("use_swiglu_ffn"):
        return kwargs  # the arch (vit_giant_patch14_dinov2) carries its SwiGLU
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{folder / 'config.json'}: hidden_act {act!r} has no timm counterpart here "
            f"(supported: {', '.join(_ACTIVATIONS)})"
        )
    if _ACTIVATIONS[act] is not None:
        kwargs["act_layer"] = _ACTIVATIONS[act]
    return kwargs


def check_config(config: dict[str, Any], model: torch.nn.Module, arch: str, folder: Path) -> None:
    """The timm arch must have the folder's shape; head count and registers are invisible in the
    tensor shapes, so a mismatch there would load silently wrong."""
    blocks = model.blocks
    ours = {
        "hidden_size": int(model.embed_dim),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(blocks[0].attn.num_heads),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "num_register_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "distillation_token": int(getattr(model, "dist_token", None) is not None),
    }
    theirs = {
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": config.get("num_attention_heads"),
        "patch_size": config.get("patch_size"),
        "num_register_tokens": config.get("num_register_tokens", 0),
        "distillation_token": int(config.get("model_type") == "deit"),
    }
    if "intermediate_size" in config and config.get("model_type") != "dinov2":
        ours["intermediate_size"] = int(blocks[0].mlp.fc1.out_features)
        theirs["intermediate_size"] = config["intermediate_size"]
    wrong = [
        f"{k} {theirs[k]} (arch: {ours[k]})"
        for k in ours
        if theirs[k] is not None and int(theirs[k]) != ours[k]
    ]
    if wrong:
        raise SpecError(
            f"{folder / 'config.json'} does not describe {arch}: {', '.join(wrong)}; "
            "name the timm arch of that size (e.g. vit_base_patch16_224, vit_small_patch14_reg4_dinov2, "
            "deit_base_distilled_patch16_224)"
        )
