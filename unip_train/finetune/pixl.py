"""PiXL pixel loss (Gan et al., ICLR 2024; method.md section 8), reconstructed: no code was released.

Each image is a distribution of pixels. Per image, the pixels the model is least sure of (highest
normalised prediction entropy) are "drift" pixels, the rest "joint" pixels. Class prototypes are the
normalised means of the joint-pixel embeddings of a pair of images, at several feature scales, and
drift pixels are pulled toward their class prototype by an InfoNCE loss. Only drift pixels receive a
gradient: prototypes are detached and joint pixels take no other part in the loss.

What method.md section 8 fixes and what this module had to choose (each choice a named option or a
documented rule, see docs/pixl.md):

- embeddings: the decode head's fused map through :class:`ProjectionHead` (1x1 conv, BN, ReLU, 1x1
  conv to 256), L2-normalised; probabilities: softmax of the main logits at the same grid;
- partition: per image exactly ``ceil(eta * valid)`` drift pixels (ties broken by pixel order); label
  255 pixels are neither joint nor drift; eta falls linearly from 0.2 at the first step to 0.001 at
  the last (:func:`eta_at`);
- scales (reconstructed): scale ``s`` is the fused map area-resized by ``s`` (a 2x2 mean for 0.5),
  not a second forward pass at a lower input resolution; labels are taken by nearest resizing;
- prototype choice (reconstructed): per class, the scale with more joint pixels (``count``, the
  method.md rule, ties to the earlier scale) or with the larger share of the class's pixels joint
  (``share``);
- loss (reconstructed): InfoNCE (temperature ``tau``) of every drift pixel of the FIRST scale whose
  class has a prototype, against all prototypes of its group, averaged over those pixels;
- pairs (reconstructed): labelled image ``i`` pairs with unlabelled image ``i``; what is left over
  pairs in order, an odd last image forms a group of one (:func:`pair_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unip_analysis.errors import UnipError

from .layouts import IGNORE_INDEX

DEFAULT_WEIGHT = 0.1
DEFAULT_TAU = 0.1
DEFAULT_ETA = (0.2, 0.001)  # eta at the first and at the last step
DEFAULT_SCALES = (1.0, 0.5)
PROJECTION_DIM = 256
SCALE_RULES = ("count", "share")
# Keeps whole-number products such as 0.2 x 10 from rounding up in binary floating point.
_CEIL_TOLERANCE = 1e-9
# Mixed into the seed that initialises the projection head (numpy SeedSequence keys).
_HEAD_INIT_KEY = 0x9171


class PixlError(UnipError):
    """A PiXL option that cannot be used."""


# --- schedule and partition ---------------------------------------------------------------------


def eta_at(it: int, total: int, start: float = DEFAULT_ETA[0], end: float = DEFAULT_ETA[1]) -> float:
    """Drift fraction at step ``it`` (0-based) of ``total``: ``start + (end - start) * it / (total - 1)``,
    so ``start`` at the first step and ``end`` at the last (clamped beyond them)."""
    frac = min(max(it / (total - 1), 0.0), 1.0) if total > 1 else 0.0
    return start + (end - start) * frac


def drift_count(eta: float, n_valid: int) -> int:
    """``ceil(eta * n_valid)``: how many of an image's valid pixels are drift pixels."""
    return min(n_valid, max(0, math.ceil(eta * n_valid - _CEIL_TOLERANCE)))


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c log p_c / log C`` over dim 1: [N, C, h, w] -> [N, h, w], in [0, 1]."""
    num_classes = probs.shape[1]
    ent = -torch.special.xlogy(probs, probs).sum(dim=1)
    return ent / math.log(num_classes) if num_classes > 1 else torch.zeros_like(ent)


def partition(probs: torch.Tensor, labels: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each image's valid pixels (label != 255) into (joint, drift) boolean masks [N, h, w].

    The ``ceil(eta * valid)`` pixels of highest normalised entropy are drift pixels (equal entropies:
    the earlier pixel in row-major order first); the other valid pixels are joint pixels.
    """
    valid = (labels != IGNORE_INDEX).flatten(1)
    ent = normalized_entropy(probs.detach().float()).flatten(1).masked_fill(~valid, -math.inf)
    order = ent.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    k = [drift_count(eta, n) for n in valid.sum(dim=1).tolist()]
    drift = (rank < torch.tensor(k, device=rank.device)[:, None]) & valid
    return (valid & ~drift).view_as(labels), drift.view_as(labels)


