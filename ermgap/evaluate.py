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
from ermgap.labels import INVALID
from ermgap.task import DEFAULT_TASK, LABEL_COLUMN, Task, TaskSpec


def base_columns(task: Task = DEFAULT_TASK) -> tuple[str, ...]:
    """PREDS.csv's leading columns: utt_id, the stratum columns, the attribute, gold, pred, valid, modality
    (utt_id, language, gender, ... for the paper's task)."""
    strata = tuple(c for c in task.stratum if c != "modality")
    return tuple(dict.fromkeys(("utt_id", *strata, task.attribute, "gold", "pred", "valid", "modality")))


def score_columns(task: Task = DEFAULT_TASK) -> tuple[str, ...]:
    """One `score_<label>` column per label, in the task's order."""
    return tuple(f"score_{lab}" for lab in task.labels)


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


def predictions_frame(utt_ids, strata, attributes, gold, pred, scores=None, valid=None, modality=None,
                      answers=None, *, task: Task = DEFAULT_TASK, columns: dict | None = None) -> pd.DataFrame:
    """PREDS.csv rows: utt_id, <stratum>, <attribute>, gold, pred, valid, modality[, score_<label>...][, answer]
    (stratum `language` and attribute `gender` in the paper's task).

    `strata` / `attributes` / `gold` / `pred` may be strings or indices (task.stratum_values,
    task.attribute_values, task.labels; a negative pred index means INVALID). `scores`: array-like [N, K] in
    label order or None. `valid` defaults to pred != INVALID; `modality` is one string for all rows or one per
    row. A stratum of several columns is given as `columns` {column: values} instead of `strata`.
    """
    preds = _names(pred, task.labels, "pred", allow_invalid=True)
    n = len(preds)
    df = pd.DataFrame({"utt_id": [str(u) for u in utt_ids]})
    if columns is not None:
        for col, values in columns.items():
            df[col] = [str(v) for v in values]
    else:
        df[task.stratum[0]] = _names(strata, task.stratum_values, task.stratum[0])
    df[task.attribute] = _names(attributes, task.attribute_values, task.attribute)
    df["gold"] = _names(gold, task.labels, "gold")
    df["pred"] = preds
    df["valid"] = [p != INVALID for p in preds] if valid is None else [bool(v) for v in valid]
    if modality is None or isinstance(modality, str):
        df["modality"] = [modality or ""] * n
    else:
        df["modality"] = list(modality)
    if scores is not None:
        arr = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
        if arr.shape != (n, task.num_labels):
            raise ValueError(f"scores must have shape ({n}, {task.num_labels}), got {arr.shape}")
        for j, col in enumerate(score_columns(task)):
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


def check_replaceable_predictions(out: str | os.PathLike, force: bool) -> Path:
    """Before writing PREDS.csv at `out`: OutputExistsError if it exists without `force`; with `force`,
    ConfigError unless it is a predictions file (a header with utt_id, gold and pred): --force replaces a
    predictions file with a predictions file, never a manifest or a folder."""
    out = Path(out)
    if not out.exists():
        return out
    if not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory, not a predictions file: --force only replaces a predictions "
                          "file with a predictions file; give a file name (e.g. preds.csv)")
    with open(out, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    if not {"utt_id", "gold", "pred"} <= set(header):
        shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "") or "none"
        raise ConfigError(f"--out {out} is not a predictions file (its header: {shown}; a predictions file has "
                          "utt_id, gold and pred columns): --force only replaces a predictions file with a "
                          f"predictions file; choose another --out or remove {out} yourself")
    return out


def evaluate_rows(backend, rows: pd.DataFrame, out: str | os.PathLike, *, modality: str, batch_size: int = 8,
                  force: bool = False, restart: bool = False, run_info: dict | None = None,
                  progress: bool = True, task: Task = DEFAULT_TASK) -> pd.DataFrame:
    """Predict every manifest row with `backend` and write PREDS.csv to `out`; returns the final frame.

    `task` names the columns (its stratum and attribute) and the label order of the score columns; it must
    be the backend's.

    Resumes from `<out>.partial` when its recorded `run_info` (model, split, modality, mode...) matches;
    `restart=True` discards it. Raises OutputExistsError if `out` exists and not `force`.
    """
    out = check_replaceable_predictions(out, force)
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    partial, meta_path = _partial_paths(out)
    info = {"modality": modality, **(run_info or {})}
    columns = list(base_columns(task)) + (list(score_columns(task)) if backend.has_scores else ["answer"])
    strata = [c for c in task.stratum if c != "modality"]
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
                    [r["utt_id"] for r in chunk], None, [r[task.attribute] for r in chunk],
                    [r[LABEL_COLUMN] for r in chunk], [p.pred for p in preds],
                    scores=[p.scores for p in preds] if backend.has_scores else None,
                    modality=modality, answers=None if backend.has_scores else [p.answer for p in preds],
                    task=task, columns={c: [r[c] for r in chunk] for c in strata})
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


def load_split(manifest: str | os.PathLike, split: str, *, modality: str, limit: int | None = None,
               cfg=None) -> pd.DataFrame:
    """The validated manifest rows of one split (first `limit` rows when given); `cfg` (a RunConfig) declares
    the task (default: the paper's)."""
    rows, _ = load_split_and_task(manifest, split, modality=modality, limit=limit, cfg=cfg)
    return rows


def load_split_and_task(manifest: str | os.PathLike, split: str, *, modality: str, limit: int | None = None,
                        cfg=None) -> tuple[pd.DataFrame, Task]:
    """`load_split` and the Task resolved on the whole manifest (so class indices match training's)."""

    spec = TaskSpec.from_config(cfg) if cfg is not None else TaskSpec()
    df = read_manifest(manifest, modality=modality, require_splits=(split,), task=spec)
    task = spec.resolve(df, file=str(manifest), modality=modality)
    rows = df[df["split"] == split].reset_index(drop=True)
    return (rows.head(limit) if limit else rows), task


def summary(df: pd.DataFrame) -> dict:
    """n, accuracy and invalid rate of a predictions frame (the full metrics live in ermgap.metrics)."""
    valid = df["valid"].astype(str).str.lower().isin({"true", "1"})
    return {"n": int(len(df)), "acc": float((df["gold"] == df["pred"]).mean()) if len(df) else float("nan"),
            "invalid_rate": float(1 - valid.mean()) if len(df) else float("nan")}
