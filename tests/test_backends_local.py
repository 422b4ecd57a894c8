"""Local backends switch modality without reloading the weights: the switched copy predicts exactly what a
freshly loaded backend in that modality predicts, and the original keeps its own."""

from __future__ import annotations

import numpy as np

from ermgap.backends.qwen2_audio import Qwen2AudioBackend
from ermgap.config import ModelConfig, PromptConfig
from ermgap.evaluate import load_split


def test_for_modality_equals_a_fresh_backend(tiny_model, synth_corpus):
    rows = load_split(synth_corpus, "test", modality="multi", limit=4).to_dict("records")
    cfg = ModelConfig(name_or_path=str(tiny_model))
    uni = Qwen2AudioBackend(cfg, PromptConfig(), modality="uni")
    multi = uni.for_modality("multi")
    assert multi.model is uni.model
    fresh = Qwen2AudioBackend(cfg, PromptConfig(), modality="multi")
    got, want = [p.scores for p in multi.predict(rows)], [p.scores for p in fresh.predict(rows)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the transcript changes the prompt, so uni scores differ: the original was not switched along
    assert np.abs(np.array([p.scores for p in uni.predict(rows)]) - np.array(want)).max() > 1e-3
