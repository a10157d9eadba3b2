"""NMI-HAD pieces (method.md section 2): the frozen teacher, the student, MAE-style init, the losses.

The distilled quantity is one layer's pre-softmax query-key logits ``(q @ k^T) * head_dim^-0.5``,
[B, H, N+1, N+1] with the cls token kept. The teacher computes them at its selected layer; the
student at its last block, which therefore has the teacher's head count at that layer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from unip_analysis.attention import forward_until, layer_qk_logits, qk_logits
from unip_analysis.checkpoints import LoadedBackbone, build_vit, heads_per_layer, set_attention_heads
from unip_analysis.errors import SpecError
from unip_analysis.files import atomic_write

STUDENT_FORMAT = "unip-student"


# --- losses: pure functions over [B, H, Q, K] logits ----------------------------------------


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``mean_{b,h,q} sum_k p[k] (log p[k] - log s[k])`` with p = softmax(teacher), s = softmax(student)
    over the key axis: KL(teacher || student) per query row, averaged over batch, heads and queries.

    Computed in float32 whatever the inputs' dtype.
    """
    log_p = teacher_logits.float().log_softmax(dim=-1)
    log_s = student_logits.float().log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_s)).sum(dim=-1).mean()


def ce_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``mean_{b,h,q} -sum_k p[k] log s[k]``: cross-entropy against the teacher's softmax.

    Equals :func:`kl_loss` plus the teacher's entropy, so it has the same gradient for the student.
    """
    p = teacher_logits.float().softmax(dim=-1)
    log_s = student_logits.float().log_softmax(dim=-1)
    return -(p * log_s).sum(dim=-1).mean()


LOSSES = {"kl": kl_loss, "ce": ce_loss}


# --- teacher -------------------------------------------------------------------------------


class Teacher(torch.nn.Module):
    """A frozen ViT that returns layer ``layer0``'s logits divided by ``temperature``.

    Blocks after the distilled layer are dropped: they are never run.
    """

    def __init__(self, backbone: LoadedBackbone, layer0: int, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise SpecError(f"--temperature must be positive, got {temperature}")
        self.model = backbone.model
        self.model.blocks = self.model.blocks[: layer0 + 1]
        self.model.eval().requires_grad_(False)
        self.layer0 = layer0
        self.heads = int(self.model.blocks[layer0].attn.num_heads)
        self.temperature = float(temperature)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: no dropout, no drop path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return layer_qk_logits(self.model, images, self.layer0) / self.temperature


# --- student ---------------------------------------------------------------------------------


class Student(torch.nn.Module):
    """A timm ViT whose forward returns its last block's q·k logits (nothing after them is run)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last = len(self.vit.blocks) - 1
        tokens = forward_until(self.vit, images, last)
        blk = self.vit.blocks[last]
        return qk_logits(blk.attn, blk.norm1(tokens))


def build_student(
    arch: str, last_heads: int, img_size: int, drop_path_rate: float = 0.1
) -> VisionTransformer:
    """``arch`` with its default head counts except the last block, which gets ``last_heads``
    (the teacher's at the distilled layer); MAE-style init; parameters the loss never reaches frozen."""
    model = build_vit(arch, img_size=img_size, drop_path_rate=drop_path_rate)
    set_attention_heads(model.blocks[-1].attn, int(last_heads))
    mae_init(model)
    freeze_unused(model)
    return model


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1, prefix + rows*cols, dim]; prefix rows are zero.

    Half the channels encode the column, half the row; each half is ``[sin(p w_i), cos(p w_i)]``
    with ``w_i = 10000^(-i / (dim/4))``, i < dim/4 (Vaswani et al., 2-D as in MAE).
    """
    if dim % 4:
        raise SpecError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angle = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    emb = np.concatenate([np.zeros((num_prefix_tokens, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


@torch.no_grad()
def mae_init(model: VisionTransformer) -> None:
    """MAE's init: fixed sin-cos pos_embed (not trained), xavier-uniform Linear and patch
    projection (viewed as a Linear), cls token N(0, 0.02), LayerNorm weight 1 / bias 0."""
    if model.pos_embed is None or getattr(model, "no_embed_class", False):
        raise SpecError("the student needs a learned-position ViT with the cls token in pos_embed")
    prefix = model.num_prefix_tokens
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    model.pos_embed.copy_(sincos_pos_embed_2d(model.embed_dim, grid, prefix))
    model.pos_embed.requires_grad_(False)
    w = model.patch_embed.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if model.cls_token is not None:
        torch.nn.init.normal_(model.cls_token, std=0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


# Inside the last block only norm1 and the q/k projection lead to the logits.
_LAST_BLOCK_USED = ("norm1.", "attn.qkv.", "attn.q_norm.", "attn.k_norm.")


def freeze_unused(model: VisionTransformer) -> None:
    """Freeze what the loss never reaches (the last block's attention output and MLP, the final
    norm): it keeps its init, and DDP needs no search for unused parameters."""
    for name, p in model.blocks[-1].named_parameters():
        if not name.startswith(_LAST_BLOCK_USED):
            p.requires_grad_(False)
    for module in (model.norm, model.fc_norm, model.head):
        module.requires_grad_(False)


def check_token_grids(teacher: torch.nn.Module, student: VisionTransformer, img_size: int) -> None:
    """Teacher and student logits are compared entry by entry: the token sets must be the same."""
    t, s = teacher.model, student
    t_grid, s_grid = tuple(t.patch_embed.grid_size), tuple(s.patch_embed.grid_size)
    if t_grid != s_grid or t.num_prefix_tokens != s.num_prefix_tokens:
        raise SpecError(
            f"at --input-size {img_size} the teacher has a {t_grid[0]}x{t_grid[1]} patch grid "
            f"(patch {t.patch_embed.patch_size[0]}) + {t.num_prefix_tokens} prefix tokens, the student "
            f"{s_grid[0]}x{s_grid[1]} (patch {s.patch_embed.patch_size[0]}) + {s.num_prefix_tokens}; "
            "choose a --student with the teacher's patch size and prefix tokens"
        )


# --- outputs ---------------------------------------------------------------------------------


def student_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The student's weights with timm key names, contiguous on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_student(path: str | Path, model: VisionTransformer, arch: str) -> Path:
    """``student.safetensors``; its metadata lets ``load_backbone("unip", arch, path)`` rebuild it."""
    meta = {
        "format": STUDENT_FORMAT,
        "heads_per_layer": json.dumps(heads_per_layer(model)),
        "arch": arch,
    }
    state = student_state(model)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over parameter names and bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lr_from_blr(blr: float, effective_batch: int) -> float:
    """MAE's linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256
