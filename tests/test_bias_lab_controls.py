"""The lab's own controls carry what they claim: in the positive control the minority's emotions are spoken through
a mapping the majority's examples do not teach (a classifier of the female voices fails on the male ones) but
their own examples do, and gender is audible; in the negative control gender is a label only (one voice pool: it
cannot be told from the audio) and a classifier of either group's examples serves both alike.

The corpora are the lab's `CONTROLS` as `ermgap bias-lab` builds them (`build_corpus`), small: 8 train, 1 dev,
6 test utterances per cell, the oracle twins (every group's train utterances kept, so "both groups" has the
minority's own examples). The oracle is independent of ermgap's models: a scikit-learn random forest on numpy
prosodic summary features (tests/_prosody.py), one per language, scored on the test split's voices (which no
train utterance uses), accuracies pooled over the three languages (126 test utterances per gender).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _prosody import features

from ermgap.bias_lab.corpora import CONTROLS, Sizes, build_corpus
from ermgap.labels import EMOTIONS, LANGUAGES

SIZES = Sizes(train=8, dev=1, test=6)


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    """{control: {"majority only" | "both": {gender: pooled test accuracy}, "gender": test accuracy of a gender
    classifier}} for the positive and negative controls."""
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
        test = (df["split"] == "test").to_numpy()
        g = df["gender"].to_numpy()
        clf = RandomForestClassifier(n_estimators=300, random_state=0).fit(x[train], g[train])
        out[control.name]["gender"] = float(np.mean(clf.predict(x[test]) == g[test]))
        out[control.name]["manifest"] = str(manifest)
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


def test_gender_is_audible_in_the_positive_control_only(accuracies):
    """The negative control's groups speak with the same voices, so nothing in its audio tells them apart."""
    report = json.dumps(accuracies)
    assert accuracies["positive"]["gender"] > 0.9, report
    assert abs(accuracies["negative"]["gender"] - 0.5) < 0.1, report


def test_negative_control_either_group_is_served_alike(accuracies):
    neg, pos, report = accuracies["negative"], accuracies["positive"], json.dumps(accuracies)
    # The female-only classifier serves the male-labelled utterances as well as the female ones (in the positive
    # control it fails them), and so does the classifier of both groups.
    for k in ("majority only", "both"):
        assert neg[k]["M"] > 0.3 and abs(neg[k]["M"] - neg[k]["F"]) < 0.12, report
    assert neg["majority only"]["M"] - pos["majority only"]["M"] > 0.2, report


def test_negative_control_groups_share_every_voice(accuracies):
    df = pd.read_csv(accuracies["negative"]["manifest"])
    for (split, lang), d in df.groupby(["split", "language"]):
        female, male = (set(d.loc[d["gender"] == g, "speaker"]) for g in ("F", "M"))
        assert female == male and len(female) >= 7, (split, lang, sorted(female), sorted(male))
