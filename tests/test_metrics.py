"""ermgap.metrics against independent oracles: fairlearn MetricFrame / scikit-learn per group, hand-computed cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from metrics_oracle import oracle, random_preds

from ermgap.errors import PredictionsError
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES
from ermgap.metrics import (
    METRIC_KEYS,
    bootstrap_ci,
    compute_metrics,
    confusion_by_gender,
    encode,
    metrics_from_counts,
    paired_bootstrap,
    pareto_front,
    read_predictions,
    validate_predictions,
)


def counts_of(df: pd.DataFrame) -> np.ndarray:
    """[2, 7, 8] confusion counts built with pandas crosstab (independent of the module's encoder)."""
    out = np.zeros((2, 7, 8), dtype=np.int64)
    cols = (*EMOTIONS, "invalid")
    for gi, g in enumerate(GENDERS):
        sub = df[df["gender"] == g]
        tab = pd.crosstab(sub["gold"], sub["pred"]).reindex(index=list(EMOTIONS), columns=list(cols), fill_value=0)
        out[gi] = tab.to_numpy()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_fairlearn_overall_and_per_language(seed):
    df = random_preds(1500, seed, invalid_rate=0.05 * seed)
    got = compute_metrics(df)
    for key, want in oracle(df).items():
        assert got["overall"][key] == pytest.approx(want, abs=1e-9), key
    for lang in LANGUAGES:
        sub = df[df["language"] == lang]
        block = got["per_language"][lang]
        assert block["n"] == len(sub)
        assert block["invalid_rate"] == pytest.approx(np.mean(sub["pred"] == "invalid"))
        for key, want in oracle(sub).items():
            assert block[key] == pytest.approx(want, abs=1e-9), (lang, key)
    assert got["overall"]["tpr_classes"] == list(EMOTIONS)


@pytest.mark.parametrize("seed", [3, 4])
def test_vectorised_metrics_match_fairlearn(seed):
    df = random_preds(800, seed)
    got = metrics_from_counts(counts_of(df))
    for key, want in oracle(df).items():
        assert float(got[key]) == pytest.approx(want, abs=1e-9), key
    # a stack of two subsets is computed elementwise
    a, b = df.iloc[:400], df.iloc[400:]
    stacked = metrics_from_counts(np.stack([counts_of(a), counts_of(b)]))
    assert stacked["w_f1"] == pytest.approx([oracle(a)["w_f1"], oracle(b)["w_f1"]])


def test_valid_false_counts_as_invalid():
    df = random_preds(600, 5, invalid_rate=0.0, skill=0.9)
    df["valid"] = ["false" if i % 5 == 0 else "true" for i in range(len(df))]
    as_invalid = df.assign(pred=np.where(df["valid"] == "false", "invalid", df["pred"])).drop(columns="valid")
    got = compute_metrics(validate_predictions(df))["overall"]
    for key, want in oracle(as_invalid).items():
        assert got[key] == pytest.approx(want, abs=1e-9), key
    assert got["invalid_rate"] == pytest.approx(0.2)


def test_hand_computed_case_with_class_missing_in_one_group():
    # F: neutral→neutral, neutral→joy, joy→joy, sadness→invalid ; M: neutral→neutral, joy→neutral, joy→joy
    rows = [("F", "neutral", "neutral"), ("F", "neutral", "joy"), ("F", "joy", "joy"), ("F", "sadness", "invalid"),
            ("M", "neutral", "neutral"), ("M", "joy", "neutral"), ("M", "joy", "joy")]
    df = pd.DataFrame([(f"u{i}", "eng", g, y, p) for i, (g, y, p) in enumerate(rows)],
                      columns=["utt_id", "language", "gender", "gold", "pred"])
    m = compute_metrics(df)["overall"]
    # TPR: neutral F 1/2, M 1/1; joy F 1/1, M 1/2; sadness has no male positive → left out.
    assert m["tpr_classes"] == ["neutral", "joy"]
    assert m["tpr_gap"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    # FPR: negatives exist for all 7 classes in both groups.
    # neutral: F 0/2, M 1/2; joy: F 1/3 (neutral→joy), M 0/1; all others 0 → mean of (1/2, 1/3, 0, 0, 0, 0, 0)
    assert m["fpr_classes"] == list(EMOTIONS)
    assert m["fpr_gap"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 7)
    # ACC: F 2/4, M 2/3 ; overall 4/7
    assert m["acc"] == pytest.approx(100 * 4 / 7)
    assert m["acc_gap"] == pytest.approx(100 * (2 / 3 - 1 / 2))
    # W-F1 F: neutral P=1 R=.5 F1=2/3 (w2), joy P=.5 R=1 F1=2/3 (w1), sadness F1=0 (w1) → (4/3+2/3)/4 = 0.5
    # W-F1 M: neutral P=.5 R=1 F1=2/3 (w1), joy P=1 R=.5 F1=2/3 (w2) → 2/3
    assert m["by_gender"]["F"]["w_f1"] == pytest.approx(50.0)
    assert m["by_gender"]["M"]["w_f1"] == pytest.approx(100 * 2 / 3)
    assert m["w_f1_gap"] == pytest.approx(100 * (2 / 3 - 0.5))
    assert m["avg_gap"] == pytest.approx((m["tpr_gap"] + m["fpr_gap"] + m["w_f1_gap"] + m["acc_gap"]) / 4)
    assert m["invalid_rate"] == pytest.approx(1 / 7)
    # the vectorised path applies the same exclusion rule
    vec = metrics_from_counts(counts_of(df))
    for key in METRIC_KEYS:
        assert float(vec[key]) == pytest.approx(m[key]), key
    # confusion matrix has an 'invalid' column
    cm = confusion_by_gender(df)
    assert cm["F"].shape == (7, 8) and cm["F"][EMOTIONS.index("sadness"), 7] == 1 and cm["M"].sum() == 3


def test_one_gender_missing_gives_undefined_gaps():
    df = random_preds(100, 6).assign(gender="F")
    m = compute_metrics(df)["overall"]
    assert all(math.isnan(m[k]) for k in ("tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap", "avg_gap"))
    assert not math.isnan(m["w_f1"]) and m["tpr_classes"] == []


def test_confusion_matrices_with_one_gender_missing():
    """Only women in the file (e.g. `ermgap benchmark --limit`): F's matrix counts every row, M's is all zeros."""
    df = random_preds(60, 7).assign(gender="F")
    got = confusion_by_gender(df)
    codes = encode(validate_predictions(df, source="t"))
    expected = np.zeros((len(EMOTIONS), len(EMOTIONS) + 1), dtype=int)
    np.add.at(expected, (codes["gold"], codes["pred"]), 1)  # hand count, invalid as the extra column
    assert (got["F"] == expected).all() and got["F"].sum() == 60
    assert got["M"].shape == expected.shape and got["M"].sum() == 0


# ------------------------------------------------------------------------------------------------ bad files


def _write(tmp_path, text: str):
    p = tmp_path / "preds.csv"
    p.write_text(text)
    return p


HEADER = "utt_id,language,gender,gold,pred\n"
GOOD = "a,eng,F,joy,joy\nb,deu,M,anger,invalid\n"


@pytest.mark.parametrize(
    "text, needles",
    [
        ("", ["empty file"]),
        (HEADER, ["no data rows"]),
        ("utt_id,language,gender,gold\na,eng,F,joy\n", ["missing column", "pred", "CSV line 1"]),
        (HEADER + GOOD + "c,eng,F,happy,joy\n", ["data row 3", "CSV line 4", "'gold'", "'happy'", "neutral"]),
        (HEADER + GOOD + "c,eng,F,joy,invalidd\n", ["data row 3", "'pred'", "invalid"]),
        (HEADER + "c,eng,X,joy,joy\n" + GOOD, ["data row 1", "CSV line 2", "'gender'", "'X'", "F, M"]),
        (HEADER + GOOD + "c,fra,F,joy,joy\n", ["data row 3", "'language'", "deu, eng, jpn"]),
        (HEADER + GOOD + "a,eng,F,joy,joy\n", ["data row 3", "duplicate", "'a'", "first at data row 1"]),
        ("utt_id,language,gender,gold,pred,valid\na,eng,F,joy,joy,maybe\n", ["data row 1", "'valid'", "'maybe'"]),
        ("utt_id,language,gender,gold,pred,valid\na,eng,F,joy,invalid,true\n", ["'valid'", "must be false where pred is"]),
        (HEADER + ",eng,F,joy,joy\n", ["data row 1", "'utt_id'", "non-empty"]),
    ],
    ids=["empty", "header-only", "missing-col", "bad-gold", "bad-pred", "bad-gender", "bad-lang", "dup-id",
         "bad-valid", "valid-contradiction", "empty-id"],
)
def test_bad_prediction_files(tmp_path, text, needles):
    path = _write(tmp_path, text)
    with pytest.raises(PredictionsError) as err:
        read_predictions(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_read_predictions_roundtrip_and_cli(tmp_path):
    df = random_preds(300, 7)
    path = tmp_path / "p.csv"
    df.to_csv(path, index=False)
    got = read_predictions(path)
    assert list(encode(got)["pred"][:5]) == [list((*EMOTIONS, "invalid")).index(p) for p in df["pred"][:5]]
    cli = [sys.executable, "-m", "ermgap.cli.main", "metrics", str(path), "--json", "--ci", "--n-boot", "50"]
    out = json.loads(subprocess.run(cli, check=True, capture_output=True, text=True).stdout)
    assert set(out) == {"overall", "per_language"} and set(out["per_language"]) == set(LANGUAGES)
    for block in [out["overall"], *out["per_language"].values()]:
        assert {*METRIC_KEYS, "n", "invalid_rate", "ci"} <= set(block)
        assert set(block["ci"]) == set(METRIC_KEYS)
    want = oracle(df)
    assert out["overall"]["avg_gap"] == pytest.approx(want["avg_gap"])
    lo, hi = out["overall"]["ci"]["acc"]
    assert lo <= want["acc"] <= hi
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "a,eng,Q,joy,joy\n")
    res = subprocess.run([*cli[:4], str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "'gender'" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_is_deterministic_for_a_seed():
    df = random_preds(900, 8)
    a, b = bootstrap_ci(df, n_boot=200, seed=3), bootstrap_ci(df, n_boot=200, seed=3)
    assert a == b
    assert bootstrap_ci(df, n_boot=200, seed=4)["overall"]["acc"] != a["overall"]["acc"]
    assert set(a["per_language"]) == set(LANGUAGES)


def test_bootstrap_coverage_near_nominal():
    """Draw many samples (fixed n per language) from a large population; the 95% CI should cover the
    population value in roughly 95% of them (loose band: percentile CIs at n=600 and few replicates)."""
    population = random_preds(60_000, 9, invalid_rate=0.05, skill=0.5)
    truth = oracle(population)
    rng = np.random.default_rng(10)
    by_lang = {lang: population[population["language"] == lang] for lang in LANGUAGES}
    hits = {"acc": 0, "w_f1": 0}
    reps = 120
    for r in range(reps):
        sample = pd.concat([sub.iloc[rng.choice(len(sub), 200, replace=False)] for sub in by_lang.values()])
        ci = bootstrap_ci(sample, n_boot=200, seed=r)["overall"]
        for key in hits:
            lo, hi = ci[key]
            hits[key] += lo <= truth[key] <= hi
    for key, h in hits.items():
        assert 0.87 <= h / reps <= 0.995, (key, h / reps)


def test_bootstrap_matches_naive_index_resampling():
    """The count-based bootstrap gives the same intervals (up to Monte-Carlo noise) as resampling row
    indices within language and recomputing with scikit-learn / numpy on each resample."""
    from sklearn.metrics import f1_score

    df = random_preds(900, 15, skill=0.5)
    ours = bootstrap_ci(df, n_boot=2000, seed=0)["overall"]
    rng = np.random.default_rng(1)
    groups = [np.flatnonzero(df["language"].to_numpy() == lang) for lang in LANGUAGES]
    gold, pred, female = df["gold"].to_numpy(), df["pred"].to_numpy(), df["gender"].to_numpy() == "F"
    samples = {"w_f1": [], "acc": [], "acc_gap": []}
    for _ in range(400):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        y, p, f = gold[idx], pred[idx], female[idx]
        samples["w_f1"].append(100 * f1_score(y, p, labels=list(EMOTIONS), average="weighted", zero_division=0))
        samples["acc"].append(100 * np.mean(y == p))
        samples["acc_gap"].append(100 * abs(np.mean(y[f] == p[f]) - np.mean(y[~f] == p[~f])))
    for key, vals in samples.items():
        lo, hi = np.percentile(vals, [2.5, 97.5])
        width = hi - lo
        assert ours[key][0] == pytest.approx(lo, abs=0.2 * width), key
        assert ours[key][1] == pytest.approx(hi, abs=0.2 * width), key


def test_paired_bootstrap_identical_and_better_system():
    a = random_preds(1200, 11, skill=0.4)
    same = paired_bootstrap(a, a.sample(frac=1.0, random_state=0), n_boot=300, seed=0)  # row order irrelevant
    for key in METRIC_KEYS:
        entry = same["overall"][key]
        assert entry["diff"] == 0 and entry["ci"] == [0.0, 0.0] and entry["p_value"] == 1.0
    rng = np.random.default_rng(12)
    fix = rng.random(len(a)) < 0.3
    better = a.assign(pred=np.where(fix, a["gold"], a["pred"]))
    res = paired_bootstrap(a, better, n_boot=300, seed=0)
    acc = res["overall"]["acc"]
    want = oracle(better)["acc"] - oracle(a)["acc"]
    assert acc["diff"] == pytest.approx(want) and acc["ci"][0] > 0 and acc["p_value"] < 0.01
    assert res["overall"]["w_f1"]["ci"][0] > 0
    for lang in LANGUAGES:
        assert res["per_language"][lang]["acc"]["ci"][0] > 0


def test_paired_bootstrap_rejects_mismatched_utterances():
    a = random_preds(100, 13)
    with pytest.raises(PredictionsError, match="same utterances"):
        paired_bootstrap(a, a.iloc[1:])
    flipped = a.copy()
    flipped.loc[5, "gender"] = "M" if a.loc[5, "gender"] == "F" else "F"
    with pytest.raises(PredictionsError, match="gender"):
        paired_bootstrap(a, flipped)


def test_pareto_front_hand_case():
    pts = [(50, 5), (60, 6), (55, 4), (40, 3), (45, 5), (60, 7), (float("nan"), 1)]
    # (45,5) dominated by (50,5) and (55,4); (60,7) by (60,6); (50,5) by (55,4); NaN never on the front
    assert pareto_front(pts) == [False, True, True, True, False, False, False]


def test_accepts_evaluate_predictions_frame():
    """The contract with ermgap.evaluate: index inputs, bool `valid`, empty `modality`, score columns."""
    from ermgap.evaluate import predictions_frame

    rng = np.random.default_rng(14)
    n = 500
    pred = rng.integers(-1, 7, n)  # -1 = invalid
    frame = predictions_frame([f"u{i}" for i in range(n)], rng.integers(0, 3, n), rng.integers(0, 2, n),
                              rng.integers(0, 7, n), pred, scores=rng.random((n, 7)))
    got = compute_metrics(frame)["overall"]
    want = oracle(frame[["utt_id", "language", "gender", "gold", "pred"]])
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["invalid_rate"] == pytest.approx(np.mean(pred < 0))
