"""The paper's SER and gender-fairness metrics (section 3.4), bootstrap CIs and the Pareto front.

Pure functions on DataFrames / numpy arrays (no torch). All metrics are over the 7 EMOTIONS, always all 7
labels, even when a subset lacks some of them.

Definitions (reported in percent, like the paper):
- ``w_f1``: support-weighted F1 (sklearn ``f1_score(average="weighted", labels=the 7)``); ``acc``: accuracy.
- ``tpr_gap``: mean over classes c of |TPR_c(F) - TPR_c(M)|, one-vs-rest, TPR_c = TP/(TP+FN).
- ``fpr_gap``: likewise with FPR_c = FP/(FP+TN).
- ``w_f1_gap`` = |W-F1(F) - W-F1(M)|, ``acc_gap`` = |ACC(F) - ACC(M)|; ``avg_gap`` = mean of the four gaps.

Undefined rates: TPR_c is undefined in a gender group with no gold-c utterance, FPR_c in a group where every
utterance is gold c. Such a class is left out of that gap's class average (it says nothing about disparity);
the classes that were used are reported as ``tpr_classes`` / ``fpr_classes``. If no class is usable, or a
gender group is empty, the gap is NaN (``null`` in JSON) and ``avg_gap`` is the mean of the defined gaps
(NaN when none is).

Invalid predictions (free generation that parsed to no label: ``pred == "invalid"`` or ``valid`` false) are a
never-gold 8th label: wrong for accuracy, a false negative for their gold class, never a false positive of any
of the 7 classes, and their own column in confusion matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from ermgap.errors import PredictionsError
from ermgap.labels import EMOTIONS, GENDERS, INVALID, LANGUAGES, MODALITIES

REQUIRED_COLUMNS: tuple[str, ...] = ("utt_id", "language", "gender", "gold", "pred")
# The headline numbers, in the paper's column order.
METRIC_KEYS: tuple[str, ...] = ("w_f1", "acc", "tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap", "avg_gap")
K = len(EMOTIONS)  # gold classes; prediction index K means "invalid"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


# ----------------------------------------------------------------------------------------------- input


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read and validate a PREDS.csv (columns utt_id, language, gender, gold, pred [, valid, modality, score_*]).

    Returns a DataFrame with string columns and ``valid`` as bool (True when the column is absent and the
    prediction is a label). Raises PredictionsError naming the file, the data row (1-based, with its CSV
    line = row + 1 for the header) and the column of each problem: one line per column and kind,
    with the first offending rows.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found")
    if path.stat().st_size == 0:
        raise PredictionsError(f"{path}: empty file (expected a CSV header {', '.join(REQUIRED_COLUMNS)})")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PredictionsError(f"{path}: not a readable CSV: {err}") from None
    return validate_predictions(df, source=str(path))


def validate_predictions(df: pd.DataFrame, *, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions frame (as read from CSV, or built by ermgap.evaluate.predictions_frame).

    Returns a normalised copy (stripped strings, bool ``valid``); raises PredictionsError listing problems.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PredictionsError(
            f"{source}: header (CSV line 1): missing column(s) {', '.join(missing)}; "
            f"required: {', '.join(REQUIRED_COLUMNS)} (optional: valid, modality, score_<emotion>); "
            f"found: {', '.join(map(str, df.columns))}"
        )
    if len(df) == 0:
        raise PredictionsError(f"{source}: no data rows (only a header)")
    out = df.copy()
    problems: list[str] = []

    def bad(mask: np.ndarray, column: str, allowed: str) -> None:
        # One line per column and kind: a wholly wrong column should not bury the message in repeats.
        rows = np.flatnonzero(mask)
        if rows.size:
            shown = ", ".join(f"data row {i + 1} (CSV line {i + 2}) {out[column].iloc[i]!r}" for i in rows[:3])
            more = f" and {rows.size - 3} more" if rows.size > 3 else ""
            problems.append(f"column {column!r}: {rows.size} bad value(s) at {shown}{more}; {allowed}")

    for col in (*REQUIRED_COLUMNS, *(c for c in ("valid", "modality") if c in out.columns)):
        out[col] = out[col].astype(str).str.strip()
    bad((out["utt_id"] == "").to_numpy(), "utt_id", "must be non-empty")
    bad(~out["language"].isin(LANGUAGES).to_numpy(), "language", f"allowed: {', '.join(LANGUAGES)}")
    bad(~out["gender"].isin(GENDERS).to_numpy(), "gender", f"allowed: {', '.join(GENDERS)}")
    bad(~out["gold"].isin(EMOTIONS).to_numpy(), "gold", f"allowed: {', '.join(EMOTIONS)}")
    bad(~out["pred"].isin((*EMOTIONS, INVALID)).to_numpy(), "pred", f"allowed: {', '.join(EMOTIONS)}, {INVALID}")
    if "modality" in out.columns:
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


def encode(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Integer codes of a validated frame: language (index in LANGUAGES), gender (0=F, 1=M), gold (0..6),
    pred (0..6, or 7 = invalid). Each an int64 array of shape [N]."""
    pred = pd.Categorical(df["pred"], categories=EMOTIONS).codes.astype(np.int64)
    pred[(pred < 0) | ~df["valid"].to_numpy(dtype=bool)] = K
    return {
        "language": pd.Categorical(df["language"], categories=LANGUAGES).codes.astype(np.int64),
        "gender": pd.Categorical(df["gender"], categories=GENDERS).codes.astype(np.int64),
        "gold": pd.Categorical(df["gold"], categories=EMOTIONS).codes.astype(np.int64),
        "pred": pred,
    }


