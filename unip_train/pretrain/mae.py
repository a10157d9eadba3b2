"""Masked-image modelling as MAE defines it (He et al. 2022), the objective PAD continues
(method.md section 7): per-sample random masking, the MAE decoder, the loss on per-patch
normalised pixels of the masked patches, and reading MAE checkpoints that hold the decoder.

Key names follow MAE's ``models_mae.py`` (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``), so an MAE training or "visualize"
checkpoint loads as it is; MMSelfSup / MMPretrain MAE files are renamed onto them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from unip_analysis.checkpoints import read_weights_file
from unip_analysis.errors import CheckpointError

from .nmi_had import sincos_pos_embed_2d

MASK_RATIO = 0.75
NORM_PIX_EPS = 1e-6  # MAE: (target - mean) / sqrt(var + 1e-6)
LN_EPS = 1e-6  # MAE's norm_layer = partial(nn.LayerNorm, eps=1e-6)
# MAE's released decoders: 512 wide, 8 blocks, 16 heads, MLP ratio 4.
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 512, 8, 16
DECODER_PREFIXES = ("decoder_", "decoder.", "mask_token")
FILES_WITH_A_DECODER = (
    "MAE's pre-training checkpoints (mae_visualize_vit_base.pth / _large.pth, or a checkpoint-N.pth of "
    "main_pretrain.py) and MMSelfSup / MMPretrain MAE pre-training files (mae_vit-base-p16_*.pth)"
)


# --- masking and the loss: pure functions ----------------------------------------------------


def random_masking(batch: int, length: int, ratio: float, device: torch.device) -> tuple:
    """MAE's per-sample random masking: (ids_keep [B, K], ids_restore [B, L], mask [B, L] with 1 =
    removed), ``K = int(L * (1 - ratio))``. Draws ``rand(B, L)`` from the global generator of
    ``device`` (restored on resume, so a resumed run masks as the uninterrupted one)."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, device=device)
    ids_shuffle = noise.argsort(dim=1)  # small noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, mask.gather(1, ids_restore)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels (row, column, channel) as MAE."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """``sum_l mask_l * mean_j (pred_lj - t_lj)^2 / sum_l mask_l`` with t each patch's pixels
    normalised by its own mean and (unbiased) variance, ``(x - mean) / sqrt(var + 1e-6)``:
    MAE's ``norm_pix_loss`` on the masked patches only. Computed in float32."""
    target = patchify(images.float(), patch)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


# --- the decoder -------------------------------------------------------------------------------


class MaeDecoder(nn.Module):
    """MAE's decoder: project the kept tokens, insert mask tokens, add the fixed sin-cos position
    embedding, run ``depth`` ViT blocks, predict each patch's pixels."""

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        patch: int,
        dim: int = DECODER_DIM,
        depth: int = DECODER_DEPTH,
        heads: int = DECODER_HEADS,
        in_chans: int = 3,
    ):
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid, 1), requires_grad=False)
        norm = functools.partial(nn.LayerNorm, eps=LN_EPS)
        self.decoder_blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * in_chans)

    @torch.no_grad()
    def mae_init(self) -> MaeDecoder:
        """MAE's init for a decoder built from scratch: xavier-uniform linears, mask token N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        return self

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` [B, 1 + K, D] (cls first) -> predicted pixels [B, L, p*p*C]."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length - (x.shape[1] - 1), -1).to(x.dtype)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# --- reading MAE checkpoints that hold the decoder ------------------------------------------------


@dataclass
class MaeCheckpoint:
    """An MAE file split into the encoder (timm key names) and the decoder (MAE key names)."""

    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor]
    layout: str  # "mae" or "mmpretrain"

    def decoder_shape(self) -> tuple[int, int]:
        """(width, depth) of the stored decoder."""
        dim = int(self.decoder["decoder_embed.weight"].shape[0])
        depth = len({k.split(".")[1] for k in self.decoder if k.startswith("decoder_blocks.")})
        return dim, depth


# MMSelfSup 1.x / MMPretrain (mmcls TransformerEncoderLayer) -> MAE / timm names, applied in order.
_MM_RENAMES = (
    (r"^backbone\.ln1\.", "norm."),  # the encoder's final norm
    (r"^neck\.ln1\.", "decoder_norm."),  # the decoder's final norm
    (r"^(backbone|neck)\.", ""),
    (r"^layers\.", "blocks."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
    (r"\.ln([12])\.", r".norm\1."),
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
)


def mmpretrain_to_mae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MMSelfSup / MMPretrain MAE state dict (``backbone.*`` encoder, ``neck.*`` decoder) with MAE's
    key names; the rest (data preprocessor, head, target generator) is dropped. MMSelfSup 0.x
    decoders already use timm names inside the neck and pass through."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(("backbone.", "neck.")):
            continue
        for pattern, new in _MM_RENAMES:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def read_mae_checkpoint(path: Path) -> MaeCheckpoint:
    """Split an MAE pre-training file into encoder and decoder; ``decoder`` is empty when the file
    has none (a backbone-only release)."""
    raw: Any = read_weights_file(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: not an MAE checkpoint (holds a {type(raw).__name__}, not a dict)")
    sd = next((raw[k] for k in ("model", "state_dict") if isinstance(raw.get(k), Mapping)), raw)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    layout = "mae"
    if any(k.startswith("backbone.layers.") for k in sd):
        sd, layout = mmpretrain_to_mae(sd), "mmpretrain"
    decoder = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    encoder = {k: v for k, v in sd.items() if k not in decoder}
    return MaeCheckpoint(encoder, decoder, layout)


def adapt_decoder_pos_embed(decoder: dict[str, torch.Tensor], grid: tuple[int, int]) -> None:
    """Resize the stored decoder position embedding to ``grid`` (in place), as the encoder's."""
    pe = decoder.get("decoder_pos_embed")
    if pe is None:
        return
    side = int(round((pe.shape[1] - 1) ** 0.5))
    if (side, side) != tuple(grid):
        decoder["decoder_pos_embed"] = resample_abs_pos_embed(
            pe, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1
        )
