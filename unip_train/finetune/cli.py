"""``unip-finetune``: LL-FPN fine-tuning, multi-layer fine-tuning and (layer-wise) linear probing of a
ViT backbone on an infrared (or RGB / depth) segmentation dataset, then sliding-window mIoU (method.md
sections 4 and 9).

    unip-finetune --backbone unip:vit_small_patch16_224:student.safetensors --dataset soda \\
        --data-root /data/SODA --mode ft --out runs/soda_ft
    unip-finetune --config runs/soda_ft/config.json --out runs/soda_ft_again
    unip-finetune --eval-only --model runs/soda_ft/model.pt
    torchrun --nproc_per_node 2 -m unip_train.finetune ...   (same flags)

Set-up lives here (options, data, model, optimizer, resume, run folder); the loop is
:func:`unip_train.finetune.engine.train`. From Python: ``run(FinetuneConfig(...)) -> metrics`` and
``evaluate_saved(path) -> metrics``.

A run folder holds ``config.json`` (the resolved options, written before the first step),
``checkpoint.pt`` (resumable training state), ``model.pt`` (state dict + config,
``torch.load(weights_only=True)``), ``metrics.json``, ``log.jsonl`` and ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import fields

from unip_analysis.errors import UnipError, error_line

from .. import runs
from ..precision import AMP_CHOICES
from .config import (
    CE_AVERAGES,
    DEFAULT_CROP,
    DEFAULT_ITERS,
    DEFAULT_WARMUP,
    PIXEL_LOSSES,
    FinetuneConfig,
    FinetuneError,
)
from .layouts import LABEL_MAPS, LAYOUTS
from .ll_fpn import NECKS
from .pixl import DEFAULT_ETA, DEFAULT_SCALES, DEFAULT_TAU, DEFAULT_WEIGHT, SCALE_RULES
from .semi import DEFAULT_DECAY, DEFAULT_THRESHOLD
from .trainer import DERIVED_KEYS, evaluate_saved, run

__all__ = ["build_parser", "main"]

PROG = "unip-finetune"
# Resuming with any of these changed would visit other samples or build another model. (--iters may
# grow: the run then continues on the longer schedule.)
# --- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as for every other error of this CLI
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1-based layer numbers like 4,6,8,12") from None


def build_parser() -> argparse.ArgumentParser:
    """Every option's dest is the :class:`FinetuneConfig` field it sets (so config.json reads back)."""
    iters = ", ".join(f"{k} {v}" for k, v in DEFAULT_ITERS.items())
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", help="JSON or TOML file of option defaults (a run's config.json works); flags override it"
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--backbone", help="FAMILY:ARCH:PATH of the pre-trained ViT")
    g.add_argument("--dataset", help=" | ".join(LAYOUTS))
    g.add_argument("--data-root", help="folder holding the dataset in its layout")
    g.add_argument(
        "--label-map",
        default="auto",
        choices=LABEL_MAPS,
        help="SCUT-Seg labels: auto (detect Cityscapes label IDs, default) | none | cityscapes",
    )
    g.add_argument("--num-classes", type=int, help="folder layout without classes.txt")
    g.add_argument(
        "--norm",
        default="auto",
        help="image normalization: imagenet | infrared | infmix | MEAN,STD; auto (default): the backbone's "
        "pre-training norm when its student.json / backbone.json records one, else the dataset's "
        "(infrared; imagenet for nyuv2, sunrgbd, ade20k, mfnet-rgb)",
    )
    g.add_argument("--train-split", default="train", help="split to train on (default train)")
    g.add_argument(
        "--eval-split",
        help="split to evaluate (default test; ade20k val; MFNet also val, val_test, test_day, test_night)",
    )
    g.add_argument("--mode", default="ft", help="ft (fine-tune, default) | lp (linear probing)")
    g.add_argument("--neck", default="ll-fpn", help=f"{' | '.join(NECKS)} (ft; default ll-fpn)")
    g.add_argument(
        "--layers", type=_layers, help="1-based blocks, e.g. 4,6,8,12 (lp / multi-layer); 12 = one layer"
    )
    g.add_argument(
        "--resplit-last-heads",
        action="store_true",
        help="re-split the last block into the arch's default head count (as the reference)",
    )
    g.add_argument(
        "--adapters",
        choices=("keep", "drop"),
        default="keep",
        help="pad backbones: keep the adapters (trained with the rest, default) or drop them (plain ViT)",
    )
    g.add_argument(
        "--drop-path",
        type=float,
        help="stochastic depth of the last block, 0 at the first (default 0.1; 0.2 for ViT-L)",
    )
    g.add_argument(
        "--layer-scale",
        type=float,
        default=1.0,
        help="LayerScale init in every block, trained (default 1.0; 0 = none)",
    )
    g.add_argument(
        "--rel-pos-bias",
        action=argparse.BooleanOptionalAction,
        help="BEiT-style relative position bias (default: off with ll-fpn, on with multi-layer)",
    )
    g.add_argument("--head-channels", type=int, help="UperNet channels (default: the backbone's embed dim)")
    g.add_argument("--aux-channels", type=int, default=256, help="auxiliary FCN head channels (default 256)")
    g.add_argument("--aux-weight", type=float, default=0.4, help="auxiliary loss weight (default 0.4)")
    g.add_argument(
        "--ce-average",
        default="labelled",
        choices=CE_AVERAGES,
        help="cross-entropy over labelled pixels (default) | all pixels, as the reference's mmseg 0.11",
    )
    g = p.add_argument_group("pixel-level learning (PiXL) and semi-supervision (docs/pixl.md)")
    g.add_argument(
        "--pixel-loss",
        default="none",
        choices=PIXEL_LOSSES,
        help="none (default) | pixl: PiXL's drift-to-prototype InfoNCE on the decode head's features (ft)",
    )
    g.add_argument("--pixl-weight", type=float, default=DEFAULT_WEIGHT, help="PiXL loss weight (0.1)")
    g.add_argument("--pixl-tau", type=float, default=DEFAULT_TAU, help="InfoNCE temperature (0.1)")
    g.add_argument(
        "--pixl-eta",
        default=",".join(map(str, DEFAULT_ETA)),
        metavar="START,END",
        help="drift-pixel fraction, linear from START at the first step to END at the last (0.2,0.001)",
    )
    g.add_argument(
        "--pixl-scales",
        default=",".join(map(str, DEFAULT_SCALES)),
        help="feature scales for the prototypes; drift pixels of the first are aligned (1,0.5)",
    )
    g.add_argument(
        "--pixl-scale-rule",
        default="count",
        choices=SCALE_RULES,
        help="per class, the scale with more joint pixels (count, default) or the larger joint share",
    )
    g.add_argument(
        "--label-fraction",
        metavar="F",
        help="keep a seeded fraction F (e.g. 1/8) of the training split labelled; the rest is unlabelled "
        "and labelled by a mean teacher (writes labelled.txt / unlabelled.txt)",
    )
    g.add_argument(
        "--unlabelled",
        action="append",
        default=[],
        metavar="DIR",
        help="extra label-free images for the mean teacher (repeatable)",
    )
    g.add_argument("--ema-decay", type=float, default=DEFAULT_DECAY, help="mean teacher EMA (0.999)")
    g.add_argument(
        "--pseudo-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="pseudo-label confidence; the loss is weighted by the confident fraction (0.968)",
    )
    g = p.add_argument_group("schedule")
    g.add_argument("--iters", type=int, help=f"training iterations (default: {iters})")
    g.add_argument(
        "--warmup-iters",
        type=int,
        help=f"linear warm-up (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_WARMUP.items())}; at most iters/5)",
    )
    crops = sorted(set(DEFAULT_CROP.values()))
    g.add_argument(
        "--crop",
        type=int,
        help="training crop (default: "
        + "; ".join(f"{c} for {', '.join(k for k, v in DEFAULT_CROP.items() if v == c)}" for c in crops)
        + ")",
    )
    g.add_argument(
        "--batch-size", type=int, help="total over processes (default 8; 4 when fine-tuning ViT-L)"
    )
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    g.add_argument(
        "--layer-decay", type=float, help="layer-wise lr decay (default 0.85 ll-fpn, 0.65 multi-layer)"
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-window", type=int, help="sliding window (default: crop)")
    g.add_argument("--eval-stride", type=int, help="sliding stride (default: 2/3 window, 341 for 512)")
    g.add_argument("--eval-only", action="store_true", help="re-evaluate --model instead of training")
    g.add_argument("--model", help="model.pt of a finished run (with --eval-only)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue this run folder (bare), or from the given checkpoint file",
    )
    g.add_argument(
        "--num-workers",
        "--workers",
        dest="workers",
        type=int,
        default=None,
        help=f"data loader processes per training process, started once (default: cores / local processes, at "
        f"most {runs.MAX_DEFAULT_WORKERS}, less torch's threads when the model runs on the CPU: "
        f"{runs.default_num_workers()} here with --device auto)",
    )
    g.add_argument(
        "--cache-mb",
        type=float,
        default=1024.0,
        help="decoded training images kept in memory, MiB per training process, shared among its loader "
        "workers (1024; 0: decode every time). Results do not depend on it",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision of training and evaluation; auto: bf16 on CUDA (fp16 + loss scaling where "
        "bf16 is missing), none on the CPU",
    )
    g.add_argument("--no-amp", dest="amp", action="store_const", const="none", help="same as --amp none")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory order for the convolutions (patch embedding, neck, heads): the same results up to "
        "summation order, faster (UperNet steps -15%% on CPU, -12..-23%% on an H100; benchmarks/RESULTS.md)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step's model (compiles once at the start; evaluation runs it plain)",
    )
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--ckpt-every", type=int, default=1000)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("backbone", "dataset", "data_root", "out")
        if not getattr(args, n)
    ]
    if missing:
        raise FinetuneError(f"missing {', '.join(missing)} (or use --eval-only --model RUN/model.pt)")
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    values["betas"] = tuple(values["betas"])
    return FinetuneConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = runs.parse_with_config(build_parser(), argv, ignore=DERIVED_KEYS)
        if args.eval_only:
            if not args.model:
                raise FinetuneError("--eval-only needs --model RUN/model.pt")
            metrics = evaluate_saved(
                args.model, args.data_root, args.eval_split, args.out, args.device, args.progress
            )
        else:
            metrics = run(config_from_args(args))
    except UnipError as e:
        if debug:
            raise
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        miou = metrics["miou"]
        shown = f"{miou:.4f}" if miou is not None and math.isfinite(miou) else "n/a"
        print(
            f"mIoU {shown}  pixel acc {metrics['pixel_acc']:.4f}  ({metrics['dataset']}, {metrics['mode']})"
        )
    return 0