# ----------------------------------------------------------------------------------------------- point estimates


def _rates(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest TPR and FPR per class from a [7, 8] gold × pred confusion matrix; NaN where undefined."""
    tp = np.diag(cm[:, :K]).astype(float)
    positives = cm.sum(axis=1).astype(float)
    negatives = cm.sum() - positives
    fp = cm[:, :K].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, tp / positives, np.nan), np.where(negatives > 0, fp / negatives, np.nan)


def _class_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, list[str]]:
    usable = np.isfinite(a) & np.isfinite(b)
    if not usable.any():
        return math.nan, []
    return float(np.mean(np.abs(a - b)[usable])), [EMOTIONS[c] for c in np.flatnonzero(usable)]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _subset_metrics(gold: np.ndarray, pred: np.ndarray, gender: np.ndarray) -> dict:
    labels = list(range(K))
    w_f1 = f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)
    per_gender: dict[str, dict] = {}
    rates = []
    for g, name in enumerate(GENDERS):
        m = gender == g
        if not m.any():
            per_gender[name] = {"w_f1": math.nan, "acc": math.nan, "n": 0}
            rates.append((np.full(K, np.nan), np.full(K, np.nan)))
            continue
        cm = confusion_matrix(gold[m], pred[m], labels=list(range(K + 1)))[:K]
        per_gender[name] = {
            "w_f1": 100 * f1_score(gold[m], pred[m], labels=labels, average="weighted", zero_division=0),
            "acc": 100 * accuracy_score(gold[m], pred[m]),
            "n": int(m.sum()),
        }
        rates.append(_rates(cm))
    (tpr_f, fpr_f), (tpr_m, fpr_m) = rates
    tpr_gap, tpr_classes = _class_gap(tpr_f, tpr_m)
    fpr_gap, fpr_classes = _class_gap(fpr_f, fpr_m)
    f, m_ = per_gender["F"], per_gender["M"]
    out = {
        "w_f1": 100 * float(w_f1),
        "acc": 100 * float(accuracy_score(gold, pred)),
        "tpr_gap": 100 * tpr_gap,
        "fpr_gap": 100 * fpr_gap,
        "w_f1_gap": abs(f["w_f1"] - m_["w_f1"]),
        "acc_gap": abs(f["acc"] - m_["acc"]),
    }
    out["avg_gap"] = _nanmean([out["tpr_gap"], out["fpr_gap"], out["w_f1_gap"], out["acc_gap"]])
    out.update(
        n=int(len(gold)),
        invalid_rate=float(np.mean(pred == K)),
        tpr_classes=tpr_classes,
        fpr_classes=fpr_classes,
        by_gender=per_gender,
    )
    return out


def compute_metrics(df: pd.DataFrame) -> dict:
    """Metrics of one system's predictions: ``{"overall": {...}, "per_language": {lang: {...}}}``.

    Each block holds w_f1, acc, tpr_gap, fpr_gap, w_f1_gap, acc_gap, avg_gap (percent floats; NaN when
    undefined), n (utterances), invalid_rate (fraction 0..1 of invalid predictions), tpr_classes / fpr_classes
    (emotions used in each gap's average) and by_gender ({"F"|"M": {w_f1, acc, n}}). "overall" pools all
    languages (the paper's Multilingual rows); per_language has the languages present, in LANGUAGES order.
    """
    codes = encode(validate_predictions(df, source="predictions frame"))
    out = {"overall": _subset_metrics(codes["gold"], codes["pred"], codes["gender"]), "per_language": {}}
    for li, lang in enumerate(LANGUAGES):
        m = codes["language"] == li
        if m.any():
            out["per_language"][lang] = _subset_metrics(codes["gold"][m], codes["pred"][m], codes["gender"][m])
    return out


def confusion_by_gender(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """{"F"|"M": int array [7, 8]}: rows gold EMOTIONS, columns predicted EMOTIONS + "invalid"."""
    codes = encode(validate_predictions(df, source="predictions frame"))
    out = {}
    for g, name in enumerate(GENDERS):
        m = codes["gender"] == g
        out[name] = confusion_matrix(codes["gold"][m], codes["pred"][m], labels=list(range(K + 1)))[:K]
    return out


# ----------------------------------------------------------------------------------------------- vectorised


def _nanmean_last(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where there is none (no warning)."""
    defined = np.isfinite(x).sum(-1)
    return np.nansum(x, -1) / np.where(defined > 0, defined, np.nan)


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """The 7 METRIC_KEYS (percent) from confusion counts of shape [..., 2 genders, 7 gold, 8 pred].

    Same definitions as compute_metrics, computed for every leading index at once (one bootstrap resample
    per index). Returns arrays of shape counts.shape[:-3]; NaN where undefined.
    """
    c = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):

        def wf1_acc(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            tp = np.diagonal(cm[..., :K], axis1=-2, axis2=-1)
            support = cm.sum(-1)
            predicted = cm[..., :K].sum(-2)
            n = support.sum(-1)
            denom = support + predicted
            f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
            n_safe = np.where(n > 0, n, np.nan)
            return (support * f1).sum(-1) / n_safe, tp.sum(-1) / n_safe

        w_f1, acc = wf1_acc(c.sum(-3))
        wf1_g, acc_g = wf1_acc(c)  # [..., 2]
        tp = np.diagonal(c[..., :K], axis1=-2, axis2=-1)  # [..., 2, 7]
        pos = c.sum(-1)
        neg = pos.sum(-1, keepdims=True) - pos
        fp = c[..., :K].sum(-2) - tp
        tpr = np.where(pos > 0, tp / pos, np.nan)
        fpr = np.where(neg > 0, fp / neg, np.nan)
        # a class undefined in either group is left out of the class average, as in compute_metrics
        tpr_gap = _nanmean_last(np.abs(tpr[..., 0, :] - tpr[..., 1, :]))
        fpr_gap = _nanmean_last(np.abs(fpr[..., 0, :] - fpr[..., 1, :]))
        out = {
            "w_f1": 100 * w_f1,
            "acc": 100 * acc,
            "tpr_gap": 100 * tpr_gap,
            "fpr_gap": 100 * fpr_gap,
            "w_f1_gap": 100 * np.abs(wf1_g[..., 0] - wf1_g[..., 1]),
            "acc_gap": 100 * np.abs(acc_g[..., 0] - acc_g[..., 1]),
        }
        out["avg_gap"] = _nanmean_last(np.stack([out[k] for k in ("tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap")], -1))
    return out


def _cells(codes: dict[str, np.ndarray], *preds: np.ndarray) -> np.ndarray:
    """Flat cell index of each row over (gender, gold, pred[, pred2]) for np.bincount / multinomial draws."""
    cell = codes["gender"] * K + codes["gold"]
    for p in preds:
        cell = cell * (K + 1) + p
    return cell


def _resample_cell_counts(
    language: np.ndarray, cell: np.ndarray, n_cells: int, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap cell counts [n_boot, L, n_cells], resampling utterances with replacement within language.

    Resampling the n_l utterances of language l with replacement makes the cell counts exactly
    Multinomial(n_l, empirical cell frequencies of l), so the counts are drawn directly: the cost is
    O(n_boot × cells), independent of the number of utterances, and no index array is materialised.
    """
    out = np.zeros((n_boot, len(LANGUAGES), n_cells), dtype=np.int64)
    for li in range(len(LANGUAGES)):
        m = language == li
        if m.any():
            freq = np.bincount(cell[m], minlength=n_cells) / m.sum()
            out[:, li] = rng.multinomial(int(m.sum()), freq, size=n_boot)
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _by_subset(metric_arrays: dict[str, np.ndarray], present: list[int], fn) -> dict:
    """Apply fn(metric -> samples [n_boot]) to the overall (index -1) and each present language."""
    return {
        "overall": {k: fn(k, v[:, -1]) for k, v in metric_arrays.items()},
        "per_language": {LANGUAGES[li]: {k: fn(k, v[:, li]) for k, v in metric_arrays.items()} for li in present},
    }


def _with_overall(counts: np.ndarray) -> np.ndarray:
    """[B, L, ...] → [B, L + 1, ...]: the pooled (multilingual) counts appended as the last subset."""
    return np.concatenate([counts, counts.sum(1, keepdims=True)], axis=1)


def bootstrap_ci(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile CIs: ``{"overall": {metric: [lo, hi]}, "per_language": {lang: {metric: [lo, hi]}}}``.

    Utterances are resampled with replacement within each language (stratified; the pooled "overall"
    resample is the union of the per-language ones), n_boot times, seeded. Resamples where a metric is
    undefined are ignored for that metric's interval. Percent units, as compute_metrics.
    """
    codes = encode(validate_predictions(df, source="predictions frame"))
    rng = np.random.default_rng(seed)
    n_cells = 2 * K * (K + 1)
    cells = _resample_cell_counts(codes["language"], _cells(codes, codes["pred"]), n_cells, n_boot, rng)
    samples = metrics_from_counts(_with_overall(cells).reshape(n_boot, len(LANGUAGES) + 1, 2, K, K + 1))
    present = [li for li in range(len(LANGUAGES)) if (codes["language"] == li).any()]
    return _by_subset(samples, present, lambda _k, s: _percentile_ci(s, level))


def paired_bootstrap(
    a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Paired bootstrap of metric(b) − metric(a) on the same utterances (aligned by utt_id).

    Returns ``{"overall": {metric: {...}}, "per_language": {lang: {metric: {...}}}}`` where each entry has
    ``diff`` (point estimate, percent points), ``ci`` ([lo, hi] percentile interval) and ``p_value``: the
    two-sided bootstrap fraction 2·min(P*(d ≤ 0), P*(d ≥ 0)), capped at 1 (small = the sign of the
    difference is stable under resampling). For gaps a negative diff means b has the smaller gap.
    Raises PredictionsError if the utterance sets differ or an utterance's language/gender/gold disagree.
    """
    a = validate_predictions(a, source="system A predictions")
    b = validate_predictions(b, source="system B predictions")
    ids_a, ids_b = set(a["utt_id"]), set(b["utt_id"])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise PredictionsError(
            f"paired bootstrap needs the same utterances: {len(only_a)} only in A (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in B (e.g. {only_b[:3]})"
        )
    b = b.set_index("utt_id").loc[a["utt_id"]].reset_index()
    for col in ("language", "gender", "gold"):
        differ = (a[col].to_numpy() != b[col].to_numpy()).nonzero()[0]
        if differ.size:
            i = int(differ[0])
            raise PredictionsError(
                f"paired bootstrap: utterance {a['utt_id'].iloc[i]!r} has {col}={a[col].iloc[i]!r} in A "
                f"but {b[col].iloc[i]!r} in B"
            )
    ca, cb = encode(a), encode(b)
    rng = np.random.default_rng(seed)
    n_cells = 2 * K * (K + 1) * (K + 1)
    cells = _resample_cell_counts(ca["language"], _cells(ca, ca["pred"], cb["pred"]), n_cells, n_boot, rng)
    joint = _with_overall(cells).reshape(n_boot, len(LANGUAGES) + 1, 2, K, K + 1, K + 1)
    sa, sb = metrics_from_counts(joint.sum(-1)), metrics_from_counts(joint.sum(-2))
    diffs = {k: sb[k] - sa[k] for k in METRIC_KEYS}
    point_a, point_b = compute_metrics(a), compute_metrics(b)

    def summarise(key: str, d: np.ndarray, subset: tuple[str, ...]) -> dict:
        pa, pb = point_a, point_b
        for part in subset:
            pa, pb = pa[part], pb[part]
        finite = d[np.isfinite(d)]
        p = min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0))) if finite.size else math.nan
        return {"diff": float(pb[key] - pa[key]), "ci": _percentile_ci(d, level), "p_value": float(p)}

    present = [li for li in range(len(LANGUAGES)) if (ca["language"] == li).any()]
    return {
        "overall": {k: summarise(k, diffs[k][:, -1], ("overall",)) for k in METRIC_KEYS},
        "per_language": {
            LANGUAGES[li]: {k: summarise(k, diffs[k][:, li], ("per_language", LANGUAGES[li])) for k in METRIC_KEYS}
            for li in present
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
