"""Qwen2-Audio (hub id or local directory, optionally with a peft adapter) as a prediction backend."""

from __future__ import annotations

import torch

from ermgap.backends import Prediction
from ermgap.batching import EmotionCollator, to_device
from ermgap.config import ModelConfig, PromptConfig
from ermgap.data.audio import load_audio
from ermgap.errors import ConfigError
from ermgap.labels import EMOTIONS
from ermgap.model import load_adapter, load_backbone
from ermgap.prompts import parse_answer
from ermgap.scoring import generate, score_labels


class Qwen2AudioBackend:
    """Label scoring (`mode="score"`, always a valid label, 7 scores) or greedy generation + parser."""

    has_scores: bool

    def __init__(self, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, mode: str = "score",
                 device: str = "cpu", adapter: str | None = None, max_new_tokens: int = 16,
                 sample_rate: int = 16000):

        self.name = model_cfg.name_or_path
        self.mode = mode
        self.has_scores = mode == "score"
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.sample_rate = sample_rate
        self.prompt_cfg = prompt_cfg
        model, processor = load_backbone(model_cfg, device=device)
        if adapter:
            model = load_adapter(model, adapter).to(device)
        self.model = model.eval()
        self.processor = processor
        self.collator = EmotionCollator(processor, prompt_cfg, modality, sample_rate=sample_rate)

    def predict(self, rows: list[dict]) -> list[Prediction]:

        examples = [{**row, "emotion": None, "audio": load_audio(row["audio_path"], self.sample_rate)} for row in rows]
        batch = to_device(self.collator(examples), self.device)
        with torch.no_grad():
            if self.mode == "score":
                scores = score_labels(self.model, batch).float().cpu()
                bad = [row["utt_id"] for row, ok in zip(rows, torch.isfinite(scores).all(-1)) if not ok]
                if bad:  # argmax of NaN scores is label 0: it would pass as a confident "neutral"
                    raise ConfigError(f"model {self.name} gave NaN or infinite label scores for utterance(s) "
                                      f"{', '.join(bad[:5])}; in fp16 activations can overflow (try --dtype fp32 "
                                      "or bf16)")
                return [Prediction(EMOTIONS[int(s.argmax())], tuple(float(v) for v in s)) for s in scores]
            texts = generate(self.model, batch, self.processor.tokenizer, max_new_tokens=self.max_new_tokens)
        return [Prediction(parse_answer(t, self.prompt_cfg.verbalizers), None, t) for t in texts]
