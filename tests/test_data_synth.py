"""The synthetic corpus: valid manifest, exact bias, disjoint speakers, determinism, bad arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf

from ermgap.data.manifest import validate_manifest
from ermgap.data.synth import Job, parse_bias, parse_train_share, plan_corpus, render, synthesize
from ermgap.errors import ConfigError, OutputExistsError
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES, SPLITS

FIXTURE_ARGS = dict(per_cell=4, eval_per_cell=2, bias={("deu", "F"): 0.7}, seed=0, lexical_cue_rate=0.0)


def test_fixture_corpus_is_a_valid_balanced_manifest(synth_corpus):
    assert validate_manifest(synth_corpus, modality="multi") == []
    df = pd.read_csv(synth_corpus, keep_default_na=False)
    # independent count: 4 train and 2 dev/test utterances per (language, gender, emotion)
    counts = df.groupby(["split", "language", "gender", "emotion"]).size()
    assert len(counts) == len(SPLITS) * len(LANGUAGES) * len(GENDERS) * len(EMOTIONS)
    assert set(counts.loc["train"]) == {4} and set(counts.loc["dev"]) == {2} and set(counts.loc["test"]) == {2}
    # train speakers are never heard in dev/test (dev and test share one held-out pool), and every
    # (split, language, gender) has at least 2 voices
    train_speakers = set(df.loc[df["split"] == "train", "speaker"])
    assert train_speakers.isdisjoint(df.loc[df["split"] != "train", "speaker"])
    assert set(df.loc[df["split"] == "dev", "speaker"]) == set(df.loc[df["split"] == "test", "speaker"])
    assert df.groupby(["split", "language", "gender"])["speaker"].nunique().min() >= 2
    for rel in df["audio"].iloc[::37]:
        info = sf.info(synth_corpus.parent / rel)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16") and info.frames > 8000
    # Japanese transcripts are in Japanese script (kana), not romaji
    assert df.loc[df["language"] == "jpn", "transcript"].str.contains(r"[\u3040-\u30ff]").all()


def test_bias_neutralises_exactly_the_requested_fraction(synth_corpus):
    df = pd.read_csv(synth_corpus, keep_default_na=False)
    flat = df[df["prosody_neutralised"] == 1]
    assert set(zip(flat["language"], flat["gender"])) == {("deu", "F")}
    assert "neutral" not in set(flat["emotion"])
    per_cell = flat.groupby(["split", "emotion"]).size()
    # round(0.7 * 4) = 3 of each train cell, round(0.7 * 2) = 1 of each dev/test cell
    assert set(per_cell.loc["train"]) == {3} and set(per_cell.loc["dev"]) == {1} and set(per_cell.loc["test"]) == {1}
    meta = json.loads((synth_corpus.parent / "corpus.json").read_text())
    assert meta["bias"] == [{"language": "deu", "gender": "F", "strength": 0.7}]
    assert meta["num_prosody_neutralised"] == len(flat) == 6 * (3 + 1 + 1)


def test_deterministic_render_matches_the_parallel_run(synth_corpus, tmp_path):
    """Re-plan with the same seed and re-render a sample in this process (workers=1 path):
    manifest rows and wav bytes equal those the 2-process run wrote."""
    rows, jobs = plan_corpus(**FIXTURE_ARGS)
    df = pd.read_csv(synth_corpus, keep_default_na=False, dtype=str)
    assert list(df["utt_id"]) == [r["utt_id"] for r in rows]
    assert list(df["transcript"]) == [r["transcript"] for r in rows]
    for job in jobs[::41]:
        render(job, str(tmp_path))
        assert (tmp_path / job.rel_path).read_bytes() == (synth_corpus.parent / job.rel_path).read_bytes()
    other_rows, _ = plan_corpus(**{**FIXTURE_ARGS, "seed": 1})
    assert [r["transcript"] for r in other_rows] != [r["transcript"] for r in rows]


def test_emotion_prosody_reaches_the_audio(tmp_path):
    """Same voice and sentence: sadness (slow) is longer than anger (fast); independent of the planner."""
    from ermgap.data.synth import EMOTION_PROSODY

    text = "The train leaves at seven in the morning."
    durations = {e: render(Job(f"{e}.wav", "en-us+f2", text, EMOTION_PROSODY[e]), str(tmp_path)) for e in
                 ("sadness", "anger")}
    assert durations["sadness"] > 1.4 * durations["anger"]
    assert abs(sf.info(tmp_path / "anger.wav").frames - durations["anger"] * 16000) <= 2


def test_lexical_cue_rate(tmp_path):
    rows, _ = plan_corpus(per_cell=6, eval_per_cell=3, bias={}, seed=3, lexical_cue_rate=1.0)
    from ermgap.data.synth import CUE_SENTENCES

    assert all(r["lexical_cue"] == 1 and r["transcript"] in CUE_SENTENCES[r["language"]][r["emotion"]] for r in rows)
    rows, _ = plan_corpus(per_cell=6, eval_per_cell=3, bias={}, seed=3, lexical_cue_rate=0.0)
    assert sum(r["lexical_cue"] for r in rows) == 0


@pytest.mark.parametrize("spec,fragment", [
    ("deu:F", "expected LANG:GENDER:STRENGTH"),
    ("fra:F:0.5", "language 'fra'"),
    ("deu:X:0.5", "gender 'X'"),
    ("deu:F:strong", "not a number"),
    ("deu:F:1.5", "out of range"),
])
def test_bad_bias_spec(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_bias(spec)


def test_parse_bias_ok():
    assert parse_bias("jpn:M:0.25") == (("jpn", "M"), 0.25)


def test_train_share_under_represents_only_that_groups_train_cells():
    rows, jobs = plan_corpus(per_cell=10, eval_per_cell=3, bias={}, seed=1, lexical_cue_rate=0.0,
                             train_share={("deu", "F"): 0.25, ("jpn", "F"): 0.04})
    df = pd.DataFrame(rows)
    counts = df.groupby(["split", "language", "gender", "emotion"]).size()
    # hand-counted: floor(0.25 * 10 + 0.5) = 3 per deu-F train cell; 0.04 * 10 rounds to 0, kept at 1
    assert set(counts.loc[("train", "deu", "F")]) == {3}
    assert set(counts.loc[("train", "jpn", "F")]) == {1}
    for lang, gender in [("deu", "M"), ("eng", "F"), ("eng", "M"), ("jpn", "M")]:
        assert set(counts.loc[("train", lang, gender)]) == {10}
    assert set(counts.loc["dev"]) == {3} and set(counts.loc["test"]) == {3}
    assert len(jobs) == len(df) == 7 * (3 + 1 + 4 * 10) + 2 * 42 * 3
    assert df["prosody_neutralised"].sum() == 0


@pytest.mark.parametrize("spec,fragment", [
    ("deu:F", "expected LANG:GENDER:SHARE"),
    ("deu:F:0", "expected 0 < SHARE <= 1"),
    ("deu:F:1.2", "out of range"),
    ("xx:F:0.5", "language 'xx'"),
])
def test_bad_train_share_spec(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_train_share(spec)
    assert parse_train_share("eng:M:0.5") == (("eng", "M"), 0.5)


def run_cli(monkeypatch, capsys, *args):
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("args,fragment", [
    (["--bias", "deu:F"], "expected LANG:GENDER:STRENGTH"),
    (["--bias", "deu:Q:0.3"], "gender 'Q'"),
    (["--lexical-cue-rate", "2"], "lexical_cue_rate=2.0"),
    (["--per-cell", "0"], "per_cell=0"),
    (["--train-share", "deu:F:0"], "--train-share 'deu:F:0'"),
    (["--cue-shift", "deu:Q"], "--cue-shift 'deu:Q': gender 'Q'"),
    (["--cue-shift", "deu:M:2"], "expected 0 <= STRENGTH <= 1"),
])
def test_synth_cli_bad_args_write_nothing(tmp_path, monkeypatch, capsys, args, fragment):
    out = tmp_path / "corpus"
    code, text = run_cli(monkeypatch, capsys, "data", "synth", "--out", str(out), *args)
    assert code == 2 and fragment in text and "Traceback" not in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_synth_refuses_existing_out_without_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        synthesize(out, per_cell=1)
    code, text = run_cli(monkeypatch, capsys, "data", "synth", "--out", str(out), "--per-cell", "1")
    assert code == 2 and "already exists" in text and "--force" in text
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_synth_cli_small_corpus_with_force(tmp_path, monkeypatch, capsys):
    from ermgap.io import claim_dir

    out = claim_dir(tmp_path / "corpus", "corpus")  # a corpus ermgap wrote before: --force replaces it
    (out / "old.txt").write_text("old")
    code, text = run_cli(monkeypatch, capsys, "data", "synth", "--out", str(out), "--per-cell", "1",
                         "--eval-per-cell", "1", "--bias", "none", "--workers", "2", "--force",
                         "--cue-shift", "eng:F:0.5", "--cue-shift", "jpn:M")
    assert code == 0, text
    assert "cue shift eng:F:0.5, jpn:M:1.0" in text
    df = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(df) == 3 * 42 and df["prosody_neutralised"].sum() == 0
    assert json.loads((out / "corpus.json").read_text())["cue_shift"] == [
        {"language": "eng", "gender": "F", "strength": 0.5}, {"language": "jpn", "gender": "M", "strength": 1.0}]
    assert sorted(df.groupby(["language", "gender"])["cue_shift"].first().items()) == [
        (("deu", "F"), 0.0), (("deu", "M"), 0.0), (("eng", "F"), 0.5), (("eng", "M"), 0.0),
        (("jpn", "F"), 0.0), (("jpn", "M"), 1.0)]
    assert not (out / "old.txt").exists()
    assert validate_manifest(Path(out) / "manifest.csv") == []
