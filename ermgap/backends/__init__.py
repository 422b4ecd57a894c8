"""Zero-shot / fine-tuned prediction backends behind one small interface.

A backend turns a list of manifest rows (dicts with utt_id, language, gender, emotion, transcript,
audio_path) into one `Prediction` per row, in order. `ermgap.evaluate` drives it in batches,
writes PREDS.csv and handles resume; backends only predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ermgap.errors import ErmgapError
from ermgap.labels import INVALID


class BackendError(ErmgapError):
    """A backend cannot go on (server unreachable after retries, authentication refused, ...)."""


@dataclass(frozen=True)
class Prediction:
    """One utterance's answer: an emotion or "invalid", the 7 label scores when the backend has them,
    and the raw text for free generation."""

    pred: str
    scores: tuple[float, ...] | None = None
    answer: str | None = None

    @property
    def valid(self) -> bool:

        return self.pred != INVALID


class Backend(Protocol):
    name: str
    has_scores: bool

    def predict(self, rows: list[dict]) -> list[Prediction]: ...


__all__ = ["Backend", "BackendError", "Prediction"]
