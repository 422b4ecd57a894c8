"""The paper's SER and fairness metrics (section 3.4), bootstrap CIs and the Pareto front.

Each metric is declared once, with its formula on per-group confusion counts, in `ermgap.metric_registry`;
this module builds the counts (of a predictions file, of every bootstrap resample) and applies those
formulas: point estimates, intervals and paired differences share one implementation. scikit-learn and
fairlearn are the tests' oracle, not a second implementation.

Pure functions on DataFrames / numpy arrays (no torch), for any task (`ermgap.task.Task`: its labels, its
protected attribute with k >= 2 values, its stratum). Without a task, the paper's: MELD's 7 emotions, gender
F/M, per language. All metrics are over all the task's labels, even when a subset lacks some of them.

Definitions (reported in percent, like the paper):
- ``w_f1``: support-weighted F1 (as sklearn ``f1_score(average="weighted", labels=all labels)``); ``acc``: accuracy.
- ``tpr_gap``: mean over classes c of the spread of TPR_c over the attribute's groups, one-vs-rest,
  TPR_c = TP/(TP+FN). The spread is max − min over the groups (for two groups, |TPR_c(F) − TPR_c(M)|; for
  k > 2 values, the largest difference between any two groups, as fairlearn's ``difference()``).
- ``fpr_gap``: likewise with FPR_c = FP/(FP+TN).
- ``w_f1_gap`` = max − min of W-F1 over the groups, ``acc_gap`` likewise for ACC; ``avg_gap`` = mean of the four.

Undefined rates: TPR_c is undefined in a group with no gold-c utterance, FPR_c in a group where every
utterance is gold c. The spread of a class is taken over the groups where its rate is defined; a class defined
in fewer than two groups is left out of that gap's class average (it says nothing about disparity); the classes
that were used are reported as ``tpr_classes`` / ``fpr_classes``. If no class is usable, or fewer than two
groups have utterances, the gap is NaN (``null`` in JSON) and ``avg_gap`` is the mean of the defined gaps
(NaN when none is).

Invalid predictions (free generation that parsed to no label: ``pred == "invalid"`` or ``valid`` false) are a
never-gold extra label: wrong for accuracy, a false negative for their gold class, never a false positive of
any class, and their own column in confusion matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ermgap.errors import PredictionsError
from ermgap.labels import INVALID, MODALITIES
from ermgap.metric_registry import ConfusionCounts, counts_metrics, spread
from ermgap.task import DEFAULT_TASK, Task

# The paper's task's columns; a task's are prediction_columns(task).
REQUIRED_COLUMNS: tuple[str, ...] = ("utt_id", "language", "gender", "gold", "pred")
# The headline numbers, in the paper's column order: the registry's counts metrics.
METRIC_KEYS: tuple[str, ...] = counts_metrics()
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def prediction_columns(task: Task = DEFAULT_TASK) -> tuple[str, ...]:
    """The columns a predictions file needs for `task`: utt_id, the stratum columns, the attribute, gold, pred."""
    return tuple(dict.fromkeys(("utt_id", *task.stratum, task.attribute, "gold", "pred")))


def per_key(task: Task = DEFAULT_TASK) -> str:
    """The result key of the per-stratum blocks: ``per_language`` for the paper's task."""
    return f"per_{task.stratum_name}"


def by_key(task: Task = DEFAULT_TASK) -> str:
    """The result key of the per-group blocks: ``by_gender`` for the paper's task."""
    return f"by_{task.attribute}"


# ----------------------------------------------------------------------------------------------- input


def read_predictions(path: str | Path, task: Task | None = None) -> pd.DataFrame:
    """Read and validate a PREDS.csv (columns utt_id, language, gender, gold, pred [, valid, modality, score_*];
    for another task its stratum and attribute columns instead of language and gender).

    Returns a DataFrame with string columns and ``valid`` as bool (True when the column is absent and the
    prediction is a label). Raises PredictionsError naming the file, the data row (1-based, with its CSV
    line = row + 1 for the header) and the column of each problem: one line per column and kind,
    with the first offending rows.
    """
    return validate_predictions(read_predictions_csv(path), source=str(path), task=task)


