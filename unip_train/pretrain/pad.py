"""PAD (Zhang et al. 2023; method.md section 7): continue MAE pre-training of a frozen ImageNet MAE
ViT on infrared images, training only small adapters beside each block's MLP (and their per-token
scale predictors after 60% of the epochs) plus the MAE decoder, with crops around object proposals.

What stays frozen: the whole encoder, the decoder's input projection ``decoder_embed`` and its
position embedding. What trains: ``blocks.N.adapter.*``, ``blocks.N.scale_pred`` (from epoch
``--scale-frozen-epochs`` on), ``mask_token`` and the rest of the decoder (dropped at export).
The adapter block itself is :mod:`unip_analysis.pad_vit`, shared with analysis and fine-tuning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unip_analysis import command, pad_vit
from unip_analysis.checkpoints import FAMILIES, adapt_state_dict, build_vit, load_backbone, load_strict
from unip_analysis.errors import CheckpointError, SpecError
from unip_analysis.files import atomic_write, atomic_write_text, sha256_file

from ..optim import param_groups
from . import rois
from .mae import (
    DECODER_DEPTH,
    DECODER_DIM,
    DECODER_HEADS,
    FILES_WITH_A_DECODER,
    MASK_RATIO,
    MaeDecoder,
    adapt_decoder_pos_embed,
    mae_loss,
    random_masking,
    read_mae_checkpoint,
)
from .method import PretrainMethod

BASE_FAMILIES = ("mae", "mmpretrain", "mmselfsup")  # files that can hold MAE's decoder
SCALE_FROZEN_FRACTION = 0.6


def default_scale_frozen_epochs(epochs: int) -> int:
    """PAD's main_pretrain.py freezes the scale predictors while ``epoch <= round(0.6 * epochs)``
    (0-based): epochs 0..60 of 100, so they train from epoch 61 on."""
    return round(SCALE_FROZEN_FRACTION * epochs) + 1


class PadMae(nn.Module):
    """The MAE being continued: the adapted encoder and the decoder. ``forward(images)`` masks,
    encodes the kept patches, decodes, and returns (loss, [depth, 2] scale mean and std per layer)."""

    def __init__(self, encoder: VisionTransformer, decoder: MaeDecoder, mask_ratio: float = MASK_RATIO):
        super().__init__()
        self.encoder, self.decoder, self.mask_ratio = encoder, decoder, mask_ratio
        self.patch = int(encoder.patch_embed.patch_size[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        b, length, dim = x.shape
        ids_keep, ids_restore, mask = random_masking(b, length, self.mask_ratio, x.device)
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, dim))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        scales = []
        for blk in enc.blocks:
            x, s = blk.forward_with_scale(x)
            s = s.detach().float()
            scales.append(torch.stack([s.mean(), s.std()]))
        pred = self.decoder(enc.norm(x), ids_restore)
        return mae_loss(images, pred, mask, self.patch), torch.stack(scales)


def check_mae_encoder(model: VisionTransformer, arch: str) -> None:
    """MAE's encoder: one cls token inside a learned pos_embed, no registers, plain blocks."""
    if (
        model.cls_token is None
        or model.num_prefix_tokens != 1
        or model.pos_embed is None
        or getattr(model, "no_embed_class", False)
    ):
        raise SpecError(
            f"--init architecture {arch!r} is not an MAE ViT (one cls token, position embedding that "
            "includes it, no registers); PAD continues MAE pre-training: use e.g. vit_base_patch16_224"
        )


GROUP = "PAD adapter pre-training (--method pad)"


