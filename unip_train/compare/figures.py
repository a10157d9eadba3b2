"""Figures of a comparison, one function per figure; each returns a matplotlib Figure.

- :func:`plot_miou`: mIoU per backbone for each dataset and mode: mean over seeds with its 95%
  t interval, every seed as a dot, the baseline's mean as a dashed line.
- :func:`plot_layerwise`: layer-wise linear probing, mIoU by depth for each backbone, drawn over
  that backbone's NMI by depth and the local / hybrid / global bands of a ``layer_selection.json``
  (drawn by :func:`unip_analysis.plots.plot_nmi_curves`, the analysis' own figure).

:func:`render_figures` gives every figure of a comparison as PNG bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from unip_analysis import plots, selection
from unip_analysis.patterns import Thresholds
from unip_analysis.report import layer_frame

MIOU_COLOR = "black"
SEED_COLOR = "0.45"


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 2)
    return (n + cols - 1) // cols, cols


def plot_miou(summary: pd.DataFrame, results: pd.DataFrame, baseline: str | None = None) -> Figure:
    """One panel per dataset x mode (whole-backbone modes, not layer-wise): each backbone's mean mIoU
    with its 95% t interval over seeds (error bar) and every seed's mIoU (grey dots)."""
    import matplotlib.pyplot as plt

    summary = summary[summary["layer"].isna()]
    results = results[results["layer"].isna()]
    groups = list(dict.fromkeys(zip(summary["dataset"], summary["mode"])))
    if not groups:
        raise ValueError("no whole-backbone (non layer-wise) cells to draw")
    nrows, ncols = _panels(len(groups))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (dataset, mode) in zip(axes.flat, groups):
        s = summary[(summary["dataset"] == dataset) & (summary["mode"] == mode)].reset_index(drop=True)
        r = results[(results["dataset"] == dataset) & (results["mode"] == mode)]
        x = np.arange(len(s))
        lo = (s["miou_mean"] - s["miou_ci95_lo"]).fillna(0).clip(lower=0)
        hi = (s["miou_ci95_hi"] - s["miou_mean"]).fillna(0).clip(lower=0)
        ax.errorbar(
            x, s["miou_mean"], yerr=[lo, hi], fmt="o", color=MIOU_COLOR, ms=7, capsize=5, lw=1.5, zorder=3
        )
        for i, name in enumerate(s["backbone"]):
            seeds = r[r["backbone"] == name]["miou"].to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else np.zeros(len(seeds))
            ax.plot(i + 0.22 + jitter, seeds, "o", color=SEED_COLOR, ms=3.5, zorder=2)
        if baseline is not None and baseline in set(s["backbone"]):
            base = float(s.loc[s["backbone"] == baseline, "miou_mean"].iloc[0])
            ax.axhline(base, color="#C44E52", ls="--", lw=1, zorder=1)
        ax.set_xticks(
            x, s["backbone"], rotation=20 if len(s) > 3 else 0, ha="right" if len(s) > 3 else "center"
        )
        ax.set_xlim(-0.5, len(s) - 0.3)
        ax.set_ylabel("mIoU")
        ax.set_title(f"{dataset}, {mode}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", ls="-", color=MIOU_COLOR, label="mean, 95% t interval over seeds"),
        Line2D([], [], marker="o", ls="", color=SEED_COLOR, ms=3.5, label="one seed"),
    ]
    if baseline is not None:
        handles.append(Line2D([], [], color="#C44E52", ls="--", label=f"baseline ({baseline}) mean"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def selection_thresholds(doc: dict) -> Thresholds:
    th = doc["thresholds"]
    return Thresholds(th["global_max"], th["local_min"], source="layer_selection.json")


def _nmi_underlay(ax, name: str, nmi: pd.DataFrame, model: str, selection_doc: dict) -> tuple:
    """Draw the model's NMI by layer over the pattern bands on ``ax``; returns the twin axis for the
    mIoU, the panel's title and the NMI definition."""
    definition = selection.nmi_definition(selection_doc)
    plots.plot_nmi_curves(
        nmi, selection_thresholds(selection_doc), ax=ax, x="layer", nmi_definition=definition
    )
    ax.get_legend().remove()
    miou_ax = ax.twinx()
    # The pattern names sit just right of the NMI axis: move the mIoU axis further out.
    miou_ax.spines["right"].set_position(("axes", 1.1))
    title = f"{name}: probe mIoU by layer over NMI of {model!r} ({definition} NMI, layer_selection.json)"
    return miou_ax, title, definition


def _miou_by_layer(miou_ax, sb: pd.DataFrame, rb: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Probe mIoU by layer: mean line, 95% t band, every seed's dot, the best layer marked; returns
    the probed layers and the best one."""
    layers = sb["layer"].astype(int).to_numpy()
    miou_ax.fill_between(
        layers,
        sb["miou_ci95_lo"].astype(float),
        sb["miou_ci95_hi"].astype(float),
        color=MIOU_COLOR,
        alpha=0.12,
        lw=0,
    )
    miou_ax.plot(layers, sb["miou_mean"], "-s", color=MIOU_COLOR, ms=5, lw=1.8, zorder=5)
    miou_ax.plot(rb["layer"].astype(int), rb["miou"], "o", color=SEED_COLOR, ms=3, zorder=4)
    best = int(layers[int(np.nanargmax(sb["miou_mean"].to_numpy()))])
    miou_ax.axvline(best, color=MIOU_COLOR, ls=":", lw=1)
    miou_ax.set_ylabel("probe mIoU")
    return layers, best


def _layerwise_legend(ax, miou_ax, best: int, definition: str | None) -> None:
    """The panel's legend, below it: the mIoU entries, after the NMI curve's when one is drawn."""
    handles = [
        Line2D(
            [],
            [],
            marker="s",
            color=MIOU_COLOR,
            label=f"probe mIoU, mean and 95% t interval (best: layer {best})",
        ),
        Line2D([], [], marker="o", ls="", color=SEED_COLOR, ms=3, label="probe mIoU, one seed"),
    ]
    if miou_ax is not ax:
        handles = [*_nmi_handles(ax, definition), *handles]
    # Below the panel: inside, it would cover the curves whatever corner it took.
    ax.legend(
        handles=handles,
        fontsize=7.5,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncols=2,
        frameon=False,
    )


def _layerwise_panel(
    ax,
    name: str,
    sb: pd.DataFrame,
    rb: pd.DataFrame,
    nmi: pd.DataFrame | None,
    model: str | None,
    selection_doc: dict | None,
) -> None:
    """One backbone's panel: its NMI underlay (when the selection has it), the probe mIoU, legend,
    layer ticks and title."""
    definition = None
    if nmi is not None and len(nmi):
        miou_ax, title, definition = _nmi_underlay(ax, name, nmi, model, selection_doc)
    else:
        miou_ax = ax
        ax.set_xlabel("layer (1-based)")
        title = f"{name}: probe mIoU by layer (no NMI: not in the plan's layer_selection)"
    layers, best = _miou_by_layer(miou_ax, sb, rb)
    _layerwise_legend(ax, miou_ax, best, definition)
    depth = int(nmi["layer"].max()) if miou_ax is not ax else int(layers.max())
    ax.set_xticks(range(1, max(depth, int(layers.max())) + 1))
    ax.set_title(title, fontsize=9.5)


def plot_layerwise(
    summary: pd.DataFrame,
    results: pd.DataFrame,
    dataset: str,
    mode: str,
    selection_doc: dict | None = None,
    selection_models: Mapping[str, str] | None = None,
) -> Figure:
    """Layer-wise probing of ``dataset`` / ``mode``: one panel per backbone. Left axis: the backbone's
    layer NMI with its bootstrap interval over the pattern bands, from ``selection_doc`` (the model
    named ``selection_models[backbone]``); right axis: probe mIoU by layer, mean over seeds with
    its 95% t interval (band) and every seed (dots). The NMI axis and title name the definition the
    file records (Park et al.'s or UNIP's published one)."""
    import matplotlib.pyplot as plt

    selection_models = dict(selection_models or {})
    s = summary[(summary["dataset"] == dataset) & (summary["mode"] == mode) & summary["layer"].notna()]
    r = results[(results["dataset"] == dataset) & (results["mode"] == mode) & results["layer"].notna()]
    backbones = list(dict.fromkeys(s["backbone"]))
    if not backbones:
        raise ValueError(f"no layer-wise cells for {dataset} / {mode}")
    table = layer_frame(selection_doc) if selection_doc is not None else None
    fig, axes = plt.subplots(
        len(backbones), 1, figsize=(8.2, 4.4 * len(backbones)), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes[:, 0], backbones):
        model = selection_models.get(name)
        nmi = None if table is None or model is None else table[table["model"] == model]
        sb, rb = s[s["backbone"] == name].sort_values("layer"), r[r["backbone"] == name]
        _layerwise_panel(ax, name, sb, rb, nmi, model, selection_doc)
    return fig


def _nmi_handles(ax, definition: str) -> list[Line2D]:
    """A legend entry for the NMI curve plot_nmi_curves drew (labelled with the NMI definition,
    the model and the selected layer)."""
    curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")][:1]
    return [
        Line2D(
            [],
            [],
            marker="o",
            ms=3.5,
            color=ln.get_color(),
            label=f"layer NMI ({definition}) of {ln.get_label()}, 95% bootstrap CI",
        )
        for ln in curves
    ]


def figure_name(kind: str, *parts: str) -> str:
    stem = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts)
    return f"{kind}_{stem}.png" if stem else f"{kind}.png"


def render_figures(
    results: pd.DataFrame,
    summary: pd.DataFrame,
    baseline: str | None = None,
    selection_doc: dict | None = None,
    selection_models: Mapping[str, str] | None = None,
) -> dict[str, bytes]:
    """Every figure of a comparison as ``{file name: PNG bytes}``: ``miou.png`` and one
    ``layerwise_DATASET_MODE.png`` per layer-wise mode and dataset."""
    figs: dict[str, bytes] = {}
    if len(summary) and summary["layer"].isna().any():
        figs["miou.png"] = plots.png_bytes(plot_miou(summary, results, baseline))
    layered = summary[summary["layer"].notna()] if len(summary) else summary
    for dataset, mode in dict.fromkeys(zip(layered.get("dataset", []), layered.get("mode", []))):
        fig = plot_layerwise(summary, results, dataset, mode, selection_doc, selection_models)
        figs[figure_name("layerwise", dataset, mode)] = plots.png_bytes(fig)
    return figs
