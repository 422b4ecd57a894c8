"""Importer for the MELD-ST release (ku-nlp/MELD-ST) into a canonical manifest.

Release layout under ROOT::

    ENG_JPN/jpn_{train,valid,test}.csv   English + Japanese (we take both languages' speech)
    ENG_DEU/deu_{train,valid,test}.csv   English + German (we take the German speech only)

with columns ``id, dia_id, utt_id, emotion, sentiment, English, Japanese|German, season, episode,
speaker, ..._begin_time, ..._end_time``. As in the paper, English and Japanese come from ENG_JPN and
German from ENG_DEU; split ``valid`` becomes ``dev``; the transcript is the text in the utterance's
language; utt_id becomes ``<lang>_<release split>_<id>``.

Audio is distributed separately, so its location is a pattern relative to ROOT (absolute patterns
work too), formatted per row with these placeholders:

    {pair}       ENG_JPN | ENG_DEU
    {split}      release split name: train | valid | test
    {lang}       eng | jpn | deu
    {lang_name}  English | Japanese | German
    {id} {dia_id} {utt_id} {season} {episode}   the row's values in the release CSV

e.g. ``'{pair}/{split}/{lang_name}/{id}.wav'`` (the default) or ``'audio/{lang}/dia{dia_id}_utt{utt_id}.wav'``.
The manifest's ``audio`` column holds the path relative to the output folder.

Speaker gender comes from a CSV with columns ``speaker,gender[,note]`` (gender F or M; anything else,
e.g. ``?``, marks the speaker as ambiguous and excludes them). The shipped table
``ermgap/data/meld_speakers.csv`` covers the six main Friends characters and recurring characters whose
gender is certain. To extend it, copy it, add one line per speaker exactly as the name appears in the
release's ``speaker`` column (matching ignores case, dots and repeated spaces: "Mr Geller" = "Mr. Geller"),
and pass it with ``--genders``; the import summary lists the most frequent unknown speakers to add.

Excluded rows are counted by reason: multiple speakers ("Monica and Rachel", "All", "Both", ...),
unknown speaker, ambiguous gender, invalid emotion, duplicate id, missing audio (with require_audio).
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import soundfile as sf

from ermgap.data.manifest import format_problems, validate_manifest, warn_problems, write_manifest
from ermgap.errors import ConfigError, ManifestError
from ermgap.io import atomic_dir, check_writable_dir
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGE_NAMES

DEFAULT_SPEAKERS = Path(__file__).with_name("meld_speakers.csv")
DEFAULT_AUDIO_PATTERN = "{pair}/{split}/{lang_name}/{id}.wav"
PLACEHOLDERS = ("pair", "split", "lang", "lang_name", "id", "dia_id", "utt_id", "season", "episode")
SPLIT_MAP = {"train": "train", "valid": "dev", "test": "test"}
# language -> (pair folder, file prefix, text column)
SOURCES = {
    "eng": ("ENG_JPN", "jpn", "English"),
    "jpn": ("ENG_JPN", "jpn", "Japanese"),
    "deu": ("ENG_DEU", "deu", "German"),
}
REQUIRED_RELEASE_COLUMNS = ("id", "dia_id", "utt_id", "emotion", "speaker")
GROUP_SPEAKERS = {"all", "both", "everyone", "everybody", "together", "group", "the guys", "guys", "girls",
                  "the girls", "others", "crowd", "people", "kids"}
_MULTI = re.compile(r"\band\b|&|,|/|\+", re.IGNORECASE)

REASON_MULTIPLE = "multiple speakers"
REASON_UNKNOWN = "unknown speaker"
REASON_AMBIGUOUS = "ambiguous gender"
REASON_EMOTION = "invalid emotion"
REASON_DUPLICATE = "duplicate id"
REASON_AUDIO = "missing audio"


@dataclass
class ImportSummary:
    """What the import kept and dropped: kept[lang], excluded[(lang, reason)], top unknown speakers."""

    kept: Counter = field(default_factory=Counter)
    excluded: Counter = field(default_factory=Counter)
    unknown_speakers: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        reasons = Counter()
        for (_, reason), n in self.excluded.items():
            reasons[reason] += n
        return {
            "kept": dict(self.kept), "kept_total": sum(self.kept.values()),
            "excluded_by_reason": dict(reasons), "excluded_total": sum(reasons.values()),
            "excluded_by_language": {f"{lang}/{reason}": n for (lang, reason), n in sorted(self.excluded.items())},
            "top_unknown_speakers": dict(self.unknown_speakers.most_common(20)),
        }

    def format(self) -> str:
        d = self.to_dict()
        lines = [f"kept {d['kept_total']} utterances: " + ", ".join(f"{k} {v}" for k, v in sorted(d["kept"].items())),
                 f"excluded {d['excluded_total']}:"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(d["excluded_by_reason"].items(), key=lambda kv: -kv[1])]
        if d["top_unknown_speakers"]:
            lines.append("most frequent unknown speakers (add them to the --genders table if certain): "
                         + ", ".join(f"{s} ({n})" for s, n in list(d["top_unknown_speakers"].items())[:10]))
        return "\n".join(lines)


def normalise_speaker(name: str) -> str:
    """Key used to match speakers: case-folded, dots removed, whitespace collapsed."""
    return " ".join(name.replace(".", " ").split()).casefold()


def is_multiple_speakers(name: str) -> bool:
    return bool(_MULTI.search(name)) or normalise_speaker(name) in GROUP_SPEAKERS


def load_speaker_genders(path: str | os.PathLike = DEFAULT_SPEAKERS) -> dict[str, str | None]:
    """Read a speaker,gender CSV into {normalised speaker: "F" | "M" | None (ambiguous)}."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"speaker gender table {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"speaker gender table {path} is not a valid UTF-8 CSV ({err})") from None
    missing = [c for c in ("speaker", "gender") if c not in df.columns]
    if missing:
        raise ManifestError(f"speaker gender table {path}: missing column(s) {', '.join(missing)}; "
                            "expected header speaker,gender[,note]")
    table: dict[str, str | None] = {}
    first: dict[str, int] = {}
    for i, (spk, gender) in enumerate(zip(df["speaker"], df["gender"]), start=1):
        key = normalise_speaker(spk)
        if not key:
            raise ManifestError(f"speaker gender table {path} row {i} (line {i + 1}), column 'speaker': empty name")
        g = gender.strip().upper() or None
        g = g if g in GENDERS else None
        if key in table and table[key] != g:
            raise ManifestError(f"speaker gender table {path} row {i} (line {i + 1}), column 'gender': speaker "
                                f"{spk!r} is listed again with a different gender (first in row {first[key]})")
        table[key] = g
        first.setdefault(key, i)
    return table


