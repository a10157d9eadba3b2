"""Train the demo's two teachers on the demo task's scenes (unip_train.demo_task); docs/demo.md.

Both teachers are the same timm ViT, TEACHER_ARCH at 64x64 with 8x8 patches (an 8x8 token grid),
8 blocks of width 128: deeper and wider than the demo's student (6 blocks of width 64), as MAE-L
is to UNIP-S. They differ only in the objective, which is what UNIP says shapes attention:

- ``mim``: MAE (He et al. 2022). The encoder sees a random 25% of the patches; a small decoder
  (2 blocks of width 96) fills in mask tokens and regresses the grey pixels of the masked patches
  (mean squared error on masked patches only). The encoder is what ships.
- ``sup``: supervised classification of which object classes a scene contains (multi-label, binary
  cross-entropy) from the cls token, as a DeiT is trained on image labels.
- ``con``: contrastive (SimCLR, Chen et al. 2020): two random resized crops of each scene, the cls
  token through a projection MLP, InfoNCE at temperature 0.2 over the batch.

Training images come from a fixed pool of scenes (the pool's seed is --seed); the MIM teacher also
sees random resized crops, the supervised one flips only (a crop could cut an object out of the
label). Every --probe-every steps the script prints the NMI of every layer on a fixed probe batch
(the same measure unip-analyze reports), so one can watch the objective shape the attention.

The shipped files are stored in float16 (loading casts them back to float32); the command that made
each is in the .json beside it and in the file's own metadata:

    nice -n 10 python scripts/train_demo_teachers.py --objective mim --steps 3000 --out unip_train/assets
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

from unip_analysis.attention import attention_maps
from unip_analysis.checkpoints import build_vit
from unip_analysis.images import NORMALIZATIONS, normalize
from unip_analysis.metrics import nmi, patch_attention
from unip_train import demo_task
from unip_train.optim import cosine_lr, param_groups, set_lr
from unip_train.pretrain.data import augment
from unip_train.pretrain.nmi_had import mae_init, sincos_pos_embed_2d
from unip_train.sampling import keyed_generator

TEACHER_ARCH = "vit_tiny_patch16_224(depth=8,embed_dim=128,num_heads=4,patch_size=8)"
IMG = 64
MASK_RATIO = 0.75
DECODER_HEAD_DIM = 32
OBJECT_CLASSES = [c for c in demo_task.CLASS_INDEX if c != "background"]
MIN_PIXELS_PRESENT = 8  # a class is "in the scene" when it covers at least this many pixels
CONTRASTIVE_DIM, CONTRASTIVE_TEMPERATURE = 64, 0.2


# --- data ----------------------------------------------------------------------------------


def scene_pool(n: int, seed: int, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` demo scenes as uint8 [n, IMG, IMG] and multi-hot class presence [n, classes].

    ``cache``: an .npz to reuse (written on the first call); generation takes minutes on a busy CPU."""
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if z["images"].shape[0] == n and int(z["seed"]) == seed:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["present"]).float()
    images, labels = demo_task.scenes(n, IMG, seed)
    present = np.stack(
        [(labels == demo_task.CLASS_INDEX[c]).sum(axis=(1, 2)) >= MIN_PIXELS_PRESENT for c in OBJECT_CLASSES],
        axis=1,
    )
    if cache is not None:
        np.savez(cache, images=images, present=present, seed=seed)
    return torch.from_numpy(images), torch.from_numpy(present).float()


def draw_batch(pool: torch.Tensor, index: torch.Tensor, key: tuple[int, ...], crop: bool) -> torch.Tensor:
    """Normalized 3-channel images of ``pool[index]``: random resized crop + flip (``crop``) or flip
    only; the draws come from generators keyed by ``key`` and the position in the batch."""
    mean, std = NORMALIZATIONS["infrared"]
    out = []
    for j, i in enumerate(index.tolist()):
        g = keyed_generator(*key, j)
        img = pool[i].float().div(255.0)[None].expand(3, -1, -1)
        if crop:
            img = augment(img, IMG, g)
        elif torch.rand((), generator=g) < 0.5:
            img = img.flip(-1)
        out.append(normalize(img, mean, std))
    return torch.stack(out)


# --- MAE -----------------------------------------------------------------------------------


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] grey image -> [B, patches, p*p] pixels of the grey channel, patches in row-major order."""
    g = x[:, :1]  # grey: one channel carries the image
    b, _, h, w = g.shape
    return (
        g.reshape(b, 1, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p)
    )


def encode_visible(vit: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MAE encoder: patch tokens at positions ``keep`` [B, n_keep] only, with the cls token in front."""
    tokens = vit.patch_embed(x) + vit.pos_embed[:, vit.num_prefix_tokens :]
    tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1)
    for blk in vit.blocks:
        tokens = blk(tokens)
    return vit.norm(tokens)


