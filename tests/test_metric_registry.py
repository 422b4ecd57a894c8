"""The metric registry: one declaration per metric; `eval.metric` takes its direction from it."""

from __future__ import annotations

import pytest

from ermgap.config import load_config
from ermgap.errors import ConfigError
from ermgap.metric_registry import METRICS, SPLIT_METRICS, better, direction, label, lookup
from ermgap.metrics import METRIC_KEYS
from ermgap.sweep.spec import REPORTED_METRICS


def test_every_computed_and_reported_metric_is_declared():
    assert set(METRIC_KEYS) <= set(METRICS)
    assert set(SPLIT_METRICS) <= set(METRICS)
    for key in REPORTED_METRICS:
        if key != "lambda":  # a state value, not a metric with a better direction
            lookup(key)


@pytest.mark.parametrize("key, want, text", [
    ("dev_w_f1", "max", "dev W-F1"), ("best_dev_w_f1", "max", "dev W-F1"), ("test_acc", "max", "test ACC"),
    ("dev_avg_gap", "min", "dev AVG gap"), ("best/test_worst_lang_gap", "min", "test worst-lang gap"), ("eval/dev_loss_gap", "min", "dev Δloss"),
    ("test_avg_gap_deu", "min", "test AVG gap deu"), ("dev_loss_gap_jpn_multi", "min", "dev Δloss jpn multi"),
    ("w_f1_gap", "min", "W-F1 gap"), ("tpr_gap", "min", "TPR gap"), ("dev_loss", "min", "dev loss"),
])
def test_lookup_direction_and_label(key, want, text):
    assert direction(key) == want and label(key) == text


def test_better_follows_direction_and_unknown_keys_are_named():
    assert better("dev_w_f1", 60.0, 50.0) and not better("dev_w_f1", 50.0, 60.0)
    assert better("dev_avg_gap", 2.0, 5.0) and not better("dev_avg_gap", 5.0, 2.0)
    with pytest.raises(KeyError, match="'dev_f1' is not a known metric"):
        lookup("dev_f1")


def test_eval_metric_mode_is_derived_and_checked():
    # The bug this fixes: eval.metric=avg_gap used to keep metric_mode=max, i.e. the LEAST fair checkpoint.
    assert load_config(None, ["eval.metric=avg_gap"]).eval.metric_mode == "min"
    assert load_config(None, ["eval.metric=loss_gap"]).eval.metric_mode == "min"
    assert load_config(None, ["eval.metric=acc"]).eval.metric_mode == "max"
    assert load_config(None, ["eval.metric=worst_lang_gap", "eval.metric_mode=min"]).eval.metric_mode == "min"
    assert load_config("configs/paper.yaml").eval.metric_mode == "max"  # explicit and consistent: accepted
    with pytest.raises(ConfigError, match="eval.metric_mode: 'max' contradicts eval.metric=avg_gap, where smaller"):
        load_config(None, ["eval.metric=avg_gap", "eval.metric_mode=max"])
    with pytest.raises(ConfigError, match="eval.metric: 'f1' is not a dev metric; allowed: w_f1, acc"):
        load_config(None, ["eval.metric=f1"])
