"""The bias lab's results table: pure functions from test predictions to numbers, text, Markdown and verdicts.

    table = lab_table({corpus: {objective: {seed: test predictions}}})   # one row per (corpus, objective)
    print(format_table(table))                                          # fits 100 columns
    verdicts(table)                                                     # the targets, in words

Per corpus the *worst language* is the one whose AVG gender gap is largest in the reference's (ERM's) test
predictions pooled over its seeds; every row of that corpus is measured in that language, so each row answers
"what happened to the gap ERM leaves widest". Per row: test W-F1 (all languages), the AVG gap in that language and
each gender's own accuracy there (mean ± sample sd over seeds), and against the reference the seed-paired
bootstrap difference (`ermgap.objective_comparison.paired_difference`: both systems' predictions of the seeds they
share pooled, utterances resampled within language) of test W-F1 and of that gap, with 95 % percentile intervals
and the relative change of the gap. The gender accuracies show which group moved: a penalty on the loss gap can
narrow a gap by lowering the better-served group's accuracy as well as by raising the other's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ermgap.errors import PredictionsError
from ermgap.metrics import by_key, compute_metrics, per_key
from ermgap.objective_comparison import paired_difference, pool_seeds, worst_language
from ermgap.task import DEFAULT_TASK, Task

REFERENCE = "erm"
N_BOOT, BOOT_SEED, LEVEL = 1000, 0, 0.95


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if math.isfinite(x)]
    mean = float(np.mean(v)) if v else math.nan
    return mean, (float(np.std(v, ddof=1)) if len(v) > 1 else math.nan)


def lab_table(preds: Mapping[str, Mapping[str, Mapping[int, pd.DataFrame]]], *, reference: str = REFERENCE,
              n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = LEVEL,
              task: Task = DEFAULT_TASK) -> pd.DataFrame:
    """{corpus: {objective: {seed: test predictions}}} → one row per (corpus, objective), in the given orders.

    Columns: corpus, objective, seeds (how many), worst_language; w_f1_mean/_sd, gap_mean/_sd (AVG gap in the
    worst language), acc_<value>_mean/_sd for each attribute value (accuracy in the worst language), percent;
    against the reference (NaN on its own row): d_w_f1 and d_gap with _lo/_hi (the interval) and _seed_mean
    (mean of the per-seed differences), d_gap_rel with _lo/_hi (−0.5: halved), d_acc_<value> (difference of
    the pooled accuracies). PredictionsError if a corpus lacks the reference.
    """
    per, by = per_key(task), by_key(task)
    rows = []
    for corpus, systems in preds.items():
        if reference not in systems or not systems[reference]:
            raise PredictionsError(f"corpus {corpus!r}: no {reference!r} runs to compare with; have {sorted(systems)}")
        worst = worst_language(pool_seeds(systems[reference]), task)
        pooled_ref = compute_metrics(pool_seeds(systems[reference]), task)[per][worst][by]
        for name, runs in systems.items():
            row: dict = {"corpus": corpus, "objective": name, "seeds": len(runs), "worst_language": worst}
            metrics = [compute_metrics(runs[s], task) for s in sorted(runs)]
            row["w_f1_mean"], row["w_f1_sd"] = _mean_sd([m["overall"]["w_f1"] for m in metrics])
            here = [m[per].get(worst) for m in metrics]
            row["gap_mean"], row["gap_sd"] = _mean_sd([h["avg_gap"] if h else math.nan for h in here])
            for value in task.attribute_values:
                row[f"acc_{value}_mean"], row[f"acc_{value}_sd"] = _mean_sd(
                    [h[by][value]["acc"] if h else math.nan for h in here])
            if name == reference:
                rows.append(row)
                continue
            d = paired_difference(systems[reference], runs, n_boot=n_boot, seed=seed, level=level, task=task)
            for key, col in (("w_f1", "d_w_f1"), ("worst_gap", "d_gap")):
                row[col], (row[f"{col}_lo"], row[f"{col}_hi"]) = d[key]["diff"], d[key]["ci"]
                row[f"{col}_seed_mean"] = d[key]["seed_mean"]
            row["d_gap_rel"], (row["d_gap_rel_lo"], row["d_gap_rel_hi"]) = d["worst_gap"]["rel"], d["worst_gap"]["rel_ci"]
            pooled = compute_metrics(pool_seeds({s: runs[s] for s in d["seeds"]}), task)[per][worst][by]
            for value in task.attribute_values:
                row[f"d_acc_{value}"] = pooled[value]["acc"] - pooled_ref[value]["acc"]
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- display

NAMES = {"erm": "ERM", "minmaxgap": "MinMaxGAP", "constrained": "Constrained", "group_dro": "Group DRO",
         "reweight": "Reweight", "adversarial": "Adversarial", "oracle": "Oracle"}


def _num(x: float, digits: int = 1, sign: bool = False) -> str:
    if not (isinstance(x, (int, float)) and math.isfinite(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ms(mean: float, sd: float) -> str:
    return _num(mean) + ("" if not math.isfinite(sd) else f"±{sd:.1f}")


def _diff(row: pd.Series, col: str) -> str:
    if not math.isfinite(row.get(col, math.nan)):
        return "reference"
    return f"{_num(row[col], sign=True)} [{_num(row[col + '_lo'], sign=True)}, {_num(row[col + '_hi'], sign=True)}]"


def _cells(row: pd.Series, values: tuple[str, ...]) -> list[str]:
    rel = row.get("d_gap_rel", math.nan)
    return [NAMES.get(row["objective"], row["objective"]), _ms(row["w_f1_mean"], row["w_f1_sd"]),
            _ms(row["gap_mean"], row["gap_sd"]), *(_ms(row[f"acc_{v}_mean"], row[f"acc_{v}_sd"]) for v in values),
            _diff(row, "d_gap"), f"{100 * rel:+.0f} %" if math.isfinite(rel) else "", _diff(row, "d_w_f1")]


def _values(table: pd.DataFrame) -> tuple[str, ...]:
    return tuple(c[len("acc_"):-len("_mean")] for c in table.columns if c.startswith("acc_") and c.endswith("_mean"))


def seed_counts(part: pd.DataFrame) -> str:
    """"3 seed(s)", or "3 seed(s) (Adversarial: 1)" when some rows have fewer seeds than the most (pooled sweeps
    need not hold every row's seeds; a row's Δ pairs the seeds it shares with ERM)."""
    most = int(part["seeds"].max())
    fewer = {}
    for _, r in part[part["seeds"] < most].iterrows():
        fewer.setdefault(int(r["seeds"]), []).append(NAMES.get(r["objective"], r["objective"]))
    return f"{most} seed(s)" + "".join(f" ({', '.join(names)}: {n})" for n, names in sorted(fewer.items()))


def format_table(table: pd.DataFrame, titles: Mapping[str, str] | None = None) -> str:
    """The table as plain text: a block per corpus headed by its title and worst language. ≤ 100 columns for any
    row name in NAMES and values of the widest forms (means < 100 with two-digit sds, differences and intervals
    above −100, relative changes of three digits)."""
    values = _values(table)
    head = ["objective", "W-F1", "gap", *(f"acc {v}" for v in values), "Δgap [95 % CI]", "Δgap", "ΔW-F1 [95 % CI]"]
    blocks = []
    for corpus, part in table.groupby("corpus", sort=False):
        cells = [head] + [_cells(r, values) for _, r in part.iterrows()]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        lines = [f"{(titles or {}).get(corpus, corpus)}",
                 f"  gap (AVG) and accuracies in {part['worst_language'].iloc[0]}, ERM's widest",
                 f"  mean ± sd over {seed_counts(part)}; Δ vs ERM on the seeds both ran"]
        for i, c in enumerate(cells):
            lines.append(" ".join([c[0].ljust(widths[0]), *(x.rjust(w) for x, w in zip(c[1:], widths[1:]))]))
            if i == 0:
                lines.append(" ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_table(table: pd.DataFrame, titles: Mapping[str, str] | None = None) -> str:
    """The same numbers as one Markdown table (corpus and worst language as the first columns)."""
    values = _values(table)
    head = ["corpus (worst language)", "objective", "seeds", "test W-F1", "gap", *(f"acc {v}" for v in values),
            "Δ gap vs ERM [95 % CI]", "Δ gap %", "Δ W-F1 vs ERM [95 % CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for _, r in table.iterrows():
        name = f"{(titles or {}).get(r['corpus'], r['corpus'])} ({r['worst_language']})"
        cells = _cells(r, values)
        lines.append("| " + " | ".join([name, cells[0], str(int(r["seeds"])), *cells[1:]]) + " |")
    return "\n".join(lines)


def verdicts(table: pd.DataFrame, *, positive: str = "positive", negative: str = "negative",
             objective: str = "minmaxgap", min_reduction: float = 0.5, max_cost: float = 2.0,
             not_objectives: tuple[str, ...] = ("oracle",)) -> dict[str, dict]:
    """The targets, checked on the table.

    positive: `objective` lowers ERM's gap by ≥ `min_reduction` (relative, point estimate) with the interval of
    the gap difference excluding 0, at a W-F1 cost ≤ `max_cost` points (point estimate). negative: every
    objective's gap-difference interval contains 0 (rows in `not_objectives`, the oracle's restored share, are
    data, not objectives, and are not checked). Returns {name: {"met": bool, "why": str}} for the corpora
    present.
    """
    out: dict[str, dict] = {}
    pos = table[(table["corpus"] == positive) & (table["objective"] == objective)]
    if len(pos):
        r = pos.iloc[0]
        reduction = -r["d_gap_rel"]
        checks = {f"gap −{100 * min_reduction:.0f} % or more": reduction >= min_reduction,
                  "gap interval excludes 0": r["d_gap_hi"] < 0,
                  f"W-F1 cost ≤ {max_cost:g}": r["d_w_f1"] >= -max_cost}
        out["positive"] = {"met": all(checks.values()), "checks": {k: bool(v) for k, v in checks.items()},
                           "why": f"{NAMES.get(objective, objective)}: gap {_num(r['d_gap'], sign=True)} "
                                  f"[{_num(r['d_gap_lo'], sign=True)}, {_num(r['d_gap_hi'], sign=True)}] "
                                  f"({100 * r['d_gap_rel']:+.0f} %), W-F1 {_num(r['d_w_f1'], sign=True)} "
                                  f"[{_num(r['d_w_f1_lo'], sign=True)}, {_num(r['d_w_f1_hi'], sign=True)}]"}
    neg = table[(table["corpus"] == negative) & ~table["objective"].isin(not_objectives)]
    neg = neg[neg["d_gap"].notna()] if "d_gap" in neg else neg.iloc[:0]
    if len(neg):
        contains = {r["objective"]: bool(r["d_gap_lo"] <= 0 <= r["d_gap_hi"]) for _, r in neg.iterrows()}
        out["negative"] = {"met": all(contains.values()), "checks": contains,
                           "why": "; ".join(f"{NAMES.get(r['objective'], r['objective'])} "
                                            f"[{_num(r['d_gap_lo'], sign=True)}, {_num(r['d_gap_hi'], sign=True)}]"
                                            for _, r in neg.iterrows())}
    return out
