"""Semi-supervised fine-tuning: a labelled fraction of the training list, unlabelled infrared images, and a
mean teacher whose confident pseudo-labels train the student (method.md section 8; DACS-style weighting).

- :func:`prepare_semi` splits the training list with the run's seed (``--label-fraction F``), writes
  ``labelled.txt`` / ``unlabelled.txt`` into the run folder, and gathers the unlabelled images: the
  rest of the split and/or every image under ``--unlabelled DIR``.
- :class:`UnlabelledSet` gives, per image, the student's view, the teacher's weakly augmented view and
  a mask of real (not padded) pixels. Both views come from one (seed, epoch, index) key of
  :mod:`unip_train.sampling`, so they share their geometry and a resumed run sees the same crops.
- :class:`MeanTeacherExtension` keeps the teacher (EMA of the student), draws the unlabelled batch of
  each step, labels it with the teacher, and adds the pseudo-label cross-entropy weighted by the
  fraction of confident pixels (threshold 0.968, as DACS).

The mean teacher, in formulas (``t`` = 0-based index of the step just taken):
``alpha_t = min(1 - 1 / (t + 1), decay)``; every floating-point parameter and buffer (BatchNorm running
statistics included) becomes ``alpha_t * teacher + (1 - alpha_t) * student``; integer buffers
(``num_batches_tracked``) are copied. The teacher predicts in eval mode (running statistics, no
dropout, no drop path), so it draws nothing from the global RNG.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unip_analysis.errors import ImageError, UnipError
from unip_analysis.files import atomic_write_text
from unip_analysis.images import IMAGE_SUFFIXES, NORMALIZATIONS, find_images

from ..precision import amp_dtype, autocast
from ..sampling import EpochSampler, KeyBatches, KeyedDataset, keyed_generator, keyed_loader, sample_generator
from .augment import TrainAugment
from .dataset import Norm, SegDataset, read_grey_u8, scaled_norm, to_input
from .layouts import DEFAULT_CROP, IGNORE_INDEX, img_scale
from .losses import seg_loss

DEFAULT_DECAY = 0.999
DEFAULT_THRESHOLD = 0.968  # DACS's confidence threshold
# Stream keys mixed with the run's seed (numpy SeedSequence): far above any epoch number, so the split
# and the unlabelled stream never share a generator with the labelled epochs and crops.
SPLIT_KEY = 0x5E_5B17
UNLABELLED_KEY = 0x5E_5B18
SPLIT_FILES = ("labelled.txt", "unlabelled.txt")


class SemiError(UnipError):
    """A semi-supervised option (--label-fraction, --unlabelled) or its data that cannot be used."""


# --- the split ------------------------------------------------------------------------------------


def parse_label_fraction(text: str | float) -> float:
    """``"1/8"``, ``"0.125"`` or a number -> a fraction in (0, 1]."""
    try:
        value = Fraction(text.strip()) if isinstance(text, str) else Fraction(text)
    except (ValueError, ZeroDivisionError, TypeError):
        value = None
    if value is None or not 0 < value <= 1:
        raise SemiError(
            f"--label-fraction {text}: expected a fraction in (0, 1] such as 1/8, 1/30 or 0.25 "
            "(1 = every training image labelled)"
        )
    return float(value)


@dataclass
class LabelSplit:
    """Image stems of the training list, labelled and unlabelled, in the list's order."""

    fraction: float
    labelled: list[str]
    unlabelled: list[str]


def split_labelled(stems: Sequence[str], fraction: float, seed: int) -> LabelSplit:
    """Choose ``max(1, floor(F * n + 1/2))`` of the ``n`` distinct stems as labelled, by a permutation
    drawn from (``seed``, :data:`SPLIT_KEY`); the same seed and list give the same split."""
    unique = list(dict.fromkeys(stems))  # a stem listed twice is one image, on one side only
    # 0.1 or 1/30 given as floats: their decimal meaning, not their binary approximation.
    frac = Fraction(fraction).limit_denominator(1_000_000)
    n_labelled = min(len(unique), max(1, math.floor(frac * len(unique) + Fraction(1, 2))))
    perm = torch.randperm(len(unique), generator=keyed_generator(seed, SPLIT_KEY)).tolist()
    chosen = set(perm[:n_labelled])
    labelled = [s for i, s in enumerate(unique) if i in chosen]
    unlabelled = [s for i, s in enumerate(unique) if i not in chosen]
    return LabelSplit(float(fraction), labelled, unlabelled)


