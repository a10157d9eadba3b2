"""``model.pt``: a fine-tuned segmentor with everything needed to rebuild it without the backbone file
(state dict, resolved config, classes, where the backbone came from) and to use it on new images
(``palette``: one RGB colour per class; ``norm``: the input normalization; ``channels``: 1 for grey
infrared images, 3 for colour / depth ones; files written before these were recorded read back with
``None``). :func:`build_backbone` and
:func:`build_segmentor` make the model a config asks for; :func:`save_model` / :func:`load_model` write
and read the file (``torch.load(weights_only=True)``)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from unip_analysis import transformers_format
from unip_analysis.checkpoints import build_vit, load_backbone, set_attention_heads
from unip_analysis.pad_vit import adapter_width, add_adapters, drop_adapters

from ..checkpointing import load_checkpoint, save_checkpoint
from .backbone import prepare_for_finetuning
from .config import (
    FinetuneConfig,
    FinetuneError,
    norm_record,
    parse_backbone,
    plain_config,
)
from .ll_fpn import Segmentor

MODEL_FORMAT = "unip-finetune/2"  # 2: LayerScale / relative position bias / raw features / head widths

# --- building -------------------------------------------------------------------------------


def default_heads(arch: str) -> int:
    """Head count the architecture has by default (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return int(build_vit(arch).blocks[-1].attn.num_heads)


def build_backbone(cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict]:
    """The pre-trained ViT with the fine-tuning parts added (ft mode) and where it came from."""
    family, arch, path = parse_backbone(cfg.backbone)
    loaded = load_backbone(family, arch, path, img_size=cfg.crop)
    model = loaded.model
    info = {
        "family": family,
        "arch": arch,
        "path": path,
        "sha256": loaded.sha256,
        "notes": list(loaded.notes),
    }
    if cfg.resplit_last_heads:
        # The reference fine-tuning re-splits the student's last block to the default head count.
        set_attention_heads(model.blocks[-1].attn, default_heads(arch))
    info["heads_per_layer"] = [int(b.attn.num_heads) for b in model.blocks]
    if family == "hf":  # LayerNorm eps and activation come from config.json, not the arch's defaults
        info["hf_build"] = transformers_format.build_config(Path(path))
    if cfg.adapters == "drop":
        drop_adapters(model)
    info["adapter_width"] = adapter_width(model)
    if cfg.mode == "ft":
        info["notes"] += prepare_for_finetuning(
            model, cfg.drop_path or 0.0, cfg.layer_scale, bool(cfg.rel_pos_bias)
        )
        model.train().requires_grad_(True)
    return model, info


def build_segmentor(cfg: FinetuneConfig, backbone: torch.nn.Module, num_classes: int) -> Segmentor:
    return Segmentor(
        backbone, num_classes, cfg.mode, cfg.neck, cfg.layers, cfg.head_channels, cfg.aux_channels
    )


def save_model(
    path: Path,
    model: Segmentor,
    cfg: FinetuneConfig,
    classes,
    backbone_info: dict,
    palette=None,
    channels: int | None = None,
) -> None:
    """``palette``: one (R, G, B) per class; ``channels``: the dataset's image channels."""
    state = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": plain_config(cfg),
        "classes": list(classes),
        "palette": None if palette is None else [list(map(int, c)) for c in palette],
        "norm": norm_record(cfg.norm),
        "channels": channels,
        "backbone": backbone_info,
    }
    save_checkpoint(path, state)


# --- evaluation of a saved model ----------------------------------------------------------------


def load_model(path: str | Path) -> tuple[Segmentor, FinetuneConfig, dict]:
    """Rebuild a fine-tuned segmentor from ``model.pt`` (no backbone file needed)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise FinetuneError(
            f"{path}: not a model.pt of this unip-finetune (format {MODEL_FORMAT}, found {found}); "
            "fine-tune again to re-evaluate it"
        )
    known = {f.name for f in fields(FinetuneConfig)}
    # Files from before --norm trained with the infrared statistics; before palettes: none recorded.
    cfg = FinetuneConfig(**{"norm": "infrared", **{k: v for k, v in ckpt["config"].items() if k in known}})
    for key in ("palette", "norm", "channels"):
        ckpt.setdefault(key, None)
    info = ckpt["backbone"]
    kwargs = transformers_format.timm_kwargs(info["hf_build"], path) if "hf_build" in info else {}
    backbone = build_vit(info["arch"], img_size=cfg.crop, heads_per_layer=info["heads_per_layer"], **kwargs)
    if info.get("adapter_width"):
        add_adapters(backbone, info["adapter_width"])
    if cfg.mode == "ft":
        prepare_for_finetuning(backbone, cfg.drop_path or 0.0, cfg.layer_scale, bool(cfg.rel_pos_bias))
    model = build_segmentor(cfg, backbone, len(ckpt["classes"]))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise FinetuneError(
            f"{path}: state dict does not fit the stored config "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return model.eval(), cfg, ckpt
