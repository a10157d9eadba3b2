"""NMI-HAD (method.md section 2): the frozen teacher, the student, MAE-style init, the losses, and
the ``--method nmi-had`` object the shared pre-training run drives.

The distilled quantity is one layer's pre-softmax query-key logits ``(q @ k^T) * head_dim^-0.5``
plus what the block adds before its softmax (EVA's rotary embedding, BEiT's relative position
bias, its own or the model's shared table), [B, H, N+1, N+1] with the cls token kept. The teacher
computes them at its selected layer with the analysis' own code (``attention.run_until`` and
``attention.block_qk_logits``: exactly ``attention.layer_qk_logits``, in fp32), so the layer
distilled is the layer measured; the student at its last block, which therefore has the
teacher's head count at that layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer

from unip_analysis import command, selection
from unip_analysis.attention import block_qk_logits, check_supported, run_until
from unip_analysis.checkpoints import (
    LoadedBackbone,
    build_vit,
    heads_per_layer,
    load_backbone,
    set_attention_heads,
)
from unip_analysis.errors import SpecError
from unip_analysis.files import atomic_write, atomic_write_text

from .. import distributed
from ..optim import param_groups
from .method import PretrainMethod

STUDENT_FORMAT = "unip-student"
DEFAULT_STUDENT = "vit_small_patch16_224"
DROP_PATH = 0.1


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
    """A frozen ViT that returns layer ``layer0``'s logits divided by ``temperature``: those of
    ``attention.layer_qk_logits``, position terms included, computed in fp32.

    Blocks after the distilled layer are dropped: they are never run. A model whose logits the
    analysis cannot reproduce up to that layer (another attention class, a post-norm block) is
    refused, naming the class.
    """

    def __init__(self, backbone: LoadedBackbone, layer0: int, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise SpecError(f"--temperature must be positive, got {temperature}")
        depth = len(backbone.model.blocks)
        if not 0 <= layer0 < depth:
            raise SpecError(f"teacher layer {layer0 + 1} is outside 1..{depth}")
        self.model = backbone.model
        self.model.blocks = self.model.blocks[: layer0 + 1]
        check_supported(self.model, f"teacher {backbone.family}:{backbone.arch}")
        self.model.eval().requires_grad_(False)
        self.layer0 = layer0
        self.heads = int(self.model.blocks[layer0].attn.num_heads)
        self.temperature = float(temperature)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: no dropout, no drop path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, context = run_until(self.model, images, self.layer0)
        return float32_qk_logits(self.model.blocks[self.layer0], tokens, context) / self.temperature


# --- student ---------------------------------------------------------------------------------


class Student(torch.nn.Module):
    """A timm ViT whose forward returns its last block's q·k logits (nothing after them is run)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last = len(self.vit.blocks) - 1
        tokens, context = run_until(self.vit, images, last)
        return float32_qk_logits(self.vit.blocks[last], tokens, context)


