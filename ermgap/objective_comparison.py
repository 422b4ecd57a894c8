"""Objectives compared with a reference objective (ERM) on the same test utterances, over seeds.

Each seed's run of objective X is paired with the reference's run of the same seed. Both are pooled over
the seeds they share (utterance ids tagged with the seed, so utterance u of seed s is paired with itself),
and `ermgap.metrics.paired_bootstrap` resamples the pooled (utterance, seed) units within language:

    diff = metric(X) − metric(reference) on the pooled predictions, with a percentile interval.

Reported: test W-F1 (overall) and the AVG gender gap in the *worst stratum*, the language whose pooled
gap is largest under the reference (the paired bootstrap resamples per-language gaps, not their max, so
the stratum is fixed by the reference: "how much narrower is the gap ERM leaves widest").
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ermgap.errors import PredictionsError
from ermgap.metrics import compute_metrics, paired_bootstrap


def pool_seeds(frames: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """Predictions of several seeds as one frame, `utt_id` → `<utt_id>@<seed>`."""
    return pd.concat([f.assign(utt_id=f["utt_id"].astype(str) + f"@{s}") for s, f in sorted(frames.items())],
                     ignore_index=True)


def worst_language(preds: pd.DataFrame) -> str:
    """The language with the largest AVG gap in `preds` (NaN gaps never win)."""
    per = compute_metrics(preds)["per_language"]
    finite = {lg: b["avg_gap"] for lg, b in per.items() if b["avg_gap"] == b["avg_gap"]}
    if not finite:
        raise PredictionsError("no language has a defined AVG gap (each needs both genders)")
    return max(finite, key=finite.get)


def paired_difference(reference: Mapping[int, pd.DataFrame], other: Mapping[int, pd.DataFrame], *,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """{seed: test predictions} of the reference and of another objective → their paired differences.

    Returns {"seeds", "worst_language", "w_f1": {diff, ci, p_value}, "worst_gap": {diff, ci, p_value}}
    in percent points (a negative worst_gap diff: the other objective narrows that gap).
    """
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        raise PredictionsError(f"no seed in common (reference: {sorted(reference)}, other: {sorted(other)})")
    a = pool_seeds({s: reference[s] for s in seeds})
    b = pool_seeds({s: other[s] for s in seeds})
    worst = worst_language(a)
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, level=level)
    return {"seeds": seeds, "worst_language": worst, "w_f1": boot["overall"]["w_f1"],
            "worst_gap": boot["per_language"][worst]["avg_gap"]}


def compare_to_reference(preds: Mapping[str, Mapping[int, pd.DataFrame]], reference: str, *,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """{configuration: {seed: test predictions}} → one row per non-reference configuration.

    Columns: config, seeds, worst_language, d_test_w_f1, d_test_w_f1_lo/_hi, d_test_worst_gap, _lo/_hi.
    """
    if reference not in preds:
        raise PredictionsError(f"reference {reference!r} has no finished runs; have {sorted(preds)}")
    rows = []
    for name, runs in preds.items():
        if name == reference:
            continue
        d = paired_difference(preds[reference], runs, n_boot=n_boot, seed=seed, level=level)
        row = {"config": name, "seeds": len(d["seeds"]), "worst_language": d["worst_language"]}
        for key, col in (("w_f1", "d_test_w_f1"), ("worst_gap", "d_test_worst_gap")):
            row[col], (row[f"{col}_lo"], row[f"{col}_hi"]) = d[key]["diff"], d[key]["ci"]
        rows.append(row)
    return pd.DataFrame(rows)
