"""ermgap.leakage's probe arithmetic: balanced accuracy and its paired bootstrap intervals against scikit-learn on
the same resamples, a hand-computed case, and why balanced accuracy (a probe that learnt only the attribute's
prior reads a 3:1 split at 75 % plain accuracy, at chance balanced)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from ermgap.leakage import balanced_accuracy_ci, fit_probe


def test_balanced_accuracy_of_a_hand_computed_case():
    y = np.array(["F", "F", "F", "M"])
    (point,), _, _ = balanced_accuracy_ci(y, [np.array(["F", "F", "M", "M"])], n_boot=100)
    assert point == pytest.approx((2 / 3 + 1) / 2)


def test_intervals_and_paired_differences_equal_scikit_learn_on_the_same_resamples():
    rng = np.random.default_rng(3)
    y = rng.choice(["F", "M"], size=60, p=[0.7, 0.3])
    a = np.where(rng.random(60) < 0.8, y, rng.choice(["F", "M"], size=60))
    b = np.where(rng.random(60) < 0.6, y, rng.choice(["F", "M"], size=60))
    points, cis, deltas = balanced_accuracy_ci(y, [a, b], n_boot=300, seed=11)
    draws = np.random.default_rng(11).integers(0, 60, size=(300, 60))
    # scikit-learn per resample (it warns and skips a value absent from a resample, as the code does)
    sk = np.array([[balanced_accuracy_score(y[d], p[d]) for p in (a, b)] for d in draws])
    assert points == pytest.approx([balanced_accuracy_score(y, a), balanced_accuracy_score(y, b)])
    assert cis[0] == pytest.approx(list(np.percentile(sk[:, 0], [2.5, 97.5])))
    assert cis[1] == pytest.approx(list(np.percentile(sk[:, 1], [2.5, 97.5])))
    assert deltas[0] == pytest.approx(list(np.percentile(sk[:, 1] - sk[:, 0], [2.5, 97.5])))


def test_resamples_in_blocks_equal_scikit_learn_and_hold_only_a_block(monkeypatch):
    """n = 20,000 with blocks of 2^16 draws: 3 resamples per block, 40 resamples in 14 blocks, the same draws as
    one (40, n) call (scikit-learn on each). Peak memory while it runs: a few blocks, not the 40 × n matrices
    (6.4 MB each) that holding every resample at once takes."""
    import tracemalloc

    from ermgap import leakage

    rng = np.random.default_rng(5)
    n = 20_000
    y = rng.choice(["F", "M"], size=n, p=[0.6, 0.4])
    a = np.where(rng.random(n) < 0.7, y, rng.choice(["F", "M"], size=n))
    monkeypatch.setattr(leakage, "RESAMPLE_BLOCK", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        _, (ci,), _ = leakage.balanced_accuracy_ci(y, [a], n_boot=40, seed=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    draws = np.random.default_rng(2).integers(0, n, size=(40, n))
    sk = [balanced_accuracy_score(y[d], a[d]) for d in draws]
    assert ci == pytest.approx(list(np.percentile(sk, [2.5, 97.5])))
    assert peak < 6_400_000, peak


def test_a_probe_reads_an_attribute_that_is_there_and_not_one_that_is_not():
    rng = np.random.default_rng(0)
    n, d = 400, 16
    y_fit, y_score = (rng.choice(["F", "M"], size=n, p=[0.75, 0.25]) for _ in range(2))
    noise_fit, noise_score = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    coded_fit, coded_score = noise_fit.copy(), noise_score.copy()
    coded_fit[:, 3] += 2 * (y_fit == "M")
    coded_score[:, 3] += 2 * (y_score == "M")
    coded = fit_probe(coded_fit, y_fit, coded_score)
    blind = fit_probe(noise_fit, y_fit, noise_score)
    (read, none), (ci_read, ci_none), _ = balanced_accuracy_ci(y_score, [coded, blind], n_boot=500)
    assert read > 0.8 and ci_read[0] > 0.7
    assert ci_none[0] < 0.5 < ci_none[1]
    # what a head that learnt only the prior scores: 75 % plain accuracy on this split, chance balanced
    prior = np.full(n, "F")
    assert np.mean(prior == y_score) > 0.7 and balanced_accuracy_score(y_score, prior) == 0.5
    assert balanced_accuracy_ci(y_score, [prior], n_boot=100)[0] == [0.5]
