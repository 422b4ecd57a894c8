"""Manifest validation, audio loading and UtteranceDataset on small hand-built manifests.

Each bad input must give one clear error naming the file, row and column, through the library and
through the CLI (exit 2, no traceback), and must leave nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ermgap.data.audio import load_audio
from ermgap.data.dataset import UtteranceDataset
from ermgap.data.manifest import REQUIRED_COLUMNS, read_manifest, validate_manifest
from ermgap.errors import ErmgapWarning, ManifestError
from ermgap.labels import GENDERS, LANGUAGES, SPLITS


def tone(seconds: float, sr: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_valid(folder: Path) -> Path:
    """18 rows: one per (split, language, gender), each with its own 0.25 s wav."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in SPLITS:
        for lang in LANGUAGES:
            for g in GENDERS:
                uid = f"{split}_{lang}_{g}"
                sf.write(folder / f"{uid}.wav", tone(0.25), 16000, subtype="PCM_16")
                rows.append(dict(utt_id=uid, split=split, language=lang, emotion="joy", speaker=f"{lang}_{g}_{split}",
                                 gender=g, transcript="hello there", audio=f"{uid}.wav", duration_s=0.25))
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def _edit(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def _set(row: int, col: str, value: str):
    """A mutation writing `value` into data row `row` (1-based), column `col`."""
    def fn(path):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df.loc[row - 1, col] = value
        df.to_csv(path, index=False)
    return fn


# (case id, mutation of the manifest folder, expected fragments of the message, modality)
def _drop_col(path):
    _edit(path, lambda df: df.drop(columns=["gender"]))


def _dup(path):
    _set(5, "utt_id", "train_deu_F")(path)


def _missing_audio(path):
    (path.parent / "train_eng_M.wav").unlink()


def _corrupt(path):
    (path.parent / "dev_eng_F.wav").write_bytes(b"RIFF\x00\x00garbage-not-a-wav" * 10)


def _stereo(path):
    sf.write(path.parent / "dev_jpn_M.wav", tone(0.25, channels=2), 16000)


def _empty_audio(path):
    sf.write(path.parent / "test_deu_M.wav", np.zeros(0, dtype=np.float32), 16000)


def _nonfinite_audio(path):
    x = tone(0.25)
    x[3000] = np.nan  # past the first 1600 frames a header check reads
    x[3001] = np.inf
    sf.write(path.parent / "test_eng_M.wav", x, 16000, subtype="FLOAT")


def _empty_split(path):
    _edit(path, lambda df: df[df["split"] != "test"])


def _no_dev_female(path):
    _edit(path, lambda df: df[~((df["split"] == "dev") & (df["language"] == "deu") & (df["gender"] == "F"))])


def _rate(path):
    sf.write(path.parent / "train_jpn_F.wav", tone(0.25, sr=22050), 22050)


def _empty_transcript(path):
    _set(4, "transcript", "")(path)


def _empty_file(path):
    path.write_bytes(b"")


def _header_only(path):
    path.write_text(",".join(REQUIRED_COLUMNS) + "\n")


BAD = [
    ("missing-column", _drop_col, ["column 'gender'", "required column is missing"], None),
    ("unknown-emotion", _set(3, "emotion", "happy"), ["row 3 (line 4)", "column 'emotion'", "'happy'", "neutral"], None),
    ("bad-gender", _set(2, "gender", "X"), ["row 2", "column 'gender'", "'X'", "F, M"], None),
    ("unknown-language", _set(7, "language", "fra"), ["row 7", "column 'language'", "'fra'", "deu, eng, jpn"], None),
    ("bad-split", _set(1, "split", "valid"), ["row 1", "column 'split'", "'valid'", "train, dev, test"], None),
    ("duplicate-id", _dup, ["row 5", "column 'utt_id'", "duplicate", "row 1"], None),
    ("missing-audio", _missing_audio, ["row 4", "column 'audio'", "train_eng_M.wav", "not found"], None),
    ("corrupt-audio", _corrupt, ["row 9", "column 'audio'", "dev_eng_F.wav", "cannot be decoded"], None),
    ("stereo-audio", _stereo, ["row 12", "column 'audio'", "2 channels", "mono"], None),
    ("empty-audio", _empty_audio, ["row 14", "column 'audio'", "empty"], None),
    ("empty-split", _empty_split, ["split 'test' is empty"], None),
    ("gender-missing-dev", _no_dev_female, ["split 'dev', language 'deu' has no F rows"], None),
    ("wrong-sample-rate", _rate, ["row 5", "column 'audio'", "22050 Hz", "expected 16000 Hz"], None),
    ("empty-transcript-multi", _empty_transcript, ["row 4", "column 'transcript'", "multi"], "multi"),
    ("empty-file", _empty_file, ["file is empty"], None),
    ("header-only", _header_only, ["no rows"], None),
    ("bad-duration", _set(6, "duration_s", "-1"), ["row 6", "column 'duration_s'", "positive"], None),
    ("empty-speaker", _set(8, "speaker", ""), ["row 8", "column 'speaker'", "must not be empty"], None),
    ("nonfinite-audio", _nonfinite_audio, ["row 16", "column 'audio'", "test_eng_M.wav", "2 NaN or infinite"], None),
    ("duration-mismatch", _set(6, "duration_s", "3.5"), ["row 6", "column 'duration_s'", "'3.5'", "lasts 0.250 s"],
     None),
]


def test_valid_manifest_has_no_problems(tmp_path):
    path = write_valid(tmp_path / "m")
    assert validate_manifest(path, modality="multi") == []
    df = read_manifest(path, check_audio=True)
    assert len(df) == 18
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["audio_path"])