def write_split(out: str | Path, split: LabelSplit) -> None:
    """``labelled.txt`` and ``unlabelled.txt`` (one stem per line), each written atomically."""
    for name, stems in zip(SPLIT_FILES, (split.labelled, split.unlabelled)):
        atomic_write_text(Path(out) / name, "".join(f"{s}\n" for s in stems))


def labelled_subset(dataset: SegDataset, stems: Sequence[str]) -> SegDataset:
    """A copy of ``dataset`` restricted to ``stems`` (indices renumbered, list order kept)."""
    keep = set(stems)
    subset = copy.copy(dataset)
    subset.samples = [s for s in dataset.samples if s.stem in keep]
    return subset


# --- unlabelled images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnlabelledFile:
    path: Path
    thermal_channel: bool = False  # 4-channel RGB+thermal file (MFNet): take the 4th channel


def list_unlabelled_dir(folder: str | Path) -> list[UnlabelledFile]:
    """Every image under ``folder`` (recursively, sorted); errors name ``--unlabelled`` and the folder."""
    folder = Path(folder)
    if not folder.exists():
        raise SemiError(
            f"--unlabelled {folder}: folder not found; pass a folder of label-free infrared images"
        )
    if not folder.is_dir():
        raise SemiError(f"--unlabelled {folder}: not a folder; pass the folder that holds the images")
    try:
        os.listdir(folder)
    except OSError as e:
        raise SemiError(
            f"--unlabelled {folder}: cannot read the folder ({e.strerror or e}); check its permissions"
        ) from None
    try:
        files = find_images(folder)
    except ImageError:
        raise SemiError(
            f"--unlabelled {folder}: no images found (searched recursively for {', '.join(IMAGE_SUFFIXES)}); "
            "pass a folder that holds infrared images"
        ) from None
    return [UnlabelledFile(p) for p in files]


@dataclass
class SemiData:
    """What :func:`prepare_semi` gives the loop: the labelled training set, the split (``None``
    without ``--label-fraction``) and the unlabelled images (empty: no semi-supervision)."""

    train_set: SegDataset
    split: LabelSplit | None = None
    files: list[UnlabelledFile] = field(default_factory=list)
    left_out: int = 0  # --unlabelled images skipped: labelled training images or evaluation images


def prepare_semi(
    train_set: SegDataset,
    label_fraction: str | float | None,
    unlabelled_dirs: Sequence[str | Path] = (),
    seed: int = 0,
    out: str | Path | None = None,
    min_labelled: int = 1,
    eval_images: Sequence[str | Path] = (),
) -> SemiData:
    """Split ``train_set`` by ``label_fraction`` and gather the unlabelled images.

    Every check runs before anything is written; the split files are written into ``out`` when it is
    given (pass it on the main process only). ``--unlabelled`` images that are labelled training
    images or ``eval_images`` (the evaluation split: training on them, even without labels, would
    leak the test set) are left out, compared by resolved path, and counted in ``left_out``.
    ``min_labelled``: fewest labelled images allowed (the batch size).
    """
    dirs = [Path(d) for d in unlabelled_dirs or ()]
    if label_fraction is None and not dirs:
        return SemiData(train_set)
    if train_set.channels != 1:
        raise SemiError(
            f"--label-fraction / --unlabelled: semi-supervision reads grey infrared images; the "
            f"{train_set.layout.name} layout has colour / depth images (fine-tune it without them)"
        )
    split, labelled = None, train_set
    files: list[UnlabelledFile] = []
    thermal = train_set.layout.thermal_channel
    if label_fraction is not None:
        fraction = parse_label_fraction(label_fraction)
        split = split_labelled([s.stem for s in train_set.samples], fraction, seed)
        labelled = labelled_subset(train_set, split.labelled)
        rest = set(split.unlabelled)
        files = [UnlabelledFile(s.image, thermal) for s in _first_per_stem(train_set) if s.stem in rest]
        if len(labelled) < min_labelled:
            raise SemiError(
                f"--label-fraction {label_fraction}: keeps {len(labelled)} of {len(train_set)} training "
                f"images labelled, fewer than one batch of {min_labelled}; raise the fraction or lower --batch-size"
            )
    forbidden = {s.image.resolve() for s in labelled.samples} | {Path(p).resolve() for p in eval_images}
    taken, left_out = {f.path.resolve() for f in files}, 0
    for d in dirs:
        listed = list_unlabelled_dir(d)
        usable = [f for f in listed if f.path.resolve() not in forbidden]
        left_out += len(listed) - len(usable)
        if not usable:
            raise SemiError(
                f"--unlabelled {d}: every image in it is a labelled training image or an evaluation image; "
                "pass a folder of other label-free infrared images"
            )
        found = [f for f in usable if f.path.resolve() not in taken]  # each image once
        taken |= {f.path.resolve() for f in found}
        files += found
    if out is not None and split is not None:
        write_split(out, split)
    return SemiData(labelled, split, files, left_out)


