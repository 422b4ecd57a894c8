"""The sweep leaderboard (ermgap.sweep.leaderboard): pure pandas over hand-made trial results, no Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ermgap.sweep.leaderboard import DEV_METRICS, TEST_METRICS, TrialRecord, build_leaderboard, seed_summary, select_best
from ermgap.sweep.spec import load_sweep_spec
from test_sweep_spec import _spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_selection_rule_hand_case():
    spec = load_sweep_spec(SWEEPS / "demo.yaml")  # tolerance 2.0 points on dev_avg_gap
    board = pd.DataFrame({
        "trial": ["a", "b", "c", "d", "e"],
        "dev_w_f1": [60.0, 55.0, 50.0, 70.0, 80.0],
        "dev_avg_gap": [4.0, 2.5, 2.0, 4.1, 1.0],
        "test_w_f1": [1.0, 1.0, 1.0, 1.0, math.nan],  # e never finished (stopped): not eligible
    })
    # Finished trials' lowest gap is 2.0 → admissible gap ≤ 4.0: a, b, c → best W-F1 is a (d's 4.1 is out).
    assert select_best(board, spec) == "a"


def test_seed_summary_means_and_sds_over_seeds_per_configuration(tmp_path):
    """Hand-computed oracle: 2 configs × 3 seeds, one trial of one config stopped early (no test metrics)."""
    spec = load_sweep_spec(_spec(tmp_path, space={}, seeds=[1, 2, 3]))
    rows = []
    for variant, base in (("erm", 40.0), ("adaptive", 30.0)):
        for i, seed in enumerate((1, 2, 3)):
            row = {"trial": f"{variant}{seed}", "variant": variant, "optim.seed": seed}
            row.update({m: base + 2.0 * i for m in DEV_METRICS + TEST_METRICS})  # base, base+2, base+4
            rows.append(row)
    rows[-1]["test_w_f1"] = None  # adaptive seed 3 was stopped: it must not count
    got = seed_summary(pd.DataFrame(rows), spec).set_index("variant")
    assert list(got.index) == ["erm", "adaptive"]
    assert got.loc["erm", "n_seeds"] == 3 and got.loc["adaptive", "n_seeds"] == 2
    assert got.loc["erm", "test_worst_lang_gap_mean"] == pytest.approx(42.0)
    assert got.loc["erm", "test_worst_lang_gap_sd"] == pytest.approx(2.0)  # sd of 40, 42, 44
    assert got.loc["adaptive", "dev_w_f1_mean"] == pytest.approx(31.0)  # 30, 32
    assert got.loc["adaptive", "dev_w_f1_sd"] == pytest.approx(math.sqrt(2.0))
    single = load_sweep_spec(_spec(tmp_path, space={}, seeds=[1]))
    assert seed_summary(pd.DataFrame(rows), single) is None


def _child(trial: str, run_id: str, metrics: dict[str, float]) -> dict:
    return {"run_id": run_id, "tags.ermgap.trial_id": trial, **{f"metrics.{k}": v for k, v in metrics.items()}}


def test_leaderboard_reads_final_metrics_marks_pareto_and_best(tmp_path):
    """Hand-made Tune records and MLflow child runs: a finished trial reports its `best/` metrics, a stopped
    one its last evaluation (no test metrics), an errored one has no run; Pareto and best by hand."""
    spec = load_sweep_spec(_spec(tmp_path, space={}))  # variants erm/adaptive, tolerance 2 on dev_avg_gap
    full = {m: 1.0 for m in DEV_METRICS + TEST_METRICS}
    runs = pd.DataFrame([
        # t1: finished; its last evaluation (dev_w_f1 50) differs from the best checkpoint's (best/ 55).
        _child("t1", "r1", {**{f"best/{m}": v for m, v in full.items()}, "best/dev_w_f1": 55.0,
                            "best/dev_avg_gap": 3.0, "eval/dev_w_f1": 50.0, "eval/dev_avg_gap": 9.0}),
        # t2: finished, higher W-F1 but a gap 2.5 points above t1's: not admissible, still Pareto.
        _child("t2", "r2", {**{f"best/{m}": v for m, v in full.items()}, "best/dev_w_f1": 60.0,
                            "best/dev_avg_gap": 5.5}),
        # t3: stopped by ASHA after its 2nd evaluation: only per-evaluation metrics, no test metrics.
        _child("t3", "r3", {"eval/dev_w_f1": 40.0, "eval/dev_avg_gap": 2.0, "eval/dev_acc": 41.0}),
    ])
    trials = {
        "t3": TrialRecord(params={"variant": "adaptive"}, status="stopped", last_round=2),
        "t1": TrialRecord(params={"variant": "erm"}, status="done", last_round=8, time_total_s=100.0),
        "t2": TrialRecord(params={"variant": "adaptive"}, status="done", last_round=8),
        "t4": TrialRecord(params={"variant": "erm"}, status="ERROR"),
    }
    board = build_leaderboard(spec, runs, trials).set_index("trial")
    assert list(board.index) == ["t1", "t2", "t3", "t4"]
    assert board.loc["t1", "dev_w_f1"] == 55.0 and board.loc["t1", "dev_avg_gap"] == 3.0  # best/, not last eval
    assert board.loc["t3", "dev_w_f1"] == 40.0 and pd.isna(board.loc["t3", "test_w_f1"])
    assert pd.isna(board.loc["t4", "mlflow_run_id"]) and board.loc["t4", "n_child_runs"] == 0
    assert board.loc["t1", "mlflow_run_id"] == "r1" and board.loc["t1", "trial_s"] == 100.0
    assert board.loc["t2", "variant"] == "adaptive" and board.loc["t3", "status"] == "stopped"
    # Pareto over (dev W-F1 ↑, dev AVG gap ↓): t1 (55, 3), t2 (60, 5.5), t3 (40, 2) are each undominated.
    assert board["pareto"].to_dict() == {"t1": True, "t2": True, "t3": True, "t4": False}
    # Best: only finished trials compete (t3 is out despite the lowest gap); admissible gap <= 3 + 2 → t1.
    assert board["best"].to_dict() == {"t1": True, "t2": False, "t3": False, "t4": False}
    assert select_best(board.reset_index(), spec) == "t1"


def test_leaderboard_of_no_trials_is_empty(tmp_path):
    spec = load_sweep_spec(_spec(tmp_path, space={}))
    assert build_leaderboard(spec, pd.DataFrame(), {}).empty


def test_objective_comparison_pairs_each_configuration_with_erm(tmp_path):
    """3 configurations × 2 seeds (one Group DRO seed stopped early). ERM is MinMaxGAP with λ fixed at 0, as
    its child runs' params say. Oracles: fairlearn metrics of the seed-pooled predictions for the
    differences, hand-computed means and sds, ERM's worst language found by the oracle."""
    import numpy as np
    from metrics_oracle import oracle, random_preds

    from ermgap.sweep.leaderboard import objective_comparison

    variants = {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0}, "gdro": {"objective.kind": "group_dro"},
                "adaptive": {"lambda.mode": "adaptive"}}
    spec = load_sweep_spec(_spec(tmp_path, space={}, seeds=[1, 2], variants=variants))
    params = {"erm": {"objective.kind": "minmaxgap", "lambda.mode": "fixed", "lambda.init": "0.0"},
              "gdro": {"objective.kind": "group_dro", "objective.group_dro.eta": "0.1"},
              "adaptive": {"objective.kind": "minmaxgap", "lambda.mode": "adaptive", "objective.p": "2.0"}}
    runs, trials, preds = [], {}, {}
    for i, (variant, seed) in enumerate((v, s) for v in variants for s in (1, 2)):
        tid, rid = f"t{i}", f"r{i}"
        df = random_preds(300, 7, skill=0.7)  # the same test utterances in every run
        rng = np.random.default_rng(10 * i)
        hurt = (df["language"] == "deu") & (df["gender"] == "F") & (rng.random(300) < (0.8 if variant == "erm" else 0.2))
        preds[rid] = df.assign(pred=np.where(hurt, "invalid", np.where(rng.random(300) < 0.2, "invalid", df["pred"])))
        stopped = variant == "gdro" and seed == 2
        metrics = {"dev_w_f1": 40.0 + i, "dev_avg_gap": 5.0}
        if not stopped:
            metrics.update({f"best/{k}": v for k, v in {"dev_w_f1": 40.0 + i, "dev_avg_gap": 5.0,
                                                         "test_w_f1": 30.0 + 3 * i, "test_worst_lang_gap": 10.0 - i}.items()})
        runs.append({**_child(tid, rid, metrics), **{f"params.{k}": v for k, v in params[variant].items()}})
        trials[tid] = TrialRecord(params={"variant": variant, "optim.seed": seed}, status="stopped" if stopped else "done")
    board = build_leaderboard(spec, pd.DataFrame(runs), trials)
    assert list(board["objective"]) == ["ERM (SFT)"] * 2 + ["Group DRO (η=0.1)"] * 2 + ["ERM-MinMaxGAP (p=2)"] * 2

    got = objective_comparison(board, spec, preds, n_boot=200).set_index("variant")
    assert list(got.index) == ["erm", "gdro", "adaptive"] and list(got["reference"]) == [True, False, False]
    assert list(got["n_seeds"]) == [2, 1, 2]
    assert got.loc["erm", "test_w_f1_mean"] == pytest.approx(31.5) and got.loc["erm", "test_w_f1_sd"] == pytest.approx(
        math.sqrt(4.5))  # 30, 33
    assert got.loc["adaptive", "test_worst_lang_gap_mean"] == pytest.approx(5.5)  # 6, 5
    assert math.isnan(got.loc["gdro", "test_w_f1_sd"])  # one finished seed

    pool = lambda rids, seeds: pd.concat(  # noqa: E731
        [preds[r].assign(utt_id=preds[r]["utt_id"] + f"@{s}") for r, s in zip(rids, seeds)], ignore_index=True)
    erm_all, erm_1 = pool(["r0", "r1"], [1, 2]), pool(["r0"], [1])
    lang_gap = lambda df: {lg: oracle(df[df["language"] == lg])["avg_gap"] for lg in ("eng", "deu", "jpn")}  # noqa: E731
    worst = max(lang_gap(erm_all).items(), key=lambda kv: kv[1])[0]
    assert worst == "deu" and got.loc["adaptive", "worst_language"] == "deu"
    for variant, other, ref in (("adaptive", pool(["r4", "r5"], [1, 2]), erm_all), ("gdro", pool(["r2"], [1]), erm_1)):
        row = got.loc[variant]
        assert row["paired_seeds"] == (2 if variant == "adaptive" else 1)
        assert row["d_test_w_f1"] == pytest.approx(oracle(other)["w_f1"] - oracle(ref)["w_f1"], abs=1e-9)
        want_gap = lang_gap(other)[row["worst_language"]] - lang_gap(ref)[row["worst_language"]]
        assert row["d_test_worst_gap"] == pytest.approx(want_gap, abs=1e-9)
        assert row["d_test_w_f1_lo"] <= row["d_test_w_f1"] <= row["d_test_w_f1_hi"]
    assert got.loc["adaptive", "d_test_worst_gap_hi"] < 0  # 0.8 vs 0.2 of deu-F hurt: clearly narrower

    # The table the sweep prints and logs: ERM marked as the reference, the others with their intervals.
    from ermgap.formatting import fmt
    from ermgap.sweep.render import comparison_markdown

    md = comparison_markdown(got.reset_index(), spec).splitlines()
    assert "Δ test gap of ERM's worst language (deu) vs ERM [95 % CI]" in md[0]
    assert md[2].startswith("| erm | ERM (SFT) | 2 |") and md[2].endswith("| reference | reference |")
    r = got.loc["adaptive"]
    assert md[4].endswith(f"| {fmt(r['d_test_w_f1'])} [{fmt(r['d_test_w_f1_lo'])}, {fmt(r['d_test_w_f1_hi'])}] | "
                          f"{fmt(r['d_test_worst_gap'])} [{fmt(r['d_test_worst_gap_lo'])}, {fmt(r['d_test_worst_gap_hi'])}] |")

    # No ERM configuration, or two of them: nothing to compare with.
    assert objective_comparison(board[board["objective"] != "ERM (SFT)"], spec, preds) is None
    twice = board.assign(objective=board["objective"].replace("ERM-MinMaxGAP (p=2)", "ERM (SFT)"))
    assert objective_comparison(twice, spec, preds) is None