@pytest.mark.parametrize("case,mutate,fragments,modality", BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_gives_one_clear_error(tmp_path, monkeypatch, capsys, case, mutate, fragments, modality):
    path = write_valid(tmp_path / "m")
    mutate(path)
    before = sorted(p.name for p in path.parent.iterdir())
    problems = validate_manifest(path, modality=modality)
    assert len(problems) == 1, [str(p) for p in problems]
    text = str(problems[0])
    assert str(path) in text
    for frag in fragments:
        assert frag in text, (frag, text)
    args = ["data", "validate", str(path)] + (["--modality", modality] if modality else [])
    code, out = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in out and fragments[0] in out
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written
    if case != "wrong-sample-rate":  # read_manifest resamples other rates instead of refusing them
        with pytest.raises(ManifestError, match="problem"):
            read_manifest(path, check_audio=True, modality=modality)


def test_utf8_bom_from_spreadsheets_is_accepted(tmp_path):
    path = write_valid(tmp_path / "m")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert validate_manifest(path) == []
    assert list(read_manifest(path).columns)[0] == "utt_id"


def test_bad_modality_cli(tmp_path, monkeypatch, capsys):
    path = write_valid(tmp_path / "m")
    code, out = run_cli(monkeypatch, capsys, "data", "validate", str(path), "--modality", "both")
    assert code == 2 and "'both'" in out and "uni, multi" in out


def test_all_problems_are_reported_at_once(tmp_path):
    path = write_valid(tmp_path / "m")
    _set(3, "gender", "W")(path)
    _set(2, "emotion", "happy")(path)
    (path.parent / "test_eng_F.wav").unlink()
    problems = validate_manifest(path)
    where = sorted((p.row, p.column) for p in problems if p.row is not None)
    assert where == [(2, "emotion"), (3, "gender"), (15, "audio")]
    assert len(problems) == 3


def test_missing_manifest_file_cli(tmp_path, monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "data", "validate", str(tmp_path / "nope.csv"))
    assert code == 2 and "does not exist" in out and "Traceback" not in out


def test_load_audio_resamples_and_rejects(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0, sr=22050), 22050)
    x = load_audio(tmp_path / "a.wav", 16000)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 16000) <= 1
    # a 220 Hz tone stays a 220 Hz tone: the spectrum peak (independent FFT oracle) is at 220 Hz
    assert abs(np.fft.rfftfreq(len(x), 1 / 16000)[np.abs(np.fft.rfft(x)).argmax()] - 220) <= 1.0
    sf.write(tmp_path / "s.wav", tone(0.1, channels=2), 16000)
    with pytest.raises(ManifestError, match="2 channels"):
        load_audio(tmp_path / "s.wav")
    with pytest.raises(ManifestError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_utterance_dataset(tmp_path):
    path = write_valid(tmp_path / "m")
    sf.write(path.parent / "train_deu_M.wav", tone(0.5, sr=22050), 22050)  # resampled on load
    _edit(path, lambda df: df.drop(columns=["duration_s"]))  # lengths from the headers
    df = read_manifest(path)
    ds = UtteranceDataset(df, sample_rate=16000, max_audio_s=0.4)
    i = int(np.flatnonzero(df["utt_id"] == "train_deu_M")[0])
    item = ds[i]
    assert set(item) == {"utt_id", "language", "gender", "emotion", "transcript", "speaker", "audio"}
    assert (item["utt_id"], item["language"], item["gender"]) == ("train_deu_M", "deu", "M")
    assert len(item["audio"]) == ds.lengths[i] == 6400  # 0.5 s cropped to 0.4 s at 16 kHz
    j = int(np.flatnonzero(df["utt_id"] == "train_deu_F")[0])
    assert len(ds[j]["audio"]) == ds.lengths[j] == sf.info(path.parent / "train_deu_F.wav").frames == 4000


def test_load_audio_rejects_nonfinite_samples(tmp_path):
    x = tone(0.5)
    x[7000] = -np.inf
    sf.write(tmp_path / "f.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(ManifestError, match=r"f\.wav has 1 NaN or infinite sample"):
        load_audio(tmp_path / "f.wav")
    x[7000] = 0.0
    sf.write(tmp_path / "f.wav", x, 16000, subtype="FLOAT")
    assert np.isfinite(load_audio(tmp_path / "f.wav")).all()


def test_duration_within_rounding_is_accepted(tmp_path):
    path = write_valid(tmp_path / "m")
    _set(6, "duration_s", "0.2504")(path)
    assert validate_manifest(path) == []


def test_speaker_in_train_and_test_is_a_warning(tmp_path, monkeypatch, capsys):
    path = write_valid(tmp_path / "m")
    _set(13, "speaker", "deu_F_train")(path)  # row 13 is test_deu_F
    assert validate_manifest(path) == []
    problems = validate_manifest(path, include_notices=True)
    assert [(p.kind, p.column) for p in problems] == [("notice", "speaker")]
    assert "1 speaker(s) are in both train and test (deu_F_train)" in str(problems[0])
    with pytest.warns(ErmgapWarning, match="both train and test"):
        assert len(read_manifest(path)) == 18  # a warning, not an error
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", "data", "validate", str(path)])
    main()
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "warning:" in out and "deu_F_train" in out and ": OK (18 utterances" in out
