"""A metric is one declaration (ermgap.metric_registry): registered here with its formula on per-group confusion
counts, it reaches the recipe's split metrics, `eval.metric`, the sweep's reported metrics, the leaderboard
and the `ermgap train` table without another line anywhere; its value is checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import balanced_accuracy_score
from test_sweep_spec import _spec

from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES
from ermgap.metric_registry import METRICS, Metric, register_metric
from ermgap.task import DEFAULT_TASK


def _balanced_accuracy(c) -> np.ndarray:
    """Mean over gold classes of the pooled recall (invalid predictions are misses), percent."""
    pooled = c.c.sum(-3)  # [..., K, K+1]
    k = pooled.shape[-2]
    support = pooled.sum(-1)
    recall = np.diagonal(pooled[..., :k], axis1=-2, axis2=-1) / np.where(support > 0, support, np.nan)
    return 100 * np.nanmean(recall, axis=-1)


@pytest.fixture
def bal_acc():
    metric = register_metric(Metric("bal_acc", "max", "balanced ACC", "bACC", "%", "mean per-class recall",
                                    formula=_balanced_accuracy, reported=True))
    try:
        yield metric
    finally:
        METRICS.pop("bal_acc")


def _frame(n: int = 240, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gold = np.resize(np.array(EMOTIONS), n)  # every class present
    pred = np.where(rng.random(n) < 0.5, gold, rng.choice(EMOTIONS, n))
    return pd.DataFrame({"utt_id": [f"u{i}" for i in range(n)], "language": rng.choice(LANGUAGES, n),
                         "gender": rng.choice(GENDERS, n), "gold": gold, "pred": pred,
                         "loss": rng.random(n)})


def test_a_metric_declared_once_is_everywhere(bal_acc, tmp_path):
    from ermgap.cli.train_cmd import final_table
    from ermgap.config import load_config
    from ermgap.run_data import split_metrics
    from ermgap.sweep.leaderboard import TrialRecord, build_leaderboard
    from ermgap.sweep.spec import load_sweep_spec, reported_metrics

    frame = _frame()
    oracle = 100 * balanced_accuracy_score(frame["gold"], frame["pred"])
    # The recipe's split metrics, next to the shipped ones.
    got = split_metrics(frame, "dev", DEFAULT_TASK, "uni")
    assert got["dev_bal_acc"] == pytest.approx(oracle, abs=1e-9)
    assert {"dev_w_f1", "dev_worst_lang_gap", "dev_loss_gap"} <= set(got)
    # eval.metric may select it, with the declared direction.
    assert load_config(None, ["eval.metric=bal_acc"]).eval.metric_mode == "max"
    # A sweep may select on it; the leaderboard shows it for dev and test.
    assert {"dev_bal_acc", "test_bal_acc"} <= set(reported_metrics())
    spec = load_sweep_spec(_spec(tmp_path, space={}))
    runs = pd.DataFrame([{"run_id": "r1", "tags.ermgap.trial_id": "t1", "metrics.best/dev_bal_acc": oracle,
                          "metrics.best/test_bal_acc": 12.5, "metrics.best/dev_w_f1": 50.0,
                          "metrics.best/dev_avg_gap": 3.0, "metrics.best/test_w_f1": 48.0}])
    board = build_leaderboard(spec, runs, {"t1": TrialRecord(params={"variant": "erm"})})
    assert board.loc[0, "dev_bal_acc"] == pytest.approx(oracle) and board.loc[0, "test_bal_acc"] == 12.5
    # The `ermgap train` table has its row.
    console = Console(width=100, record=True)
    console.print(final_table({**got, "test_bal_acc": 12.5}))
    row = next(line for line in console.export_text().splitlines() if " bal_acc " in line)
    assert f"{oracle:.3f}" in row and "12.500" in row


def test_without_the_declaration_it_is_nowhere():
    from ermgap.config import load_config
    from ermgap.errors import ConfigError
    from ermgap.run_data import split_metrics

    assert "dev_bal_acc" not in split_metrics(_frame(), "dev", DEFAULT_TASK, "uni")
    with pytest.raises(ConfigError, match="'bal_acc' is not a dev metric"):
        load_config(None, ["eval.metric=bal_acc"])