def check_audio_pattern(pattern: str) -> None:
    """ConfigError if `pattern` uses a placeholder other than PLACEHOLDERS (or is malformed)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as err:
        raise ConfigError(f"--audio-pattern {pattern!r} is malformed ({err})") from None
    bad = [n for n in names if n not in PLACEHOLDERS]
    if bad or not names:
        raise ConfigError(f"--audio-pattern {pattern!r}: " + (f"unknown placeholder(s) {', '.join('{'+b+'}' for b in bad)}"
                          if bad else "has no placeholder, so every row would share one file")
                          + f"; allowed: {', '.join('{'+p+'}' for p in PLACEHOLDERS)}")


def _read_release_csv(path: Path, text_col: str) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"MELD-ST file {path} does not exist; expected the release layout "
                            "ENG_JPN/jpn_{train,valid,test}.csv and ENG_DEU/deu_{train,valid,test}.csv")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"MELD-ST file {path} is not a valid UTF-8 CSV ({str(err).strip()})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in (*REQUIRED_RELEASE_COLUMNS, text_col) if c not in df.columns]
    if missing:
        raise ManifestError(f"MELD-ST file {path}: missing column(s) {', '.join(missing)} "
                            f"(header has: {', '.join(df.columns)})")
    return df


def build_rows(root: str | os.PathLike, genders: dict[str, str | None], audio_pattern: str, out_dir: Path,
               *, require_audio: bool = True) -> tuple[pd.DataFrame, ImportSummary]:
    """The manifest rows (audio relative to `out_dir`) and the summary; no files written."""

    root = Path(root)
    summary = ImportSummary()
    rows: list[dict] = []
    out_abs = out_dir.resolve()
    for lang, (pair, prefix, text_col) in SOURCES.items():
        for release_split, split in SPLIT_MAP.items():
            df = _read_release_csv(root / pair / f"{prefix}_{release_split}.csv", text_col)
            seen: set[str] = set()
            for rec in df.to_dict("records"):
                speaker = rec["speaker"].strip()
                key = normalise_speaker(speaker)
                emotion = rec["emotion"].strip().lower()
                reason = None
                if rec["id"] in seen:
                    reason = REASON_DUPLICATE
                elif emotion not in EMOTIONS:
                    reason = REASON_EMOTION
                elif is_multiple_speakers(speaker):
                    reason = REASON_MULTIPLE
                elif key not in genders:
                    reason = REASON_UNKNOWN
                    summary.unknown_speakers[speaker] += 1
                elif genders[key] is None:
                    reason = REASON_AMBIGUOUS
                seen.add(rec["id"])
                if reason is None:
                    fields = {k: str(rec.get(k, "")).strip() for k in ("id", "dia_id", "utt_id", "season", "episode")}
                    audio = Path(audio_pattern.format(pair=pair, split=release_split, lang=lang,
                                                      lang_name=LANGUAGE_NAMES[lang], **fields))
                    audio = audio if audio.is_absolute() else root / audio
                    duration = None
                    if audio.is_file():
                        try:
                            duration = round(sf.info(str(audio)).duration, 4)
                        except Exception:  # undecodable: kept, so that `data validate` reports it by row
                            duration = None
                    elif require_audio:
                        reason = REASON_AUDIO
                if reason is not None:
                    summary.excluded[(lang, reason)] += 1
                    continue
                summary.kept[lang] += 1
                rows.append({
                    "utt_id": f"{lang}_{release_split}_{rec['id'].strip()}", "split": split, "language": lang,
                    "emotion": emotion, "speaker": speaker, "gender": genders[key],
                    "transcript": rec[text_col].strip(),
                    "audio": os.path.relpath(audio.resolve(), out_abs), "duration_s": duration,
                })
    return pd.DataFrame(rows), summary


def import_meld_st(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    genders: str | os.PathLike = DEFAULT_SPEAKERS,
    audio_pattern: str = DEFAULT_AUDIO_PATTERN,
    require_audio: bool = True,
    force: bool = False,
) -> tuple[Path, ImportSummary]:
    """Write `out_dir/manifest.csv` and `out_dir/import_summary.json` atomically; returns (manifest, summary).

    Raises ManifestError for a missing/malformed release file or speaker table, or when the resulting
    manifest is invalid (e.g. a split left without one gender); ConfigError for a bad audio pattern.
    """


    check_audio_pattern(audio_pattern)
    check_writable_dir(out_dir, "corpus", force)
    table = load_speaker_genders(genders)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind="corpus", force=force) as tmp:
        df, summary = build_rows(root, table, audio_pattern, out_dir, require_audio=require_audio)
        if df.empty:
            raise ManifestError(f"MELD-ST import from {root} kept no utterances:\n{summary.format()}")
        manifest = tmp / "manifest.csv"
        write_manifest(df, manifest)
        problems = warn_problems(validate_manifest(manifest, check_audio=False, include_notices=True))
        if problems:
            raise ManifestError(f"the imported manifest would be invalid ({len(problems)} problem(s)); nothing "
                                f"written:\n{format_problems(problems, 20)}\n{summary.format()}")
        (tmp / "import_summary.json").write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return out_dir / "manifest.csv", summary
