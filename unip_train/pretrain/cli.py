"""``unip-pretrain``: pre-train a ViT backbone on unlabelled (infrared) images.

``--method nmi-had`` (default): UNIP's hybrid-attention distillation (method.md section 2).
``--method pad``: PAD's patch-wise-scale adapters, continued MAE pre-training (method.md section 7).
Each method is a small object (:mod:`.method`); the run around it (data, optimizer, schedule,
checkpoints, exact resume, logging, torchrun) is :mod:`.trainer`, the step :mod:`.engine`.
Run it as is, or under ``torchrun --nproc_per_node N -m unip_train.pretrain ...``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from unip_analysis.errors import SpecError, UnipError, error_line

from .. import distributed, runs
from ..precision import AMP_CHOICES
from .data import GREY_CHOICES
from .engine import NonFiniteLoss
from .method import PretrainMethod
from .nmi_had import NmiHad
from .pad import Pad
from .trainer import DERIVED, KILL_ENV, LAST, PROG, train

__all__ = ["KILL_ENV", "LAST", "METHODS", "get_args_parser", "main", "parse_args"]

METHODS: dict[str, type[PretrainMethod]] = {m.name: m for m in (NmiHad, Pad)}
DEFAULT_METHOD = "nmi-had"

EPILOG = """\
effective batch = --batch-size x --accum-iter x processes (torchrun --nproc_per_node x nodes).
The published recipe uses 4096 = 256 x 8 x 2 processes; on one process the defaults give 2048, so
use e.g. --accum-iter 16, or --batch-size 128 --accum-iter 4 on 8 processes. The learning rate is
--blr x effective_batch / 256 unless --lr is given. --config FILE (JSON or TOML, long option names
as keys) sets defaults; flags override it; a run's own config.json is accepted.

Outputs in --out: config.json (the resolved configuration, written before the first step),
checkpoint-last.pt (resumable: --resume), checkpoint-EPOCH.pt every --save-every epochs and at the
end, log.jsonl (one line per optimizer step; TensorBoard scalars in tensorboard/ when installed),
and the backbone: nmi-had writes student.safetensors + student.json (load it with
unip-analyze --checkpoint s=unip:ARCH:RUN/student.safetensors); pad writes backbone.safetensors
(timm keys + adapters + scale predictors, no decoder) + backbone.json (load it as
pad:ARCH:RUN/backbone.safetensors in unip-analyze and unip-finetune).

