"""Qwen2-Audio (hub id or local directory, optionally with a peft adapter) as a prediction backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ermgap.backends import Prediction
from ermgap.config import ModelConfig, PromptConfig
from ermgap.labels import EMOTIONS


class Qwen2AudioBackend:
    """Label scoring (`mode="score"`, always a valid label, 7 scores) or greedy generation + parser.

    `predict` builds its batches with the training collator (so evaluation sees the training prompts);
    `score_chat` / `generate_chat` take any instruction text and answer set (what `ermgap serve` needs).
    """

    has_scores: bool

    def __init__(self, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, mode: str = "score",
                 device: str = "cpu", adapter: str | None = None, max_new_tokens: int = 16,
                 sample_rate: int = 16000):
        from ermgap.batching import EmotionCollator
        from ermgap.model import load_adapter, load_backbone

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
        from ermgap.batching import to_device
        from ermgap.data.audio import load_audio
        from ermgap.prompts import parse_answer
        from ermgap.scoring import generate, score_labels

        examples = [{**row, "emotion": None, "audio": load_audio(row["audio_path"], self.sample_rate)} for row in rows]
        batch = to_device(self.collator(examples), self.device)
        with torch.no_grad():
            if self.mode == "score":
                scores = score_labels(self.model, batch).float().cpu()
                return [Prediction(EMOTIONS[int(s.argmax())], tuple(float(v) for v in s)) for s in scores]
            texts = generate(self.model, batch, self.processor.tokenizer, max_new_tokens=self.max_new_tokens)
        return [Prediction(parse_answer(t, self.prompt_cfg.verbalizers), None, t) for t in texts]

    # ------------------------------------------------------------------ free-form chat (ermgap serve)

    def chat_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str] = ()) -> dict:
        """Left-padded prompts (one user turn: audio, then `texts[i]`) with audio features, and the answer
        strings' token ids (+ `<|im_end|>`), in the batch layout `score_labels` and `generate` read."""
        from ermgap.batching import audio_token_count, compute_features, pad_ids, to_device
        from ermgap.prompts import END_OF_TURN, answer_token_ids, user_turn

        tok = self.processor.tokenizer
        feats, fmask = compute_features(self.processor.feature_extractor, audios, self.sample_rate)
        audio_token = getattr(self.processor, "audio_token", "<|AUDIO|>")
        prompts = []
        for text, n in zip(texts, audio_token_count(fmask.sum(-1))):
            chat = self.processor.apply_chat_template(user_turn(text), add_generation_prompt=True, tokenize=False)
            prompts.append(tok.encode(chat.replace(audio_token, audio_token * n), add_special_tokens=False))
        batch = {"input_features": feats, "feature_attention_mask": fmask,
                 "prompt_input_ids": pad_ids(prompts, tok.pad_token_id, left=True),
                 "prompt_attention_mask": pad_ids([[1] * len(p) for p in prompts], 0, left=True)}
        if answers:
            seqs = answer_token_ids(tok, answers, tok.convert_tokens_to_ids(END_OF_TURN))
            batch["label_input_ids"] = pad_ids(seqs, tok.pad_token_id, left=False)
            batch["label_attention_mask"] = pad_ids([[1] * len(s) for s in seqs], 0, left=False)
        return to_device(batch, self.device)

    def score_chat(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Summed log-probability of each answer (+ terminator) after each prompt → Tensor[B, len(answers)]."""
        from ermgap.scoring import score_labels

        with torch.no_grad():
            return score_labels(self.model, self.chat_batch(audios, texts, answers)).float().cpu()

    def generate_chat(self, audios: Sequence[np.ndarray], texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to each prompt (special tokens removed)."""
        from ermgap.scoring import generate

        with torch.no_grad():
            return generate(self.model, self.chat_batch(audios, texts), self.processor.tokenizer,
                            max_new_tokens=max_new_tokens)
