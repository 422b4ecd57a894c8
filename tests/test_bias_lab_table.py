"""The bias lab's table on hand-made predictions: known differences and known intervals, computed by hand.

Every gold label is joy. In German the reference (ERM) gets every female utterance right and calls every male
one sadness; in English both genders are right. Then, in German, by hand (percent):
  TPR gap (joy, the only class with positives) = 100 · (1 − k/n); FPR gap = that / 6 (sadness is the one class of
  six with false positives, joy has no negatives); W-F1 gap = 100 · (1 − 2k/(n + k)) (F1 of joy, the only
  supported class); ACC gap = 100 · (1 − k/n); AVG gap = their mean — for a system with k of n male utterances
  right. ERM (k = 0): 79.1667; a system with every male utterance right: 0, in *every* bootstrap resample that
  holds both genders, so the difference is −79.1667 with the interval [−79.1667, −79.1667] exactly.
Overall W-F1 (all gold joy: F1 of joy) with m male German utterances called sadness and everything else right:
  100 · 2(N − m) / (2(N − m) + m). Pooled over 3 seeds, German has 60 + 60 utterances, resampled within the
  language: the number of male ones in a resample is Binomial(120, 1/2), so the interval of "fixed" − ERM is
  d(q) = 100 · q / (480 − q) at the binomial's 2.5 % and 97.5 % quantiles (scipy), within one count.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from ermgap.bias_lab.table import format_table, lab_table, markdown_table, verdicts
from ermgap.errors import PredictionsError

N = 20  # utterances per (language, gender) and seed
SEEDS = (42, 43, 44)


def preds(male_right_deu: int, *, seed: int) -> pd.DataFrame:
    rows = []
    for lang in ("deu", "eng"):
        for g in ("F", "M"):
            for i in range(N):
                right = lang == "eng" or g == "F" or i < male_right_deu
                rows.append({"utt_id": f"{lang}-{g}-{i}", "language": lang, "gender": g, "gold": "joy",
                             "pred": "joy" if right else "sadness"})
    return pd.DataFrame(rows)


def gap_by_hand(k: int, n: int = N) -> float:
    tpr = acc = 1 - k / n
    return 100 * (tpr + tpr / 6 + (1 - 2 * k / (n + k)) + acc) / 4


PARTIAL = {42: 10, 43: 14, 44: 6}


@pytest.fixture(scope="module")
def table():
    lab = {
        "positive": {"erm": {s: preds(0, seed=s) for s in SEEDS},
                     "fixed": {s: preds(N, seed=s) for s in SEEDS},
                     "partial": {s: preds(PARTIAL[s], seed=s) for s in SEEDS}},
        "negative": {"erm": {s: preds(N, seed=s) for s in SEEDS},
                     "same": {s: preds(N, seed=s) for s in SEEDS}},
    }
    return lab_table(lab, n_boot=2000, seed=1)


def row(table, corpus, objective):
    return table[(table["corpus"] == corpus) & (table["objective"] == objective)].iloc[0]


def test_point_values_mean_and_sd_over_seeds_by_hand(table):
    erm, fixed, partial = (row(table, "positive", o) for o in ("erm", "fixed", "partial"))
    assert erm["worst_language"] == fixed["worst_language"] == "deu"
    assert erm["gap_mean"] == pytest.approx(79.1667, abs=1e-3)
    assert erm["gap_sd"] == pytest.approx(0.0)
    assert (erm["acc_F_mean"], erm["acc_M_mean"]) == (100.0, 0.0)
    assert erm["w_f1_mean"] == pytest.approx(100 * 2 * 60 / (2 * 60 + 20))
    gaps = [gap_by_hand(PARTIAL[s]) for s in SEEDS]
    assert partial["gap_mean"] == pytest.approx(np.mean(gaps)) and partial["gap_sd"] == pytest.approx(np.std(gaps, ddof=1))
    assert partial["acc_M_mean"] == pytest.approx(50.0) and partial["acc_M_sd"] == pytest.approx(20.0)
    assert partial["acc_F_mean"] == 100.0 and partial["acc_F_sd"] == 0.0
    # which group moved: the male accuracy, by 50 points pooled; the female one not at all
    assert (partial["d_acc_M"], partial["d_acc_F"]) == (pytest.approx(50.0), 0.0)
    assert math.isnan(erm["d_gap"]) and erm["seeds"] == 3


def test_known_differences_and_intervals(table):
    fixed, partial = row(table, "positive", "fixed"), row(table, "positive", "partial")
    # gap: the same in every resample
    assert fixed["d_gap"] == pytest.approx(-79.1667, abs=1e-3)
    assert (fixed["d_gap_lo"], fixed["d_gap_hi"]) == (pytest.approx(-79.1667, abs=1e-3),) * 2
    assert (fixed["d_gap_rel"], fixed["d_gap_rel_lo"], fixed["d_gap_rel_hi"]) == (-1.0, -1.0, -1.0)
    # W-F1: point by hand, interval from the binomial quantiles of the resampled male count
    assert fixed["d_w_f1"] == pytest.approx(100 - 100 * 2 * 60 / (2 * 60 + 20))
    d = lambda q: 100 * q / (480 - q)  # noqa: E731
    lo_q, hi_q = binom.ppf(0.025, 120, 0.5), binom.ppf(0.975, 120, 0.5)
    assert d(lo_q - 1) <= fixed["d_w_f1_lo"] <= d(lo_q + 1)
    assert d(hi_q - 1) <= fixed["d_w_f1_hi"] <= d(hi_q + 1)
    # the partial system: pooled difference of the German gap (pooled k = 30 of 60) by hand, and per seed
    pooled_gap = gap_by_hand(30, 60)
    assert partial["d_gap"] == pytest.approx(pooled_gap - gap_by_hand(0))
    assert partial["d_gap_seed_mean"] == pytest.approx(np.mean([gap_by_hand(PARTIAL[s]) - gap_by_hand(0) for s in SEEDS]))
    assert partial["d_gap_lo"] < partial["d_gap"] < partial["d_gap_hi"] < 0


def test_identical_systems_differ_by_exactly_zero(table):
    same = row(table, "negative", "same")
    for col in ("d_gap", "d_gap_lo", "d_gap_hi", "d_w_f1", "d_w_f1_lo", "d_w_f1_hi", "d_acc_F", "d_acc_M"):
        assert same[col] == 0.0, col


def test_verdicts_text_and_markdown(table):
    v = verdicts(table, objective="fixed")
    assert v["positive"]["met"] and v["negative"]["met"]
    assert "−79.2" in v["positive"]["why"].replace("-", "−") or "-79.2" in v["positive"]["why"]
    # the partial system halves nothing with certainty here? it does: pooled gap falls by more than half
    assert verdicts(table, objective="partial")["positive"]["checks"]["gap interval excludes 0"]
    failing = table.copy()
    failing.loc[failing["objective"] == "same", ["d_gap_lo", "d_gap_hi"]] = [0.5, 3.0]
    assert not verdicts(failing)["negative"]["met"]
    text = format_table(table, {"positive": "positive control"})
    assert max(len(line) for line in text.splitlines()) <= 100
    assert text.startswith("positive control\n  gap (AVG) and accuracies in deu") and "reference" in text
    md = markdown_table(table).splitlines()
    assert len(md) == 2 + len(table) and md[2].count("|") == md[0].count("|")


def test_a_corpus_without_the_reference_is_refused():
    with pytest.raises(PredictionsError, match="corpus 'x': no 'erm' runs"):
        lab_table({"x": {"minmaxgap": {42: preds(0, seed=42)}}})


def test_every_row_of_the_shipped_spec_is_named_drawn_checked_and_fits(tmp_path):
    """The seven rows of sweeps/bias_lab.yaml, in its order: each has a display name and a figure marker of its
    own, the printed table fits 100 columns even with every cell at its widest form, and the negative-control
    verdict checks every objective (the oracle, data rather than an objective, excepted): one row whose gap
    interval excludes 0 fails it and is named."""
    from pathlib import Path

    import yaml

    from ermgap.bias_lab.figure import MARKERS, plot_lab
    from ermgap.bias_lab.table import NAMES

    spec = Path(__file__).resolve().parent.parent / "sweeps" / "bias_lab.yaml"
    rows = list(yaml.safe_load(spec.read_text())["variants"])
    assert rows == ["erm", "minmaxgap", "constrained", "group_dro", "reweight", "adversarial", "oracle"]
    assert set(rows) <= set(NAMES) and set(rows) <= set(MARKERS)
    assert len({MARKERS[r] for r in rows}) == len(rows) and len({NAMES[r] for r in rows}) == len(rows)
    k = {r: i * 3 for i, r in enumerate(rows)}  # male German utterances right, per seed: every row differs
    # the new rows with one seed, the others with two (pooled sweeps need not hold every row's seeds)
    lab = {c: {r: {s: preds(min(N, k[r]), seed=s) for s in (SEEDS[:1] if r in ("constrained", "adversarial")
                                                              else SEEDS[:2])} for r in rows}
           for c in ("positive", "negative")}
    seven = lab_table(lab, n_boot=200, seed=1)
    assert list(seven["objective"]) == rows * 2 and seven["d_gap"].notna().sum() == 2 * (len(rows) - 1)
    text = format_table(seven, {"positive": "positive control", "negative": "negative control"})
    assert all(any(line.startswith(NAMES[r] + " ") for line in text.splitlines()) for r in rows), text
    assert "mean ± sd over 2 seed(s) (Constrained, Adversarial: 1)" in text and max(map(len, text.splitlines())) <= 100
    md = markdown_table(seven).splitlines()
    assert md[0].split(" | ")[2] == "seeds" and [ln.split(" | ")[2] for ln in md[2:9]] == ["2", "2", "1", "2", "2", "1", "2"]
    # the widest forms: means < 100 with two-digit sds, differences and bounds above −100, three-digit changes
    wide = seven.copy()
    for col in [c for c in wide.columns if c.endswith("_mean")]:
        wide[col] = 99.9
    for col in [c for c in wide.columns if c.endswith("_sd")]:
        wide[col] = 44.4
    diffs = [c for c in wide.columns if c.startswith("d_") and not c.startswith("d_gap_rel") and c != "d_acc_F"]
    wide.loc[wide["d_gap"].notna(), diffs] = -99.9
    wide.loc[wide["d_gap"].notna(), "d_gap_rel"] = -9.99  # −999 %
    lines = format_table(wide, {"positive": "positive control"}).splitlines()
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    assert any("−99.9 [−99.9, −99.9]" in line.replace("-", "−") for line in lines)
    # negative control: every objective checked, the oracle not
    checks = verdicts(seven)["negative"]["checks"]
    assert sorted(checks) == sorted(r for r in rows if r not in ("erm", "oracle"))
    calm = seven.copy()
    calm.loc[calm["d_gap"].notna(), ["d_gap_lo", "d_gap_hi"]] = [-1.0, 1.0]
    assert verdicts(calm)["negative"]["met"]
    for row_name in ("constrained", "adversarial"):
        bad = calm.copy()
        bad.loc[(bad["corpus"] == "negative") & (bad["objective"] == row_name), ["d_gap_lo", "d_gap_hi"]] = [0.5, 3.0]
        v = verdicts(bad)["negative"]
        assert not v["met"] and not v["checks"][row_name] and f"{NAMES[row_name]} [+0.5, +3.0]" in v["why"]
    assert plot_lab(seven, tmp_path / "seven.png").stat().st_size > 10_000
