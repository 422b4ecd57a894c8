"""Every metric declared once: name, direction (which way is better), label, unit, and how it is computed.

A metric's `source` says where its one formula lives and what it takes:
    counts   `formula(ConfusionCounts)`: from per-group confusion counts [..., A groups, K gold, K+1 pred],
             vectorised over leading axes (one bootstrap resample or one stratum per index): the paper's SER
             and fairness metrics. `ermgap.metrics` computes point estimates, bootstrap intervals and paired
             differences through these formulas only.
    strata   `formula({stratum: {metric: value}})`: from the per-stratum values of counts metrics
             (worst_lang_gap: the largest per-stratum AVG gap).
    losses   `formula(losses)`: from a split's per-sample answer losses and cells (an object with `mean()` and
             `gap()`, ermgap.recipe's), returning (value, {stratum: value}).
    steps    from each optimizer step's global cell counts (`ermgap.sampler.BatchCoverage`).
`reported` metrics are what the training recipe reports for each split (`dev_<name>`, `test_<name>`; with
`per_stratum`, also `<split>_<name>_<stratum>`), hence what `eval.metric`, a sweep's selection and scheduler may
use, and what the CLI table and the leaderboard show; all of them are derived from this list.

Keys in reports are `<split>_<metric>[_<stratum>]` (`dev_w_f1`, `test_avg_gap_deu`, `best_dev_w_f1`),
in MLflow with a namespace (`best/test_worst_lang_gap`, `eval/dev_w_f1`); `lookup` resolves any of them to the
declaration, so a place that ranks, labels or selects by a metric reads its direction here instead of
repeating it. numpy only (no torch): the config imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

Direction = Literal["max", "min"]
Source = Literal["counts", "strata", "losses", "steps"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction   # "max": higher is better
    label: str             # standalone name ("AVG gap")
    header: str            # column header in the paper's tables, under a gender-gap heading ("AVG")
    unit: str
    description: str
    source: Source = "counts"
    formula: Callable[[Any], Any] | None = None  # the one implementation (see the module docstring)
    reported: bool = False     # reported by the recipe for every split
    per_stratum: bool = False  # ... and per stratum

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "max" else "↓"

    @property
    def column(self) -> str:
        """The paper's header with its direction: "W-F1↑", "AVG↓"."""
        return self.header + self.arrow


# --------------------------------------------------------------------------- formulas on confusion counts


