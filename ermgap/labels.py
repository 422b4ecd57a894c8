"""The label spaces every module agrees on: MELD's 7 emotions, the paper's languages and genders."""

from __future__ import annotations

# Order matters: it is the class index used by training targets, label scores and metrics.
EMOTIONS: tuple[str, ...] = ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise")
EMOTION_INDEX: dict[str, int] = {e: i for i, e in enumerate(EMOTIONS)}

# ISO 639-3 codes, as in the paper's DEU / ENG / JPN rows.
LANGUAGES: tuple[str, ...] = ("deu", "eng", "jpn")
LANGUAGE_NAMES: dict[str, str] = {"deu": "German", "eng": "English", "jpn": "Japanese"}

# Attribute index 0 = F, 1 = M (the objective's `attribute` tensor uses these indices).
GENDERS: tuple[str, ...] = ("F", "M")
GENDER_INDEX: dict[str, int] = {g: i for i, g in enumerate(GENDERS)}

SPLITS: tuple[str, ...] = ("train", "dev", "test")
MODALITIES: tuple[str, ...] = ("uni", "multi")

# Predictions that could not be parsed to a label (free generation) carry this marker.
INVALID = "invalid"
