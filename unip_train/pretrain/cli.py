"""``unip-pretrain``: pre-train a ViT backbone on unlabelled (infrared) images.

``--method nmi-had`` (default): UNIP's hybrid-attention distillation (method.md section 2).
``--method pad``: PAD's patch-wise-scale adapters, continued MAE pre-training (method.md section 7).
Each method is a small object (:mod:`.method`) that declares its own options; the run around it
(data, optimizer, schedule, checkpoints, exact resume, logging, torchrun) is :mod:`.trainer`, the
step :mod:`.engine`. The options are declared once (:class:`PretrainOptions`, the grammar of
:mod:`unip_analysis.command`). Run it as is, or under
``torchrun --nproc_per_node N -m unip_train.pretrain ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unip_analysis import command
from unip_analysis.errors import SpecError

from .. import distributed, runs
from .engine import NonFiniteLoss
from .method import METHODS, PretrainMethod
from .nmi_had import NmiHad, NmiHadOptions
from .pad import Pad, PadOptions
from .trainer import CHECKPOINT, DERIVED, KILL_ENV, OLD_CHECKPOINT, PROG, train
from .trainer import recorded_options as record

__all__ = [
    "CHECKPOINT", "COMMAND", "DERIVED", "KILL_ENV", "METHODS", "OLD_CHECKPOINT", "PretrainOptions", "main", "parse_args",
    "record",
]  # fmt: skip

_REGISTERED = (NmiHad, Pad)  # importing the methods registers them in METHODS, in --help's order
DEFAULT_METHOD = NmiHad.name
# The common options whose default is each method's recipe, as --help shows them.
_RECIPE_TEXT = {
    key: ", ".join(f"{m.defaults[key]} ({n})" for n, m in METHODS.items())
    for key in ("warmup_epochs", "blr", "grey")
}

EPILOG = """\
effective batch = --batch-size x --accum-iter x processes (torchrun --nproc_per_node x nodes).
The published recipe uses 4096 = 256 x 8 x 2 processes; on one process the defaults give 2048, so
use e.g. --accum-iter 16, or --batch-size 128 --accum-iter 4 on 8 processes. The learning rate is
--blr x effective_batch / 256 unless --lr is given. --config FILE (YAML, JSON or TOML; option names
as keys) sets the options; flags override it; a run's own config.json is accepted.

Outputs in --out: config.json (the resolved options, written before the first step), checkpoint.pt
(resumable: --resume; refreshed every --ckpt-every optimizer steps and at each epoch end),
checkpoint-EPOCH.pt every --save-every epochs and at the end, log.jsonl (one line per optimizer
step; TensorBoard scalars in tensorboard/ when installed), and the backbone: nmi-had writes
student.safetensors + student.json (load it with unip-analyze --checkpoint
s=unip:ARCH:RUN/student.safetensors); pad writes backbone.safetensors (timm keys + adapters + scale
predictors, no decoder) + backbone.json (load it as pad:ARCH:RUN/backbone.safetensors in
unip-analyze and unip-finetune). A folder that holds a run is continued with --resume or replaced
with --overwrite (its files moved to previous-<time>/), never reused otherwise.

