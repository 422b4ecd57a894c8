"""A torch Dataset over manifest rows: audio loaded lazily, resampled, optionally cropped."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from ermgap.data.audio import audio_info, load_audio


class UtteranceDataset(Dataset):
    """Rows of a validated manifest (from `read_manifest`, which adds `audio_path`).

    `__getitem__(i)` returns dict(utt_id, language, gender, emotion, transcript, speaker (those the manifest has),
    the `extra_columns` (a task's attribute / stratum columns),
    audio: float32 array [num_samples] at `sample_rate` Hz, cropped to `max_audio_s` seconds).
    `.lengths[i]` is the row's length in samples at `sample_rate` (after cropping), taken from
    `duration_s` when present, otherwise from the file header: for length-grouped batching.
    """

    def __init__(self, df: pd.DataFrame, sample_rate: int = 16000, max_audio_s: float | None = None,
                 extra_columns: tuple[str, ...] = ()):
        if "audio_path" not in df.columns:
            raise ValueError("UtteranceDataset needs the `audio_path` column added by read_manifest()")
        self.df = df.reset_index(drop=True)
        # A task's attribute / stratum columns beyond language and gender (e.g. age_group) travel too.
        self.extra_columns = tuple(c for c in extra_columns if c in df.columns and c not in self._BASE)
        self.sample_rate = sample_rate
        self.max_samples = None if max_audio_s is None else int(round(max_audio_s * sample_rate))
        self.lengths = [self._length(i) for i in range(len(self.df))]

    def _length(self, i: int) -> int:
        dur = self.df.at[i, "duration_s"] if "duration_s" in self.df.columns else None
        if dur is None or not isinstance(dur, (int, float)) or not math.isfinite(dur):
            dur = audio_info(self.df.at[i, "audio_path"]).duration_s
        n = int(round(float(dur) * self.sample_rate))
        return n if self.max_samples is None else min(n, self.max_samples)

    _BASE = ("utt_id", "language", "gender", "emotion", "transcript", "speaker")

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict:
        row = self.df.iloc[i]
        audio: np.ndarray = load_audio(row["audio_path"], self.sample_rate)
        if self.max_samples is not None:
            audio = audio[: self.max_samples]
        item = {c: row[c] for c in self._BASE if c in row.index}
        item.update({c: row[c] for c in self.extra_columns})
        item["audio"] = audio
        return item