def float32_qk_logits(
    block: torch.nn.Module, tokens: torch.Tensor, context: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The distilled logits of ``block`` for the tokens entering it (``attention.block_qk_logits``;
    ``context``: the rotary embedding or shared bias the model passes it), computed in float32
    whatever autocast is on: the block's norm1, its q/k projection, the position terms and q·k
    (method.md section 2: a bf16 target is ~70x noisier than fp16 against the fp32 one; the
    blocks before may run in bf16)."""
    context = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in (context or {}).items()
    }
    with torch.autocast(tokens.device.type, enabled=False):
        return block_qk_logits(block, tokens.float(), context)


def build_student(
    arch: str, last_heads: int, img_size: int, drop_path_rate: float = 0.1
) -> VisionTransformer:
    """``arch`` with its default head counts except the last block, which gets ``last_heads``
    (the teacher's at the distilled layer); MAE-style init; the same drop path rate in every block
    (the reference's constant rate, not timm's 0..rate ramp); parameters the loss never reaches frozen."""
    model = build_vit(arch, img_size=img_size)
    for blk in model.blocks:
        blk.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else torch.nn.Identity()
        blk.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else torch.nn.Identity()
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
            f"at --img-size {img_size} the teacher has a {t_grid[0]}x{t_grid[1]} patch grid "
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


# --- the method ------------------------------------------------------------------------------


GROUP = "NMI-HAD distillation (--method nmi-had, the default)"


@dataclass(kw_only=True)
class NmiHadOptions:
    """The options of ``--method nmi-had``; None: not given (:attr:`NmiHad.defaults` fills them)."""

    selection: Path | None = command.option(
        None, help="layer_selection.json from unip-analyze (required)", group=GROUP, metavar="FILE"
    )
    teacher: str | None = command.option(
        None, help="the teacher's model name in the selection file (required)", group=GROUP, metavar="NAME"
    )
    layer: int | None = command.option(
        None, help="1-based teacher layer to distil", group=GROUP, metavar="N", check=command.positive,
        default_text="the file's selected_layer",
    )  # fmt: skip
    student: str | None = command.option(
        None, help="timm ViT name, optionally name(k=v,...)", group=GROUP, metavar="ARCH",
        default_text=DEFAULT_STUDENT,
    )  # fmt: skip
    drop_path: float | None = command.option(
        None,
        help="the student's stochastic depth: this same rate in every block (the UNIP reference's constant "
        "rate; unip-finetune's --drop-path is a ramp from 0 at the first block to the rate at the last)",
        group=GROUP,
        metavar="RATE",
        default_text=str(DROP_PATH),
    )
    loss: Literal["kl", "ce"] | None = command.option(
        None, help="kl: KL(teacher || student); ce: cross-entropy against the teacher (the same gradient)",
        group=GROUP, default_text="kl",
    )  # fmt: skip
    temperature: float | None = command.option(
        None, help="the teacher's logits are divided by it", group=GROUP, metavar="T", default_text="1"
    )


class NmiHad(PretrainMethod):
    """``--method nmi-had``: distil a teacher's selected layer into a student's last block."""

    name = "nmi-had"
    options = NmiHadOptions
    defaults = {
        "warmup_epochs": 5, "blr": 1.5e-4, "grey": "all",  # the UNIP reference's recipe
        "student": DEFAULT_STUDENT, "drop_path": DROP_PATH, "loss": "kl", "temperature": 1.0,
    }  # fmt: skip
    resume_keys = ("student", "layer", "loss", "temperature", "drop_path")

    def check_args(self) -> None:
        missing = [f"--{n}" for n in ("selection", "teacher") if getattr(self.args, n) is None]
        if missing:
            raise SpecError(
                f"--method nmi-had needs {' and '.join(missing)}: the layer_selection.json from "
                "unip-analyze and the teacher's name in it"
            )

    def build(self, device: torch.device) -> None:
        args = self.args
        # Teacher: the selection file says which checkpoint and which layer.
        doc = selection.read(args.selection)
        entry, layer = selection.resolve_teacher(doc, args.teacher, str(args.selection), layer=args.layer)
        backbone = load_backbone(entry["family"], entry["arch"], entry["weights"], img_size=args.img_size)
        self.teacher = Teacher(backbone, layer - 1, args.temperature).to(device)
        # Seeded here too, so the student's init does not depend on what loading the teacher drew.
        distributed.seed_everything(args.seed)
        self.vit = build_student(args.student, self.teacher.heads, args.img_size, args.drop_path)
        check_token_grids(self.teacher, self.vit, args.img_size)
        self.module = Student(self.vit).to(device)
        self.criterion = LOSSES[args.loss]
        self.teacher_info = {
            "name": args.teacher,
            "family": entry["family"],
            "arch": entry["arch"],
            "weights": entry["weights"],
            "weights_sha256": entry["weights_sha256"],
            "layer": layer,
            "heads": self.teacher.heads,
        }

    def param_groups(self, weight_decay: float) -> list[dict]:
        # timm's rule, as the reference (param_groups_weight_decay with no name list): cls_token decays.
        return param_groups(self.vit, weight_decay, no_decay_names=())

    def loss(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.criterion(self.teacher(images), model(images)), {}

    def identity(self) -> dict:
        return {
            "teacher_sha256": self.teacher_info["weights_sha256"],
            "teacher_layer": self.teacher_info["layer"],
        }

    def info(self) -> dict:
        return {"teacher": self.teacher_info}

    def describe(self) -> str:
        t = self.teacher_info
        return (
            f"teacher {t['name']} ({t['family']}:{t['arch']}) layer {t['layer']}, {t['heads']} heads; "
            f"student {self.args.student}, heads {heads_per_layer(self.vit)}"
        )

    def backbone(self) -> torch.nn.Module:
        return self.vit

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.vit.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.vit.load_state_dict(state)

    def export(self, out: Path, summary: dict) -> Path:
        path = save_student(out / "student.safetensors", self.vit, self.args.student)
        doc = {"arch": self.args.student, "heads_per_layer": heads_per_layer(self.vit)}
        doc.update(teacher=self.teacher_info, **summary)
        atomic_write_text(out / "student.json", json.dumps(doc, indent=2) + "\n")
        return path