def spread(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """max − min over `axis` of the finite entries; NaN where fewer than two are finite (the k-group gap)."""
    finite = np.isfinite(x)
    hi = np.where(finite, x, -np.inf).max(axis=axis)
    lo = np.where(finite, x, np.inf).min(axis=axis)
    with np.errstate(invalid="ignore"):
        return np.where(finite.sum(axis=axis) >= 2, hi - lo, np.nan)


def nanmean_last(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where there is none (no warning)."""
    defined = np.isfinite(x).sum(-1)
    return np.nansum(x, -1) / np.where(defined > 0, defined, np.nan)


def _wf1_acc(cm: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Support-weighted F1 (F1 = 0 where a class is neither gold nor predicted) and accuracy, fractions."""
    tp = np.diagonal(cm[..., :k], axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm[..., :k].sum(-2)
    n = support.sum(-1)
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    n_safe = np.where(n > 0, n, np.nan)
    return (support * f1).sum(-1) / n_safe, tp.sum(-1) / n_safe


class ConfusionCounts:
    """Confusion counts [..., A groups, K gold, K+1 pred] (the last pred column: invalid predictions) and the
    quantities the counts formulas share, each computed once; `value(name)` is a counts metric, in percent."""

    def __init__(self, counts: np.ndarray) -> None:
        self.c = np.asarray(counts, dtype=np.float64)
        self.k = self.c.shape[-2]
        self._values: dict[str, np.ndarray] = {}

    def value(self, name: str) -> np.ndarray:
        if name not in self._values:
            with np.errstate(invalid="ignore", divide="ignore"):
                self._values[name] = METRICS[name].formula(self)
        return self._values[name]

    @cached_property
    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(W-F1, ACC) over all groups, fractions [...]."""
        return _wf1_acc(self.c.sum(-3), self.k)

    @cached_property
    def per_group(self) -> tuple[np.ndarray, np.ndarray]:
        """(W-F1, ACC) of each group, fractions [..., A]; NaN for an empty group."""
        return _wf1_acc(self.c, self.k)

    @cached_property
    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """One-vs-rest (TPR, FPR) [..., A, K]: NaN where undefined (no gold-c / no non-gold-c utterance)."""
        c, k = self.c, self.k
        tp = np.diagonal(c[..., :k], axis1=-2, axis2=-1)
        pos = c.sum(-1)
        neg = pos.sum(-1, keepdims=True) - pos
        fp = c[..., :k].sum(-2) - tp
        return np.where(pos > 0, tp / pos, np.nan), np.where(neg > 0, fp / neg, np.nan)

    def class_gap(self, rates: np.ndarray) -> np.ndarray:
        """Mean over classes of the spread over groups; a class defined in fewer than two groups is left out."""
        return nanmean_last(spread(rates, axis=-2))


# The four attribute gaps AVG averages.
AVG_OF = ("tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap")


def _worst_stratum(per_stratum: dict[str, dict[str, float]]) -> float:
    finite = [v["avg_gap"] for v in per_stratum.values() if v["avg_gap"] == v["avg_gap"]]
    return max(finite) if finite else math.nan


_DECLARED = (
    Metric("w_f1", "max", "W-F1", "W-F1", "%", "support-weighted F1 over the 7 emotions",
           formula=lambda c: 100 * c.pooled[0], reported=True, per_stratum=True),
    Metric("acc", "max", "ACC", "ACC", "%", "accuracy", formula=lambda c: 100 * c.pooled[1], reported=True),
    # Gaps are between the protected attribute's groups: |F − M| for gender, max − min over k > 2 values.
    Metric("tpr_gap", "min", "TPR gap", "TPR", "% points", "mean over classes of |TPR(F) − TPR(M)| (k groups: max − min)",
           formula=lambda c: 100 * c.class_gap(c.rates[0])),
    Metric("fpr_gap", "min", "FPR gap", "FPR", "% points", "mean over classes of |FPR(F) − FPR(M)| (k groups: max − min)",
           formula=lambda c: 100 * c.class_gap(c.rates[1])),
    Metric("w_f1_gap", "min", "W-F1 gap", "W-F1 gap", "% points", "|W-F1(F) − W-F1(M)| (k groups: max − min)",
           formula=lambda c: 100 * spread(c.per_group[0])),
    Metric("acc_gap", "min", "ACC gap", "ACC gap", "% points", "|ACC(F) − ACC(M)| (k groups: max − min)",
           formula=lambda c: 100 * spread(c.per_group[1])),
    Metric("avg_gap", "min", "AVG gap", "AVG", "% points", "mean of the TPR, FPR, W-F1 and ACC attribute gaps",
           formula=lambda c: nanmean_last(np.stack([c.value(m) for m in AVG_OF], -1)), reported=True,
           per_stratum=True),
    Metric("worst_lang_gap", "min", "worst-lang gap", "worst-lang", "% points", "largest per-stratum (language) AVG gap",
           source="strata", formula=_worst_stratum, reported=True),
    Metric("loss", "min", "loss", "loss", "nats", "mean per-utterance cross-entropy of the answer",
           source="losses", formula=lambda d: (d.mean(), {}), reported=True),
    Metric("loss_gap", "min", "Δloss", "Δloss", "nats", "largest within-stratum attribute gap of the mean loss",
           source="losses", formula=lambda d: d.gap(), reported=True, per_stratum=True),
    # Batch coverage (ermgap.sampler.BatchCoverage), from each optimizer step's global cell counts: the
    # gap term is 0 in a step without a valid stratum, and a cell mean of 1 example is noise.
    Metric("valid_strata", "max", "valid strata", "valid strata", "strata",
           "strata of a step's global batch with every attribute value present (train/, every step)", source="steps"),
    Metric("min_cell_count", "max", "min cell count", "min cell", "examples",
           "fewest examples of a train (stratum, attribute) cell in a step's global batch (train/ every step; "
           "train_: over all steps)", source="steps"),
    Metric("valid_step_share", "max", "valid-stratum steps", "valid steps", "fraction",
           "share of optimizer steps whose global batch has at least one valid stratum", source="steps"),
)
# The per-step coverage values the training recipe (`ermgap.recipe`) logs as train/<name>, and the run summary
# it writes as train_<name>.
STEP_COVERAGE: tuple[str, ...] = ("valid_strata", "min_cell_count")
RUN_COVERAGE: tuple[str, ...] = ("valid_step_share", "min_cell_count")
METRICS: dict[str, Metric] = {m.name: m for m in _DECLARED}
SPLITS: tuple[str, ...] = ("dev", "test")


def register_metric(metric: Metric) -> Metric:
    """Add a metric at run time (a test's, a notebook's); a metric shipped with ermgap is a line in _DECLARED."""
    if metric.source in ("counts", "strata", "losses") and metric.formula is None:
        raise ValueError(f"metric {metric.name!r}: a {metric.source} metric needs its formula")
    METRICS[metric.name] = metric
    return metric


def split_metrics() -> tuple[str, ...]:
    """What the training recipe reports for each split, in declaration order (what `eval.metric` may select)."""
    return tuple(m.name for m in METRICS.values() if m.reported)


def counts_metrics() -> tuple[str, ...]:
    """The metrics computed from confusion counts (point estimates, bootstrap intervals, paired differences)."""
    return tuple(m.name for m in METRICS.values() if m.source == "counts")


def reported_keys(splits: tuple[str, ...] = SPLITS) -> tuple[str, ...]:
    """`<split>_<metric>` of every reported metric, split by split: what each training report carries."""
    return tuple(f"{s}_{m}" for s in splits for m in split_metrics())


# The shipped lists (import-time snapshots; a metric registered later is in the functions above).
SPLIT_METRICS: tuple[str, ...] = split_metrics()
_PREFIXES = ("best/", "eval/", "train/", "best_")  # MLflow namespaces (ermgap.tracking), the Tune report's best_
_PARTS = (*SPLITS, "train")  # `train_<metric>`: a run's summary of its training steps


def lookup(key: str) -> Metric:
    """The declaration behind a metric name or report key; KeyError naming the key if there is none."""
    name = key
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    for split in _PARTS:
        name = name.removeprefix(f"{split}_")
    if name in METRICS:
        return METRICS[name]
    # `<metric>_<stratum>`: strata come from the data (deu, fra, deu_uni, ...); the longest metric name wins
    # (`w_f1_gap_deu` is w_f1_gap, not w_f1).
    stem = max((m for m in METRICS if name.startswith(f"{m}_")), key=len, default=None)
    if stem is not None:
        return METRICS[stem]
    raise KeyError(f"{key!r} is not a known metric; known: {', '.join(METRICS)}")


def direction(key: str) -> Direction:
    return lookup(key).direction


def better(key: str, a: float, b: float) -> bool:
    """Whether value `a` of metric `key` is strictly better than `b`."""
    return a > b if direction(key) == "max" else a < b


def label(key: str) -> str:
    """`dev_worst_lang_gap` → "dev worst-lang gap"; `test_avg_gap_deu` → "test AVG gap deu"."""
    m = lookup(key)
    bare = key
    for prefix in _PREFIXES:
        bare = bare.removeprefix(prefix)
    split = next((s for s in _PARTS if bare.startswith(f"{s}_")), None)
    rest = bare.removeprefix(f"{split}_") if split else bare
    tail = rest[len(m.name):].lstrip("_").replace("_", " ")
    return " ".join(x for x in (split, m.label, tail) if x)
