"""The canonical manifest: one CSV row per utterance, validated once at the boundary.

Columns (CSV header, any order; extra columns are kept):

    utt_id      unique id (string)
    split       train | dev | test
    emotion     the gold label (the task's labels; default MELD's seven: neutral joy sadness anger fear
                disgust surprise)
    speaker     speaker id (string; speakers should not cross splits)
    transcript  text in the utterance's language (may be empty unless modality is "multi")
    audio       path of the wav, relative to the manifest's folder (absolute paths also work)
    duration_s  optional, seconds (speeds up length-grouped batching)
    language    the default stratum; any column named by objective.stratum
    gender      the default protected attribute (F | M); any column named by data.attribute

Allowed values come from the task (`ermgap.task`): labels and attribute values as declared or inferred from the
train split; stratum values as found in the train split. A dev/test value the task lacks is an error.

Problems are reported with the CSV row (1 = first data row) and line (header = line 1), the column,
the offending value and what is allowed; `validate_manifest` returns all of them at once and
`read_manifest` raises one ManifestError listing them. Coverage problems (a (split, stratum) without some
attribute value, so its gap is undefined or compares fewer groups) are warnings: `data validate` reports
them like errors, `read_manifest(allow_warnings=True)` (training) logs them and goes on.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from ermgap.errors import ErmgapWarning, ManifestError
from ermgap.labels import MODALITIES, SPLITS
from ermgap.task import LABEL_COLUMN, RUN_MODALITY, Task, TaskError, TaskSpec

# Columns every manifest has, whatever the task; the task adds its attribute and stratum columns.
BASE_COLUMNS: tuple[str, ...] = ("utt_id", "split", LABEL_COLUMN, "speaker", "transcript", "audio")
# The default task's full header (language stratum, gender attribute), in the canonical order.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "utt_id", "split", "language", "emotion", "speaker", "gender", "transcript", "audio",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("duration_s",)
log = logging.getLogger(__name__)
EXPECTED_SAMPLE_RATE = 16000
# Sample formats that store floats, which can be NaN or inf (integer PCM cannot).
NONFINITE_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
# How far a stated duration_s may be from the file's own length (rounding, not a different file).
DURATION_TOLERANCE_S = 0.05
# Columns that identify an utterance and must never be blank (transcript may be, in unimodal use).
_NONEMPTY = ("utt_id", "speaker", "audio")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest. `row` is the 1-based data row (None: file-level problem)."""

    file: str
    message: str
    row: int | None = None
    column: str | None = None
    value: str | None = None
    kind: str = "error"  # error | warning (data validate fails on it) | notice (reported, never fails)

    def describe(self, *, with_file: bool = True) -> str:
        parts = [self.file] if with_file else []
        if self.row is not None:
            parts.append(f"row {self.row} (line {self.row + 1})")
        if self.column is not None:
            parts.append(f"column '{self.column}'")
        where = ", ".join(parts)
        shown = ("warning: " if self.kind == "warning" else "") + (f"value {self.value!r}: " if self.value is not None
                                                                  else "")
        return f"{where}: {shown}{self.message}" if where else f"{shown}{self.message}"

    def __str__(self) -> str:
        return self.describe()


