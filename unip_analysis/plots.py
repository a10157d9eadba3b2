"""Figures of the attention-pattern analysis, one function per figure.

Every function takes data (the tidy layer table of :func:`unip_analysis.report.layer_frame`, a
:class:`~unip_analysis.analyze.ModelAnalysis`), draws on a new figure or on ``ax``, and returns
the Figure; :func:`save` writes one atomically. Notebook use::

    from unip_analysis import plots, report
    table = report.layer_frame(doc)                  # or res.layer_table() of one analysis
    plots.plot_nmi_curves(table, thresholds)
    plots.plot_attention_maps(res, selected=9)

Matplotlib's Agg backend is chosen only when no backend has been picked yet (Jupyter keeps its own).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .analyze import ModelAnalysis  # noqa: E402
from .errors import ImageError  # noqa: E402
from .files import atomic_write_bytes  # noqa: E402
from .images import read_image, resize_center_crop  # noqa: E402
from .patterns import PATTERN_COLORS, PATTERNS, Thresholds  # noqa: E402

_BAND_ALPHA = 0.13
_MODEL_COLORS = plt.get_cmap("tab10").colors

Tables = pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame]


# --- data plumbing -------------------------------------------------------------------------


def _as_frame(tables: Tables) -> pd.DataFrame:
    """One tidy frame (model, layer, nmi, ...) from a frame, a list of frames or {name: frame}."""
    if isinstance(tables, pd.DataFrame):
        frame = tables.copy()
    elif isinstance(tables, Mapping):
        frame = pd.concat([t.assign(model=name) for name, t in tables.items()], ignore_index=True)
    else:
        frame = pd.concat(list(tables), ignore_index=True)
    if "model" not in frame:
        frame["model"] = "model"
    if "depth" not in frame:
        frame["depth"] = frame.groupby("model")["layer"].transform("max")
    if "selected" not in frame:
        frame["selected"] = False
    return frame


def _x_axis(frame: pd.DataFrame, x: str) -> tuple[str, str]:
    """Column and label of the depth axis; ``auto`` uses relative depth when depths differ."""
    if x == "auto":
        x = "layer" if frame["depth"].nunique() == 1 else "relative"
    if x == "layer":
        return "layer", "layer (1-based)"
    if x == "relative":
        return "rel_depth", "relative depth (layer / depth)"
    raise ValueError(f"x must be 'auto', 'layer' or 'relative', got {x!r}")


def _with_rel_depth(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(rel_depth=frame["layer"] / frame["depth"])


def _model_colors(models: Iterable[str]) -> dict[str, tuple]:
    return {m: _MODEL_COLORS[i % len(_MODEL_COLORS)] for i, m in enumerate(models)}


def _new_axes(ax, size: tuple[float, float]):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, layout="constrained")
    return ax.figure, ax


def _shade_bands(ax, th: Thresholds, ymax: float) -> None:
    """Global / hybrid / local bands on the NMI axis, labelled at the right edge."""
    spans = {
        "global": (0.0, th.global_max),
        "hybrid": (th.global_max, th.local_min),
        "local": (th.local_min, ymax),
    }
    for pattern, (lo, hi) in spans.items():
        if hi <= lo:
            continue
        ax.axhspan(lo, hi, color=PATTERN_COLORS[pattern], alpha=_BAND_ALPHA, lw=0, zorder=0)
        ax.text(
            1.005,
            (lo + hi) / 2,
            pattern,
            transform=ax.get_yaxis_transform(),
            va="center",
            ha="left",
            fontsize=9,
            color=PATTERN_COLORS[pattern],
            fontweight="bold",
            clip_on=False,
        )
    for v in (th.global_max, th.local_min):
        ax.axhline(v, color="0.4", lw=0.8, ls="--", zorder=1)


# --- figures -----------------------------------------------------------------------------


def plot_nmi_curves(
    tables: Tables, thresholds: Thresholds, ax=None, x: str = "auto", nmi_definition: str | None = None
) -> Figure:
    """Layer NMI against depth for every model, over the local / hybrid / global bands.

    Shaded error bands are the bootstrap 95% intervals over images (``nmi_ci_lo``/``nmi_ci_hi``
    columns, when present); a star marks each model's selected layer. ``nmi_definition`` ('park'
    or 'unip') names the NMI on the axis.
    """
    frame = _with_rel_depth(_as_frame(tables))
    col, label = _x_axis(frame, x)
    fig, ax = _new_axes(ax, (7.5, 4.5))
    colors = _model_colors(frame["model"].unique())
    top = max(
        float(frame[["nmi"] + [c for c in ("nmi_ci_hi",) if c in frame]].max().max()), thresholds.local_min
    )
    ymax = top * 1.12 if top > 0 else 1.0
    _shade_bands(ax, thresholds, ymax)
    for model, t in frame.groupby("model", sort=False):
        t = t.sort_values("layer")
        c = colors[model]
        sel = t[t["selected"].astype(bool)]
        tag = f" (layer {int(sel['layer'].iloc[0])})" if len(sel) else ""
        ax.plot(t[col], t["nmi"], "-o", color=c, ms=3.5, lw=1.6, label=f"{model}{tag}", zorder=3)
        if {"nmi_ci_lo", "nmi_ci_hi"} <= set(t.columns):
            ax.fill_between(t[col], t["nmi_ci_lo"], t["nmi_ci_hi"], color=c, alpha=0.25, lw=0, zorder=2)
        if len(sel):
            ax.plot(sel[col], sel["nmi"], "*", ms=16, color=c, mec="black", mew=0.8, zorder=4)
    ax.set_ylim(0.0, ymax)
    ax.set_xlabel(label)
    ax.set_ylabel(
        "layer NMI (mean over heads and images)"
        if nmi_definition is None
        else f"layer NMI, {nmi_definition} definition\n(mean over heads and images)"
    )
    ax.set_title("Attention NMI by depth (shaded: 95% bootstrap CI; star: selected layer)", fontsize=10)
    ax.grid(alpha=0.3, zorder=1)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return fig


def plot_attn_distance(tables: Tables, ax=None, x: str = "auto") -> Figure:
    """Mean attention distance (pixels) against depth for every model; a star marks the selected layer."""
    frame = _with_rel_depth(_as_frame(tables))
    col, label = _x_axis(frame, x)
    fig, ax = _new_axes(ax, (7.5, 4.5))
    colors = _model_colors(frame["model"].unique())
    for model, t in frame.groupby("model", sort=False):
        t = t.sort_values("layer")
        c = colors[model]
        ax.plot(t[col], t["attn_distance"], "-o", color=c, ms=3.5, lw=1.6, label=model, zorder=3)
        sel = t[t["selected"].astype(bool)]
        if len(sel):
            ax.plot(sel[col], sel["attn_distance"], "*", ms=16, color=c, mec="black", mew=0.8, zorder=4)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(label)
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title("Mean attention distance by depth (star: selected layer)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return fig


def plot_pattern_heatmap(tables: Tables, ax=None, annotate: bool = True) -> Figure:
    """Models x layers, coloured by pattern, layer NMI written in each cell; selected layers boxed.

    Models of different depth share the layer axis; layers a model does not have stay blank.
    """
    frame = _as_frame(tables)
    models = list(frame["model"].unique())
    depth = int(frame["layer"].max())
    codes = np.full((len(models), depth), np.nan)
    for i, model in enumerate(models):
        for r in frame[frame["model"] == model].itertuples():
            codes[i, int(r.layer) - 1] = PATTERNS.index(r.pattern)
    fig, ax = _new_axes(
        ax, (max(5.0, 1.8 + (0.55 if depth <= 16 else 0.42) * depth), 1.4 + 0.55 * len(models))
    )
    cmap = ListedColormap([PATTERN_COLORS[p] for p in PATTERNS]).with_extremes(bad="white")
    ax.imshow(
        np.ma.masked_invalid(codes), cmap=cmap, vmin=-0.5, vmax=len(PATTERNS) - 0.5, aspect="auto", alpha=0.85
    )
    for i, model in enumerate(models):
        for r in frame[frame["model"] == model].itertuples():
            j = int(r.layer) - 1
            if annotate:
                ax.text(
                    j,
                    i,
                    f"{r.nmi:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7 if depth > 16 else 8,
                    color="white",
                )
            if bool(r.selected):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=2.5))
    ax.set_xticks(range(depth), [str(j + 1) for j in range(depth)], fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=9)
    ax.set_xlabel("layer (cell text: layer NMI; black box: selected layer)")
    ax.legend(
        handles=[Patch(color=PATTERN_COLORS[p], label=p) for p in PATTERNS],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    ax.set_title("Attention pattern per layer", fontsize=10)
    return fig


def map_layers(depth: int, selected: int | None = None) -> list[int]:
    """1-based layers to show: first, ~1/3, ~2/3, the selected one, last (deduplicated, sorted)."""
    picks = {1, max(1, round(depth / 3)), max(1, round(2 * depth / 3)), depth}
    if selected is not None:
        picks.add(int(selected))
    return sorted(picks)


def _display_image(path: str, size: int) -> np.ndarray | None:
    """The analysed crop of an image, grey, for drawing under maps; None if it cannot be read."""
    try:
        img = resize_center_crop(read_image(path), size)
    except ImageError:
        return None
    return img.mean(dim=0).numpy()


def has_maps(res: ModelAnalysis) -> bool:
    """Whether the analysis kept query maps (``map_images`` >= 1 and at least one image)."""
    return bool(res.query_maps) and res.query_maps[0].ndim == 5 and res.query_maps[0].shape[0] > 0


def plot_attention_maps(
    res: ModelAnalysis, layers: Sequence[int] | None = None, selected: int | None = None
) -> Figure:
    """Head-averaged attention of each query point over the image, at a few layers.

    One row per (image, query point), one column per layer; the query point is marked with a
    cross. Each panel's colours are scaled to its own maximum, so local and global layers both read.
    """
    layers = list(layers) if layers is not None else map_layers(res.depth, selected)
    if not has_maps(res):
        raise ValueError(f"{res.name}: no attention maps were kept (analyse with map_images >= 1)")
    n_img = int(res.query_maps[0].shape[0])
    points = res.query_points
    rows = [(i, p) for i in range(n_img) for p in range(len(points))]
    cols = len(layers)
    fig, axes = plt.subplots(
        len(rows),
        cols,
        figsize=(2.1 * cols + 0.6, 2.1 * len(rows) + 0.7),
        squeeze=False,
        layout="constrained",
    )
    gh, gw = res.grid
    backgrounds = [
        _display_image(res.map_images[i], res.img_size) if i < len(res.map_images) else None
        for i in range(n_img)
    ]
    for r, (i, p) in enumerate(rows):
        y, x = points[p]
        for c, layer in enumerate(layers):
            ax = axes[r, c]
            amap = res.query_maps[layer - 1][i, p].mean(axis=0)  # head average: [gh, gw]
            extent = (0, res.img_size, res.img_size, 0)
            # From zero to the panel's maximum: a collapsed (uniform) map reads as flat, not as noise.
            scale = {"cmap": "inferno", "vmin": 0.0, "vmax": float(amap.max()) or 1.0, "extent": extent}
            if backgrounds[i] is not None:
                ax.imshow(backgrounds[i], cmap="gray", extent=extent, interpolation="bilinear")
                ax.imshow(amap, alpha=0.6, interpolation="nearest", **scale)
            else:
                ax.imshow(amap, interpolation="nearest", **scale)
            # Centre of the query's patch, where the query token actually sits.
            qy = (min(int(y * gh), gh - 1) + 0.5) * res.img_size / gh
            qx = (min(int(x * gw), gw - 1) + 0.5) * res.img_size / gw
            ax.plot(qx, qy, marker="x", color="cyan", ms=9, mew=2.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                tag = " (selected)" if layer == selected else ""
                ax.set_title(f"layer {layer}{tag}", fontsize=9, fontweight="bold" if tag else "normal")
            if c == 0:
                name = Path(res.map_images[i]).name if i < len(res.map_images) else f"image {i + 1}"
                ax.set_ylabel(f"{name}\nquery (y={y:.2f}, x={x:.2f})", fontsize=8)
    fig.suptitle(
        f"{res.name}: head-averaged attention of the query token (cyan x); colour from 0 to each panel's maximum",
        fontsize=10,
    )
    return fig


# --- output --------------------------------------------------------------------------------


def png_bytes(fig: Figure, dpi: int = 120) -> bytes:
    """The figure as PNG bytes; closes it (figures are not kept alive in long runs)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as a PNG atomically and close it."""
    return atomic_write_bytes(path, png_bytes(fig, dpi))
