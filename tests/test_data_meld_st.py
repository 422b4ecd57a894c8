"""MELD-ST importer on a fixture built here in the exact release layout, with bad rows counted by hand."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ermgap.data.dataset import UtteranceDataset
from ermgap.data.manifest import read_manifest, validate_manifest
from ermgap.data.meld_st import DEFAULT_SPEAKERS, import_meld_st, load_speaker_genders
from ermgap.errors import ConfigError, ManifestError

PAIRS = {"ENG_JPN": ("jpn", "Japanese"), "ENG_DEU": ("deu", "German")}
GOOD = {  # speaker -> gender (all in the shipped table)
    "train": ["Rachel", "Ross", "Monica", "Joey", "Phoebe", "Chandler"],
    "valid": ["Rachel", "Ross", "Monica", "Joey"],
    "test": ["Phoebe", "Chandler", "Rachel", "Mr. Geller"],
}
BAD_SPEAKERS = ["Monica and Rachel", "All", "Stranger", "Pat"]  # multiple, multiple, unknown, ambiguous (table: ?)
PATTERN = "{pair}/{split}/{lang_name}/{id}.wav"


def _row(i, speaker, emotion, other_lang, text_id):
    return {"id": str(i), "dia_id": str(i // 3), "utt_id": str(i % 3), "emotion": emotion, "sentiment": "neutral",
            "English": f"english text {text_id}", other_lang: f"{other_lang.lower()} text {text_id}",
            "season": "1", "episode": "2", "speaker": speaker,
            "English_begin_time": "0:00:01.000", "English_end_time": "0:00:02.000",
            f"{other_lang}_begin_time": "0:00:01.000", f"{other_lang}_end_time": "0:00:02.000"}


def build_release(root):
    """ENG_JPN/jpn_{split}.csv and ENG_DEU/deu_{split}.csv plus 0.2 s 16 kHz wavs per language."""
    tone = (0.2 * np.sin(2 * np.pi * 180 * np.arange(3200) / 16000)).astype(np.float32)
    for pair, (prefix, other) in PAIRS.items():
        for split, speakers in GOOD.items():
            rows = [_row(i, s, "joy" if i % 2 else "anger", other, f"{split}-{i}") for i, s in enumerate(speakers)]
            n = len(rows)
            rows += [_row(n + j, s, "sadness", other, f"bad-{j}") for j, s in enumerate(BAD_SPEAKERS)]
            rows.append(_row(n + 10, "Rachel", "happiness", other, "bad-emotion"))  # not a MELD emotion
            rows.append(_row(0, "Ross", "fear", other, "dup"))  # id 0 again
            (root / pair).mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(root / pair / f"{prefix}_{split}.csv", index=False)
            for lang_name in ("English", other):
                folder = root / pair / split / lang_name
                folder.mkdir(parents=True, exist_ok=True)
                for r in rows:
                    sf.write(folder / f"{r['id']}.wav", tone, 16000, subtype="PCM_16")
    # missing audio: Japanese train id 2 (English id 2 stays), German test id 1
    (root / "ENG_JPN" / "train" / "Japanese" / "2.wav").unlink()
    (root / "ENG_DEU" / "test" / "German" / "1.wav").unlink()
    genders = root / "speakers.csv"
    shipped = pd.read_csv(DEFAULT_SPEAKERS, dtype=str, keep_default_na=False)
    pd.concat([shipped, pd.DataFrame([{"speaker": "Pat", "gender": "?", "note": "unsure"}])]).to_csv(genders, index=False)
    return genders


@pytest.fixture()
def release(tmp_path):
    root = tmp_path / "MELD-ST"
    root.mkdir()
    return root, build_release(root)


def test_import_counts_and_mapping(release, tmp_path):
    root, genders = release
    manifest, summary = import_meld_st(root, tmp_path / "out", genders=genders, audio_pattern=PATTERN)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    # hand count: 6 + 4 + 4 good rows per language, minus one missing-audio row for jpn and deu
    assert df["language"].value_counts().to_dict() == {"eng": 14, "jpn": 13, "deu": 13}
    d = summary.to_dict()
    per_lang_split = 3 * 3  # three languages × three splits, each file has the same bad rows
    assert d["excluded_by_reason"] == {"multiple speakers": 2 * per_lang_split, "unknown speaker": per_lang_split,
                                       "ambiguous gender": per_lang_split, "invalid emotion": per_lang_split,
                                       "duplicate id": per_lang_split, "missing audio": 2}
    assert d["top_unknown_speakers"] == {"Stranger": 9}
    assert set(df["split"]) == {"train", "dev", "test"}
    assert (df["split"] == "dev").sum() == 3 * 4
    row = df.set_index("utt_id").loc["jpn_valid_1"]
    assert (row["split"], row["speaker"], row["gender"], row["emotion"]) == ("dev", "Ross", "M", "joy")
    assert row["transcript"] == "japanese text valid-1"
    assert df.set_index("utt_id").loc["eng_valid_1", "transcript"] == "english text valid-1"
    assert df.set_index("utt_id").loc["deu_test_3", "transcript"] == "german text test-3"
    assert df.set_index("utt_id").loc["deu_test_3", "gender"] == "M"  # Mr. Geller
    assert "eng_train_2" in set(df["utt_id"]) and "jpn_train_2" not in set(df["utt_id"])
    assert "deu_test_1" not in set(df["utt_id"])
    # the dup row (id 0, "dup" text) was dropped, the first id 0 kept
    assert not df["transcript"].str.contains("dup").any()
    assert validate_manifest(manifest, modality="multi") == []
    loaded = read_manifest(manifest, check_audio=True)
    ds = UtteranceDataset(loaded)
    assert len(ds[0]["audio"]) == ds.lengths[0] == 3200
    assert (tmp_path / "out" / "import_summary.json").exists()


def test_no_require_audio_keeps_rows(release, tmp_path):
    root, genders = release
    manifest, summary = import_meld_st(root, tmp_path / "out", genders=genders, audio_pattern=PATTERN,
                                       require_audio=False)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert len(df) == 42 and "missing audio" not in summary.to_dict()["excluded_by_reason"]
    problems = validate_manifest(manifest)
    assert len(problems) == 2 and all("not found" in str(p) for p in problems)


def _drop_speaker_column(root):
    path = root / "ENG_DEU" / "deu_valid.csv"
    pd.read_csv(path, dtype=str).drop(columns=["speaker"]).to_csv(path, index=False)
    return "deu_valid.csv", "speaker"


def _remove_file(root):
    (root / "ENG_JPN" / "jpn_test.csv").unlink()
    return "jpn_test.csv", "does not exist"


def _only_men(root):
    for path in root.glob("ENG_*/*_valid.csv"):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df.loc[df["speaker"].isin(["Rachel", "Monica", "Phoebe"]), "speaker"] = "Joey"
        df.to_csv(path, index=False)
    return "split 'dev', language", "has no F rows"


@pytest.mark.parametrize("breaker", [_drop_speaker_column, _remove_file, _only_men])
def test_bad_release_writes_nothing(release, tmp_path, breaker):
    root, genders = release
    fragments = breaker(root)
    with pytest.raises(ManifestError) as err:
        import_meld_st(root, tmp_path / "out", genders=genders, audio_pattern=PATTERN)
    for frag in fragments:
        assert frag in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


def test_bad_pattern_and_speaker_table(release, tmp_path):
    root, genders = release
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{language\}"):
        import_meld_st(root, tmp_path / "out", genders=genders, audio_pattern="{pair}/{language}/{id}.wav")
    bad = tmp_path / "genders.csv"
    bad.write_text("speaker,gender\nRachel,F\nrachel,M\n")
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\).*different gender"):
        import_meld_st(root, tmp_path / "out", genders=bad, audio_pattern=PATTERN)
    assert not (tmp_path / "out").exists()


def test_shipped_speaker_table():
    table = load_speaker_genders()
    assert {k: table[k] for k in ("rachel", "monica", "phoebe", "ross", "chandler", "joey")} == {
        "rachel": "F", "monica": "F", "phoebe": "F", "ross": "M", "chandler": "M", "joey": "M"}
    assert table["mr geller"] == "M" and table["mrs geller"] == "F"


def test_cli_import(release, tmp_path, monkeypatch, capsys):
    from ermgap.cli.main import main

    root, genders = release
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["ermgap", "data", "import-meld-st", str(root), "--genders", str(genders),
                                      "--audio-pattern", PATTERN, "--out", str(out)])
    main()
    text = capsys.readouterr().out
    assert "kept 40 utterances" in text and "multiple speakers: 18" in text and "Stranger (9)" in text
    monkeypatch.setattr(sys, "argv", ["ermgap", "data", "import-meld-st", str(root), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
