"""What the local transformers backends (qwen2_audio, voxtral) share: loading the model (+ peft adapter) and
answering free-form chat turns by label scoring or greedy generation on the batch their `chat_batch` builds."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from ermgap.config import ModelConfig, PromptConfig
from ermgap.model import load_adapter, load_backbone
from ermgap.prompts import prompt_task
from ermgap.scoring import generate, score_labels
from ermgap.task import Task


class LocalBackend:
    """Base of the local backends. Subclasses set `model_class` (None: Qwen2-Audio) and define
    `chat_batch(audios, texts, answers)` and `predict(rows)`."""

    model_class = None
    has_scores: bool

    def __init__(self, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, mode: str = "score",
                 device: str = "cpu", adapter: str | None = None, max_new_tokens: int = 16,
                 sample_rate: int = 16000, task: Task | None = None):
        self.name = model_cfg.name_or_path
        self.task = prompt_task(prompt_cfg, task)  # labels (score order), answer strings, `{labels}`
        self.mode = mode
        self.has_scores = mode == "score"
        self.modality = modality
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.sample_rate = sample_rate
        self.prompt_cfg = prompt_cfg
        model, processor = load_backbone(model_cfg, device=device, model_class=self.model_class)
        if adapter:
            model = load_adapter(model, adapter).to(device)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def for_modality(self, modality: str):
        """This backend prompting in another modality, sharing the loaded weights (a 7B model loads once)."""
        clone = copy.copy(self)
        clone.modality = modality
        return clone

    def chat_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str] = ()) -> dict:
        raise NotImplementedError

    def score_chat(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Summed log-probability of each answer (+ its terminator) after each prompt → Tensor[B, len(answers)]."""
        with torch.no_grad():
            return score_labels(self.model, self.chat_batch(audios, texts, answers)).float().cpu()

    def generate_chat(self, audios: Sequence[np.ndarray], texts: Sequence[str], max_new_tokens: int,
                      with_counts: bool = False):
        """Greedy answers to each prompt (special tokens removed); with `with_counts` also the generated token
        counts (scoring.generate)."""
        with torch.no_grad():
            return generate(self.model, self.chat_batch(audios, texts), self.tokenizer, max_new_tokens=max_new_tokens,
                            with_counts=with_counts)