--method pad switches the defaults to PAD's recipe: 30 warm-up epochs, --blr 1e-4, --grey none,
scale predictors frozen for the first round(0.6 x epochs) + 1 epochs. See docs/pad.md.
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pre-train a ViT backbone on unlabelled images. --method nmi-had (default): train a "
        "student's last-block attention logits to match a frozen teacher's selected layer (UNIP, "
        "method.md section 2). --method pad: continue MAE pre-training of a frozen MAE ViT through "
        "patch-wise-scale adapters (PAD, method.md section 7). Defaults follow each method's published recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD, help="(nmi-had)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of option defaults")
    for method in METHODS.values():
        method.add_arguments(p.add_argument_group(method.title))
    g = p.add_argument_group("data (InfMix-style mix)")
    g.add_argument("--input-size", type=int, default=224, help="image side (224)")
    g.add_argument(
        "--infrared",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder of infrared images, every image under it (repeatable)",
    )
    g.add_argument(
        "--infpre",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="InfPre / MSIP root: DIR/<dataset>/thermal/* only, paired rgb/ folders never read (repeatable)",
    )
    g.add_argument(
        "--rgb",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="RGB folder: ImageNet train (class subfolders) or COCO's flat train2017 (repeatable)",
    )
    g.add_argument(
        "--per-class-cap",
        type=int,
        metavar="N",
        help="--rgb folders: at most N images per class subfolder (InfMix: 200); images directly in the "
        "folder (COCO) and --infrared/--infpre folders are never capped",
    )
    g.add_argument(
        "--grey",
        choices=GREY_CHOICES,
        default="all",
        help="convert to grey: all (every image, infrared included, as the UNIP reference; nmi-had "
        "default), rgb (--rgb folders only), none (as read; pad default)",
    )
    g.add_argument(
        "--max-images-per-source",
        type=int,
        metavar="N",
        help="every folder: keep a fixed random subset of N images",
    )
    g.add_argument(
        "--norm",
        default="infmix",
        help="normalization: infmix (mean 0.3801, std 0.1871), infrared, imagenet or MEAN,STD",
    )
    g.add_argument(
        "--num-workers",
        "--workers",
        type=int,
        default=None,
        help=f"data loader processes per training process (default: cores / local processes, at most "
        f"{runs.MAX_DEFAULT_WORKERS}, less torch's threads when the model runs on the CPU: "
        f"{runs.default_num_workers()} here with --device auto)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100, help="(100)")
    g.add_argument(
        "--warmup-epochs", type=float, default=5, help="linear warm-up, then cosine per optimizer step (5)"
    )
    g.add_argument("--batch-size", type=int, default=256, help="images per process per micro-batch (256)")
    g.add_argument("--accum-iter", type=int, default=8, help="micro-batches per optimizer step (8)")
    g.add_argument(
        "--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective_batch / 256 (1.5e-4)"
    )
    g.add_argument("--lr", type=float, help="absolute learning rate; overrides --blr")
    g.add_argument("--min-lr", type=float, default=0.0, help="floor of the cosine schedule (0)")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.05,
        help="AdamW; none on biases and norms, cls/mask tokens decay as in the references (0.05)",
    )
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (off)")
    g.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision; auto: bf16 on CUDA (fp16 + loss scaling where bf16 is missing), none on CPU",
    )
    g.add_argument("--seed", type=int, default=0, help="data order, augmentation and init (0)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    g = p.add_argument_group("run folder and checkpoints")
    g.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder for all outputs")
    g.add_argument(
        "--save-every",
        type=int,
        default=20,
        metavar="K",
        help="keep checkpoint-EPOCH.pt every K epochs and at the end (20)",
    )
    g.add_argument(
        "--ckpt-every-steps",
        type=int,
        default=50,
        metavar="S",
        help="also refresh checkpoint-last.pt every S optimizer steps mid-epoch; 0: epoch ends only (50)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue exactly: bare --resume or 'auto' = this run folder's checkpoint-last.pt "
        "(a fresh start if there is none), or a checkpoint file",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def method_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """The option names (dests) each method's group declares."""
    titles = {m.title: name for name, m in METHODS.items()}
    return {
        titles[g.title]: {a.dest for a in g._group_actions}
        for g in parser._action_groups
        if g.title in titles
    }


def given_options(argv: Sequence[str]) -> dict:
    """The options the command line names, with their values (argparse with every default suppressed,
    so abbreviations and ``--opt=value`` count too)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return vars(parser.parse_args(argv))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, PretrainMethod]:
    """Options with the chosen method's recipe defaults, ``--config`` applied, flags on top; the
    options of other methods refused when given and removed from the namespace."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = given_options(argv)
    from_file = runs.read_config_file(given["config"]) if "config" in given else {}
    name = given.get("method") or from_file.get("method") or DEFAULT_METHOD
    if name not in METHODS:
        raise SpecError(f"{given['config']}: method {name!r} unknown; known: {', '.join(METHODS)}")
    parser = get_args_parser()
    parser.set_defaults(**METHODS[name].defaults)
    args = runs.parse_with_config(parser, argv, ignore=DERIVED)
    named = set(given) | {k for k, v in from_file.items() if v is not None}
    owned = method_options(parser)
    for other, dests in owned.items():
        for dest in sorted(dests - owned[name]):
            if dest in named:
                raise SpecError(
                    f"--{dest.replace('_', '-')} is an option of --method {other}, not of --method {name}; "
                    "drop it (see --help)"
                )
            delattr(args, dest)
    check_args(args)
    method = METHODS[name](args)
    method.check_args()
    return args, method


def check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "accum_iter", "input_size", "save_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_workers is None:
        args.num_workers = runs.default_num_workers(args.device)
    for name in ("epochs", "warmup_epochs", "ckpt_every_steps", "num_workers"):
        if getattr(args, name) < 0:
            raise SpecError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not args.infrared and not args.infpre and not args.rgb:
        raise SpecError("no data: pass at least one --infrared DIR, --infpre DIR or --rgb DIR")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        train(*parse_args(argv))
        return 0
    except (NonFiniteLoss, UnipError) as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, NonFiniteLoss) else 2
    finally:
        distributed.cleanup()
