"""One NMI-HAD training step: what ``unip-pretrain`` runs vs the straightforward way.

Both variants go through the product's own loop, :func:`unip_train.pretrain.engine.train_one_epoch`
(forward, KL loss, backward, gradient norm, AdamW step), on the same weights, images, loss and
optimizer settings; only the two modules handed to it differ:

- ``ours``:  :class:`unip_train.pretrain.nmi_had.Teacher` (blocks after the distilled layer dropped, never
             run) and :class:`unip_train.pretrain.nmi_had.Student` (timm's fused attention up to the last
             block, then that block's q·k logits only), exactly as ``unip-pretrain`` builds them;
- ``naive``: the whole teacher (all its blocks) and the whole student, every block computing
             explicit attention (``softmax(q k^T * scale) @ v``) and keeping its pre-softmax logits,
             as a ViT that returns its attention would; the loss takes the distilled layer's
             logits from the teacher and the last block's from the student.

Student: ViT-S/16 with its last block re-split to the teacher's head count; teacher: ViT-B/16,
distilled at layer 9 (1-based); input 224; batches 8 and 16; float32 on the CPU. With CUDA the
same is also measured on the GPU with bf16 autocast, and with bf16 autocast + torch.compile.

- ``bare``:  ``ours``' own parts on a ready tensor, nothing around them: the truncated teacher's
             forward, then the student's forward, the loss, backward and the optimizer step
             (:func:`bare_step`; no loader, schedule, non-finite checks or gradient norm).

Timing: the variants run interleaved in one process (ours step, naive step, bare step, ours
step, ...), so slow drifts of a busy machine hit them alike; each is reported as the median of
the timed steps after warm-up steps. Prints one JSON line: per configuration images/s of each
variant, ``ratio_ours_over_naive`` (a throughput ratio; the target is >= 1.3 on the CPU) and
``ratio_ours_over_bare`` (seconds per step, ours / bare: what the product's loop adds to the
step's own work; the target is <= 1.10).

    .venv/bin/python benchmarks/bench_pretrain.py              # ViT-B/16 layer 9 -> ViT-S/16, 224
    .venv/bin/python benchmarks/bench_pretrain.py --quick      # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import types

STUDENT = "vit_small_patch16_224"
TEACHER = "vit_base_patch16_224"
TEACHER_LAYER = 9  # 1-based, DINO-B/16's target layer (method.md section 1)
IMG = 224
BATCHES = (8, 16)
QUICK = {
    "student": "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)",
    # 4 heads at the distilled layer: the student's last block is re-split from 2 to 4.
    "teacher": "vit_tiny_patch16_224(depth=4,embed_dim=96,num_heads=4,patch_size=8)",
    "layer": 3,
    "img": 32,
    "batches": (2,),
}
TARGET_RATIO = 1.3
TARGET_BARE_RATIO = 1.10
BLR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)  # unip-pretrain's defaults


# --- the naive variant ---------------------------------------------------------------------


def explicit_attention(logits_out: list):
    """An attention forward that materialises ``softmax(q k^T * scale)`` and appends the
    pre-softmax logits [B, H, N, N] to ``logits_out`` (differentiable: no in-place ops)."""
    from unip_analysis.attention import project_qkv

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        q, k, v = project_qkv(self, x)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits_out.append(logits)
        out = self.attn_drop(logits.softmax(dim=-1)) @ v
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(out))

    return forward


def naive_module(vit, layer0: int, no_grad: bool):
    """``vit`` (all blocks, explicit attention) as a module returning block ``layer0``'s logits."""
    import torch

    class Naive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit
            self.logits: list = []
            for blk in vit.blocks:
                blk.attn.forward = types.MethodType(explicit_attention(self.logits), blk.attn)

        def forward(self, images):
            self.logits.clear()
            with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
                self.vit.forward_features(images)  # every block, the final norm too
            all_layers = list(self.logits)
            self.logits.clear()
            return all_layers[layer0]

    return Naive()


# --- one configuration -----------------------------------------------------------------------


