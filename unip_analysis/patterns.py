"""Local / hybrid / global bands on layer NMI, and the layer-selection rule (method.md section 1).

Default thresholds are derived, not fixed numbers: NMI depends on the token grid (a 3x3 local
window over 196 tokens and over 784 tokens give different NMI), so the bands are the NMI of
prototype maps at the analysed grid. A prototype mixes, per query, a local part (uniform over
the query's 3x3 neighbourhood) with a shared part (uniform over all tokens, identical for every
query: complete collapse), ``A = w * local + (1 - w) * shared``:

- ``local_min``  = NMI at w = 0.5: at least half of each query's attention is its own neighbourhood;
- ``global_max`` = NMI at w = 0.1: at most a tenth is, the rest shared by all queries.

Between the two, queries attend both nearby and to shared tokens: the hybrid pattern.

The prototypes are measured with the NMI definition the bands are applied to ('park' or 'unip',
:mod:`unip_analysis.metrics`). They have no prefix tokens (what a cls token or a register
attends to in a "local" or "global" pattern is not defined) and their rows sum to 1, so both
definitions give the same band edges (to ~1e-9): the difference between them lies in the maps
they are fed.

:func:`robustness` says how much a selection depends on where the edges sit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .metrics import check_nmi_definition, local_window_attention, nmi, nmi_unip, shared_attention

# One colour per pattern in every figure, report and the explorer.
PATTERN_COLORS = {"local": "#4C72B0", "hybrid": "#55A868", "global": "#C44E52"}
PATTERNS = ("local", "hybrid", "global")
LOCAL_WEIGHT_FOR_LOCAL_MIN = 0.5
LOCAL_WEIGHT_FOR_GLOBAL_MAX = 0.1
# How far the band edges move in :func:`robustness`: multiples of global_max and of local_min.
GLOBAL_MAX_FACTORS = (0.5, 1.0, 2.0, 4.0, 8.0)
LOCAL_MIN_FACTORS = (0.75, 1.0, 1.25)


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


def prototype_nmi(
    grid: tuple[int, int], local_weight: float, radius: int = 1, nmi_definition: str = "park"
) -> float:
    """NMI (``nmi_definition``: 'park' or 'unip') of ``w * local_window + (1 - w) * shared`` on a
    ``grid`` of patch tokens."""
    n = grid[0] * grid[1]
    a = local_weight * local_window_attention(grid, radius) + (1 - local_weight) * shared_attention(n)
    measure = nmi_unip if check_nmi_definition(nmi_definition) == "unip" else nmi
    return float(measure(a[None, None])[0, 0])


def default_thresholds(grid: tuple[int, int], nmi_definition: str = "park") -> Thresholds:
    """Bands derived from prototype maps at this token grid, measured with the NMI definition they
    will be applied to (see module docstring)."""
    return Thresholds(
        global_max=round(prototype_nmi(grid, LOCAL_WEIGHT_FOR_GLOBAL_MAX, nmi_definition=nmi_definition), 4),
        local_min=round(prototype_nmi(grid, LOCAL_WEIGHT_FOR_LOCAL_MIN, nmi_definition=nmi_definition), 4),
        source=(
            f"derived at a {grid[0]}x{grid[1]} token grid: {nmi_definition} NMI of w*local3x3 + (1-w)*shared "
            f"with w={LOCAL_WEIGHT_FOR_GLOBAL_MAX} (global_max) and w={LOCAL_WEIGHT_FOR_LOCAL_MIN} (local_min)"
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


def edge_margins(nmis: Sequence[float], ci95: Sequence[Sequence[float]], th: Thresholds) -> list[dict]:
    """Per layer, its NMI's signed distance to the nearest band edge, ``NMI - edge``, and that of
    its 95% bootstrap interval ``[lo - edge, hi - edge]``; ``edge_in_ci95`` when the interval
    contains the edge (the layer's pattern is then not settled by the images analysed)."""
    out = []
    for i, (v, (lo, hi)) in enumerate(zip(nmis, ci95)):
        edge = min(("global_max", "local_min"), key=lambda e: abs(v - getattr(th, e)))
        at = getattr(th, edge)
        out.append(
            {
                "layer": i + 1,
                "edge": edge,
                "margin": float(v - at),
                "margin_ci95": [float(lo - at), float(hi - at)],
                "edge_in_ci95": bool(lo <= at <= hi),
            }
        )
    return out


def robustness(
    nmis: Sequence[float],
    ci95: Sequence[Sequence[float]],
    th: Thresholds,
    fallback: str = "nearest",
    global_max_factors: Sequence[float] = GLOBAL_MAX_FACTORS,
    local_min_factors: Sequence[float] = LOCAL_MIN_FACTORS,
) -> dict:
    """How robust the rule's choice is: the ``robustness`` object of a model in layer_selection.json.

    - ``margins``: :func:`edge_margins` of every layer;
    - ``moved_bands``: for every pair of factors, the layer the rule (deepest hybrid, with
      ``fallback``) selects with ``global_max * f`` and ``local_min * g``; ``valid`` is false
      (and ``selected_layer`` null) where the moved edges cross (``global_max >= local_min``);
    - ``rule_layer``: the rule's layer at the given bands;
    - ``fragile``: the rule selects another layer (or none) somewhere in that range.
    """
    rule = select_layer(nmis, [classify(v, th) for v in nmis], th, fallback=fallback).layer
    cells, changed = [], False
    for f in global_max_factors:
        for g in local_min_factors:
            gmax, lmin = th.global_max * f, th.local_min * g
            valid = 0.0 <= gmax < lmin <= 1.0
            layer = None
            if valid:
                moved = Thresholds(gmax, lmin, source="moved")
                layer = select_layer(nmis, [classify(v, moved) for v in nmis], moved, fallback=fallback).layer
                changed |= layer != rule
            cells.append(
                {
                    "global_max_factor": float(f),
                    "local_min_factor": float(g),
                    "global_max": float(gmax),
                    "local_min": float(lmin),
                    "valid": valid,
                    "selected_layer": layer,
                }
            )
    return {
        "margins": edge_margins(nmis, ci95, th),
        "moved_bands": cells,
        "rule_layer": rule,
        "fragile": changed,
    }
