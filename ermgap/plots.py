"""Fairness plots as PNG (matplotlib, Agg backend): trade-off scatter with Pareto front, per-stratum attribute
gaps, λ trajectories, per-group confusion matrices. Each function writes one file atomically and returns it;
the `*_figure` builders return the matplotlib Figure itself (the tests read its artists back)."""

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


def save_figure(fig, out_path: str | os.PathLike, force: bool) -> Path:
    """Write `fig` as a PNG atomically (replacing only with `force`) and close it; returns the path."""
    try:
        with atomic_path(out_path, force=force) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(out_path)


def trade_off_figure(
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    *,
    split: str | None,
    title: str = "Performance–fairness trade-off",
    xlabel: str = "AVG gender gap [%] ↓",
    ylabel: str = "W-F1 [%] ↑",
    errors: Sequence[tuple[tuple[float, float], tuple[float, float]]] | None = None,
    note: str = "",
):
    """The trade-off scatter as a matplotlib Figure (see fairness_accuracy_scatter); the title names the split.

    Axes: the gap axis starts at 0 (a gap's natural origin), so a 1-point difference is not drawn as a chasm;
    the score axis spans at least 10 points. Points on the Pareto front are red; with two or more of them
    the front is drawn as a step line."""
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs, ys = [], []
    for i, ((acc, gap), label, on) in enumerate(zip(points, labels, front)):
        if not (math.isfinite(acc) and math.isfinite(gap)):
            continue
        xs.append(gap)
        ys.append(acc)
        if errors is not None:
            (a_lo, a_hi), (g_lo, g_hi) = errors[i]
            # A percentile interval of a gap (an absolute value) need not contain the point estimate.
            ax.errorbar(gap, acc, xerr=[[max(0.0, gap - g_lo)], [max(0.0, g_hi - gap)]],
                        yerr=[[max(0.0, acc - a_lo)], [max(0.0, a_hi - acc)]],
                        fmt="none", ecolor="grey", alpha=0.6, capsize=2, zorder=2, label=f"_ci {label}")
            xs += [g_lo, g_hi]
            ys += [a_lo, a_hi]
        ax.scatter(gap, acc, s=48 if on else 28, color="tab:red" if on else "tab:blue", zorder=3,
                   label=f"_point {label}")
        ax.annotate(label, (gap, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pts = sorted((gap, acc) for (acc, gap), on in zip(points, front) if on and math.isfinite(acc + gap))
    if len(pts) >= 2:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
    if pts:
        ax.scatter([], [], s=48, color="tab:red", label="on the Pareto front (no other is better on both axes)")
        ax.legend(loc="best", fontsize=7)
    xs, ys = [v for v in xs if math.isfinite(v)], [v for v in ys if math.isfinite(v)]
    if xs:
        ax.set_xlim(0.0, max(1.0, max(xs)) * 1.15)
        lo, hi = min(ys), max(ys)
        pad = max(0.0, 10.0 - (hi - lo)) / 2 + 1.0
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    errs = ", bootstrap 95 % intervals" if errors is not None else ""
    named = f"{title} ({split} split{errs})" if split else title  # split None: the title already names it
    ax.set(title=named + (f"\n{note}" if note else ""), xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig


def fairness_accuracy_scatter(
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    out_path: str | os.PathLike,
    *,
    split: str | None = None,
    title: str = "Performance–fairness trade-off",
    xlabel: str = "AVG gender gap [%] ↓",
    ylabel: str = "W-F1 [%] ↑",
    force: bool = False,
    errors: Sequence[tuple[tuple[float, float], tuple[float, float]]] | None = None,
    note: str = "",
) -> Path:
    """Scatter of (accuracy-like ↑, gap ↓) points, gap on x, one split per plot (named in the title).

    points: [(w_f1, avg_gap)] in the order of labels (the same convention as metrics.pareto_front).
    errors: per point ((w_f1 lo, hi), (gap lo, hi)) bootstrap intervals, drawn as error bars.
    note: a second title line (e.g. n per group).
    """
    fig = trade_off_figure(points, labels, split=split, title=title, xlabel=xlabel, ylabel=ylabel, errors=errors,
                           note=note)
    return save_figure(fig, out_path, force)


def pareto_plot(frame, out_path: str | os.PathLike, *, x: str, y: str, label: str, split: str | None = None,
                title: str = "Performance–fairness trade-off", force: bool = True, note: str = "") -> Path:
    """fairness_accuracy_scatter over a DataFrame: column `x` is the gap (↓), `y` the score (↑), `label` names
    the points; `<x>_lo`/`<x>_hi` and `<y>_lo`/`<y>_hi` columns, when present, are drawn as error bars.
    Overwrites by default: the caller (a sweep) owns the folder it writes into."""
    points = list(zip(frame[y].astype(float), frame[x].astype(float)))
    bounds = [f"{c}_{e}" for c in (y, x) for e in ("lo", "hi")]
    errors = None
    if all(c in frame for c in bounds) and frame[bounds].notna().all(axis=None):
        errors = [((r[f"{y}_lo"], r[f"{y}_hi"]), (r[f"{x}_lo"], r[f"{x}_hi"])) for _, r in frame.iterrows()]
    return fairness_accuracy_scatter(points, [str(v) for v in frame[label]], out_path, xlabel=f"{metric_label(x)} ↓",
                                     ylabel=f"{metric_label(y)} ↑", title=title, split=split, force=force,
                                     errors=errors, note=note)


def gap_bars_figure(
    gaps: Mapping[str, Mapping[str, float]],
    *,
    metric: str = "AVG gender gap [%]",
    split: str = "test",
    stratum: str = "language",
    errors: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    note: str = "",
):
    """Grouped bars as a matplotlib Figure (see gender_gap_bars)."""
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
    ax.set(ylabel=metric, title=f"{metric} by {stratum} ({split} split{ci})" + (f"\n{note}" if note else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return fig


def gender_gap_bars(
    gaps: Mapping[str, Mapping[str, float]],
    out_path: str | os.PathLike,
    *,
    metric: str = "AVG gender gap [%]",
    split: str = "test",
    stratum: str = "language",
    force: bool = False,
    errors: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    note: str = "",
) -> Path:
    """Grouped bars: one group per subset (e.g. Multilingual, DEU, ENG, JPN: each stratum value), one bar per
    system.

    gaps: {system label: {subset: gap in percent}}; missing or NaN values leave a hole.
    errors: {system label: {subset: (lo, hi)}} bootstrap intervals, drawn as error bars.
    note: a second title line (e.g. n per group).
    """
    return save_figure(gap_bars_figure(gaps, metric=metric, split=split, stratum=stratum, errors=errors, note=note),
                 out_path, force)


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
    return save_figure(fig, out_path, force)


def confusion_matrices(
    matrices: Mapping[str, np.ndarray],
    out_path: str | os.PathLike,
    *,
    title: str = "",
    labels: Sequence[str] = EMOTIONS,
    force: bool = False,
) -> Path:
    """One heat map per attribute value, rows gold `labels`, columns predicted labels, plus "invalid" when some
    answer could not be parsed (free generation; label scoring never has one), counts shown, colour =
    row-normalised rate so groups with different support compare.

    matrices: {"F": int array [K, K+1], "M": ...} (the last column counts invalid answers).
    """
    return save_figure(confusion_figure(matrices, title=title, labels=labels), out_path, force)


def confusion_figure(matrices: Mapping[str, np.ndarray], *, title: str = "", labels: Sequence[str] = EMOTIONS):
    """The confusion matrices as a matplotlib Figure (see confusion_matrices)."""
    any_invalid = any(np.asarray(cm)[:, len(labels):].sum() > 0 for cm in matrices.values())
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.6), squeeze=False)
    cols = [*labels, INVALID] if any_invalid else list(labels)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)[:, :len(cols)]
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
    return fig
