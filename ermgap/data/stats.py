"""Corpus statistics: the paper's Table 1 (stratum × attribute × split counts with totals: language × gender
for the paper) and the label distribution per stratum and attribute value. Plain functions over a manifest
DataFrame and its Task (default: the paper's)."""

from __future__ import annotations

import pandas as pd

from ermgap.labels import LANGUAGE_NAMES, SPLITS
from ermgap.task import DEFAULT_TASK, LABEL_COLUMN, Task

# Table 1 lists English, Japanese, German in this order.
PAPER_LANGUAGE_ORDER = ("eng", "jpn", "deu")
OVERALL = "Overall"
TOTAL = "Total"


def _strata(df: pd.DataFrame, task: Task) -> tuple[list[str], pd.Series]:
    """The stratum values present (the paper's language order first, then sorted) and each row's stratum."""
    keys = pd.Series(task.stratum_keys(df), index=df.index, dtype=str)
    present = set(keys)
    ordered = [lang for lang in PAPER_LANGUAGE_ORDER if lang in present] if task.stratum == ("language",) else []
    return ordered + sorted(present - set(ordered)), keys


def table1(df: pd.DataFrame, task: Task = DEFAULT_TASK) -> pd.DataFrame:
    """Counts indexed by (stratum, attribute value) with the values, then Total, and a final 'Overall'
    stratum; columns train, dev, test, total (ints). The paper's Table 1 layout (language × F, M, Total)."""
    strata, keys = _strata(df, task)
    rows = []
    for s in [*strata, OVERALL]:
        part = df if s == OVERALL else df[keys == s]
        for value in [*task.attribute_values, TOTAL]:
            cell = part if value == TOTAL else part[part[task.attribute] == value]
            counts = {split: int((cell["split"] == split).sum()) for split in SPLITS}
            rows.append({task.stratum_name: s, task.attribute: value, **counts, "total": sum(counts.values())})
    return pd.DataFrame(rows).set_index([task.stratum_name, task.attribute])


def emotion_distribution(df: pd.DataFrame, *, split: str | None = None, task: Task = DEFAULT_TASK) -> pd.DataFrame:
    """Counts indexed by (stratum, attribute value) (all splits, or one `split`), columns the labels + total."""
    strata, keys = _strata(df, task)
    part = df if split is None else df[df["split"] == split]
    rows = []
    for s in strata:
        for value in task.attribute_values:
            cell = part[(keys[part.index] == s) & (part[task.attribute] == value)]
            counts = {lab: int((cell[LABEL_COLUMN] == lab).sum()) for lab in task.labels}
            rows.append({task.stratum_name: s, task.attribute: value, **counts, "total": sum(counts.values())})
    return pd.DataFrame(rows).set_index([task.stratum_name, task.attribute])


def corpus_stats(df: pd.DataFrame, task: Task = DEFAULT_TASK) -> dict:
    """Everything `ermgap data stats --json` prints: {"num_utterances", "num_speakers",
    "table1": {stratum: {value: {split: n, "total": n}}}, "emotions": {stratum: {value: {label: n}}},
    "total_duration_s" (when the manifest has duration_s)}."""
    t1 = table1(df, task)
    em = emotion_distribution(df, task=task)
    out: dict = {
        "num_utterances": int(len(df)),
        "num_speakers": {g: int(df.loc[df[task.attribute] == g, "speaker"].nunique()) for g in task.attribute_values},
        "table1": {lang: {g: {k: int(v) for k, v in t1.loc[(lang, g)].items()} for g in t1.loc[lang].index}
                   for lang in t1.index.get_level_values(0).unique()},
        "emotions": {lang: {g: {k: int(v) for k, v in em.loc[(lang, g)].items()} for g in em.loc[lang].index}
                     for lang in em.index.get_level_values(0).unique()},
    }
    if "duration_s" in df.columns:
        out["total_duration_s"] = round(float(pd.to_numeric(df["duration_s"], errors="coerce").sum()), 2)
    return out


def language_label(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
