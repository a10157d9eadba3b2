"""The fine-tuning loop: the whole training step in one screen (MAE's engine_finetune).

Set-up (model, data, optimizer, resume, run folder) is :func:`unip_train.finetune.trainer.setup`;
this module only trains. Per iteration: poly lr with linear warm-up, one forward over the batch
(plus any extension's extra images), cross-entropy (255 ignored) on the main head plus
``aux_weight`` x the auxiliary head's, plus each extension's loss terms, autocast to ``--amp``'s
dtype (loss scaling with fp16), the optimizer step, then the extensions' ``after_step``. A resumed run continues
mid-epoch exactly where its checkpoint was written. Each log line also says where the time went:
``iter_time``, wall seconds per iteration over its window (a checkpoint included), and
``data_time``, the part of it spent waiting for batches (the progress bar shows the share).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed as du
from ..optim import poly_lr, set_lr
from ..precision import autocast
from ..runs import ScalarLog, WaitClock
from .config import FinetuneConfig, FinetuneError
from .extensions import Extension, SegOutput
from .ll_fpn import Segmentor
from .losses import seg_loss

# Test-only: SIGKILL this process right after iteration N (exercises --resume).
KILL_ENV = "UNIP_FINETUNE_SIGKILL_AT_ITER"


@dataclass
class TrainState:
    """What the loop needs, built once by the set-up."""

    cfg: FinetuneConfig
    dist: du.DistInfo
    model: Segmentor  # the bare module: state dicts, evaluation
    ddp: torch.nn.Module  # what the loop calls: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader  # batches from iteration ``start`` to the last (its batch sampler's range)
    log: ScalarLog
    amp: torch.dtype | None  # autocast dtype; None: float32
    start: int  # iterations already done (resume)
    extensions: list[Extension] = field(default_factory=list)
    extension_modules: dict[str, list[torch.nn.Module]] = field(default_factory=dict)  # by extension name

    @property
    def extension_params(self) -> list[torch.nn.Parameter]:
        return [
            p
            for mods in self.extension_modules.values()
            for m in mods
            for p in m.parameters()
            if p.requires_grad
        ]


def train(s: TrainState, save: Callable[[int], None]) -> None:
    """Iterations ``s.start .. cfg.iters - 1``; ``save(it)`` writes the checkpoint after iteration ``it``."""
    cfg, dist = s.cfg, s.dist
    kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    bar = tqdm(
        total=cfg.iters,
        initial=s.start,
        desc=f"{cfg.mode} {cfg.dataset}",
        disable=not s.log.enabled or not cfg.progress,
    )
    t0, sums, steps = time.time(), {}, 0  # the logging window's sums and iterations (this process's)
    # Where the time goes, per logging window: wall seconds, and seconds spent waiting for batches.
    clock, window_start = WaitClock(), time.perf_counter()
    s.ddp.train()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # One pass over the loader for the whole run: its batches carry their epoch (unip_train.sampling).
    for it, (img, label) in zip(range(s.start, cfg.iters), clock.wrap(s.loader)):
        lr = poly_lr(it, cfg.iters, cfg.warmup_iters, cfg.lr)
        set_lr(s.optimizer, lr)
        img = img.to(dist.device, non_blocking=True, memory_format=memory_format)
        terms = loss_terms(s, it, img, label.to(dist.device, non_blocking=True))
        loss = sum_terms(terms)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        # Every number this step logs in one transfer, once the backward is queued (one sync on CUDA);
        # a non-finite loss still stops the run before the update.
        values = scalar_values([loss, *terms.values()])
        if not math.isfinite(values[0]):
            raise FinetuneError(f"loss became {values[0]} at iteration {it}; lower --lr")
        if dist.enabled and s.extension_modules:
            average_gradients(s.extension_params, dist.world_size)  # DDP averages only the segmentor's
        logging = (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters
        if logging:
            s.scaler.unscale_(s.optimizer)  # the norm of the true gradients; the step is unchanged
            grad_norm = gradient_norm(params)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        for ext in s.extensions:
            ext.after_step(it)
        for name, value in zip(("loss", *terms), values):
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
        it += 1
        bar.update(1)
        if logging:
            sums["iter_time"] = time.perf_counter() - window_start
            sums["data_time"] = clock.take()
            record = {k: du.all_reduce_mean(v / steps, dist.device) for k, v in sums.items()}
            record = {
                "iter": it,
                **record,
                "lr": lr,
                "grad_norm": grad_norm,
                "time": round(time.time() - t0, 2),
            }
            share = record["data_time"] / max(record["iter_time"], 1e-9)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", data=f"{share:.0%}")
            s.log.write(record)
            sums, steps = {}, 0
            window_start = time.perf_counter()  # a checkpoint written now counts in the next window
        if it % cfg.ckpt_every == 0 or it == cfg.iters:
            save(it)
        if kill_at == it:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def loss_terms(s: TrainState, it: int, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every named loss term of iteration ``it``: ``ce``, ``aux_ce`` (weighted), then the extensions'."""
    extra = [x for x in (e.extra_images(it) for e in s.extensions) if x is not None]
    batch = torch.cat([img, *(x.to(img.device, non_blocking=True) for x in extra)]) if extra else img
    with autocast(s.dist.device, s.amp):
        if any(e.needs_features for e in s.extensions):
            out = s.ddp(batch, features=True)
        else:
            out = SegOutput(*s.ddp(batch), None)
    labelled, rest = out.split(img.shape[0])
    terms = {"ce": seg_loss(labelled.logits, label, s.cfg.ce_average)}
    if labelled.aux is not None:
        terms["aux_ce"] = s.cfg.aux_weight * seg_loss(labelled.aux, label, s.cfg.ce_average)
    for ext in s.extensions:
        for name, value in ext.loss_terms(it, label, labelled, rest).items():
            if name in terms:
                raise FinetuneError(
                    f"extension {ext.name!r} returned loss term {name!r}, a name already used"
                )
            terms[name] = value
    return terms


def sum_terms(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The total loss, summed in the terms' order."""
    values = iter(terms.values())
    total = next(values)
    for v in values:
        total = total + v
    return total


def scalar_values(tensors: list[torch.Tensor]) -> list[float]:
    """The values of one-element tensors, read in one device-to-host transfer (one ``.item()`` each
    would synchronise a GPU once per term)."""
    device = tensors[0].device
    return torch.cat([t.detach().float().reshape(1).to(device) for t in tensors]).tolist()


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of each parameter's gradient over processes (what DDP does for the wrapped model)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world_size)


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients together (inf/nan when fp16 overflowed; the scaler skips that step)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
