"""Every reported metric declared once: name, direction (which way is better), label and unit.

Keys in reports are `<split>_<metric>[_<stratum>]` (`dev_w_f1`, `test_avg_gap_deu`, `best_dev_w_f1`),
in MLflow with a namespace (`best/test_worst_lang_gap`, `eval/dev_w_f1`); `lookup` resolves any of them to the declaration, so a place that ranks,
labels or selects by a metric reads its direction here instead of repeating it. Pure Python (no torch):
the config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["max", "min"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction   # "max": higher is better
    label: str             # standalone name ("AVG gap")
    header: str            # column header in the paper's tables, under a gender-gap heading ("AVG")
    unit: str
    description: str

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "max" else "↓"

    @property
    def column(self) -> str:
        """The paper's header with its direction: "W-F1↑", "AVG↓"."""
        return self.header + self.arrow


_DECLARED = (
    Metric("w_f1", "max", "W-F1", "W-F1", "%", "support-weighted F1 over the 7 emotions"),
    Metric("acc", "max", "ACC", "ACC", "%", "accuracy"),
    # Gaps are between the protected attribute's groups: |F − M| for gender, max − min over k > 2 values.
    Metric("tpr_gap", "min", "TPR gap", "TPR", "% points", "mean over classes of |TPR(F) − TPR(M)| (k groups: max − min)"),
    Metric("fpr_gap", "min", "FPR gap", "FPR", "% points", "mean over classes of |FPR(F) − FPR(M)| (k groups: max − min)"),
    Metric("w_f1_gap", "min", "W-F1 gap", "W-F1 gap", "% points", "|W-F1(F) − W-F1(M)| (k groups: max − min)"),
    Metric("acc_gap", "min", "ACC gap", "ACC gap", "% points", "|ACC(F) − ACC(M)| (k groups: max − min)"),
    Metric("avg_gap", "min", "AVG gap", "AVG", "% points", "mean of the TPR, FPR, W-F1 and ACC attribute gaps"),
    Metric("worst_lang_gap", "min", "worst-lang gap", "worst-lang", "% points", "largest per-stratum (language) AVG gap"),
    Metric("loss", "min", "loss", "loss", "nats", "mean per-utterance cross-entropy of the answer"),
    Metric("loss_gap", "min", "Δloss", "Δloss", "nats", "largest within-stratum attribute gap of the mean loss"),
    # Batch coverage (ermgap.sampler.BatchCoverage), from each optimizer step's global cell counts: the
    # gap term is 0 in a step without a valid stratum, and a cell mean of 1 example is noise.
    Metric("valid_strata", "max", "valid strata", "valid strata", "strata",
           "strata of a step's global batch with every attribute value present (train/, every step)"),
    Metric("min_cell_count", "max", "min cell count", "min cell", "examples",
           "fewest examples of a train (stratum, attribute) cell in a step's global batch (train/ every step; "
           "train_: over all steps)"),
    Metric("valid_step_share", "max", "valid-stratum steps", "valid steps", "fraction",
           "share of optimizer steps whose global batch has at least one valid stratum"),
)
# The per-step coverage values the training recipe (`ermgap.recipe`) logs as train/<name>, and the run summary it writes as train_<name>.
STEP_COVERAGE: tuple[str, ...] = ("valid_strata", "min_cell_count")
RUN_COVERAGE: tuple[str, ...] = ("valid_step_share", "min_cell_count")
METRICS: dict[str, Metric] = {m.name: m for m in _DECLARED}
# What the training recipe reports for each split, hence what `eval.metric` may select on.
SPLIT_METRICS: tuple[str, ...] = ("w_f1", "acc", "avg_gap", "worst_lang_gap", "loss", "loss_gap")
SPLITS: tuple[str, ...] = ("dev", "test")
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
