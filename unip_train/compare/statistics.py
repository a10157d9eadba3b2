"""The comparison's numbers: the tidy per-cell table and its summary over seeds.

- :func:`results_table`: one row per finished cell (backbone, dataset, mode, layer, seed, mIoU,
  pixel accuracy, one ``iou_<class>`` column per class).
- :func:`summarize`: per backbone x dataset x mode x layer, the mean over seeds with a 95%
  Student-t interval, and the paired difference to the baseline row at each seed the two share,
  with its paired t-test (:func:`paired_t`): interval, two-sided p-value and verdict.

Intervals: ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` with the sample standard deviation
(``ddof=1``); undefined (NaN) for a single seed. A seed fixes the head's initialisation and the
data order for every row, so differences at the same seed are paired. A difference is called
only when its 95% interval excludes 0, and only from 3 paired seeds on: under no real difference,
"every seed has the same sign" happens half the time at 2 seeds and a quarter of the time at 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .cells import METRICS, CellRun, read_metrics

KEYS = ["backbone", "dataset", "mode", "layer"]
CONFIDENCE = 0.95
MIN_PAIRED_SEEDS = 3  # fewer: no verdict (2 seeds leave the t interval 1 degree of freedom)
CLASS_PREFIX = "iou_"
SUMMARY_COLUMNS = [
    *KEYS, "n_seeds", "seeds", "miou_mean", "miou_sd", "miou_ci95_lo", "miou_ci95_hi",
    "baseline", "n_paired", "diff_mean", "diff_ci95_lo", "diff_ci95_hi", "diff_per_seed", "diff_p",
    "verdict", "test",
]  # fmt: skip


def results_table(runs: Iterable[CellRun], out_prefix: str | None = None) -> pd.DataFrame:
    """One row per finished cell of ``runs``, in plan order. ``out_prefix``: shown run folders are
    made relative to it."""
    rows = []
    for run in runs:
        if not (run.run_dir / METRICS).is_file():
            continue
        m = read_metrics(run.run_dir)
        c = run.cell
        row = {
            "backbone": c.row.name,
            "dataset": c.dataset.name,
            "mode": c.mode.name,
            "layer": c.layer,
            "seed": c.seed,
            "miou": _float(m.get("miou")),
            "pixel_acc": _float(m.get("pixel_acc")),
            "run_dir": str(run.run_dir) if out_prefix is None else str(run.run_dir.relative_to(out_prefix)),
        }
        for name, iou in (m.get("per_class_iou") or {}).items():
            row[CLASS_PREFIX + name] = _float(iou)
        rows.append(row)
    frame = (
        pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*KEYS, "seed", "miou", "pixel_acc", "run_dir"])
    )
    return tidy(frame)


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Column types of a results table: ``layer`` nullable integer (empty unless layer-wise)."""
    frame = frame.copy()
    frame["layer"] = pd.array(frame["layer"], dtype="Int64")
    frame["seed"] = frame["seed"].astype(int)
    return frame


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t interval of the mean; low/high NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def _key(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame[KEYS].itertuples(index=False)]


def summarize(results: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """Per backbone x dataset x mode x layer: seeds, mean mIoU and its 95% t interval; for rows other
    than ``baseline``, the paired difference (row minus baseline at each shared seed)."""
    results = tidy(results)
    keys = _key(results)
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    per_seed = {
        k: dict(zip(results["seed"].iloc[idx], results["miou"].iloc[idx])) for k, idx in groups.items()
    }
    rows = []
    for k in groups:
        backbone, dataset, mode, layer = k
        values = per_seed[k]
        seeds = sorted(values)
        mean, lo, hi = t_interval([values[s] for s in seeds])
        row = {
            "backbone": backbone, "dataset": dataset, "mode": mode, "layer": layer,
            "n_seeds": len(seeds), "seeds": " ".join(map(str, seeds)),
            "miou_mean": mean, "miou_sd": float(np.std([values[s] for s in seeds], ddof=1)) if len(seeds) > 1 else math.nan,
            "miou_ci95_lo": lo, "miou_ci95_hi": hi,
        }  # fmt: skip
        row.update(_paired(values, per_seed.get((baseline, dataset, mode, layer)), backbone, baseline))
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    out["layer"] = pd.array(out["layer"], dtype="Int64")
    return out


def _paired(
    values: dict[int, float], base: dict[int, float] | None, backbone: str, baseline: str | None
) -> dict:
    """Difference to the baseline at every seed both have, with its paired t-test."""
    empty = {
        "baseline": baseline or "", "n_paired": 0, "diff_mean": math.nan, "diff_ci95_lo": math.nan,
        "diff_ci95_hi": math.nan, "diff_per_seed": "", "diff_p": math.nan, "verdict": "", "test": "",
    }  # fmt: skip
    if baseline is None or backbone == baseline:
        return {**empty, "verdict": "baseline" if backbone == baseline else ""}
    if not base:
        return {**empty, "verdict": "no baseline cells"}
    shared = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in shared]
    test = paired_t(diffs)
    return {
        "baseline": baseline,
        "n_paired": len(shared),
        "diff_mean": test.mean,
        "diff_ci95_lo": test.lo,
        "diff_ci95_hi": test.hi,
        "diff_per_seed": " ".join(f"{s}:{d:+.4f}" for s, d in zip(shared, diffs)),
        "diff_p": test.p,
        "verdict": test.verdict,
        "test": test.name,
    }


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test over seeds: the mean difference, its interval, the two-sided p-value."""

    n: int
    mean: float
    lo: float
    hi: float
    p: float
    confidence: float = CONFIDENCE

    @property
    def name(self) -> str:
        """Which test gave the numbers, for the summary and the report."""
        if self.n < 2:
            return ""
        return f"paired t-test over {self.n} seeds, {self.confidence:.0%} interval"

    @property
    def verdict(self) -> str:
        """``higher`` / ``lower`` when the interval excludes 0, ``no clear difference`` when it does
        not, ``too few seeds`` under :data:`MIN_PAIRED_SEEDS` paired seeds."""
        if self.n == 0:
            return "no paired seeds"
        if self.n < MIN_PAIRED_SEEDS:
            return "too few seeds"
        if self.lo > 0:
            return "higher"
        if self.hi < 0:
            return "lower"
        return "no clear difference"


def paired_t(diffs: Sequence[float], confidence: float = CONFIDENCE) -> PairedTest:
    """Paired t-test of per-seed differences ``d`` (row minus baseline), n of them:
    interval ``mean(d) +- t(1 - a/2, n - 1) * sd(d) / sqrt(n)`` and two-sided p-value
    ``2 * (1 - F(|mean(d)| / (sd(d) / sqrt(n)); n - 1))``, F the Student-t CDF; the same p-value as
    ``scipy.stats.ttest_rel(row, baseline)``. Differences without spread: p 0 (or 1 when all are 0)."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    mean, lo, hi = t_interval(d, confidence)
    if len(d) < 2:
        return PairedTest(len(d), mean, lo, hi, math.nan, confidence)
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, len(d) - 1))
    return PairedTest(len(d), mean, lo, hi, p, confidence)


def format_p(value: object) -> str:
    """A p-value as printed in the report, the command's lines and the demo's table: two
    significant digits, ``< 0.0001`` below that; empty when there is none (NaN, None, "")."""
    if value is None or value is pd.NA or value == "":
        return ""
    value = float(value)
    if math.isnan(value):
        return ""
    return "< 0.0001" if value < 1e-4 else f"{value:.2g}"


def class_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if c.startswith(CLASS_PREFIX)]
