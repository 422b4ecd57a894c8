"""Predictions on a manifest split → PREDS.csv (the metrics module's input), resumable and atomic.

    ermgap evaluate --model runs/tiny --manifest data/synth/manifest.csv --split test \\
        --modality uni --mode score --out preds.csv

Rows are predicted in batches by a backend (`ermgap.backends`). After every batch the new rows are
appended to `<out>.partial` (complete lines, flushed); a rerun with the same settings skips the
utterances already there. When every row is done, the final CSV is written atomically and the partial
file is removed, so `out` is either absent or complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ermgap.data.manifest import read_manifest
from ermgap.errors import ConfigError, OutputExistsError
from ermgap.io import atomic_path
from ermgap.labels import EMOTIONS, GENDERS, INVALID, LANGUAGES

BASE_COLUMNS = ("utt_id", "language", "gender", "gold", "pred", "valid", "modality")
SCORE_COLUMNS = tuple(f"score_{e}" for e in EMOTIONS)


def _names(values: Sequence, vocab: Sequence[str], what: str, allow_invalid: bool = False) -> list[str]:
    """Strings as given, or indices into `vocab` (-1 → INVALID when allowed)."""
    out = []
    for v in (values.tolist() if hasattr(values, "tolist") else values):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if allow_invalid and v < 0:
                out.append(INVALID)
            elif 0 <= v < len(vocab):
                out.append(vocab[v])
            else:
                raise ValueError(f"{what} index {v} is out of range for {list(vocab)}")
        else:
            out.append(str(v))
    return out


def predictions_frame(utt_ids, languages, genders, gold, pred, scores=None, valid=None, modality=None,
                      answers=None) -> pd.DataFrame:
    """PREDS.csv rows: utt_id, language, gender, gold, pred, valid, modality[, score_<emotion>...][, answer].

    `languages` / `genders` / `gold` / `pred` may be strings or indices (LANGUAGES, GENDERS, EMOTIONS;
    a negative pred index means INVALID). `scores`: array-like [N, 7] in EMOTIONS order or None.
    `valid` defaults to pred != INVALID; `modality` is one string for all rows or one per row.
    """
    preds = _names(pred, EMOTIONS, "pred", allow_invalid=True)
    n = len(preds)
    df = pd.DataFrame({
        "utt_id": [str(u) for u in utt_ids],
        "language": _names(languages, LANGUAGES, "language"),
        "gender": _names(genders, GENDERS, "gender"),
        "gold": _names(gold, EMOTIONS, "gold"),
        "pred": preds,
    })
    df["valid"] = [p != INVALID for p in preds] if valid is None else [bool(v) for v in valid]
    if modality is None or isinstance(modality, str):
        df["modality"] = [modality or ""] * n
    else:
        df["modality"] = list(modality)
    if scores is not None:
        arr = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
        if arr.shape != (n, len(EMOTIONS)):
            raise ValueError(f"scores must have shape ({n}, {len(EMOTIONS)}), got {arr.shape}")
        for j, col in enumerate(SCORE_COLUMNS):
            df[col] = arr[:, j]
    if answers is not None:
        df["answer"] = [("" if a is None else str(a)) for a in answers]
    return df


# --------------------------------------------------------------------------- resumable driver


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def _read_partial(path: Path, columns: list[str]) -> pd.DataFrame:
    """Rows of a partial CSV, ignoring a last line cut off by an interruption."""
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if not text.strip():
        return pd.DataFrame(columns=columns)
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    if list(df.columns) != columns:
        raise ConfigError(f"{path}: its columns {list(df.columns)} do not match this run's {columns}; "
                          "delete it (or pass --restart) to start over")
    return df


def _csv_lines(df: pd.DataFrame, header: bool) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, header=header, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue()


def evaluate_rows(backend, rows: pd.DataFrame, out: str | os.PathLike, *, modality: str, batch_size: int = 8,
                  force: bool = False, restart: bool = False, run_info: dict | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Predict every manifest row with `backend` and write PREDS.csv to `out`; returns the final frame.

    Resumes from `<out>.partial` when its recorded `run_info` (model, split, modality, mode...) matches;
    `restart=True` discards it. Raises OutputExistsError if `out` exists and not `force`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    partial, meta_path = _partial_paths(out)
    info = {"modality": modality, **(run_info or {})}
    columns = list(BASE_COLUMNS) + (list(SCORE_COLUMNS) if backend.has_scores else ["answer"])
    done = pd.DataFrame(columns=columns)
    if restart:
        partial.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    if partial.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None
        if old != info:
            raise ConfigError(f"{partial} was written by a different run ({old}); this run is {info}. "
                              "Pass --restart to discard it, or rerun with the same settings to resume")
        done = _read_partial(partial, columns)
    todo = rows[~rows["utt_id"].astype(str).isin(set(done["utt_id"]))]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists() or partial.stat().st_size == 0:
        meta_path.write_text(json.dumps(info), encoding="utf-8")
        partial.write_text(_csv_lines(pd.DataFrame(columns=columns), header=True), encoding="utf-8")
    elif partial.read_text(encoding="utf-8")[-1:] != "\n":  # drop a torn last line before appending
        text = partial.read_text(encoding="utf-8")
        partial.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")

    records = todo.to_dict("records")
    t0, n_new = time.perf_counter(), 0
    bar = _progress(progress, total=len(rows), done=len(rows) - len(records), name=getattr(backend, "name", ""))
    with bar as (update, _):
        with partial.open("a", encoding="utf-8") as fh:
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                preds = backend.predict(chunk)
                frame = predictions_frame(
                    [r["utt_id"] for r in chunk], [r["language"] for r in chunk], [r["gender"] for r in chunk],
                    [r["emotion"] for r in chunk], [p.pred for p in preds],
                    scores=[p.scores for p in preds] if backend.has_scores else None,
                    modality=modality, answers=None if backend.has_scores else [p.answer for p in preds])
                fh.write(_csv_lines(frame[columns], header=False))
                fh.flush()
                os.fsync(fh.fileno())
                n_new += len(chunk)
                update(len(chunk), n_new / max(time.perf_counter() - t0, 1e-9))
    final = _read_partial(partial, columns)
    order = {u: i for i, u in enumerate(rows["utt_id"].astype(str))}
    final = final[final["utt_id"].isin(order)].drop_duplicates("utt_id", keep="last")
    final = final.sort_values("utt_id", key=lambda s: s.map(order)).reset_index(drop=True)
    with atomic_path(out, force=force) as tmp:
        final.to_csv(tmp, index=False, lineterminator="\n")
    partial.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    return final


class _progress:
    """A rich progress bar with utterances/s (or a no-op), yielding update(n, rate)."""

    def __init__(self, enabled: bool, *, total: int, done: int, name: str):
        self.enabled, self.total, self.done, self.name = enabled, total, done, name

    def __enter__(self):
        if not self.enabled:
            return (lambda n, rate: None), None

        self.bar = Progress(TextColumn("[bold]evaluate[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.name, total=self.total, completed=self.done, rate="")

        def update(n: int, rate: float) -> None:
            self.bar.update(task, advance=n, rate=f"{rate:.1f} utt/s")

        return update, self.bar

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


def load_split(manifest: str | os.PathLike, split: str, *, modality: str, limit: int | None = None) -> pd.DataFrame:
    """The validated manifest rows of one split (first `limit` rows when given)."""

    df = read_manifest(manifest, modality=modality, require_splits=(split,))
    rows = df[df["split"] == split].reset_index(drop=True)
    return rows.head(limit) if limit else rows


def summary(df: pd.DataFrame) -> dict:
    """n, accuracy and invalid rate of a predictions frame (the full metrics live in ermgap.metrics)."""
    valid = df["valid"].astype(str).str.lower().isin({"true", "1"})
    return {"n": int(len(df)), "acc": float((df["gold"] == df["pred"]).mean()) if len(df) else float("nan"),
            "invalid_rate": float(1 - valid.mean()) if len(df) else float("nan")}