def read_predictions_csv(path: str | Path) -> pd.DataFrame:
    """The raw string frame of a predictions CSV (not validated); PredictionsError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found")
    if path.stat().st_size == 0:
        raise PredictionsError(f"{path}: empty file (expected a CSV header {', '.join(REQUIRED_COLUMNS)})")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PredictionsError(f"{path}: not a readable CSV: {err}") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas made the leading values of longer rows an index
        raise PredictionsError(f"{path}: data row 1 (CSV line 2) has more fields than the header "
                               f"({', '.join(map(str, df.columns))}); a stray comma?")
    return df


def validate_predictions(df: pd.DataFrame, *, source: str = "predictions", task: Task | None = None) -> pd.DataFrame:
    """Check a predictions frame (as read from CSV, or built by ermgap.evaluate.predictions_frame) against
    `task` (default: the paper's).

    Returns a normalised copy (stripped strings, bool ``valid``); raises PredictionsError listing problems.
    """
    task = task or DEFAULT_TASK
    required = prediction_columns(task)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise PredictionsError(
            f"{source}: header (CSV line 1): missing column(s) {', '.join(missing)}; "
            f"required: {', '.join(required)} (optional: valid, modality, score_<label>); "
            f"found: {', '.join(map(str, df.columns))}"
        )
    if len(df) == 0:
        raise PredictionsError(f"{source}: no data rows (only a header)")
    out = df.copy()
    problems: list[str] = []

    def bad(mask: np.ndarray, column: str, allowed: str, values: Sequence | None = None) -> None:
        # One line per column and kind: a wholly wrong column should not bury the message in repeats.
        rows = np.flatnonzero(mask)
        if rows.size:
            vals = out[column].tolist() if values is None else list(values)
            shown = ", ".join(f"data row {i + 1} (CSV line {i + 2}) {vals[i]!r}" for i in rows[:3])
            more = f" and {rows.size - 3} more" if rows.size > 3 else ""
            problems.append(f"column {column!r}: {rows.size} bad value(s) at {shown}{more}; {allowed}")

    for col in (*required, *(c for c in ("valid", "modality") if c in out.columns)):
        out[col] = out[col].astype(str).str.strip()
    bad((out["utt_id"] == "").to_numpy(), "utt_id", "must be non-empty")
    keys = task.stratum_keys(out)
    bad(task.stratum_codes(out) < 0, task.stratum_name, f"allowed: {', '.join(task.stratum_values)}",
        values=keys)
    bad(task.attribute_codes(out[task.attribute]) < 0, task.attribute,
        f"allowed: {', '.join(task.attribute_values)}")
    bad(task.label_codes(out["gold"]) < 0, "gold", f"allowed: {', '.join(task.labels)}")
    bad(~out["pred"].isin((*task.labels, INVALID)).to_numpy(), "pred", f"allowed: {', '.join(task.labels)}, {INVALID}")
    if "modality" in out.columns and "modality" not in task.stratum:
        # empty = not recorded (predictions_frame(modality=None))
        bad(~out["modality"].isin((*MODALITIES, "")).to_numpy(), "modality",
            f"allowed: {', '.join(MODALITIES)} or empty")
    if "valid" in out.columns:
        low = out["valid"].str.lower()
        bad(~low.isin(_TRUE | _FALSE).to_numpy(), "valid", "allowed: true/false (or 1/0)")
        contradiction = low.isin(_TRUE).to_numpy() & (out["pred"] == INVALID).to_numpy()
        bad(contradiction, "valid", f"must be false where pred is {INVALID!r}")
        out["valid"] = low.isin(_TRUE)
    else:
        out["valid"] = out["pred"] != INVALID
    dup = np.flatnonzero(out["utt_id"].duplicated(keep="first").to_numpy() & (out["utt_id"] != "").to_numpy())
    if dup.size:
        i = int(dup[0])
        first = int(np.flatnonzero((out["utt_id"] == out["utt_id"].iloc[i]).to_numpy())[0])
        more = f" ({dup.size} duplicate rows in all)" if dup.size > 1 else ""
        problems.append(
            f"column 'utt_id': duplicate id {out['utt_id'].iloc[i]!r} at data row {i + 1} (CSV line {i + 2}), "
            f"first at data row {first + 1}{more}; ids must be unique"
        )
    if len(problems) == 1:
        raise PredictionsError(f"{source}: {problems[0]}")
    if problems:
        raise PredictionsError(f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return out


def encode(df: pd.DataFrame, task: Task | None = None) -> dict[str, np.ndarray]:
    """Integer codes of a validated frame: stratum (index in task.stratum_values), attribute (index in
    task.attribute_values), gold (0..K-1), pred (0..K-1, or K = invalid). Each an int64 array of shape [N]."""
    task = task or DEFAULT_TASK
    k = task.num_labels
    pred = task.label_codes(df["pred"])
    pred[(pred < 0) | ~df["valid"].to_numpy(dtype=bool)] = k
    return {"stratum": task.stratum_codes(df), "attribute": task.attribute_codes(df[task.attribute]),
            "gold": task.label_codes(df["gold"]), "pred": pred}


# ----------------------------------------------------------------------------------------------- point estimates


def _counts(codes: dict[str, np.ndarray], k: int, a: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Confusion counts [A groups, K gold, K+1 pred] of the rows selected by the bool mask `rows` (all: None)."""
    m = slice(None) if rows is None else rows
    cell = (codes["attribute"][m] * k + codes["gold"][m]) * (k + 1) + codes["pred"][m]
    return np.bincount(cell, minlength=a * k * (k + 1)).reshape(a, k, k + 1)


def _block(counts: np.ndarray, task: Task) -> dict:
    """One subset's metrics from its counts [A, K, K+1]: every counts metric (percent), n, invalid_rate, the
    classes each rate gap averaged over, and by_<attribute> {value: {w_f1, acc, n}}."""
    c = ConfusionCounts(counts)
    out = {m: float(c.value(m)) for m in counts_metrics()}
    tpr, fpr = c.rates
    used = [[task.labels[i] for i in np.flatnonzero(np.isfinite(spread(r, axis=0)))] for r in (tpr, fpr)]
    n = int(counts.sum())
    wf1_g, acc_g = c.per_group
    out.update(n=n, invalid_rate=float(counts[..., -1].sum() / n) if n else math.nan,
               tpr_classes=used[0], fpr_classes=used[1])
    out[by_key(task)] = {name: {"w_f1": 100 * float(wf1_g[i]), "acc": 100 * float(acc_g[i]),
                                "n": int(counts[i].sum())} for i, name in enumerate(task.attribute_values)}
    return out


def compute_metrics(df: pd.DataFrame, task: Task | None = None) -> dict:
    """Metrics of one system's predictions: ``{"overall": {...}, "per_<stratum>": {value: {...}}}``
    (``per_language`` for the paper's task).

    Each block holds w_f1, acc, tpr_gap, fpr_gap, w_f1_gap, acc_gap, avg_gap (percent floats; NaN when
    undefined), n (utterances), invalid_rate (fraction 0..1 of invalid predictions), tpr_classes / fpr_classes
    (labels used in each gap's average) and by_<attribute> ({value: {w_f1, acc, n}}, ``by_gender``). "overall"
    pools all strata (the paper's Multilingual rows); the per-stratum block has the strata present, in
    task.stratum_values order.
    """
    task = task or DEFAULT_TASK
    codes = encode(validate_predictions(df, source="predictions frame", task=task), task)
    k, a = task.num_labels, len(task.attribute_values)
    out = {"overall": _block(_counts(codes, k, a), task), per_key(task): {}}
    for si, name in enumerate(task.stratum_values):
        m = codes["stratum"] == si
        if m.any():
            out[per_key(task)][name] = _block(_counts(codes, k, a, m), task)
    return out


def confusion_by_attribute(df: pd.DataFrame, task: Task | None = None) -> dict[str, np.ndarray]:
    """{attribute value: int array [K, K+1]}: rows gold labels, columns predicted labels + "invalid"."""
    task = task or DEFAULT_TASK
    codes = encode(validate_predictions(df, source="predictions frame", task=task), task)
    k = task.num_labels
    counts = _counts(codes, k, len(task.attribute_values))
    return {name: counts[i].astype(np.int64) for i, name in enumerate(task.attribute_values)}


confusion_by_gender = confusion_by_attribute  # the paper's name


# ----------------------------------------------------------------------------------------------- vectorised


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every counts metric (METRIC_KEYS, percent) from confusion counts of shape [..., A groups, K gold, K+1
    pred], for every leading index at once (one bootstrap resample per index): the registry's formulas.
    Returns arrays of shape counts.shape[:-3]; NaN where undefined."""
    c = ConfusionCounts(counts)
    return {m: c.value(m) for m in counts_metrics()}


def _cells(codes: dict[str, np.ndarray], k: int, *preds: np.ndarray) -> np.ndarray:
    """Flat cell index of each row over (attribute, gold, pred[, pred2]) for np.bincount / multinomial draws."""
    cell = codes["attribute"] * k + codes["gold"]
    for p in preds:
        cell = cell * (k + 1) + p
    return cell


def _resample_cell_counts(
    stratum: np.ndarray, num_strata: int, cell: np.ndarray, n_cells: int, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap cell counts [n_boot, S, n_cells], resampling utterances with replacement within stratum.

    Resampling the n_s utterances of stratum s with replacement makes the cell counts exactly
    Multinomial(n_s, empirical cell frequencies of s), so the counts are drawn directly: the cost is
    O(n_boot × cells), independent of the number of utterances, and no index array is materialised.
    """
    out = np.zeros((n_boot, num_strata, n_cells), dtype=np.int64)
    for si in range(num_strata):
        m = stratum == si
        if m.any():
            freq = np.bincount(cell[m], minlength=n_cells) / m.sum()
            out[:, si] = rng.multinomial(int(m.sum()), freq, size=n_boot)
    return out


def percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    """[lo, hi] percentile interval of the finite samples at `level` (0.95: 2.5th and 97.5th); NaNs if none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _with_overall(counts: np.ndarray) -> np.ndarray:
    """[B, S, ...] → [B, S + 1, ...]: the pooled (all strata) counts appended as the last subset."""
    return np.concatenate([counts, counts.sum(1, keepdims=True)], axis=1)


def _present(codes: dict[str, np.ndarray], task: Task) -> list[int]:
    return [si for si in range(len(task.stratum_values)) if (codes["stratum"] == si).any()]


def bootstrap_samples(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                      task: Task | None = None) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every counts metric on `n_boot` resamples: ({metric: [n_boot, S + 1]}, indices of the strata present).

    Column si is stratum si of task.stratum_values (NaN where absent), the last column all strata pooled.
    Utterances are resampled with replacement within each stratum (the pooled resample is the union of the
    per-stratum ones), seeded. Percent units, as compute_metrics. A metric of the per-stratum values (the
    registry's `strata` metrics) is then its formula applied resample by resample.
    """
    task = task or DEFAULT_TASK
    codes = encode(validate_predictions(df, source="predictions frame", task=task), task)
    k, a, s = task.num_labels, len(task.attribute_values), len(task.stratum_values)
    rng = np.random.default_rng(seed)
    n_cells = a * k * (k + 1)
    cells = _resample_cell_counts(codes["stratum"], s, _cells(codes, k, codes["pred"]), n_cells, n_boot, rng)
    return metrics_from_counts(_with_overall(cells).reshape(n_boot, s + 1, a, k, k + 1)), _present(codes, task)


def bootstrap_ci(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 task: Task | None = None) -> dict:
    """Percentile CIs: ``{"overall": {metric: [lo, hi]}, "per_<stratum>": {value: {metric: [lo, hi]}}}``.

    The resamples of bootstrap_samples; resamples where a metric is undefined are ignored for that metric's
    interval. Percent units, as compute_metrics.
    """
    task = task or DEFAULT_TASK
    samples, present = bootstrap_samples(df, n_boot=n_boot, seed=seed, task=task)
    return {
        "overall": {m: percentile_ci(v[:, -1], level) for m, v in samples.items()},
        per_key(task): {task.stratum_values[si]: {m: percentile_ci(v[:, si], level) for m, v in samples.items()}
                        for si in present},
    }


def paired_bootstrap(
    a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
    task: Task | None = None,
) -> dict:
    """Paired bootstrap of metric(b) − metric(a) on the same utterances (aligned by utt_id).

    Returns ``{"overall": {metric: {...}}, "per_<stratum>": {value: {metric: {...}}}}`` where each entry has
    ``diff`` (point estimate, percent points), ``ci`` ([lo, hi] percentile interval), ``p_value``: the
    two-sided bootstrap fraction 2·min(P*(d ≤ 0), P*(d ≥ 0)), capped at 1 (small = the sign of the
    difference is stable under resampling), and ``rel`` / ``rel_ci``: the relative difference
    (metric(b) − metric(a)) / metric(a) and its interval, from the same resamples (NaN where metric(a) is 0).
    For gaps a negative diff means b has the smaller gap (rel = −0.5: half of a's gap).
    Raises PredictionsError if the utterance sets differ or an utterance's stratum/attribute/gold disagree.
    """
    task = task or DEFAULT_TASK
    a = validate_predictions(a, source="system A predictions", task=task)
    b = validate_predictions(b, source="system B predictions", task=task)
    ids_a, ids_b = set(a["utt_id"]), set(b["utt_id"])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise PredictionsError(
            f"paired bootstrap needs the same utterances: {len(only_a)} only in A (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in B (e.g. {only_b[:3]})"
        )
    b = b.set_index("utt_id").loc[a["utt_id"]].reset_index()
    for col in (*task.stratum, task.attribute, "gold"):
        if col not in a.columns:
            continue
        differ = (a[col].to_numpy() != b[col].to_numpy()).nonzero()[0]
        if differ.size:
            i = int(differ[0])
            raise PredictionsError(
                f"paired bootstrap: utterance {a['utt_id'].iloc[i]!r} has {col}={a[col].iloc[i]!r} in A "
                f"but {b[col].iloc[i]!r} in B"
            )
    ca, cb = encode(a, task), encode(b, task)
    k, na, s = task.num_labels, len(task.attribute_values), len(task.stratum_values)
    rng = np.random.default_rng(seed)
    n_cells = na * k * (k + 1) * (k + 1)
    cells = _resample_cell_counts(ca["stratum"], s, _cells(ca, k, ca["pred"], cb["pred"]), n_cells, n_boot, rng)
    joint = _with_overall(cells).reshape(n_boot, s + 1, na, k, k + 1, k + 1)
    sa, sb = metrics_from_counts(joint.sum(-1)), metrics_from_counts(joint.sum(-2))
    diffs = {m: sb[m] - sa[m] for m in METRIC_KEYS}
    point_a, point_b = compute_metrics(a, task), compute_metrics(b, task)

    def summarise(key: str, col: int, subset: tuple[str, ...]) -> dict:
        pa, pb = point_a, point_b
        for part in subset:
            pa, pb = pa[part], pb[part]
        d, base = diffs[key][:, col], sa[key][:, col]
        finite = d[np.isfinite(d)]
        p = min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0))) if finite.size else math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = d / base
        return {"diff": float(pb[key] - pa[key]), "ci": percentile_ci(d, level), "p_value": float(p),
                "rel": float((pb[key] - pa[key]) / pa[key]) if pa[key] else math.nan,
                "rel_ci": percentile_ci(rel, level)}

    per = per_key(task)
    return {
        "overall": {m: summarise(m, -1, ("overall",)) for m in METRIC_KEYS},
        per: {
            task.stratum_values[si]: {m: summarise(m, si, (per, task.stratum_values[si]))
                                      for m in METRIC_KEYS}
            for si in _present(ca, task)
        },
    }


# ----------------------------------------------------------------------------------------------- trade-off


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (accuracy-like ↑, gap ↓) points are non-dominated. A point is dominated when another is at least
    as good on both and strictly better on one. Points with a NaN coordinate are never on the front."""
    pts = [(float(a), float(g)) for a, g in points]
    out = []
    for i, (a, g) in enumerate(pts):
        if not (math.isfinite(a) and math.isfinite(g)):
            out.append(False)
            continue
        dominated = any(
            j != i and math.isfinite(a2) and math.isfinite(g2) and a2 >= a and g2 <= g and (a2 > a or g2 < g)
            for j, (a2, g2) in enumerate(pts)
        )
        out.append(not dominated)
    return out
