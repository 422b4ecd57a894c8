"""Independent oracle for the paper's metrics (fairlearn MetricFrame / scikit-learn per group) and random
prediction sets, shared by the metrics and report tests."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, false_positive_rate, true_positive_rate
from sklearn.metrics import accuracy_score, f1_score

from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES


def random_preds(n: int, seed: int, *, invalid_rate: float = 0.1, skill: float = 0.4) -> pd.DataFrame:
    """Random predictions: correct with prob `skill`, otherwise a random label or (invalid_rate) 'invalid'."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(EMOTIONS, n, p=[0.4, 0.15, 0.1, 0.1, 0.05, 0.05, 0.15])
    pred = np.where(rng.random(n) < skill, gold, rng.choice(EMOTIONS, n))
    pred = np.where(rng.random(n) < invalid_rate, "invalid", pred)
    return pd.DataFrame({
        "utt_id": [f"u{i:05d}" for i in range(n)],
        "language": rng.choice(LANGUAGES, n),
        "gender": rng.choice(GENDERS, n),
        "gold": gold,
        "pred": pred,
    })


def oracle(df: pd.DataFrame, labels=EMOTIONS, attribute: str = "gender") -> dict[str, float]:
    """The paper's metrics via fairlearn MetricFrame on the string labels (invalid = its own never-gold label).
    With k > 2 attribute values fairlearn's between-groups difference is max − min over the groups."""
    y, p, g = df["gold"].to_numpy(), df["pred"].to_numpy(), df[attribute].to_numpy()
    wf1 = functools.partial(f1_score, labels=list(labels), average="weighted", zero_division=0)
    frame = MetricFrame(metrics={"w_f1": wf1, "acc": accuracy_score}, y_true=y, y_pred=p, sensitive_features=g)
    tpr_gaps, fpr_gaps = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in labels:
            rates = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
                                y_true=(y == c).astype(int), y_pred=(p == c).astype(int), sensitive_features=g)
            diff = rates.difference(method="between_groups")
            tpr_gaps.append(diff["tpr"])
            fpr_gaps.append(diff["fpr"])
    gaps = frame.difference(method="between_groups")
    out = {
        "w_f1": 100 * wf1(y, p),
        "acc": 100 * accuracy_score(y, p),
        "tpr_gap": 100 * np.mean(tpr_gaps),
        "fpr_gap": 100 * np.mean(fpr_gaps),
        "w_f1_gap": 100 * gaps["w_f1"],
        "acc_gap": 100 * gaps["acc"],
    }
    out["avg_gap"] = np.mean([out["tpr_gap"], out["fpr_gap"], out["w_f1_gap"], out["acc_gap"]])
    return out
