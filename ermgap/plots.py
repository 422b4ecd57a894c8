"""Fairness plots as PNG (matplotlib, Agg backend): trade-off scatter with Pareto front, per-stratum attribute
gaps, λ trajectories, per-group confusion matrices. Each function writes one file atomically and returns it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI, Ray workers, servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ermgap.io import atomic_path  # noqa: E402
from ermgap.labels import EMOTIONS, INVALID  # noqa: E402  (the paper's labels: the default of confusion_matrices)
from ermgap.metric_registry import label as metric_label  # noqa: E402
from ermgap.metrics import pareto_front  # noqa: E402


def _save(fig, out_path: str | os.PathLike, force: bool) -> Path:
    try:
        with atomic_path(out_path, force=force) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(out_path)


def fairness_accuracy_scatter(
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    out_path: str | os.PathLike,
    *,
    title: str = "Performance–fairness trade-off",
    xlabel: str = "AVG gender gap [%] ↓",
    ylabel: str = "W-F1 [%] ↑",
    force: bool = False,
    errors: Sequence[tuple[tuple[float, float], tuple[float, float]]] | None = None,
) -> Path:
    """Scatter of (accuracy-like ↑, gap ↓) points, gap on x; the Pareto front is drawn as a step line.

    points: [(w_f1, avg_gap)] in the order of labels (the same convention as metrics.pareto_front).
    errors: per point ((w_f1 lo, hi), (gap lo, hi)) bootstrap intervals, drawn as error bars.
    """
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, ((acc, gap), label, on) in enumerate(zip(points, labels, front)):
        if not (math.isfinite(acc) and math.isfinite(gap)):
            continue
        if errors is not None:
            (a_lo, a_hi), (g_lo, g_hi) = errors[i]
            # A percentile interval of a gap (an absolute value) need not contain the point estimate.
            ax.errorbar(gap, acc, xerr=[[max(0.0, gap - g_lo)], [max(0.0, g_hi - gap)]],
                        yerr=[[max(0.0, acc - a_lo)], [max(0.0, a_hi - acc)]],
                        fmt="none", ecolor="grey", alpha=0.6, capsize=2, zorder=2)
        ax.scatter(gap, acc, s=48 if on else 28, color="tab:red" if on else "tab:blue", zorder=3)
        ax.annotate(label, (gap, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pts = sorted((gap, acc) for (acc, gap), on in zip(points, front) if on)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, out_path, force)


def pareto_plot(frame, out_path: str | os.PathLike, *, x: str, y: str, label: str,
                title: str = "Performance–fairness trade-off",
                force: bool = True) -> Path:
    """fairness_accuracy_scatter over a DataFrame: column `x` is the gap (↓), `y` the score (↑), `label` names
    the points. Overwrites by default: the caller (a sweep) owns the folder it writes into."""
    points = list(zip(frame[y].astype(float), frame[x].astype(float)))
    return fairness_accuracy_scatter(points, [str(v) for v in frame[label]], out_path, xlabel=f"{metric_label(x)} ↓",
                                     ylabel=f"{metric_label(y)} ↑", title=title, force=force)


def gender_gap_bars(
    gaps: Mapping[str, Mapping[str, float]],
    out_path: str | os.PathLike,
    *,
    metric: str = "AVG gender gap [%]",
    split: str = "test",
    stratum: str = "language",
    force: bool = False,
    errors: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bars: one group per subset (e.g. Multilingual, DEU, ENG, JPN: each stratum value), one bar per
    system.

    gaps: {system label: {subset: gap in percent}}; missing or NaN values leave a hole.
    errors: {system label: {subset: (lo, hi)}} bootstrap intervals, drawn as error bars.
    """
    systems = list(gaps)
    subsets = list(dict.fromkeys(s for g in gaps.values() for s in g))
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(subsets) * max(1, len(systems)) * 0.5), 4.8))
    x = np.arange(len(subsets))
    for i, name in enumerate(systems):
        vals = [gaps[name].get(s, math.nan) for s in subsets]
        yerr = None
        if errors is not None:
            bounds = [errors[name].get(s, (v, v)) for s, v in zip(subsets, vals)]
            yerr = np.clip(np.nan_to_num([[v - lo for v, (lo, _) in zip(vals, bounds)],
                                          [hi - v for v, (_, hi) in zip(vals, bounds)]]), 0.0, None)
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width, label=name,
               yerr=yerr, capsize=2, error_kw={"alpha": 0.6})
    ax.set_xticks(x, subsets)
    ci = ", bootstrap 95 % intervals" if errors is not None else ""
    ax.set(ylabel=metric, title=f"{metric} by {stratum} ({split} split{ci})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path, force)


def lambda_trajectories(
    series: Mapping[str, Sequence[tuple[float, float]]],
    out_path: str | os.PathLike,
    *,
    xlabel: str = "step",
    force: bool = False,
) -> Path:
    """λ over training, one line per run. series: {name: [(step, λ), ...]}."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=name)
    ax.set(xlabel=xlabel, ylabel="λ", title="Fairness weight λ during training")
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_path, force)


def confusion_matrices(
    matrices: Mapping[str, np.ndarray],
    out_path: str | os.PathLike,
    *,
    title: str = "",
    labels: Sequence[str] = EMOTIONS,
    force: bool = False,
) -> Path:
    """One heat map per attribute value, rows gold `labels`, columns predicted labels + "invalid" (counts shown,
    colour = row-normalised rate so groups with different support compare).

    matrices: {"F": int array [K, K+1], "M": ...}.
    """
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.6), squeeze=False)
    cols = [*labels, INVALID]
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)
        rows = cm.sum(1, keepdims=True)
        rate = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
        ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if rate[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set(xlabel="predicted", ylabel="gold", title=f"{title} — {name} (n={int(cm.sum())})".strip(" —"))
    fig.tight_layout()
    return _save(fig, out_path, force)