@dataclass(kw_only=True)
class PadOptions:
    """The options of ``--method pad``; None: not given (:attr:`Pad.defaults` fills them)."""

    init: str | None = command.option(
        None,
        help="the MAE to continue, with its decoder (required): mae:vit_base_patch16_224:"
        "mae_visualize_vit_base.pth, or mmpretrain:ARCH:FILE for MMSelfSup/MMPretrain MAE files",
        group=GROUP,
        metavar="FAMILY:ARCH:PATH",
    )
    rois: str | None = command.option(
        None,
        help="object proposals: DIR/<subset>/roi/<stem>.txt per image (unip-rois writes them); "
        "none: random resized crops only",
        group=GROUP,
        metavar="DIR|none",
        default_text="PAD's own layout beside the images (<subset>/roi/ next to thermal/)",
    )
    decoder: Literal["file", "random"] | None = command.option(
        None,
        help="file: the base file's MAE decoder (PAD); random: a fresh MAE decoder (departs from PAD)",
        group=GROUP,
        default_text="file",
    )
    decoder_heads: int | None = command.option(
        None, help="attention heads of the decoder (not stored in files)", group=GROUP, metavar="N",
        check=command.positive, default_text=f"{DECODER_HEADS}, as MAE's",
    )  # fmt: skip
    decoder_dim: int | None = command.option(
        None, help="--decoder random: the decoder's width", group=GROUP, metavar="N", check=command.positive,
        default_text=f"{DECODER_DIM}, as MAE's",
    )  # fmt: skip
    decoder_depth: int | None = command.option(
        None, help="--decoder random: the decoder's blocks", group=GROUP, metavar="N", check=command.positive,
        default_text=f"{DECODER_DEPTH}, as MAE's",
    )  # fmt: skip
    mask_ratio: float | None = command.option(
        None, help="fraction of patches masked", group=GROUP, metavar="R", default_text=str(MASK_RATIO)
    )
    adapter_width: int | None = command.option(
        None, help="adapter bottleneck r", group=GROUP, metavar="R", check=command.positive,
        default_text=f"{pad_vit.DEFAULT_WIDTH} for every size, as PAD",
    )  # fmt: skip
    scale_frozen_epochs: int | None = command.option(
        None,
        help="the scale predictors stay at zero (every scale 0.5) for epochs 0..N-1",
        group=GROUP,
        metavar="N",
        check=command.non_negative,
        default_text="round(0.6 x epochs) + 1, as PAD's code: 61 of 100",
    )


