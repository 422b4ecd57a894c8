"""Objectives vs ERM over seeds: point differences checked against the fairlearn oracle on pooled predictions."""

from __future__ import annotations

import numpy as np
import pytest
from metrics_oracle import oracle, random_preds

from ermgap.errors import PredictionsError
from ermgap.objective_comparison import compare_to_reference, pool_seeds, worst_language


def _runs(skill, seeds=(42, 43, 44), fair_deu=False):
    """Per seed: the same 600 test utterances; `fair_deu` fixes the deu-F errors (narrows that gap)."""
    out = {}
    for s in seeds:
        df = random_preds(600, 7, skill=skill)  # same utterances (seed 7) for every run
        rng = np.random.default_rng(s)
        wrong = rng.random(len(df)) < 0.5
        deu_f = (df["language"] == "deu") & (df["gender"] == "F")
        if not fair_deu:
            wrong |= deu_f.to_numpy() & (rng.random(len(df)) < 0.95)  # ERM: deu-F much worse
        out[s] = df.assign(pred=np.where(wrong & (df["pred"] == df["gold"]), "invalid", df["pred"]))
    return out


def test_differences_match_the_oracle_on_pooled_seeds():
    erm, fair = _runs(0.8), _runs(0.8, fair_deu=True)
    table = compare_to_reference({"erm": erm, "fair": fair, "same": erm}, "erm", n_boot=200, seed=1)
    assert list(table["config"]) == ["fair", "same"]
    pooled_erm, pooled_fair = pool_seeds(erm), pool_seeds(fair)
    assert len(pooled_erm) == 1800 and pooled_erm["utt_id"].is_unique
    assert worst_language(pooled_erm) == "deu"
    fair_row, same_row = table.iloc[0], table.iloc[1]
    assert fair_row["worst_language"] == "deu" and fair_row["seeds"] == 3
    want_wf1 = oracle(pooled_fair)["w_f1"] - oracle(pooled_erm)["w_f1"]
    deu = lambda df: df[df["language"] == "deu"]  # noqa: E731
    want_gap = oracle(deu(pooled_fair))["avg_gap"] - oracle(deu(pooled_erm))["avg_gap"]
    assert fair_row["d_test_w_f1"] == pytest.approx(want_wf1, abs=1e-9)
    assert fair_row["d_test_worst_gap"] == pytest.approx(want_gap, abs=1e-9)
    assert want_gap < -5 and fair_row["d_test_worst_gap_hi"] < 0  # clearly narrower: interval excludes 0
    assert fair_row["d_test_w_f1_lo"] <= want_wf1 <= fair_row["d_test_w_f1_hi"]
    # An objective identical to the reference: zero difference, a degenerate interval at 0.
    assert same_row["d_test_w_f1"] == 0 and same_row["d_test_worst_gap_lo"] == same_row["d_test_worst_gap_hi"] == 0


def test_only_shared_seeds_are_paired_and_errors_are_named():
    erm, other = _runs(0.8, seeds=(42, 43)), _runs(0.8, seeds=(43, 44), fair_deu=True)
    table = compare_to_reference({"erm": erm, "x": other}, "erm", n_boot=50)
    assert table.iloc[0]["seeds"] == 1
    with pytest.raises(PredictionsError, match="reference 'erm' has no finished runs"):
        compare_to_reference({"x": other}, "erm")
    with pytest.raises(PredictionsError, match="no seed in common"):
        compare_to_reference({"erm": {1: erm[42]}, "x": {2: other[43]}}, "erm")


def test_seed_means_and_the_relative_gap_change_match_the_oracle():
    erm, fair = _runs(0.8), _runs(0.8, fair_deu=True)
    row = compare_to_reference({"erm": erm, "fair": fair}, "erm", n_boot=300, seed=2).iloc[0]
    deu = lambda df: df[df["language"] == "deu"]  # noqa: E731
    per_seed_wf1 = [oracle(fair[s])["w_f1"] - oracle(erm[s])["w_f1"] for s in erm]
    per_seed_gap = [oracle(deu(fair[s]))["avg_gap"] - oracle(deu(erm[s]))["avg_gap"] for s in erm]
    assert row["d_test_w_f1_seed_mean"] == pytest.approx(np.mean(per_seed_wf1), abs=1e-9)
    assert row["d_test_worst_gap_seed_mean"] == pytest.approx(np.mean(per_seed_gap), abs=1e-9)
    pooled_gap = oracle(deu(pool_seeds(erm)))["avg_gap"]
    assert row["d_test_worst_gap_rel"] == pytest.approx(row["d_test_worst_gap"] / pooled_gap, abs=1e-12)
    assert row["d_test_worst_gap_rel_lo"] <= row["d_test_worst_gap_rel"] <= row["d_test_worst_gap_rel_hi"] < 0


def test_a_corpus_with_its_own_attribute_and_stratum_is_compared_on_them():
    """Attribute `age` (three values) within `accent`: the columns the paper's task reads are absent, so a
    comparison that ignored the task would fail; the differences match the oracle on the new groups."""
    from ermgap.task import task_for_predictions

    def recast(runs):
        out = {}
        for s, df in runs.items():
            # F rows are `old` (the group ERM gets wrong in deu), M rows alternate `young`/`mid`: every group
            # is large enough to hold every class (an absent class is where fairlearn's 0 and ours part ways).
            ages = np.array(["young", "mid"])[np.arange(len(df)) % 2]
            out[s] = (df.assign(age=np.where(df["gender"] == "F", "old", ages),
                                accent=df["language"].map({"deu": "north", "eng": "south", "jpn": "west"}))
                      .drop(columns=["gender", "language"]))
        return out

    erm, fair = recast(_runs(0.8)), recast(_runs(0.8, fair_deu=True))
    task = task_for_predictions(erm[42], attribute="age", by="accent")
    row = compare_to_reference({"erm": erm, "fair": fair}, "erm", n_boot=100, seed=3, task=task).iloc[0]
    assert row["worst_language"] == "north"  # deu's F rows: the ones ERM gets wrong
    north = lambda df: df[df["accent"] == "north"]  # noqa: E731
    want = (oracle(north(pool_seeds(fair)), attribute="age")["avg_gap"]
            - oracle(north(pool_seeds(erm)), attribute="age")["avg_gap"])
    assert row["d_test_worst_gap"] == pytest.approx(want, abs=1e-9)


def test_a_sweep_of_the_reference_alone_compares_nothing_without_failing():
    """Only ERM configurations ran (an ERM learning-rate sweep): no rows, but the same columns (the sweep
    indexes them by config; an empty frame without columns ended such a sweep in a KeyError)."""
    table = compare_to_reference({"erm": _runs(0.8, seeds=(42,))}, "erm", n_boot=10)
    assert table.empty and list(table.set_index("config").columns)[:2] == ["seeds", "worst_language"]
