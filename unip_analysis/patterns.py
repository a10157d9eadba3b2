"""Local / hybrid / global bands on layer NMI, and the layer-selection rule (method.md section 1).

Default thresholds are derived, not fixed numbers: NMI depends on the token grid (a 3x3 local
window over 196 tokens and over 784 tokens give different NMI), so the bands are the NMI of
prototype maps at the analysed grid. A prototype mixes, per query, a local part (uniform over
the query's 3x3 neighbourhood) with a shared part (uniform over all tokens, identical for every
query: complete collapse), ``A = w * local + (1 - w) * shared``:

- ``local_min``  = NMI at w = 0.5: at least half of each query's attention is its own neighbourhood;
- ``global_max`` = NMI at w = 0.1: at most a tenth is, the rest shared by all queries.

Between the two, queries attend both nearby and to shared tokens: the hybrid pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .metrics import local_window_attention, nmi, shared_attention

PATTERNS = ("local", "hybrid", "global")
LOCAL_WEIGHT_FOR_LOCAL_MIN = 0.5
LOCAL_WEIGHT_FOR_GLOBAL_MAX = 0.1


@dataclass(frozen=True)
class Thresholds:
    global_max: float
    local_min: float
    source: str = "given"

    def __post_init__(self) -> None:
        if not 0.0 <= self.global_max < self.local_min <= 1.0:
            raise ValueError(
                f"thresholds need 0 <= global_max < local_min <= 1, got {self.global_max}, {self.local_min}"
            )


def prototype_nmi(grid: tuple[int, int], local_weight: float, radius: int = 1) -> float:
    """NMI of ``w * local_window + (1 - w) * shared`` on a ``grid`` of patch tokens."""
    n = grid[0] * grid[1]
    a = local_weight * local_window_attention(grid, radius) + (1 - local_weight) * shared_attention(n)
    return float(nmi(a[None, None])[0, 0])


def default_thresholds(grid: tuple[int, int]) -> Thresholds:
    """Bands derived from prototype maps at this token grid (see module docstring)."""
    return Thresholds(
        global_max=round(prototype_nmi(grid, LOCAL_WEIGHT_FOR_GLOBAL_MAX), 4),
        local_min=round(prototype_nmi(grid, LOCAL_WEIGHT_FOR_LOCAL_MIN), 4),
        source=(
            f"derived at a {grid[0]}x{grid[1]} token grid: NMI of w*local3x3 + (1-w)*shared with "
            f"w={LOCAL_WEIGHT_FOR_GLOBAL_MAX} (global_max) and w={LOCAL_WEIGHT_FOR_LOCAL_MIN} (local_min)"
        ),
    )


def classify(layer_nmi: float, th: Thresholds) -> str:
    """'global' if NMI <= global_max, 'local' if NMI >= local_min, else 'hybrid'."""
    if layer_nmi <= th.global_max:
        return "global"
    if layer_nmi >= th.local_min:
        return "local"
    return "hybrid"


@dataclass(frozen=True)
class Selection:
    layer: int | None  # 1-based
    rule: str
    fallback: bool = False


def select_layer(
    nmis: Sequence[float],
    patterns: Sequence[str],
    th: Thresholds,
    override: int | None = None,
    fallback: str = "nearest",
) -> Selection:
    """The deepest hybrid layer (how UNIP's MAE-L 18 / DINO-B 9 / iBOT-L 21 read).

    ``override`` (1-based) wins. With no hybrid layer, ``fallback='nearest'`` takes the layer
    whose NMI lies closest to the hybrid band (the deepest on ties); ``'none'`` selects nothing.
    """
    depth = len(nmis)
    if override is not None:
        if not 1 <= override <= depth:
            raise ValueError(f"--layer {override} is outside 1..{depth}")
        return Selection(
            override, f"override: layer {override} chosen by the user ({patterns[override - 1]})"
        )
    hybrid = [i + 1 for i, p in enumerate(patterns) if p == "hybrid"]
    if hybrid:
        return Selection(hybrid[-1], "deepest hybrid layer")
    if fallback == "none":
        return Selection(None, "no hybrid layer; no fallback requested (selected_layer is null)", True)

    def gap(v: float) -> float:
        return max(th.global_max - v, v - th.local_min, 0.0)

    best = min(range(depth), key=lambda i: (round(gap(nmis[i]), 12), -i))
    side = "above" if nmis[best] >= th.local_min else "below"
    return Selection(
        best + 1,
        f"fallback: no layer is hybrid; layer {best + 1} has the NMI closest to the hybrid band "
        f"[{th.global_max:.4f}, {th.local_min:.4f}] ({nmis[best]:.4f}, {side} it)",
        True,
    )