# --- prototypes and the loss ----------------------------------------------------------------------


def class_prototypes(
    emb: torch.Tensor, labels: torch.Tensor, joint: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the L2-normalised mean of the joint-pixel embeddings, detached.

    ``emb`` [N, D, h, w], ``labels`` / ``joint`` [N, h, w] -> (prototypes [C, D], joint counts [C]);
    a class without joint pixels has count 0 and a zero row (it has no prototype).
    """
    z = emb.detach().permute(0, 2, 3, 1)[joint].float()
    y = labels[joint]
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=num_classes)
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=1), counts


def choose_prototypes(
    protos: Sequence[torch.Tensor],
    joint_counts: Sequence[torch.Tensor],
    class_counts: Sequence[torch.Tensor],
    rule: str = "count",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prototype per class from several scales -> (prototypes [C, D], present [C] bool).

    ``count``: the scale with more joint pixels of the class; ``share``: the scale where the larger
    fraction of the class's valid pixels is joint. Ties go to the earlier scale.
    """
    counts = torch.stack(list(joint_counts))  # [S, C]
    if rule == "count":
        key = counts.double()
    elif rule == "share":
        key = counts.double() / torch.stack(list(class_counts)).clamp(min=1).double()
    else:
        raise PixlError(f"--pixl-scale-rule {rule!r}: expected one of {', '.join(SCALE_RULES)}")
    best = key.argmax(dim=0)  # first maximum: the earlier scale wins ties
    classes = torch.arange(counts.shape[1], device=counts.device)
    chosen = torch.stack(list(protos))[best, classes]
    return chosen, counts[best, classes] > 0


def info_nce(
    z: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, present: torch.Tensor, tau: float
) -> tuple[torch.Tensor, int]:
    """Sum over pixels of ``-log(exp(z.p_y / tau) / sum_k exp(z.p_k / tau))`` over the present
    prototypes ``p_k``, and the number of pixels summed (those whose class ``y`` has a prototype).

    ``z`` [M, D] unit embeddings, ``y`` [M] classes, ``protos`` [C, D], ``present`` [C] bool.
    """
    keep = present[y]
    if not bool(keep.any()):
        return z.new_zeros(()), 0
    column = torch.cumsum(present.long(), 0) - 1  # class -> its column among the present prototypes
    logits = z[keep].float() @ protos[present].T / tau
    return F.cross_entropy(logits, column[y[keep]], reduction="sum"), int(keep.sum())


def pair_groups(n_labelled: int, n_extra: int = 0) -> list[list[int]]:
    """Image groups whose joint pixels form shared prototypes (indices into labelled + extra).

    Labelled image ``i`` pairs with extra image ``i``; the rest pair in order and an odd last image
    stands alone.
    """
    m = min(n_labelled, n_extra)
    groups = [[i, n_labelled + i] for i in range(m)]
    rest = list(range(m, n_labelled)) + list(range(n_labelled + m, n_labelled + n_extra))
    groups += [rest[i : i + 2] for i in range(0, len(rest), 2)]
    return groups


def pixl_loss(
    embeddings: Sequence[torch.Tensor],
    probs: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    eta: float,
    groups: Sequence[Sequence[int]],
    tau: float = DEFAULT_TAU,
    scale_rule: str = "count",
) -> torch.Tensor:
    """The PiXL loss: mean InfoNCE of the first scale's drift pixels against their group's prototypes.

    One entry per scale: ``embeddings`` [N, D, h, w] unit vectors, ``probs`` [N, C, h, w], ``labels``
    [N, h, w] (255 ignored). Returns 0 (not NaN) when no drift pixel has a prototype of its class.
    """
    num_classes = probs[0].shape[1]
    parts = [partition(p, y, eta) for p, y in zip(probs, labels)]
    total, count = embeddings[0].new_zeros((), dtype=torch.float32), 0
    for group in groups:
        idx = torch.as_tensor(list(group), device=labels[0].device)
        found = [
            class_prototypes(e[idx], y[idx], joint[idx], num_classes)
            for e, y, (joint, _) in zip(embeddings, labels, parts)
        ]
        valid_counts = [torch.bincount(y[idx][y[idx] != IGNORE_INDEX], minlength=num_classes) for y in labels]
        protos, present = choose_prototypes(
            [f[0] for f in found], [f[1] for f in found], valid_counts, scale_rule
        )
        drift = parts[0][1][idx]
        z = embeddings[0][idx].permute(0, 2, 3, 1)[drift]
        loss_sum, n = info_nce(z, labels[0][idx][drift], protos, present, tau)
        total, count = total + loss_sum, count + n
    return total / max(count, 1)


# --- the projection head and resizing to a scale ----------------------------------------------------


class ProjectionHead(nn.Module):
    """1x1 conv -> BN -> ReLU -> 1x1 conv to ``out_dim``, L2-normalised per pixel (method.md section 8)."""

    def __init__(self, in_dim: int, out_dim: int = PROJECTION_DIM, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).float(), dim=1)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_map(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Area (mean) resizing of a [N, C, h, w] map; the identity at its own size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="area")