def _load_csv(path: Path, problems: list[Problem]) -> pd.DataFrame | None:
    name = str(path)
    if not path.exists():
        problems.append(Problem(name, "manifest file does not exist"))
        return None
    if path.is_dir():
        problems.append(Problem(name, "is a directory; expected a manifest CSV file"))
        return None
    if path.stat().st_size == 0:
        problems.append(Problem(name, "file is empty; expected a CSV header "
                                      f"({', '.join(REQUIRED_COLUMNS)}) and one row per utterance"))
        return None
    try:
        ragged = ragged_rows(path)
        # dtype=str and no NA parsing: ids like "007" and transcripts like "NA" stay as written.
        df = None if ragged else pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                                             encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        problems.append(Problem(name, f"is not UTF-8 text ({err.reason} at byte {err.start})"))
        return None
    except (csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        problems.append(Problem(name, f"is not a valid CSV file ({str(err).strip()})"))
        return None
    for row, fields, expected in ragged:
        problems.append(Problem(name, f"has {fields} fields but the header has {expected} (a stray or missing "
                                      "comma? quote values that contain commas)", row=row))
    if df is None:  # pandas would shift the values of such rows into other columns (or into the index)
        return None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def ragged_rows(path: Path) -> list[tuple[int, int, int]]:
    """(data row, its number of fields, the header's) for every row of a CSV file whose field count differs
    from the header's. Rows are counted as pandas counts them (1 = first data row, blank lines skipped);
    quoted fields may hold commas and newlines."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        records = (r for r in csv.reader(fh) if r)
        header = next(records, [])
        return [(i, len(r), len(header)) for i, r in enumerate(records, start=1) if len(r) != len(header)]


def _allowed_values(df: pd.DataFrame, task: Task) -> dict[str, tuple[tuple[str, ...], str]]:
    """{column: (allowed values, where they come from)} for the split, label, attribute and stratum columns."""
    train = df[df["split"] == "train"]
    allowed = {"split": (SPLITS, ""), LABEL_COLUMN: (task.labels, task.labels_from),
               task.attribute: (task.attribute_values, "data.attribute_values")}
    for col in task.stratum:
        if col in df.columns and col not in allowed and len(train):
            allowed[col] = (tuple(sorted(set(train[col]))), "the train split")
    return allowed


def _check_rows(df: pd.DataFrame, name: str, modality: str | None, task: Task | None,
                problems: list[Problem]) -> None:
    for col in _NONEMPTY:
        for i in df.index[df[col].str.strip() == ""]:
            problems.append(Problem(name, "must not be empty", row=i + 1, column=col, value=""))
    checks = _allowed_values(df, task) if task is not None else {"split": (SPLITS, "")}
    for col, (allowed, source) in checks.items():
        bad = ~df[col].isin(allowed)
        note = f" ({source})" if source and source != "data.attribute_values" else ""
        for i in df.index[bad]:
            problems.append(Problem(name, f"expected one of {', '.join(allowed)}{note}", row=i + 1, column=col,
                                    value=df.at[i, col]))
    if modality == "multi":
        for i in df.index[df["transcript"].str.strip() == ""]:
            problems.append(Problem(name, "transcript is empty but modality 'multi' feeds it to the model",
                                    row=i + 1, column="transcript", value=""))
    if "duration_s" in df.columns:
        dur = pd.to_numeric(df["duration_s"], errors="coerce")
        for i in df.index[~(dur > 0) & (df["duration_s"].str.strip() != "")]:
            problems.append(Problem(name, "expected a positive number of seconds (or leave it empty)",
                                    row=i + 1, column="duration_s", value=df.at[i, "duration_s"]))
    first_row: dict[str, int] = {}
    for i, uid in zip(df.index, df["utt_id"]):
        if uid in first_row and uid.strip():
            problems.append(Problem(name, f"duplicate utt_id (first used in row {first_row[uid]}); ids must be unique",
                                    row=i + 1, column="utt_id", value=uid))
        else:
            first_row.setdefault(uid, i + 1)


def _check_splits(df: pd.DataFrame, name: str, require_splits: Sequence[str], problems: list[Problem]) -> None:
    for split in require_splits:
        if not (df["split"] == split).any():
            problems.append(Problem(name, f"split '{split}' is empty; a manifest needs rows in each of "
                                          f"{', '.join(require_splits)}", column="split"))


def _check_coverage(df: pd.DataFrame, name: str, task: Task, modality: str | None, problems: list[Problem]) -> None:
    """A warning per (split, stratum) lacking some attribute value: its gap is undefined (one value left) or
    compares fewer groups; in dev an undefined gap cannot drive λ."""
    attr, values = task.attribute, task.attribute_values
    keys = pd.Series(task.stratum_keys(df, modality), index=df.index)
    counts = Counter(zip(df["split"], keys, df[attr]))
    what = " × ".join(task.stratum)
    for split in SPLITS:
        in_split = df["split"] == split
        if not in_split.any():
            continue
        for key in task.stratum_values:
            if not (in_split & (keys == key)).any():
                continue
            missing = [v for v in values if counts[(split, key, v)] == 0]
            if not missing:
                continue
            left = len(values) - len(missing)
            # The objective's loss gap needs every value present (a "valid" stratum); metric gaps need two.
            consequence = "its gaps are undefined" if left < 2 else f"its metric gaps compare the other {left} values only"
            if split == "dev":
                consequence += "; its loss gap is undefined and will not drive λ"
            need = f"both {' and '.join(values)}" if len(values) == 2 else f"all of {', '.join(values)}"
            problems.append(Problem(
                name, f"split '{split}', {what} '{key}' has no {' or '.join(missing)} rows; {attr} gaps need "
                      f"{need} in every (split, {what}): {consequence}", column=attr, kind="warning"))


def _check_audio(df: pd.DataFrame, path: Path, name: str, expected_sample_rate: int | None,
                 problems: list[Problem]) -> Counter:

    rates: Counter = Counter()
    base = path.parent
    stated = (pd.to_numeric(df["duration_s"], errors="coerce") if "duration_s" in df.columns
              else pd.Series(float("nan"), index=df.index))
    for i, rel in zip(df.index, df["audio"]):
        if not rel.strip():
            continue
        p = Path(rel) if os.path.isabs(rel) else base / rel
        row = dict(row=i + 1, column="audio", value=rel)
        if not p.is_file():
            problems.append(Problem(name, f"audio file not found (looked for {p})", **row))
            continue
        try:
            info = sf.info(str(p))
            # Integer samples are always finite, so reading a little proves the data decodes; float
            # samples can be NaN or inf anywhere, so those files are read whole.
            whole = info.frames if info.subtype in NONFINITE_SUBTYPES else min(info.frames, 1600)
            x = sf.read(str(p), frames=whole, dtype="float32")[0] if info.frames > 0 else None
        except Exception as err:
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            problems.append(Problem(name, f"audio file cannot be decoded ({msg})", **row))
            continue
        bad = int(np.size(x) - np.isfinite(x).sum()) if x is not None else 0
        if bad:
            problems.append(Problem(name, f"audio has {bad} NaN or infinite sample(s); expected finite samples "
                                          "in [-1, 1]", **row))
        rates[int(info.samplerate)] += 1
        if info.channels != 1:
            problems.append(Problem(name, f"audio has {info.channels} channels; expected mono (1 channel)", **row))
        if info.frames == 0:
            problems.append(Problem(name, "audio file is empty (0 samples)", **row))
        if expected_sample_rate is not None and info.samplerate != expected_sample_rate:
            problems.append(Problem(name, f"sample rate is {info.samplerate} Hz; expected {expected_sample_rate} Hz",
                                    **row))
        actual = info.frames / info.samplerate if info.samplerate else 0.0
        if info.frames and stated[i] > 0 and abs(stated[i] - actual) > DURATION_TOLERANCE_S:
            problems.append(Problem(name, f"the audio file {rel} lasts {actual:.3f} s; expected duration_s within "
                                          f"{DURATION_TOLERANCE_S} s of it (or leave it empty)",
                                    row=i + 1, column="duration_s", value=df.at[i, "duration_s"]))
    return rates


def _check_speakers(df: pd.DataFrame, name: str, problems: list[Problem]) -> None:
    """Warn when a training speaker is also in dev or test: those scores then measure voices already heard."""
    train = set(df.loc[df["split"] == "train", "speaker"])
    for split in ("dev", "test"):
        shared = sorted(train & set(df.loc[df["split"] == split, "speaker"]))
        if shared:
            shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
            problems.append(Problem(name, f"{len(shared)} speaker(s) are in both train and {split} ({shown}); "
                                          f"{split} scores then include voices seen in training",
                                    column="speaker", kind="notice"))


def validate_manifest(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    check_audio: bool = True,
    require_splits: Sequence[str] = SPLITS,
    expected_sample_rate: int | None = EXPECTED_SAMPLE_RATE,
    sample_rates: Counter | None = None,
    task: TaskSpec | None = None,
    include_notices: bool = False,
) -> list[Problem]:
    """Check a manifest CSV and return every problem found (none with kind "error": valid).

    include_notices: also return problems of kind "notice" (a speaker in train and in dev or test),
    which never make the manifest invalid; `warn_problems` reports them as warnings.

    modality: "multi" also requires non-empty transcripts (and is the value of a `modality` stratum part).
    check_audio: open every audio file (present, decodable, mono, non-empty, `expected_sample_rate` Hz unless
    None). require_splits: splits that must have rows. sample_rates: if given, filled with {rate_hz: file_count}.
    task: what the config declares about labels, attribute and stratum (default: the paper's task).
    """
    if modality is not None and modality not in MODALITIES:
        raise ManifestError(f"modality {modality!r} is not allowed; expected one of {', '.join(MODALITIES)}")
    path = Path(path)
    name = str(path)
    problems: list[Problem] = []
    df = _load_csv(path, problems)
    if df is None:
        return problems
    spec = task or TaskSpec()
    required = required_columns(spec)
    missing = [c for c in required if c not in df.columns]
    for col in missing:
        problems.append(Problem(name, f"required column is missing (header has: {', '.join(df.columns)}; "
                                      f"required: {', '.join(required)})", column=col))
    if missing:
        return problems
    if len(df) == 0:
        problems.append(Problem(name, "manifest has a header but no rows"))
        return problems
    resolved: Task | None = None
    try:
        resolved = spec.resolve(df[df["split"].isin(SPLITS)], file=name, modality=modality)
    except TaskError as err:
        problems.append(Problem(name, err.message, column=err.column, value=err.value))
    _check_rows(df, name, modality, resolved, problems)
    _check_splits(df, name, require_splits, problems)
    if include_notices:
        _check_speakers(df, name, problems)
    # Coverage problems would only echo a bad split/attribute/stratum value already reported by row.
    if resolved is not None and not any(p.row is not None and p.column in ("split", resolved.attribute, *resolved.stratum)
                                        for p in problems):
        _check_coverage(df, name, resolved, modality, problems)
    if check_audio:
        rates = _check_audio(df, path, name, expected_sample_rate, problems)
        if sample_rates is not None:
            sample_rates.update(rates)
    return problems


def warn_problems(problems: Sequence[Problem]) -> list[Problem]:
    """Issue an ErmgapWarning for each notice among `problems`; return the others (errors, warnings)."""
    for p in problems:
        if p.kind == "notice":
            warnings.warn(p.describe(), ErmgapWarning, stacklevel=2)
    return [p for p in problems if p.kind != "notice"]


def required_columns(spec: TaskSpec) -> list[str]:
    """The header a manifest needs for `spec`: the base columns and the task's (canonical order first)."""
    needed = set(BASE_COLUMNS) | {c for c in spec.columns if c != RUN_MODALITY}
    cols = [c for c in REQUIRED_COLUMNS if c in needed]
    return cols + [c for c in spec.columns if c in needed and c not in cols]


def format_problems(problems: Sequence[Problem], limit: int | None = None, *, with_file: bool = False) -> str:
    """One line per problem (at most `limit`, then a count of the rest); the caller names the file."""
    shown = problems if limit is None else problems[:limit]
    lines = [f"  - {p.describe(with_file=with_file)}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def read_manifest(
    path: str | os.PathLike,
    *,
    check_audio: bool = False,
    modality: str | None = None,
    require_splits: Sequence[str] = SPLITS,
    task: TaskSpec | None = None,
    allow_warnings: bool = False,
) -> pd.DataFrame:
    """Read and validate a manifest; raises ManifestError listing all problems.

    Returns the rows as a DataFrame of strings (duration_s as float when present) with an added
    column `audio_path`: the absolute path of each audio file. Sample rates other than 16 kHz are
    not an error here (load_audio resamples); `ermgap data validate` reports them. With
    `allow_warnings`, coverage warnings are logged instead of raised (training: a stratum whose gap is
    undefined is left out of the objective).
    """
    problems = warn_problems(validate_manifest(path, modality=modality, check_audio=check_audio,
                                 require_splits=require_splits, expected_sample_rate=None, task=task,
                                               include_notices=True))
    if allow_warnings:
        for p in problems:
            if p.kind == "warning":
                log.warning("%s", p)
        problems = [p for p in problems if p.kind != "warning"]
    if problems:
        raise ManifestError(f"manifest {path} has {len(problems)} problem(s):\n{format_problems(problems, 50)}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    base = Path(path).resolve().parent
    df["audio_path"] = [a if os.path.isabs(a) else str(base / a) for a in df["audio"]]
    if "duration_s" in df.columns:
        df["duration_s"] = pd.to_numeric(df["duration_s"], errors="coerce")
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the canonical columns first (then any extras) as UTF-8 CSV; the caller handles atomicity."""
    cols = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in df.columns]
    cols += [c for c in df.columns if c not in cols and c != "audio_path"]
    df[cols].to_csv(path, index=False, encoding="utf-8")
    return Path(path)
