"""Objectives compared with a reference objective (ERM) on the same test utterances, over seeds.

Each seed's run of objective X is paired with the reference's run of the same seed. Both are pooled over
the seeds they share (utterance ids tagged with the seed, so utterance u of seed s is paired with itself),
and `ermgap.metrics.paired_bootstrap` resamples the pooled (utterance, seed) units within language:

    diff = metric(X) − metric(reference) on the pooled predictions, with a percentile interval.

Reported: test W-F1 (overall) and the AVG gender gap in the *worst stratum*, the language whose pooled
gap is largest under the reference (the paired bootstrap resamples per-language gaps, not their max, so
the stratum is fixed by the reference: "how much narrower is the gap ERM leaves widest"). For each: the
mean over seeds of the per-seed difference (`seed_mean`), the pooled difference with its interval, and for
the gap the relative change with its interval (−0.5: half of ERM's gap), all from the same resamples.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ermgap.errors import PredictionsError
from ermgap.metrics import compute_metrics, paired_bootstrap, per_key
from ermgap.task import DEFAULT_TASK, Task


def pool_seeds(frames: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """Predictions of several seeds as one frame, `utt_id` → `<utt_id>@<seed>`."""
    return pd.concat([f.assign(utt_id=f["utt_id"].astype(str) + f"@{s}") for s, f in sorted(frames.items())],
                     ignore_index=True)


def worst_language(preds: pd.DataFrame, task: Task = DEFAULT_TASK) -> str:
    """The stratum (a language for the paper's task) with the largest AVG gap in `preds` (NaN gaps never win)."""
    per = compute_metrics(preds, task)[per_key(task)]
    finite = {lg: b["avg_gap"] for lg, b in per.items() if b["avg_gap"] == b["avg_gap"]}
    if not finite:
        raise PredictionsError(f"no {task.stratum_name} has a defined AVG gap (each needs two {task.attribute} "
                               "values)")
    return max(finite, key=finite.get)


def paired_difference(reference: Mapping[int, pd.DataFrame], other: Mapping[int, pd.DataFrame], *,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95, task: Task = DEFAULT_TASK) -> dict:
    """{seed: test predictions} of the reference and of another objective → their paired differences.

    Returns {"seeds", "worst_language", "w_f1": {diff, ci, p_value}, "worst_gap": {diff, ci, p_value}}
    in percent points (a negative worst_gap diff: the other objective narrows that gap).
    """
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        raise PredictionsError(f"no seed in common (reference: {sorted(reference)}, other: {sorted(other)})")
    a = pool_seeds({s: reference[s] for s in seeds})
    b = pool_seeds({s: other[s] for s in seeds})
    worst = worst_language(a, task)
    per = per_key(task)
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, level=level, task=task)
    out = {"seeds": seeds, "worst_language": worst, "w_f1": boot["overall"]["w_f1"],
           "worst_gap": boot[per][worst]["avg_gap"]}
    per_seed = {"w_f1": [], "worst_gap": []}
    for s in seeds:
        ma, mb = compute_metrics(reference[s], task), compute_metrics(other[s], task)
        per_seed["w_f1"].append(mb["overall"]["w_f1"] - ma["overall"]["w_f1"])
        gap_a, gap_b = (m[per].get(worst, {}).get("avg_gap", float("nan")) for m in (ma, mb))
        per_seed["worst_gap"].append(gap_b - gap_a)
    for key, values in per_seed.items():
        out[key] = {**out[key], "seed_mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")}
    return out


COLUMNS = ["config", "seeds", "worst_language",
           *(f"{c}{suffix}" for c in ("d_test_w_f1", "d_test_worst_gap") for suffix in ("", "_lo", "_hi", "_seed_mean")),
           "d_test_worst_gap_rel", "d_test_worst_gap_rel_lo", "d_test_worst_gap_rel_hi"]


def compare_to_reference(preds: Mapping[str, Mapping[int, pd.DataFrame]], reference: str, *,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                         task: Task = DEFAULT_TASK) -> pd.DataFrame:
    """{configuration: {seed: test predictions}} → one row per non-reference configuration.

    Columns: config, seeds, worst_language, d_test_w_f1, d_test_w_f1_lo/_hi, d_test_worst_gap, _lo/_hi
    (pooled over seeds), d_test_w_f1_seed_mean, d_test_worst_gap_seed_mean (mean of per-seed differences),
    d_test_worst_gap_rel, _rel_lo/_rel_hi (relative change of the pooled gap, −0.5: halved).
    """
    if reference not in preds:
        raise PredictionsError(f"reference {reference!r} has no finished runs; have {sorted(preds)}")
    rows = []
    for name, runs in preds.items():
        if name == reference:
            continue
        d = paired_difference(preds[reference], runs, n_boot=n_boot, seed=seed, level=level, task=task)
        row = {"config": name, "seeds": len(d["seeds"]), "worst_language": d["worst_language"]}
        for key, col in (("w_f1", "d_test_w_f1"), ("worst_gap", "d_test_worst_gap")):
            row[col], (row[f"{col}_lo"], row[f"{col}_hi"]) = d[key]["diff"], d[key]["ci"]
            row[f"{col}_seed_mean"] = d[key]["seed_mean"]
        row["d_test_worst_gap_rel"] = d["worst_gap"]["rel"]
        row["d_test_worst_gap_rel_lo"], row["d_test_worst_gap_rel_hi"] = d["worst_gap"]["rel_ci"]
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)  # the columns even when only the reference ran