def labels_to_grid(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest resizing of label maps [N, H, W] to ``size`` (as the datasets resize labels)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# --- the fine-tuning extension ------------------------------------------------------------------


def parse_floats(text: str | Sequence[float], option: str) -> tuple[float, ...]:
    """``"0.2,0.001"`` (or a sequence) -> floats; errors name ``option``."""
    if not isinstance(text, str):
        return tuple(float(v) for v in text)
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise PixlError(
            f"{option} {text!r}: expected comma-separated numbers, for example 0.2,0.001"
        ) from None


class PixlExtension:
    """PiXL as a fine-tuning extension (the loop's Extension interface: setup, modules, loss_terms,
    state_dict; duck-typed here).

    ``pseudo_labels`` returns the class map [b, H, W] (255 = unknown) of this step's extra images, e.g.
    :meth:`unip_train.finetune.semi.MeanTeacherExtension.confident_pseudo_labels`; without extra
    images it is not called. The projection head is this extension's one trainable module.
    """

    name = "pixl"
    needs_features = True

    def __init__(
        self,
        weight: float = DEFAULT_WEIGHT,
        tau: float = DEFAULT_TAU,
        eta: str | Sequence[float] = DEFAULT_ETA,
        scales: str | Sequence[float] = DEFAULT_SCALES,
        scale_rule: str = "count",
        projection_dim: int = PROJECTION_DIM,
        feature_dim: int | None = None,
        pseudo_labels: Callable[[], torch.Tensor | None] | None = None,
    ):
        self.eta = parse_floats(eta, "--pixl-eta")
        self.scales = parse_floats(scales, "--pixl-scales")
        if not (math.isfinite(weight) and weight >= 0):
            raise PixlError(f"--pixl-weight {weight}: expected a number >= 0 (0 turns the loss off)")
        if not (math.isfinite(tau) and tau > 0):
            raise PixlError(f"--pixl-tau {tau}: expected a positive temperature such as 0.1")
        if len(self.eta) != 2 or not all(0.0 <= e <= 1.0 for e in self.eta):
            raise PixlError(
                f"--pixl-eta {','.join(map(str, self.eta))}: expected START,END, two fractions in [0, 1] "
                "(default 0.2,0.001)"
            )
        if not self.scales or not all(0.0 < s <= 1.0 for s in self.scales):
            raise PixlError(
                f"--pixl-scales {','.join(map(str, self.scales))}: expected one or more scales in (0, 1], "
                "the first being the one whose drift pixels are aligned (default 1,0.5)"
            )
        if scale_rule not in SCALE_RULES:
            raise PixlError(f"--pixl-scale-rule {scale_rule!r}: expected one of {', '.join(SCALE_RULES)}")
        self.weight, self.tau, self.scale_rule = float(weight), float(tau), scale_rule
        self.projection_dim, self.feature_dim = projection_dim, feature_dim
        self.pseudo_labels = pseudo_labels
        self.head: ProjectionHead | None = None
        self.total_iters = 1

    @staticmethod
    def check_mode(mode: str) -> None:
        """PiXL needs the fine-tuning heads' feature map; a linear probe has none."""
        if mode != "ft":
            raise PixlError(
                f"--pixel-loss pixl with --mode {mode}: a frozen backbone with a 1x1 probe has no feature "
                "map to align; use --mode ft (either neck) or --pixel-loss none"
            )

    def setup(self, ctx) -> None:
        """Build the projection head from ``ctx.model.decode_head.classifier.in_channels`` (the fused
        map's width) unless ``feature_dim`` was given; ``ctx.cfg.iters`` sets the eta schedule."""
        self.check_mode(getattr(ctx.cfg, "mode", "ft"))
        self.total_iters = int(ctx.cfg.iters)
        dim = self.feature_dim or int(ctx.model.decode_head.classifier.in_channels)
        # Initialised from its own seed so that adding PiXL leaves the global RNG stream (drop path,
        # dropout) exactly as it is without it: --pixl-weight 0 must match --pixel-loss none.
        seed = int(np.random.SeedSequence([int(ctx.seed), _HEAD_INIT_KEY]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = ProjectionHead(dim, self.projection_dim)
        self.head.to(ctx.device)

    def modules(self) -> list[nn.Module]:
        return [self.head] if self.head is not None else []

    def extra_images(self, it: int) -> None:
        return None

    def loss_terms(self, it: int, labels: torch.Tensor, out, extra=None) -> dict[str, torch.Tensor]:
        """``{"pixl": weight * loss}`` over the labelled images (ground truth) and the extra images
        (pseudo-labels), at every scale of ``scales``."""
        if self.head is None:
            raise RuntimeError("PixlExtension.setup() must run before loss_terms()")
        if out.features is None or (extra is not None and extra.features is None):
            raise RuntimeError("PiXL needs SegOutput.features: run the segmentor with features=True")
        feats, logits, targets, n_extra = out.features, out.logits, labels, 0
        if extra is not None:
            pseudo = self.pseudo_labels() if self.pseudo_labels is not None else None
            if pseudo is None:
                raise RuntimeError(
                    "PiXL got extra (unlabelled) images but no pseudo-labels for them: pass "
                    "pseudo_labels=MeanTeacherExtension.confident_pseudo_labels"
                )
            n_extra = extra.features.shape[0]
            feats = torch.cat([feats, extra.features])
            logits = torch.cat([logits, extra.logits])
            targets = torch.cat([labels, pseudo.to(labels.device)])
        feats = feats.float()  # fp16 under autocast: resize, normalise and compare in fp32
        embeddings, probs, grid_labels = [], [], []
        for s in self.scales:
            size = scaled_size(feats.shape[-2:], s)
            embeddings.append(self.head(resize_map(feats, size)))
            probs.append(torch.softmax(resize_map(logits.detach().float(), size), dim=1))
            grid_labels.append(labels_to_grid(targets, size))
        eta = eta_at(it, self.total_iters, *self.eta)
        groups = pair_groups(labels.shape[0], n_extra)
        loss = pixl_loss(embeddings, probs, grid_labels, eta, groups, self.tau, self.scale_rule)
        return {"pixl": self.weight * loss}

    def after_step(self, it: int) -> None:
        return None

    def state_dict(self) -> dict:
        """The projection head (weights and BN statistics), so a resume needs nothing else."""
        return {"head": self.head.state_dict() if self.head is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.head is None:
            raise RuntimeError("PixlExtension.setup() must run before load_state_dict()")
        self.head.load_state_dict(state["head"])