def _first_per_stem(dataset: SegDataset) -> list:
    seen, first = set(), []
    for s in dataset.samples:
        if s.stem not in seen:
            seen.add(s.stem)
            first.append(s)
    return first


def files_digest(files: Sequence[UnlabelledFile]) -> str:
    """sha256 over the unlabelled file list (paths and channel flags): what a resume must see again."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\t{int(f.thermal_channel)}\n".encode())
    return h.hexdigest()


def stream_seed(seed: int, key: int) -> int:
    """A seed for a separate random stream of the run (``seed`` and ``key`` mixed by SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(key)]).generate_state(1)[0])


class UnlabelledSet(KeyedDataset):
    """Unlabelled images -> (student view [3, crop, crop], teacher view [3, crop, crop], real [crop, crop]).

    The teacher's (weak) view: random rescale, crop and flip of the fine-tuning recipe
    (:class:`~unip_train.finetune.augment.TrainAugment` without photometric distortion). The student's
    view: the same geometry (the same (seed, epoch, index) generator drives both) plus the recipe's
    photometric distortion when ``student_photometric``. ``real`` is False on padding.
    """

    def __init__(
        self,
        files: Sequence[UnlabelledFile],
        crop: int,
        seed: int = 0,
        student_photometric: bool = True,
        norm: Norm | None = None,
        scale: tuple[int, int] | None = None,
    ):
        """``norm``: the labelled set's (mean, std), 0-1 scale (default the infrared statistics);
        ``scale``: the rescale's img_scale (default ``(4 * crop, crop)``)."""
        self.files = list(files)
        self.seed = seed
        mean, std = norm if norm is not None else NORMALIZATIONS["infrared"]
        base = TrainAugment.for_crop(crop, scale)
        # No label steers the crop (cat_max_ratio 1 = accept the first draw).
        self.weak = replace(base, cat_max_ratio=1.0, photometric=False)
        self.student = replace(base, cat_max_ratio=1.0) if student_photometric else self.weak
        self.mean, self.std = scaled_norm(mean, std)

    def __len__(self) -> int:
        return len(self.files)

    def item(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both views of image ``i`` as drawn in ``epoch``."""
        f = self.files[i]
        grey = read_grey_u8(f.path, f.thermal_channel)
        blank = np.zeros(grey.shape[:2], dtype=np.uint8)  # padding turns into 255
        # Two generators from one key: the same draws, hence the same rescale, crop and flip.
        weak, mask = self.weak(grey, blank, sample_generator(self.seed, epoch, i))
        student, _ = self.student(grey, blank, sample_generator(self.seed, epoch, i))
        return (
            to_input(student, self.mean, self.std, mask.shape),
            to_input(weak, self.mean, self.std, mask.shape),
            torch.from_numpy(mask != IGNORE_INDEX),
        )


# --- the mean teacher ---------------------------------------------------------------------------------


def ema_alpha(it: int, decay: float = DEFAULT_DECAY) -> float:
    """``min(1 - 1 / (it + 1), decay)``: the teacher follows the student closely at first (DACS)."""
    return min(1.0 - 1.0 / (it + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher = alpha * teacher + (1 - alpha) * student`` for floating parameters and buffers;
    integer buffers are copied."""
    t_state, s_state = teacher.state_dict(keep_vars=True), student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        raise RuntimeError("mean teacher and student have different state dict keys")
    for key, t in t_state.items():
        s = s_state[key].detach()
        if t.is_floating_point():
            # lerp: t + (1 - alpha) (s - t), the same average, and exactly t wherever s == t.
            t.data.lerp_(s.to(t.dtype), 1.0 - alpha)
        else:
            t.data.copy_(s)


def pseudo_labels(
    logits: torch.Tensor, real: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits [b, C, H, W] (at the image size) -> (labels, confident labels, weight).

    ``labels``: argmax, 255 on padding; ``confident``: the same, 255 also where the top probability is
    below ``threshold``; ``weight``: the fraction of real pixels that are confident (0 when none is
    real), the factor of the pseudo-label cross-entropy (DACS).
    """
    conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    labels = labels.masked_fill(~real, IGNORE_INDEX)
    confident_mask = (conf >= threshold) & real
    confident = labels.masked_fill(~confident_mask, IGNORE_INDEX)
    n_real = real.sum()
    weight = confident_mask.sum().float() / n_real.clamp(min=1).float()
    return labels, confident, weight


def _logits_of(output) -> torch.Tensor:
    """Main logits of a segmentor's forward: ``SegOutput.logits``, or the first of ``(logits, aux)``."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def check_teacher_options(decay: float, threshold: float) -> None:
    """The mean teacher's EMA decay in [0, 1) and pseudo-label confidence threshold in [0, 1]."""
    if not 0.0 <= decay < 1.0:
        raise SemiError(f"--ema-decay {decay}: expected a number in [0, 1), such as 0.999")
    if not 0.0 <= threshold <= 1.0:
        raise SemiError(f"--pseudo-threshold {threshold}: expected a probability in [0, 1], such as 0.968")


class MeanTeacherExtension:
    """Mean-teacher self-training as a fine-tuning extension (the loop's Extension interface).

    Each step: :meth:`extra_images` draws this process's unlabelled batch, runs the teacher on the
    weak views, keeps the pseudo-labels and returns the student views (appended to the labelled
    batch); :meth:`loss_terms` gives ``{"semi_ce": weight * confident_fraction * CE}``;
    :meth:`after_step` moves the teacher. :meth:`confident_pseudo_labels` is what PiXL uses as the
    unlabelled images' classes.
    """

    name = "semi"
    needs_features = False

    def __init__(
        self,
        files: Sequence[UnlabelledFile],
        split: LabelSplit | None = None,
        decay: float = DEFAULT_DECAY,
        threshold: float = DEFAULT_THRESHOLD,
        weight: float = 1.0,
        batch_size: int | None = None,
        workers: int | None = None,
        student_photometric: bool = True,
    ):
        if not files:
            raise SemiError("no unlabelled images: give --label-fraction below 1 or --unlabelled DIR")
        check_teacher_options(decay, threshold)
        self.files, self.split = list(files), split
        self.decay, self.threshold, self.weight = float(decay), float(threshold), float(weight)
        self.batch_size, self.workers, self.student_photometric = batch_size, workers, student_photometric
        self.teacher: nn.Module | None = None
        self._pseudo: torch.Tensor | None = None
        self._confident: torch.Tensor | None = None
        self._conf_weight: torch.Tensor | None = None
        self._iter: Iterator | None = None
        self._at: int | None = None  # the iteration the open stream serves next

    def setup(self, ctx) -> None:
        """Teacher = a copy of ``ctx.model``; the unlabelled loader for this process (``ctx.dist``)."""
        self.device, self.student = torch.device(ctx.device), ctx.model
        self.amp = amp_dtype(getattr(ctx.cfg, "precision", "fp32"), self.device)
        self.teacher = copy.deepcopy(ctx.model).to(self.device).eval().requires_grad_(False)
        world, rank = ctx.dist.world_size, ctx.dist.rank
        b = self.batch_size or max(1, int(ctx.cfg.batch_size) // world)
        seed = stream_seed(ctx.seed, UNLABELLED_KEY)
        crop, train_set, dataset = int(ctx.cfg.img_size), ctx.train_set, getattr(ctx.cfg, "dataset", None)
        self.dataset = UnlabelledSet(
            self.files, crop, seed, self.student_photometric,
            None if train_set is None else (train_set.mean, train_set.std),
            img_scale(dataset, crop) if dataset in DEFAULT_CROP else None,
        )  # fmt: skip
        self.sampler = EpochSampler(len(self.files), world, rank, seed=seed)
        self.per_epoch = self.sampler.per_rank // b
        if self.per_epoch < 1:
            raise SemiError(
                f"{len(self.files)} unlabelled images give {self.sampler.per_rank} per process, fewer than one "
                f"unlabelled batch of {b}; add images with --unlabelled or lower --batch-size"
            )
        workers = self.workers if self.workers is not None else int(getattr(ctx.cfg, "workers", 0))
        self.batches = KeyBatches(self.sampler, b, self.per_epoch)
        self.loader = keyed_loader(self.dataset, self.batches, workers, pin_memory=self.device.type == "cuda")

    def modules(self) -> list[nn.Module]:
        return []

    def _next_batch(self, it: int):
        """The unlabelled batch of iteration ``it``: position ``it mod per_epoch`` of epoch
        ``it // per_epoch`` of this process's share; a function of ``it`` alone. Consecutive
        iterations read one stream (its workers start once); any other ``it`` opens it there."""
        if self._iter is None or self._at != it:
            self.batches.set_range(it)
            self._iter = iter(self.loader)
        self._at = it + 1
        return next(self._iter)

    def extra_images(self, it: int) -> torch.Tensor:
        """Student views [b, 3, crop, crop] of iteration ``it``; the teacher labels the weak views."""
        student, weak, real = (t.to(self.device, non_blocking=True) for t in self._next_batch(it))
        with torch.no_grad(), autocast(self.device, self.amp):
            logits = _logits_of(self.teacher(weak))
        logits = F.interpolate(logits.float(), size=real.shape[-2:], mode="bilinear", align_corners=False)
        self._pseudo, self._confident, self._conf_weight = pseudo_labels(logits, real, self.threshold)
        return student

    def confident_pseudo_labels(self) -> torch.Tensor | None:
        """This step's teacher classes of the extra images [b, crop, crop]; 255 where unsure or padded."""
        return self._confident

    def loss_terms(self, it: int, labels: torch.Tensor, out, extra=None) -> dict[str, torch.Tensor]:
        if extra is None or self._pseudo is None:
            return {}
        ce = seg_loss(extra.logits, self._pseudo)
        return {"semi_ce": self.weight * self._conf_weight * ce}

    def after_step(self, it: int) -> None:
        """EMA of the student into the teacher after optimizer step ``it`` (0-based)."""
        ema_update(self.teacher, self.student, ema_alpha(it, self.decay))

    def state_dict(self) -> dict:
        """The teacher, the split and the unlabelled list's digest (checked on resume). Positions in
        the unlabelled stream follow from the iteration, which the loop saves."""
        return {
            "teacher": self.teacher.state_dict() if self.teacher is not None else {},
            "labelled": list(self.split.labelled) if self.split is not None else None,
            "files_sha256": files_digest(self.files),
            "num_files": len(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the teacher after checking that the split and the unlabelled images are the
        checkpoint's. The next :meth:`extra_images` call opens the stream where its iteration lies."""
        labelled = list(self.split.labelled) if self.split is not None else None
        if state.get("labelled") != labelled:
            raise SemiError(
                "checkpoint: its labelled/unlabelled split differs from this run's (another --label-fraction, "
                "seed or training list); resume with the same settings or start a new run folder"
            )
        if state.get("files_sha256") != files_digest(self.files):
            raise SemiError(
                f"checkpoint: it was written with another set of unlabelled images ({state.get('num_files')} "
                f"then, {len(self.files)} now); resume with the same --unlabelled folders and --label-fraction"
            )
        self.teacher.load_state_dict(state["teacher"])
        self._iter = None
