"""Train the two tiny demo teachers that `make demo` analyses (issue: embedded default).

Both are the same timm ViT (DEMO_ARCH at 64x64, 8x8 patches -> 8x8 token grid, MAE's init with a
fixed 2-D sin-cos position embedding), trained on
synthetic infrared scenes (unip_train.synthetic) with different objectives:

- ``mim``: masked image modelling (SimMIM style): 60% of patches replaced by a learned mask
  token, a linear head regresses their pixels (MSE on masked patches only);
- ``sup``: supervised multi-label classification of which object classes are in the scene,
  from the cls token (binary cross-entropy).

UNIP's observation is that the objective shapes the attention pattern over depth; the demo
shows whether these two miniatures reproduce it. Command that made the shipped files:

    .venv/bin/python scripts/train_demo_teachers.py --steps 1500 --out unip_train/assets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unip_analysis.checkpoints import build_vit
from unip_analysis.images import NORMALIZATIONS
from unip_train import synthetic
from unip_train.optim import cosine_lr, param_groups, set_lr
from unip_train.pretrain.nmi_had import mae_init

DEMO_ARCH = "vit_tiny_patch16_224(depth=6,embed_dim=96,num_heads=3,patch_size=8)"
IMG = 64
MASK_RATIO = 0.6


def scenes(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of normalized 3-channel grey scenes and multi-hot class-presence targets."""
    imgs, present = [], []
    for _ in range(n):
        img, lab = synthetic.make_scene(rng, IMG)
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        imgs.append(img.astype(np.float32) / 255.0)
        counts = np.bincount(lab[lab != 255].ravel(), minlength=len(synthetic.CLASSES))
        present.append(counts[1:] >= 8)
    mean, std = NORMALIZATIONS["infrared"]
    x = (torch.from_numpy(np.stack(imgs))[:, None].expand(-1, 3, -1, -1) - mean[0]) / std[0]
    return x.contiguous(), torch.from_numpy(np.stack(present)).float()


def encode(model, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token=None) -> torch.Tensor:
    tokens = model.patch_embed(x)
    if mask is not None:
        tokens = torch.where(mask[..., None], mask_token.expand_as(tokens), tokens)
    tokens = model._pos_embed(tokens)
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.norm(tokens)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] grey image -> [B, patches, p*p] pixel targets (the normalized image itself).

    Not normalized per patch (MAE's norm_pix_loss): these scenes are smooth inside a patch, so
    per-patch normalization would leave mostly sensor noise to predict, and nothing to learn
    from the neighbours."""
    g = x[:, :1]  # grey: one channel carries the image
    b, _, h, w = g.shape
    return g.reshape(b, 1, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p)


def train(objective: str, steps: int, batch: int, seed: int) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_vit(DEMO_ARCH, img_size=IMG)
    mae_init(model)  # both objectives: MAE's init with a fixed 2-D sin-cos position embedding
    p = model.patch_embed.patch_size[0]
    n_tok = model.patch_embed.num_patches
    extra = torch.nn.ModuleDict()
    if objective == "mim":
        extra["head"] = torch.nn.Linear(model.embed_dim, p * p)
        mask_token = torch.nn.Parameter(torch.zeros(1, 1, model.embed_dim))
        torch.nn.init.normal_(mask_token, std=0.02)
    else:
        extra["head"] = torch.nn.Linear(model.embed_dim, len(synthetic.CLASSES) - 1)
        mask_token = None
    wrapper = torch.nn.ModuleDict({"vit": model, "extra": extra})
    groups = param_groups(wrapper, 0.05)
    if mask_token is not None:
        groups.append({"params": [mask_token], "param_names": ["mask_token"], "weight_decay": 0.0, "lr_scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    losses = []
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, steps // 15, 1e-3, 1e-5))
        x, present = scenes(rng, batch)
        if objective == "mim":
            mask = torch.rand(batch, n_tok).argsort(1) < int(MASK_RATIO * n_tok)
            feats = encode(model, x, mask, mask_token)[:, model.num_prefix_tokens :]
            pred = extra["head"](feats)
            loss = (F.mse_loss(pred, patchify(x, p), reduction="none").mean(-1) * mask).sum() / mask.sum()
        else:
            feats = encode(model, x)[:, 0]
            loss = F.binary_cross_entropy_with_logits(extra["head"](feats), present)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"[{objective}] step {step:5d}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    return model, losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objectives", default="mim,sup")
    ap.add_argument("--out", type=Path, default=Path("unip_train/assets"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for objective in args.objectives.split(","):
        model, losses = train(objective, args.steps, args.batch, args.seed)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {"arch": DEMO_ARCH, "img_size": str(IMG), "objective": objective, "steps": str(args.steps),
                "batch": str(args.batch), "seed": str(args.seed),
                "first_loss": f"{np.mean(losses[:50]):.4f}", "last_loss": f"{np.mean(losses[-50:]):.4f}",
                "made_by": f"scripts/train_demo_teachers.py --steps {args.steps} --batch {args.batch} "
                           f"--seed {args.seed} --objectives {objective}"}
        save_file(sd, str(args.out / f"demo_teacher_{objective}.safetensors"), metadata=meta)
        (args.out / f"demo_teacher_{objective}.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {args.out / f'demo_teacher_{objective}.safetensors'}: loss {meta['first_loss']} -> "
              f"{meta['last_loss']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