class MaeDecoder(torch.nn.Module):
    """MAE's decoder, small: mask tokens at the hidden positions, fixed sin-cos positions, a few
    transformer blocks, a linear layer to each patch's pixels."""

    def __init__(self, enc_dim: int, grid: tuple[int, int], patch_pixels: int, dim: int, depth: int):
        super().__init__()
        self.embed = torch.nn.Linear(enc_dim, dim)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid, 1), persistent=False)
        self.blocks = torch.nn.ModuleList(
            Block(dim, dim // DECODER_HEAD_DIM, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)
        )
        self.norm = torch.nn.LayerNorm(dim)
        self.pred = torch.nn.Linear(dim, patch_pixels)
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                torch.nn.init.zeros_(m.bias)
        torch.nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
        x = self.embed(latent)
        b, _, d = x.shape
        full = self.mask_token.expand(b, n, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


def mim_loss(vit, decoder, x: torch.Tensor, g: torch.Generator, norm_pix: bool) -> torch.Tensor:
    """Mean squared error of the predicted pixels of the masked patches (MAE); with ``norm_pix`` the
    target patch is normalized to zero mean and unit variance first (MAE's norm_pix_loss)."""
    p = vit.patch_embed.patch_size[0]
    n = vit.patch_embed.num_patches
    n_keep = int(round(n * (1 - MASK_RATIO)))
    order = torch.rand(x.shape[0], n, generator=g).argsort(dim=1)
    keep = order[:, :n_keep]
    masked = torch.ones(x.shape[0], n, dtype=torch.bool)
    masked.scatter_(1, keep, False)
    pred = decoder(encode_visible(vit, x, keep), keep, n)
    target = patchify(x, p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = F.mse_loss(pred, target, reduction="none").mean(-1)
    return (per_patch * masked).sum() / masked.sum()


def simmim_loss(vit, head, mask_token, x: torch.Tensor, g: torch.Generator, ratio: float) -> torch.Tensor:
    """SimMIM (Xie et al. 2022): masked patches enter the encoder as a learned mask token, a linear
    head regresses every patch's pixels from the last layer, the loss counts masked patches only."""
    p = vit.patch_embed.patch_size[0]
    tokens = vit.patch_embed(x)
    masked = torch.rand(tokens.shape[:2], generator=g).argsort(dim=1) < int(round(ratio * tokens.shape[1]))
    tokens = torch.where(masked[..., None], mask_token.expand_as(tokens), tokens)
    tokens = vit._pos_embed(tokens)
    for blk in vit.blocks:
        tokens = blk(tokens)
    pred = head(vit.norm(tokens)[:, vit.num_prefix_tokens :])
    per_patch = F.mse_loss(pred, patchify(x, p), reduction="none").mean(-1)
    return (per_patch * masked).sum() / masked.sum()


# --- contrastive ----------------------------------------------------------------------------


def projection_head(dim: int) -> torch.nn.Module:
    """SimCLR's projection MLP on the cls token."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, CONTRASTIVE_DIM)
    )


def info_nce(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent): each view's positive is the other view of its scene, the
    negatives every other view in the batch; cosine similarity / CONTRASTIVE_TEMPERATURE."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / CONTRASTIVE_TEMPERATURE
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


# --- probing ---------------------------------------------------------------------------------


@torch.no_grad()
def layer_nmi(vit: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Mean NMI over images and heads of every layer (method.md section 1), on batch ``x``."""
    was_training = vit.training
    vit.eval()
    maps = attention_maps(vit, x)  # 64 tokens a layer at the demo's size: full maps are small
    vit.train(was_training)
    out = {
        layer: float(nmi(patch_attention(attn, vit.num_prefix_tokens)).mean()) for layer, attn in maps.items()
    }
    return [out[i] for i in range(len(vit.blocks))]


# --- training --------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, list[float], list[float], float]:
    """Train one teacher; returns (encoder, losses, final NMI by layer, seconds)."""
    torch.manual_seed(args.seed)
    t_pool = time.time()
    pool, present = scene_pool(args.pool, args.seed, args.pool_cache)
    probe = normalize(
        pool[:32].float().div(255.0)[:, None].expand(-1, 3, -1, -1), *NORMALIZATIONS["infrared"]
    )
    print(f"[{args.objective}] pool of {args.pool} scenes in {time.time() - t_pool:.0f}s", flush=True)
    vit = build_vit(TEACHER_ARCH, img_size=IMG)
    mae_init(vit)  # every objective: MAE's init with a fixed 2-D sin-cos position embedding
    if args.objective == "mim":
        grid, pixels = tuple(vit.patch_embed.grid_size), vit.patch_embed.patch_size[0] ** 2
        extra = MaeDecoder(vit.embed_dim, grid, pixels, args.decoder_dim, args.decoder_depth)
    elif args.objective == "simmim":
        mask_token = torch.nn.Parameter(torch.randn(1, 1, vit.embed_dim) * 0.02)
        extra = torch.nn.ModuleDict(
            {
                "head": torch.nn.Linear(vit.embed_dim, vit.patch_embed.patch_size[0] ** 2),
                "tokens": torch.nn.ParameterDict({"mask_token": mask_token}),
            }
        )
    elif args.objective == "con":
        extra = projection_head(vit.embed_dim)
    else:
        extra = torch.nn.Linear(vit.embed_dim, len(OBJECT_CLASSES))
    model = torch.nn.ModuleDict({"vit": vit, "extra": extra})
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    losses: list[float] = []
    t0 = time.time()
    for step in range(args.steps):
        set_lr(opt, cosine_lr(step, args.steps, warmup, args.lr, args.lr / 100))
        index = torch.randint(0, args.pool, (args.batch,), generator=g)
        if args.objective == "mim":
            x = draw_batch(pool, index, (args.seed, step), crop=True)
            loss = mim_loss(vit, extra, x, g, args.norm_pix)
        elif args.objective == "simmim":
            x = draw_batch(pool, index, (args.seed, step), crop=True)
            loss = simmim_loss(vit, extra["head"], extra["tokens"]["mask_token"], x, g, 0.6)
        elif args.objective == "con":
            views = [draw_batch(pool, index, (args.seed, step, v), crop=True) for v in (0, 1)]
            z = extra(vit.forward_features(torch.cat(views))[:, 0])
            loss = info_nce(*z.chunk(2))
        else:
            x = draw_batch(pool, index, (args.seed, step), crop=False)
            tokens = vit.forward_features(x)
            if args.sup_tokens == "cls":
                loss = F.binary_cross_entropy_with_logits(extra(tokens[:, 0]), present[index])
            else:  # every token answers for the whole scene
                target = present[index][:, None].expand(-1, tokens.shape[1], -1)
                loss = F.binary_cross_entropy_with_logits(extra(tokens), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            profile = " ".join(f"{v:.3f}" for v in layer_nmi(vit, probe))
            print(
                f"[{args.objective}] step {step + 1}/{args.steps} loss {np.mean(losses[-args.probe_every :]):.4f} "
                f"({time.time() - t0:.0f}s) NMI by layer: {profile}",
                flush=True,
            )
    return vit, losses, layer_nmi(vit, probe), time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", choices=("mim", "simmim", "sup", "con"), required=True)
    ap.add_argument("--norm-pix", action="store_true", help="mim: per-patch normalized pixel targets")
    ap.add_argument(
        "--sup-tokens",
        choices=("cls", "all"),
        default="cls",
        help="sup: the cls token predicts the scene's classes (cls), or every token does (all)",
    )
    ap.add_argument("--decoder-depth", type=int, default=2, help="mim: decoder blocks (2)")
    ap.add_argument("--decoder-dim", type=int, default=96, help="mim: decoder width (96)")
    ap.add_argument("--pool-cache", type=Path, help="an .npz to keep the scene pool in between runs")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--pool", type=int, default=8192, help="scenes in the training pool (8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-every", type=int, default=250, help="print NMI by layer every N steps (250)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 is fastest on a machine others are loading too",
    )
    ap.add_argument("--out", type=Path, default=Path("unip_train/assets"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    vit, losses, profile, seconds = train(args)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vit.state_dict().items()}
    command = "python scripts/train_demo_teachers.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    n = min(100, len(losses))
    meta = {
        "arch": TEACHER_ARCH,
        "img_size": str(IMG),
        "objective": {
            "mim": f"MAE (mask {MASK_RATIO}, {'normalized ' if args.norm_pix else ''}pixel MSE)",
            "simmim": "SimMIM (mask 0.6, pixel MSE)",
            "sup": f"supervised multi-label ({'every token' if args.sup_tokens == 'all' else 'cls token'})",
            "con": "contrastive (SimCLR, cls token)",
        }[args.objective],
        "steps": str(args.steps),
        "batch": str(args.batch),
        "lr": str(args.lr),
        "pool": str(args.pool),
        "seed": str(args.seed),
        "dtype": "float16",
        "first_loss": f"{np.mean(losses[:n]):.4f}",
        "last_loss": f"{np.mean(losses[-n:]):.4f}",
        "train_seconds": f"{seconds:.0f}",
        "probe_nmi_by_layer": " ".join(f"{v:.4f}" for v in profile),
        "made_by": command,
    }
    stem = f"demo_teacher_{args.objective}"
    save_file(state, str(args.out / f"{stem}.safetensors"), metadata=meta)
    (args.out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {args.out / f'{stem}.safetensors'}: loss {meta['first_loss']} -> {meta['last_loss']} in {seconds:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
