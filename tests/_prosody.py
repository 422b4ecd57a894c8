"""Prosodic/spectral summary features of synthetic utterances, for scikit-learn checks of what the audio carries.

Plain numpy (F0 by autocorrelation, voicing, RMS, zero-crossing rate, spectral centroid, duration): an oracle
independent of the models under test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import soundfile as sf


def prosodic_features(x: np.ndarray, sr: int = 16000) -> np.ndarray:
    """10 statistics of one utterance (float32 [samples]) from 40 ms frames every 10 ms."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    frames = x[np.arange(0, len(x) - n + 1, hop)[:, None] + np.arange(n)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    spec = np.abs(np.fft.rfft(frames * np.hanning(n), 2 * n))
    ac = np.fft.irfft(spec ** 2, 2 * n)[:, :n]  # autocorrelation per frame
    lo, hi = int(sr / 500), int(sr / 60)  # F0 search range 60-500 Hz
    lag = lo + ac[:, lo:hi].argmax(axis=1)
    peak = ac[np.arange(len(lag)), lag] / np.maximum(ac[:, 0], 1e-9)
    active = rms > 0.1 * rms.max()
    voiced = (peak > 0.4) & active
    logf0 = np.log(sr / lag[voiced]) if voiced.any() else np.zeros(1)
    freqs = np.fft.rfftfreq(2 * n, 1 / sr)
    centroid = (spec * freqs).sum(axis=1) / np.maximum(spec.sum(axis=1), 1e-9)
    zcr = (np.abs(np.diff(np.sign(frames), axis=1)) > 0).mean(axis=1)
    return np.array([
        len(x) / sr, np.median(logf0), np.percentile(logf0, 90) - np.percentile(logf0, 10), logf0.std(),
        voiced.mean(), rms[active].std() / max(rms[active].mean(), 1e-9), zcr[active].mean(),
        centroid[active].mean(), centroid[active].std(), active.mean(),
    ])


def features(manifest) -> tuple[pd.DataFrame, np.ndarray]:
    df = pd.read_csv(manifest, keep_default_na=False)
    raw = np.stack([prosodic_features(sf.read(manifest.parent / a, dtype="float32")[0]) for a in df["audio"]])
    # Per-speaker z-scores (standard speaker normalisation in SER): emotion is relative to a voice's baseline.
    norm = np.empty_like(raw)
    for idx in df.groupby("speaker").indices.values():
        norm[idx] = (raw[idx] - raw[idx].mean(0)) / (raw[idx].std(0) + 1e-6)
    return df, np.hstack([raw, norm])
