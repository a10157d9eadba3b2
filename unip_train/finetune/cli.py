"""``unip-finetune``: LL-FPN fine-tuning, multi-layer fine-tuning and (layer-wise) linear probing of a
ViT backbone on an infrared (or RGB / depth) segmentation dataset, then sliding-window mIoU (method.md
sections 4 and 9).

    unip-finetune --backbone unip:vit_small_patch16_224:student.safetensors --dataset soda \\
        --data-root /data/SODA --mode ft --out runs/soda_ft
    unip-finetune --config runs/soda_ft/config.json --out runs/soda_ft_again
    unip-finetune --eval-only --model runs/soda_ft/model.pt --out runs/soda_ft_rescored
    torchrun --nproc_per_node 2 -m unip_train.finetune ...   (same flags)

The options are :class:`unip_train.finetune.config.FinetuneConfig` (declared once) plus the few
this command adds (:class:`FinetuneOptions`); the run is :mod:`unip_train.finetune.trainer`. A run
folder that holds a run is continued (``--resume``) or replaced (``--overwrite``, the old files moved
to ``previous-<time>/``), never silently reused.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

from unip_analysis import command

from .config import FinetuneConfig, FinetuneError
from .trainer import DERIVED_KEYS, evaluate_saved, run

__all__ = ["COMMAND", "FinetuneOptions", "main"]

PROG = "unip-finetune"


@dataclass(kw_only=True)
class FinetuneOptions(FinetuneConfig):
    """``unip-finetune``'s options: every :class:`FinetuneConfig` knob and what only the command has."""

    eval_only: bool = command.option(
        False, help="re-evaluate --model instead of training; writes metrics.json into --out (default: the "
        "model's folder, where an existing metrics.json needs --overwrite and is moved aside; another --out is "
        "recorded in its own run.json)",
        group="evaluation",
    )  # fmt: skip
    model: str | None = command.option(
        None, help="model.pt of a finished run (with --eval-only)", group="evaluation", metavar="RUN/model.pt"
    )
    overwrite: bool = command.overwrite()
    debug: bool = command.debug()


COMMAND = command.Command(
    PROG,
    FinetuneOptions,
    description=__doc__.split("\n\n")[0],
    # What a run's config.json records besides the options (read back with --config, skipped).
    ignored_keys=DERIVED_KEYS,
)


def finetune_config(options: FinetuneOptions) -> FinetuneConfig:
    """The run's :class:`FinetuneConfig` (the options without the command's own)."""
    return FinetuneConfig(**{f.name: getattr(options, f.name) for f in fields(FinetuneConfig)})


def run_command(options: FinetuneOptions) -> int:
    if options.eval_only:
        if not options.model:
            raise FinetuneError("--eval-only needs --model RUN/model.pt")
        metrics = evaluate_saved(
            options.model, options.data_root, options.eval_split, options.out, options.device, options.progress,
            overwrite=options.overwrite,
        )  # fmt: skip
    else:
        metrics = run(finetune_config(options), overwrite=options.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        miou = metrics["miou"]
        shown = f"{miou:.4f}" if miou is not None and math.isfinite(miou) else "n/a"
        print(
            f"mIoU {shown}  pixel acc {metrics['pixel_acc']:.4f}  ({metrics['dataset']}, {metrics['mode']})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 done, 2 bad input)."""
    return command.main(COMMAND, run_command, list(sys.argv[1:] if argv is None else argv))
