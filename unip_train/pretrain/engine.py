"""One pre-training epoch, whatever the method: the whole training step in one screen (MAE's
engine_pretrain).

A method only supplies ``step_loss(model, images) -> (loss, extras)``; accumulation, autocast,
loss scaling, gradient clipping, the cosine schedule and the non-finite checks live here once.
The learning rate follows the cosine schedule per optimizer step (not per micro-batch): it is set
at the first micro-batch of each accumulation window, from the number of optimizer steps done.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unip_analysis.errors import UnipError

from ..distributed import all_reduce_mean, all_reduce_mean_list
from ..optim import cosine_lr, set_lr
from ..precision import autocast
from ..runs import WaitClock

# (model, images) -> (scalar loss, extra numbers to log: name -> float or list of floats)
StepLoss = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict]]


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
    step_loss: StepLoss,
    loader: Iterable[tuple[torch.Tensor, list[str]]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    cfg: LoopConfig,
    start_iter: int = 0,
    on_step: Callable[[dict, int], None] = lambda record, iters_done: None,
    on_skipped: Callable[[list[str]], None] = lambda paths: None,
    progress: bool = True,
) -> None:
    """Micro-batches ``start_iter .. iters_per_epoch-1`` of ``epoch``, the next ones ``loader`` gives
    (a loader iterator that runs on across epochs: no more is drawn from it); ``on_step(record,
    iters_done)`` after every optimizer step (logging, mid-epoch checkpoints). ``model`` is what DDP
    wraps."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.accum_iter
    step = epoch * cfg.steps_per_epoch + start_iter // accum  # optimizer steps done so far
    model.train()
    optimizer.zero_grad(set_to_none=True)
    window_losses, window_extras, tic = [], [], time.perf_counter()
    clock = WaitClock()  # seconds spent waiting for batches, per optimizer step
    bar = tqdm(total=cfg.iters_per_epoch, initial=start_iter, desc=f"epoch {epoch}", disable=not progress)
    for it, (images, skipped) in zip(range(start_iter, cfg.iters_per_epoch), clock.wrap(loader)):
        on_skipped(skipped)
        if it % accum == 0:
            lr = cosine_lr(step, cfg.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)
        last_micro = (it + 1) % accum == 0
        # DDP averages gradients only on the last micro-batch of the window.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, cfg.amp_dtype):
                loss, extras = step_loss(model, images)  # the loss itself is float32
            scaler.scale(loss / accum).backward()
        loss_value = all_reduce_mean(loss.item(), device)  # every process sees a nan on any of them
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"loss is {loss_value} at optimizer step {step + 1} (epoch {epoch}, micro-batch {it}); "
                "stopped before the update; the last checkpoint written is intact. "
                "Lower --lr/--blr, set --clip-grad, or check the starting weights"
            )
        window_losses.append(loss_value)
        window_extras.append(extras)
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
            "data_time": all_reduce_mean(clock.take() / len(window_losses), device),
            **mean_extras(window_extras, device),
        }
        share = record["data_time"] * len(window_losses) / max(toc - tic, 1e-9)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", data=f"{share:.0%}")
        on_step(record, it + 1)
        window_losses, window_extras, tic = [], [], time.perf_counter()
    bar.close()


def mean_extras(extras: list[dict], device: torch.device) -> dict:
    """Each extra number averaged over the window's micro-batches, then over processes (one
    collective for all of them). Lists are averaged element-wise (e.g. one value per layer)."""
    if not extras or not extras[0]:
        return {}
    keys = list(extras[0])
    flat, shapes = [], []
    for key in keys:
        rows = [e[key] if isinstance(e[key], list) else [e[key]] for e in extras]
        flat += [sum(col) / len(rows) for col in zip(*rows)]
        shapes.append((key, len(rows[0]), isinstance(extras[0][key], list)))
    flat = all_reduce_mean_list(flat, device)
    out, i = {}, 0
    for key, n, is_list in shapes:
        out[key] = flat[i : i + n] if is_list else flat[i]
        i += n
    return out
