"""One epoch of NMI-HAD distillation: the whole training step in one screen (MAE's engine_pretrain).

The learning rate follows the cosine schedule per optimizer step (not per micro-batch): it is set
at the first micro-batch of each accumulation window, from the number of optimizer steps done.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unip_analysis.errors import UnipError

from ..distributed import all_reduce_mean
from ..optim import cosine_lr, set_lr


class NonFiniteLoss(UnipError):
    """The loss (or the gradient norm) became inf/nan: training stops before the update."""


@dataclass(frozen=True)
class LoopConfig:
    iters_per_epoch: int  # micro-batches per epoch, a multiple of accum_iter
    accum_iter: int
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    effective_batch: int
    clip_grad: float | None = None
    amp_dtype: torch.dtype | None = None  # None: float32

    @property
    def steps_per_epoch(self) -> int:
        return self.iters_per_epoch // self.accum_iter


def train_one_epoch(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    cfg: LoopConfig,
    start_iter: int = 0,
    on_step: Callable[[dict, int], None] = lambda record, iters_done: None,
    on_skipped: Callable[[list[str]], None] = lambda paths: None,
    progress: bool = True,
) -> None:
    """Micro-batches ``start_iter .. iters_per_epoch-1`` of ``epoch``; ``on_step(record, iters_done)``
    after every optimizer step (logging, mid-epoch checkpoints)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.accum_iter
    step = epoch * cfg.steps_per_epoch + start_iter // accum  # optimizer steps done so far
    model.train()
    optimizer.zero_grad(set_to_none=True)
    window_losses, tic = [], time.perf_counter()
    bar = tqdm(total=cfg.iters_per_epoch, initial=start_iter, desc=f"epoch {epoch}", disable=not progress)
    for it, (images, skipped) in enumerate(loader, start=start_iter):
        if it >= cfg.iters_per_epoch:
            break
        on_skipped(skipped)
        if it % accum == 0:
            lr = cosine_lr(step, cfg.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)
        last_micro = (it + 1) % accum == 0
        # DDP averages gradients only on the last micro-batch of the window.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None):
                target = teacher(images)
                pred = model(images)
            loss = criterion(target, pred)  # float32
            scaler.scale(loss / accum).backward()
        loss_value = all_reduce_mean(loss.item(), device)  # every process sees a nan on any of them
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"loss is {loss_value} at optimizer step {step + 1} (epoch {epoch}, micro-batch {it}); "
                "stopped before the update; the last checkpoint written is intact. "
                "Lower --lr/--blr, set --clip-grad, or check the teacher weights"
            )
        window_losses.append(loss_value)
        bar.update(1)
        if not last_micro:
            continue
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or math.inf))
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            raise NonFiniteLoss(
                f"gradient norm is {grad_norm} at optimizer step {step + 1} (epoch {epoch}); "
                "stopped before the update; the last checkpoint written is intact. Try --clip-grad"
            )
        scaler.step(optimizer)  # with fp16, skips the update when gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        toc = time.perf_counter()
        record = {
            "step": step,
            "epoch": round(epoch + (it + 1) / cfg.iters_per_epoch, 6),
            "loss": sum(window_losses) / len(window_losses),
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": cfg.effective_batch / max(toc - tic, 1e-9),
        }
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        on_step(record, it + 1)
        window_losses, tic = [], time.perf_counter()
    bar.close()