class Pad(PretrainMethod):
    """``--method pad``: patch-wise-scale adapters trained by continued MAE pre-training."""

    name = "pad"
    options = PadOptions
    # PAD's recipe (docs/PRETRAIN.md of casiatao/PAD): 100 epochs, 30 warm-up, blr 1e-4, wd 0.05,
    # AdamW (0.9, 0.95); images read as they are (MSIP is infrared; no grey conversion).
    defaults = {
        "warmup_epochs": 30, "blr": 1e-4, "grey": "none",
        "decoder": "file", "decoder_heads": DECODER_HEADS, "mask_ratio": MASK_RATIO,
        "adapter_width": pad_vit.DEFAULT_WIDTH,
    }  # fmt: skip
    resume_keys = (
        "init", "decoder", "decoder_heads", "adapter_width", "mask_ratio", "scale_frozen_epochs", "rois",
    )  # fmt: skip

    def check_args(self) -> None:
        args = self.args
        if args.init is None:
            raise SpecError("--method pad needs --init FAMILY:ARCH:PATH, the MAE checkpoint to continue")
        parts = args.init.split(":", 2)
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise SpecError(
                f"--init {args.init!r}: expected FAMILY:ARCH:PATH, e.g. mae:vit_base_patch16_224:mae_visualize_vit_base.pth"
            )
        self.family, self.arch, path = (p.strip() for p in parts)
        self.path = Path(path)
        if self.family not in BASE_FAMILIES:
            if self.family not in FAMILIES:
                raise SpecError(f"--init family {self.family!r}: unknown; known: {', '.join(FAMILIES)}")
            if args.decoder != "random":
                raise SpecError(
                    f"--init family {self.family!r}: PAD continues MAE pre-training and needs the MAE "
                    f"decoder, which only {', '.join(BASE_FAMILIES)} files hold; or pass --decoder random "
                    "(a fresh decoder on this encoder; departs from PAD)"
                )
        if not 0 < args.mask_ratio < 1:
            raise SpecError(f"--mask-ratio must lie in (0, 1), got {args.mask_ratio}")
        if args.decoder == "file" and (args.decoder_dim or args.decoder_depth):
            raise SpecError(
                "--decoder-dim/--decoder-depth build a fresh decoder: use them with --decoder random"
            )
        if args.scale_frozen_epochs is None:
            args.scale_frozen_epochs = default_scale_frozen_epochs(args.epochs)
        if args.rois is not None and args.rois != "none" and not Path(args.rois).is_dir():
            raise SpecError(
                f"--rois {args.rois}: folder not found; pass the unip-rois output folder, or none"
            )

    # --- building --------------------------------------------------------------------------------

    def build(self, device: torch.device) -> None:
        args = self.args
        self.proposal_note, self.proposals_found = "", 0
        if self.family in BASE_FAMILIES:
            base = read_mae_checkpoint(self.path)
            encoder = build_vit(self.arch, img_size=args.img_size)
            check_mae_encoder(encoder, self.arch)
            self.notes = adapt_state_dict(base.encoder, encoder, self.path)
            load_strict(encoder, base.encoder, self.path, self.arch)
            self.base_layout = base.layout
            self.base_sha256 = sha256_file(self.path)
        else:  # --decoder random (check_args): any family's encoder, read by the shared registry
            loaded = load_backbone(self.family, self.arch, self.path, img_size=args.img_size)
            encoder = loaded.model.train()
            check_mae_encoder(encoder, self.arch)
            self.notes = loaded.notes
            self.base_layout = f"{self.family} family"
            self.base_sha256 = loaded.sha256
        grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        patch = int(encoder.patch_embed.patch_size[0])
        if args.decoder == "file":
            if not base.decoder:
                raise CheckpointError(
                    f"{self.path}: holds no MAE decoder (decoder_embed, decoder_blocks, mask_token); PAD "
                    f"continues MAE pre-training from it. Files with one: {FILES_WITH_A_DECODER}. Or pass "
                    "--decoder random (a fresh decoder; departs from PAD)"
                )
            dim, depth = base.decoder_shape()
            decoder = self.new_decoder(encoder, grid, patch, dim, depth)
            adapt_decoder_pos_embed(base.decoder, grid)
            load_strict(decoder, base.decoder, self.path, f"the MAE decoder ({dim} wide, {depth} blocks)")
        else:
            dim, depth = args.decoder_dim or DECODER_DIM, args.decoder_depth or DECODER_DEPTH
            decoder = self.new_decoder(encoder, grid, patch, dim, depth).mae_init()
        self.decoder_shape = (dim, depth)
        pad_vit.add_adapters(encoder, args.adapter_width)
        self.encoder = encoder
        self.module = PadMae(encoder, decoder, args.mask_ratio).to(device)
        self.set_trainable()

    def new_decoder(self, encoder, grid, patch: int, dim: int, depth: int) -> MaeDecoder:
        heads = self.args.decoder_heads
        if heads < 1 or dim % heads:
            raise SpecError(f"--decoder-heads {heads} does not divide the decoder width {dim}")
        return MaeDecoder(int(encoder.embed_dim), grid, patch, dim, depth, heads)

    def set_trainable(self) -> None:
        """Adapters, scale predictors and the decoder train; the encoder, decoder_embed (when it
        comes from the file) and the fixed position embeddings do not."""
        self.module.requires_grad_(False)
        for blk in self.encoder.blocks:
            blk.adapter.requires_grad_(True)
            blk.scale_pred.requires_grad_(True)
        dec = self.module.decoder
        for name, p in dec.named_parameters():
            p.requires_grad_(name != "decoder_pos_embed")
        if self.args.decoder == "file":
            dec.decoder_embed.requires_grad_(False)

    def param_groups(self, weight_decay: float) -> list[dict]:
        # PAD's main_pretrain.py: timm add_weight_decay (1-D tensors and biases exempt; mask_token and
        # the scale predictors decay). The scale predictors are in the optimizer from the start and
        # frozen by on_epoch: without gradients AdamW leaves them (and their moments) untouched.
        return param_groups(self.module, weight_decay, no_decay_names=())

    def on_epoch(self, epoch: int) -> None:
        trains = epoch >= self.args.scale_frozen_epochs
        for w in pad_vit.scale_predictors(self.encoder):
            w.requires_grad_(trains)

    def proposals(self, sources: list) -> list | None:
        if self.args.rois == "none":
            self.proposal_note = "random resized crops (--rois none)"
            return None
        root = Path(self.args.rois) if self.args.rois is not None else None
        images = [(f, Path(s.root)) for s in sources for f in s.files]
        boxes, found = rois.load_all(images, root)
        self.proposals_found = found
        where = str(root) if root is not None else "beside the images (<subset>/roi/)"
        if root is not None and found == 0:
            example = rois.proposal_file(root, images[0][1], images[0][0])
            raise SpecError(
                f"--rois {root}: no proposal file for any of the {len(images)} images (the first would be "
                f"{example}); run unip-rois --images IMAGES --out {root}, or pass --rois none"
            )
        self.proposal_note = (
            f"object proposals {where}: {found} of {len(images)} images have a file "
            f"({sum(len(b) for b in boxes if b is not None)} boxes); the others get random resized crops"
        )
        return boxes

    # --- reporting and export --------------------------------------------------------------------------

    def loss(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, scales = model(images)
        mean, std = scales.t().tolist()
        return loss, {"scale_mean": mean, "scale_std": std}

    def identity(self) -> dict:
        return {"base_sha256": self.base_sha256}

    def departures(self) -> list[str]:
        """How this run departs from PAD's recipe (recorded in backbone.json)."""
        out = []
        if self.args.decoder == "random":
            out.append(
                "--decoder random: a fresh MAE decoder (decoder_embed trained too), not the base file's"
            )
        if self.args.rois == "none":
            out.append("--rois none: random resized crops instead of object-sensitive RoI crops")
        elif self.proposals_found == 0:
            out.append("no proposal files beside the images: random resized crops only (see unip-rois)")
        return out

    def info(self) -> dict:
        return {
            "method": self.name,
            "arch": self.arch,
            "adapter_width": self.args.adapter_width,
            "adapter_parameters": pad_vit.adapter_parameter_count(
                int(self.encoder.embed_dim), self.args.adapter_width, len(self.encoder.blocks)
            ),
            "scale_mode": pad_vit.SCALE_MODE,
            "scale_frozen_epochs": self.args.scale_frozen_epochs,
            "base": {
                "family": self.family,
                "path": str(self.path),
                "sha256": self.base_sha256,
                "layout": self.base_layout,
                "notes": self.notes,
            },
            "decoder": {
                "source": "base file" if self.args.decoder == "file" else "random",
                "dim": self.decoder_shape[0],
                "depth": self.decoder_shape[1],
                "heads": self.args.decoder_heads,
            },
            "proposals": self.proposal_note,
            "departures_from_pad": self.departures(),
        }

    def describe(self) -> str:
        dim, depth = self.decoder_shape
        source = "the base file" if self.args.decoder == "file" else "random init (departs from PAD)"
        return (
            f"PAD: {self.family}:{self.arch} ({self.base_layout} layout) frozen + adapters r={self.args.adapter_width} "
            f"in {len(self.encoder.blocks)} blocks; decoder {dim} wide x {depth} blocks from {source}; "
            f"scale predictors train from epoch {self.args.scale_frozen_epochs} on\n{self.proposal_note}"
        )

    def backbone(self) -> nn.Module:
        return self.encoder

    def export(self, out: Path, summary: dict) -> Path:
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        meta = pad_vit.backbone_metadata(
            self.arch, self.args.adapter_width, {"base_sha256": self.base_sha256}
        )
        path = atomic_write(
            out / "backbone.safetensors", lambda tmp: save_file(state, str(tmp), metadata=meta)
        )
        doc = {**self.info(), **summary}
        atomic_write_text(out / "backbone.json", json.dumps(doc, indent=2) + "\n")
        return path
