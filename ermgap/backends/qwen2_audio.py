"""Qwen2-Audio (hub id or local directory, optionally with a peft adapter) as a prediction backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ermgap.backends import Prediction
from ermgap.backends.local import LocalBackend
from ermgap.batching import EmotionCollator, audio_token_count, compute_features, pad_ids, to_device
from ermgap.config import ModelConfig, PromptConfig
from ermgap.data.audio import load_audio
from ermgap.prompts import END_OF_TURN, answer_token_ids, parse_answer, user_turn
from ermgap.scoring import generate, score_labels


class Qwen2AudioBackend(LocalBackend):
    """Label scoring (`mode="score"`, always a valid label, one score per label) or greedy generation + parser.

    `predict` builds its batches with the training collator (so evaluation sees the training prompts);
    `score_chat` / `generate_chat` take any instruction text and answer set (what `ermgap serve` needs).
    """

    def __init__(self, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, **options):
        super().__init__(model_cfg, prompt_cfg, modality=modality, **options)
        self.collator = EmotionCollator(self.processor, prompt_cfg, modality, sample_rate=self.sample_rate,
                                        task=self.task)

    def for_modality(self, modality: str):
        clone = super().for_modality(modality)
        clone.collator = EmotionCollator(self.processor, self.prompt_cfg, modality, sample_rate=self.sample_rate,
                                         task=self.task)
        return clone

    def predict(self, rows: list[dict]) -> list[Prediction]:

        examples = [{**row, "emotion": None, "audio": load_audio(row["audio_path"], self.sample_rate)} for row in rows]
        batch = to_device(self.collator(examples), self.device)
        with torch.no_grad():
            if self.mode == "score":
                scores = score_labels(self.model, batch).float().cpu()
                return [Prediction(self.task.labels[int(s.argmax())], tuple(float(v) for v in s)) for s in scores]
            texts = generate(self.model, batch, self.processor.tokenizer, max_new_tokens=self.max_new_tokens)
        return [Prediction(parse_answer(t, self.task.answer_of), None, t) for t in texts]

    # ------------------------------------------------------------------ free-form chat (ermgap serve)

    def chat_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str] = ()) -> dict:
        """Left-padded prompts (one user turn: audio, then `texts[i]`) with audio features, and the answer
        strings' token ids (+ `<|im_end|>`), in the batch layout `score_labels` and `generate` read."""
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