def build_pair(student_arch: str, teacher_arch: str, layer: int, img: int, device, compile_: bool):
    """{variant: (student module, teacher module, optimizer)} and {variant: loss at init};
    both variants start from the same weights."""
    import torch

    from unip_analysis.checkpoints import LoadedBackbone, build_vit
    from unip_train.optim import adamw, param_groups
    from unip_train.pretrain.nmi_had import Student, Teacher, build_student

    pair, losses = {}, {}
    for variant in ("ours", "naive"):
        torch.manual_seed(0)
        t_vit = build_vit(teacher_arch, img_size=img).eval().requires_grad_(False)
        torch.manual_seed(1)
        heads = int(t_vit.blocks[layer - 1].attn.num_heads)
        s_vit = build_student(student_arch, heads, img)
        if variant == "ours":
            backbone = LoadedBackbone(t_vit, "timm", teacher_arch, "random", "", img)
            teacher, student = Teacher(backbone, layer - 1), Student(s_vit)
        else:
            teacher = naive_module(t_vit, layer - 1, no_grad=True).eval()
            student = naive_module(s_vit, len(s_vit.blocks) - 1, no_grad=False)
        teacher, student = teacher.to(device), student.to(device)
        losses[variant] = eval_loss(student, teacher, img, device)
        groups = param_groups(s_vit, WEIGHT_DECAY)
        # ours: the product's optimizer (fused AdamW); naive: plain torch AdamW, as the reference uses
        optimizer = (
            adamw(groups, BLR, BETAS) if variant == "ours" else torch.optim.AdamW(groups, lr=BLR, betas=BETAS)
        )
        if compile_:
            teacher, student = torch.compile(teacher), torch.compile(student)
        pair[variant] = (student, teacher, optimizer)
    return pair, losses


def eval_loss(student, teacher, img: int, device) -> float:
    """KL loss at init on fixed images, drop path off: equal for both variants when they
    compute the same thing."""
    import torch

    from unip_train.pretrain.nmi_had import kl_loss

    torch.manual_seed(3)
    images = torch.randn(2, 3, img, img, device=device)
    student.eval()
    with torch.no_grad():
        loss = float(kl_loss(teacher(images), student(images)))
    student.train()
    return loss


def bare_step(student, teacher, optimizer, images, amp_dtype, sync) -> tuple[float, float]:
    """``ours``' step reduced to its bare parts on a ready tensor: the truncated teacher's forward,
    then the student's forward, the KL loss, backward and optimizer step; nothing else (no loader,
    schedule, non-finite checks, gradient norm or log record). Seconds of (teacher, student)."""
    import torch

    from unip_train.precision import autocast
    from unip_train.pretrain.nmi_had import kl_loss

    sync()
    t0 = time.perf_counter()
    with autocast(images.device, amp_dtype), torch.no_grad():
        target = teacher(images)
    sync()
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, amp_dtype):
        loss = kl_loss(target, student(images))
    loss.backward()
    optimizer.step()
    sync()
    return t1 - t0, time.perf_counter() - t1


