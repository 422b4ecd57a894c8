"""The lab's own controls carry what they claim: in the positive control the minority's emotions are spoken through
a mapping the majority's examples do not teach (a classifier of the female voices fails on the male ones) but
their own examples do; in the negative control the majority's examples transfer to the minority.

The corpora are the lab's `CONTROLS` as `ermgap bias-lab` builds them (`build_corpus`), small: 8 train, 1 dev,
6 test utterances per cell, the oracle twins (every group's train utterances kept, so "both groups" has the
minority's own examples). The oracle is independent of ermgap's models: a scikit-learn random forest on numpy
prosodic summary features (tests/_prosody.py), one per language, scored on the test split's voices (which no
train utterance uses), accuracies pooled over the three languages (126 test utterances per gender).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _prosody import features

from ermgap.bias_lab.corpora import CONTROLS, Sizes, build_corpus
from ermgap.labels import EMOTIONS, LANGUAGES

SIZES = Sizes(train=8, dev=1, test=6)


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    """{control: {"majority only" | "both": {gender: pooled test accuracy}}} for the positive and negative controls."""
    from sklearn.ensemble import RandomForestClassifier

    root = tmp_path_factory.mktemp("controls")
    out = {}
    for control in (c for c in CONTROLS if c.name in ("positive", "negative")):
        manifest, built = build_corpus(root, control.oracle(), SIZES, workers=2, render_cache=root / "renders")
        assert built
        df, x = features(manifest)
        y = df["emotion"].to_numpy()
        train, female = (df["split"] == "train").to_numpy(), (df["gender"] == "F").to_numpy()
        right = {k: {"F": [], "M": []} for k in ("majority only", "both")}
        for lang in LANGUAGES:
            here = (df["language"] == lang).to_numpy()
            for name, rows in (("majority only", train & here & female), ("both", train & here)):
                clf = RandomForestClassifier(n_estimators=300, random_state=0).fit(x[rows], y[rows])
                for g in ("F", "M"):
                    test = ((df["split"] == "test") & (df["gender"] == g)).to_numpy() & here
                    right[name][g].extend(clf.predict(x[test]) == y[test])
        out[control.name] = {k: {g: float(np.mean(v)) for g, v in r.items()} for k, r in right.items()}
    return out


def test_positive_control_the_minority_needs_its_own_examples(accuracies):
    pos, report = accuracies["positive"], json.dumps(accuracies)
    chance = 1 / len(EMOTIONS)
    # The majority's examples teach the majority and mislead on the minority (below chance: each emotion is
    # spoken with another emotion's centre).
    assert pos["majority only"]["F"] > 0.5, report
    assert pos["majority only"]["M"] < chance + 0.05, report
    # The minority's own examples teach it, without unlearning the majority.
    assert pos["both"]["M"] > 0.4 and pos["both"]["M"] - pos["majority only"]["M"] > 0.25, report
    assert pos["both"]["F"] > 0.45, report


def test_negative_control_the_majority_transfers_to_the_minority(accuracies):
    neg, pos, report = accuracies["negative"], accuracies["positive"], json.dumps(accuracies)
    # The same utterances as the positive control's (per-utterance random streams): the female voices are
    # identical, so the majority-only classifier is the same one; only the minority's mapping differs.
    assert neg["majority only"]["F"] == pos["majority only"]["F"], report
    assert neg["majority only"]["M"] > 0.3, report
    assert neg["majority only"]["M"] > 0.6 * neg["both"]["M"], report
    assert neg["majority only"]["M"] - pos["majority only"]["M"] > 0.2, report
