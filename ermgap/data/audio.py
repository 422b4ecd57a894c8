"""Audio I/O for manifests: header inspection and mono float32 loading at a target sample rate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import gcd

import numpy as np
import soundfile as sf

from ermgap.errors import ManifestError


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: sample rate (Hz), channel count, length in frames and seconds."""

    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read the header of `path`; ManifestError if it is missing or not a decodable audio file."""

    if not os.path.isfile(path):
        raise ManifestError(f"audio file {path} does not exist")
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises LibsndfileError/RuntimeError for anything it cannot parse
        raise ManifestError(f"audio file {path} cannot be decoded ({_short(err)})") from None
    return AudioInfo(sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames))


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling of a 1-D float signal from `orig_sr` to `target_sr` (Hz); float32 out."""
    if orig_sr == target_sr:
        return x.astype(np.float32, copy=False)

    g = gcd(orig_sr, target_sr)
    from scipy.signal import resample_poly  # only when resampling: scipy.signal costs ~1 s of every import

    return resample_poly(x, target_sr // g, orig_sr // g).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Load `path` as a mono float32 array in [-1, 1] at `sample_rate` Hz, shape [num_samples].

    Raises ManifestError (naming the file) when it is missing, cannot be decoded, has more than
    one channel, holds no samples or holds NaN / infinite samples. Other sample rates are resampled.
    """

    info = audio_info(path)
    if info.channels != 1:
        raise ManifestError(f"audio file {path} has {info.channels} channels; expected mono (1 channel)")
    if info.frames == 0:
        raise ManifestError(f"audio file {path} is empty (0 samples)")
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as err:
        raise ManifestError(f"audio file {path} cannot be decoded ({_short(err)})") from None
    if x.size == 0:
        raise ManifestError(f"audio file {path} is empty (0 samples)")
    bad = int(x.size - np.isfinite(x).sum())
    if bad:  # float WAVs can hold them; the features and every score would silently become NaN
        raise ManifestError(f"audio file {path} has {bad} NaN or infinite sample(s); expected finite samples in [-1, 1]")
    return resample(x, int(sr), sample_rate)


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
