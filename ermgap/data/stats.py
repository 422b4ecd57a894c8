"""Corpus statistics: the paper's Table 1 (language × gender × split counts with totals) and the
emotion distribution per language and gender. Plain functions over a manifest DataFrame."""

from __future__ import annotations

import pandas as pd

from ermgap.labels import EMOTIONS, GENDERS, LANGUAGE_NAMES, SPLITS

# Table 1 lists English, Japanese, German in this order.
PAPER_LANGUAGE_ORDER = ("eng", "jpn", "deu")
OVERALL = "Overall"
TOTAL = "Total"


def _languages(df: pd.DataFrame) -> list[str]:
    present = set(df["language"])
    return [lang for lang in PAPER_LANGUAGE_ORDER if lang in present] + sorted(present - set(PAPER_LANGUAGE_ORDER))


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """Counts indexed by (language, gender) with gender in F, M, Total and a final 'Overall' language;
    columns train, dev, test, total (ints). Matches the paper's Table 1 layout."""
    rows = []
    for lang in [*_languages(df), OVERALL]:
        part = df if lang == OVERALL else df[df["language"] == lang]
        for gender in [*GENDERS, TOTAL]:
            cell = part if gender == TOTAL else part[part["gender"] == gender]
            counts = {split: int((cell["split"] == split).sum()) for split in SPLITS}
            rows.append({"language": lang, "gender": gender, **counts, "total": sum(counts.values())})
    return pd.DataFrame(rows).set_index(["language", "gender"])


def emotion_distribution(df: pd.DataFrame, *, split: str | None = None) -> pd.DataFrame:
    """Counts indexed by (language, gender) (all splits, or one `split`), columns EMOTIONS + total."""
    part = df if split is None else df[df["split"] == split]
    rows = []
    for lang in _languages(df):
        for gender in GENDERS:
            cell = part[(part["language"] == lang) & (part["gender"] == gender)]
            counts = {e: int((cell["emotion"] == e).sum()) for e in EMOTIONS}
            rows.append({"language": lang, "gender": gender, **counts, "total": sum(counts.values())})
    return pd.DataFrame(rows).set_index(["language", "gender"])


def corpus_stats(df: pd.DataFrame) -> dict:
    """Everything `ermgap data stats --json` prints: {"num_utterances", "num_speakers",
    "table1": {lang: {gender: {split: n, "total": n}}}, "emotions": {lang: {gender: {emotion: n}}},
    "total_duration_s" (when the manifest has duration_s)}."""
    t1 = table1(df)
    em = emotion_distribution(df)
    out: dict = {
        "num_utterances": int(len(df)),
        "num_speakers": {g: int(df.loc[df["gender"] == g, "speaker"].nunique()) for g in GENDERS},
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