def measure(
    pair: dict, batch: int, img: int, device, amp_dtype, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per training step of each variant and of ``ours``' bare parts (``bare_teacher``,
    ``bare_student``, their sum ``bare``), interleaved step by step, warm-up steps dropped."""
    import torch

    from unip_train.optim import lr_from_blr
    from unip_train.pretrain.engine import LoopConfig, train_one_epoch
    from unip_train.pretrain.nmi_had import kl_loss

    torch.manual_seed(2)
    images = torch.randn(batch, 3, img, img)
    if device.type == "cuda":
        images = images.pin_memory()  # as unip-pretrain's loader gives them
    loader = [(images, [])]  # one micro-batch = one optimizer step, as the product's loader yields
    cfg = LoopConfig(
        iters_per_epoch=1,
        accum_iter=1,
        lr=lr_from_blr(BLR, batch),
        min_lr=0.0,
        warmup_steps=0,
        total_steps=10**6,
        effective_batch=batch,
        amp_dtype=amp_dtype,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # only fp16 scales; bf16/fp32 do not
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {v: [] for v in (*pair, "bare", "bare_teacher", "bare_student")}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}  # CPU seconds of this process's threads
    ready = images.to(device)
    for i in range(warmup + repeats):
        for variant, (student, teacher, optimizer) in pair.items():
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            step_loss = lambda model, x, t=teacher: (kl_loss(t(x), model(x)), {})  # noqa: E731
            train_one_epoch(student, step_loss, loader, optimizer, scaler, 0, cfg, progress=False)
            sync()
            if i >= warmup:
                times[variant].append(time.perf_counter() - t0)
                if variant == "ours":
                    cpu["ours"].append(time.process_time() - c0)
        # ours' own modules and optimizer (the student keeps training: the same work per step)
        c0 = time.process_time()
        t_teacher, t_student = bare_step(*pair["ours"], ready, amp_dtype, sync)
        if i >= warmup:
            cpu["bare"].append(time.process_time() - c0)
            times["bare_teacher"].append(t_teacher)
            times["bare_student"].append(t_student)
            times["bare"].append(t_teacher + t_student)
    return times, cpu


def run_config(args, device_name: str, amp: str, compile_: bool, batch: int) -> dict:
    import torch

    device = torch.device(device_name)
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    pair, losses = build_pair(args.student, args.teacher, args.layer, args.img, device, compile_)
    warmup = max(args.warmup, 3) if compile_ else args.warmup  # compiling takes the first steps
    times, cpu = measure(pair, batch, args.img, device, amp_dtype, warmup, args.repeats)
    step = {v: statistics.median(t) for v, t in times.items()}
    cpu_step = {v: statistics.median(t) for v, t in cpu.items()}
    ips = {v: batch / step[v] for v in ("ours", "naive", "bare")}
    return {
        "device": device_name,
        "precision": amp,
        "compile": compile_,
        "batch": batch,
        "images_per_s": {v: round(x, 3) for v, x in ips.items()},
        "median_step_s": {v: round(s, 4) for v, s in step.items()},
        "ratio_ours_over_naive": round(ips["ours"] / ips["naive"], 3),
        # seconds, not throughput: what the product's step adds to its bare parts (target <= 1.10)
        "ratio_ours_over_bare": round(step["ours"] / step["bare"], 3),
        # the same in CPU seconds of this process (all its threads): what a busy machine's wall
        # time hides (the two agree on a quiet machine)
        "median_step_cpu_s": {v: round(s, 4) for v, s in cpu_step.items()},
        "ratio_cpu_ours_over_bare": round(cpu_step["ours"] / cpu_step["bare"], 3),
        "loss_at_init": losses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, one timed step (smoke test)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant (5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.student, args.teacher, args.layer = QUICK["student"], QUICK["teacher"], QUICK["layer"]
        args.img, batches, args.warmup, args.repeats = QUICK["img"], QUICK["batches"], 1, 1
    else:
        args.student, args.teacher, args.layer, args.img, batches = (
            STUDENT,
            TEACHER,
            TEACHER_LAYER,
            IMG,
            BATCHES,
        )

    settings = [("cpu", "fp32", False)]
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        settings += [("cuda", "bf16", False), ("cuda", "bf16", True)]
    results = [run_config(args, *s, batch) for s in settings for batch in batches]
    cpu = [r for r in results if r["device"] == "cpu"]
    print(
        json.dumps(
            {
                "benchmark": "pretrain_step",
                "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                "load_average_1min": round(os.getloadavg()[0], 2),
                "threads": torch.get_num_threads(),
                "gpu": gpu,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "student": args.student,
                "teacher": args.teacher,
                "teacher_layer": args.layer,
                "img": args.img,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "target_ratio_cpu": TARGET_RATIO,
                "target_met_cpu": min(r["ratio_ours_over_naive"] for r in cpu) >= TARGET_RATIO,
                "target_bare_ratio": TARGET_BARE_RATIO,
                "target_bare_met_cpu": max(r["ratio_ours_over_bare"] for r in cpu) <= TARGET_BARE_RATIO,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
