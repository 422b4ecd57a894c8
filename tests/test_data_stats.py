"""Table 1 and emotion counts checked against pandas.crosstab on a random manifest."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pandas as pd
import pytest

from ermgap.data.manifest import read_manifest
from ermgap.data.stats import emotion_distribution, table1
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES, SPLITS


@pytest.fixture()
def manifest(tmp_path):
    rng = np.random.default_rng(7)
    cover = list(itertools.product(SPLITS, LANGUAGES, GENDERS))  # both genders in every (split, language)
    n = 300
    rows = [dict(split=s, language=lang, gender=g) for s, lang, g in cover] + [
        dict(split=rng.choice(SPLITS, p=[0.7, 0.15, 0.15]), language=rng.choice(LANGUAGES), gender=rng.choice(GENDERS))
        for _ in range(n - len(cover))]
    df = pd.DataFrame(rows)
    df["emotion"] = rng.choice(EMOTIONS, size=n)
    df["utt_id"] = [f"u{i}" for i in range(n)]
    df["speaker"] = df["language"] + "_" + df["gender"]
    df["transcript"] = "x"
    df["audio"] = [f"{u}.wav" for u in df["utt_id"]]  # stats never opens audio
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def test_table1_matches_crosstab(manifest):
    df = read_manifest(manifest)
    ours = table1(df)
    oracle = pd.crosstab([df["language"], df["gender"]], df["split"])
    for lang in LANGUAGES:
        for g in GENDERS:
            for split in SPLITS:
                assert ours.loc[(lang, g), split] == oracle.loc[(lang, g), split]
            assert ours.loc[(lang, g), "total"] == oracle.loc[(lang, g)].sum()
        assert ours.loc[(lang, "Total"), "train"] == (df["language"].eq(lang) & df["split"].eq("train")).sum()
        assert ours.loc[(lang, "Total"), "total"] == df["language"].eq(lang).sum()
    by_gender = pd.crosstab(df["gender"], df["split"])
    for g in GENDERS:
        assert list(ours.loc[("Overall", g), list(SPLITS)]) == [by_gender.loc[g, s] for s in SPLITS]
    assert ours.loc[("Overall", "Total"), "total"] == len(df) == 300
    # the paper's row order: English, Japanese, German, Overall
    assert list(dict.fromkeys(ours.index.get_level_values(0))) == ["eng", "jpn", "deu", "Overall"]


def test_emotion_distribution_matches_crosstab(manifest):
    df = read_manifest(manifest)
    ours = emotion_distribution(df)
    oracle = pd.crosstab([df["language"], df["gender"]], df["emotion"]).reindex(columns=list(EMOTIONS), fill_value=0)
    assert (ours[list(EMOTIONS)].sort_index().values == oracle.sort_index().values).all()
    assert (ours["total"].sort_index().values == oracle.sum(axis=1).sort_index().values).all()


def test_stats_cli_json(manifest, monkeypatch, capsys):
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", "data", "stats", str(manifest), "--json"])
    main()
    got = json.loads(capsys.readouterr().out)
    df = pd.read_csv(manifest)
    assert got["num_utterances"] == 300
    assert got["table1"]["deu"]["F"]["dev"] == int(((df.language == "deu") & (df.gender == "F") & (df.split == "dev")).sum())
    assert got["emotions"]["jpn"]["M"]["anger"] == int(((df.language == "jpn") & (df.gender == "M")
                                                         & (df.emotion == "anger")).sum())
    assert got["table1"]["Overall"]["Total"]["total"] == 300


def test_stats_cli_table(manifest, monkeypatch, capsys):
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", "data", "stats", str(manifest)])
    main()
    out = capsys.readouterr().out
    assert "English" in out and "Overall" in out and "Female" in out