--method pad switches the defaults to PAD's recipe: 30 warm-up epochs, --blr 1e-4, --grey none,
scale predictors frozen for the first round(0.6 x epochs) + 1 epochs. See docs/pad.md.
"""


@dataclass(kw_only=True)
class MethodChoice:
    method: Literal["nmi-had", "pad"] = command.option(
        DEFAULT_METHOD,
        help="nmi-had: distil a teacher's selected layer into a student (UNIP); pad: adapters trained by "
        "continued MAE pre-training (PAD); each method's own options follow",
        group="method",
    )


@dataclass(kw_only=True)
class CommonOptions:
    """The options every method shares: data, optimization, the run."""

    img_size: int = command.img_size(224, "image side", aliases=("--input-size",))
    infrared: list[Path] = command.option(
        [], help="folder of infrared images, every image under it (repeatable)", group="data",
        metavar="DIR", repeat=True,
    )  # fmt: skip
    infpre: list[Path] = command.option(
        [], help="InfPre / MSIP root: DIR/<dataset>/thermal/* only, paired rgb/ folders never read (repeatable)",
        group="data", metavar="DIR", repeat=True,
    )  # fmt: skip
    rgb: list[Path] = command.option(
        [], help="RGB folder: ImageNet train (class subfolders) or COCO's flat train2017 (repeatable)",
        group="data", metavar="DIR", repeat=True,
    )  # fmt: skip
    per_class_cap: int | None = command.option(
        None,
        help="--rgb folders: at most N images per class subfolder (InfMix: 200); images directly in the "
        "folder (COCO) and --infrared/--infpre folders are never capped",
        group="data",
        metavar="N",
        check=command.positive,
    )
    grey: Literal["all", "rgb", "none"] | None = command.option(
        None,
        help="convert to grey: all (every image, infrared included, as the UNIP reference), rgb (--rgb "
        "folders only), none (as read, as PAD)",
        group="data",
        default_text=_RECIPE_TEXT["grey"],
    )
    max_images_per_source: int | None = command.option(
        None, help="every folder: keep a fixed random subset of N images", group="data", metavar="N",
        check=command.positive,
    )  # fmt: skip
    norm: str = command.norm("infmix", "infmix is mean 0.3801, std 0.1871")
    epochs: int = command.option(
        100, help="epochs", group="optimization", metavar="N", check=command.non_negative
    )
    warmup_epochs: float | None = command.option(
        None, help="linear warm-up, then cosine per optimizer step", group="optimization", metavar="E",
        check=command.non_negative, default_text=_RECIPE_TEXT["warmup_epochs"],
    )  # fmt: skip
    batch_size: int = command.batch_size(256, "images per process per micro-batch")
    accum_iter: int = command.option(
        8, help="micro-batches per optimizer step", group="optimization", metavar="N", check=command.positive
    )
    blr: float | None = command.option(
        None, help="base learning rate: lr = blr x effective_batch / 256", group="optimization",
        metavar="LR", default_text=_RECIPE_TEXT["blr"],
    )  # fmt: skip
    lr: float | None = command.option(
        None, help="absolute learning rate; overrides --blr", group="optimization", metavar="LR"
    )
    min_lr: float = command.option(
        0.0, help="floor of the cosine schedule", group="optimization", metavar="LR"
    )
    weight_decay: float = command.option(
        0.05, help="AdamW; none on biases and norms, cls/mask tokens decay as in the references",
        group="optimization", metavar="WD",
    )  # fmt: skip
    clip_grad: float | None = command.option(
        None, help="clip the gradient norm", group="optimization", metavar="NORM", default_text="off"
    )
    precision: str = command.precision(
        "auto", "auto on CUDA is fp16 with loss scaling where the GPU lacks bf16; fp16 needs CUDA"
    )
    seed: int = command.seed()
    device: str = command.device()
    workers: int | None = command.workers(
        f"data loader processes per training process (default: cores / local processes, at most "
        f"{runs.MAX_DEFAULT_WORKERS}, less torch's threads when the model runs on the CPU)"
    )
    out: Path = command.out("the run folder for all outputs")
    save_every: int = command.option(
        20, help="keep checkpoint-EPOCH.pt every K epochs and at the end", group="run", metavar="K",
        check=command.positive,
    )  # fmt: skip
    ckpt_every: int = command.option(
        50,
        help=f"refresh the resumable {CHECKPOINT} every N optimizer steps mid-epoch (and at every epoch "
        "end); 0: epoch ends only",
        group="run",
        metavar="N",
        aliases=("--ckpt-every-steps",),
        check=command.non_negative,
    )
    resume: str | None = command.resume(f"a run folder of an earlier version: its {OLD_CHECKPOINT}")
    overwrite: bool = command.overwrite()
    progress: bool = command.progress()
    debug: bool = command.debug()


@dataclass(kw_only=True)
class PretrainOptions(CommonOptions, PadOptions, NmiHadOptions, MethodChoice):
    """Every option of ``unip-pretrain``, declared once: the method, each method's own options, then
    the common ones. The recipe defaults (None here) are filled in by :func:`resolve`."""


COMMAND = command.Command(
    PROG,
    PretrainOptions,
    description="Pre-train a ViT backbone on unlabelled images. --method nmi-had (default): train a "
    "student's last-block attention logits to match a frozen teacher's selected layer (UNIP, "
    "method.md section 2). --method pad: continue MAE pre-training of a frozen MAE ViT through "
    "patch-wise-scale adapters (PAD, method.md section 7). Defaults follow each method's published recipe.",
    epilog=EPILOG,
    ignored_keys=DERIVED,
)


def resolve(opts: PretrainOptions) -> PretrainMethod:
    """The method's recipe defaults filled in, the options of other methods refused when given, the
    method's own checks, then the common ones (in that order: a missing --teacher is named before
    missing data). Returns the method object."""
    cls = METHODS[opts.method]
    for name in sorted(cls.foreign_options()):
        if getattr(opts, name) is not None:
            owner = next(n for n, m in METHODS.items() if name in m.option_names())
            raise SpecError(
                f"--{name.replace('_', '-')} is an option of --method {owner}, not of --method {opts.method}; "
                "drop it (see --help)"
            )
    for name, value in cls.defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    method = cls(opts)
    method.check_args()
    if opts.workers is None:
        opts.workers = runs.default_num_workers(opts.device)
    if not opts.infrared and not opts.infpre and not opts.rgb:
        raise SpecError("no data: pass at least one --infrared DIR, --infpre DIR or --rgb DIR")
    return method


def parse_args(argv: Sequence[str] | None = None) -> tuple[PretrainOptions, PretrainMethod]:
    """The resolved options (command line over ``--config``, recipe defaults filled in) and the method."""
    opts = COMMAND.parse(argv)
    return opts, resolve(opts)


def run(opts: PretrainOptions) -> int:
    train(opts, resolve(opts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 done, 1 the loss became non-finite, 2 bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return command.main(COMMAND, run, argv, exit_codes={NonFiniteLoss: 1}, cleanup=distributed.cleanup)
