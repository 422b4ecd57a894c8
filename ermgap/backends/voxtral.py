"""Voxtral (Voxtral-Mini-3B-2507 or a local directory, optionally with a peft adapter) as a prediction backend.

    ermgap evaluate --backend voxtral --model mistralai/Voxtral-Mini-3B-2507 --mode score ...

Loaded through transformers' `VoxtralForConditionalGeneration` and `AutoProcessor` (for the hub
checkpoint the processor's tokenizer is mistral-common's Tekken: `pip install mistral-common`). The prompt
is Voxtral's instruct format for one user turn with audio then text, built from token ids so it is the
same for the Tekken tokenizer and the tiny local one (`ermgap model tiny --arch voxtral`):

    <s> [INST] [BEGIN_AUDIO] [AUDIO] × (12.5 per second, whole chunks) {instruction} [/INST]

Audio is padded to a whole number of encoder chunks (30 s for the real model), as VoxtralProcessor does;
each chunk becomes `max_source_positions · d_model / intermediate_size` audio tokens (375 for 30 s).
An answer is the verbaliser's tokens followed by `</s>`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import VoxtralForConditionalGeneration

from ermgap.backends import Prediction
from ermgap.backends.local import LocalBackend
from ermgap.batching import pad_ids, to_device
from ermgap.config import ModelConfig, PromptConfig
from ermgap.data.audio import load_audio
from ermgap.errors import ConfigError
from ermgap.prompts import answer_token_ids, instruction_text, parse_answer


class VoxtralBackend(LocalBackend):
    """Label scoring (`mode="score"`: one forward for all verbalisers) or greedy generation + parser."""

    model_class = VoxtralForConditionalGeneration

    def __init__(self, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, **options):
        super().__init__(model_cfg, prompt_cfg, modality=modality, **options)
        model = self.model
        if model.config.model_type != "voxtral":
            raise ConfigError(f"{self.name}: model_type {model.config.model_type!r} is not a Voxtral checkpoint")
        enc = model.config.audio_config
        self.tokens_per_chunk = enc.max_source_positions * enc.hidden_size // enc.intermediate_size
        self.ids = {t: self._token_id(t) for t in ("[INST]", "[/INST]", "[BEGIN_AUDIO]")}
        self.audio_id = model.config.audio_token_id

    def _token_id(self, token: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id:
            raise ConfigError(f"{self.name}: the tokenizer has no {token} token; not a Voxtral instruct tokenizer")
        return int(i)

    def audio_chunks(self, audio: np.ndarray) -> torch.Tensor:
        """Log-mel features of one clip padded to whole chunks → FloatTensor[n_chunks, mels, frames_per_chunk]."""
        fe = self.processor.feature_extractor
        if self.sample_rate != fe.sampling_rate:
            raise ConfigError(f"data.sample_rate is {self.sample_rate} Hz but the model's feature extractor expects "
                              f"{fe.sampling_rate} Hz")
        feats = fe(np.asarray(audio, dtype=np.float32), sampling_rate=self.sample_rate, padding=True,
                   truncation=False, pad_to_multiple_of=fe.n_samples, return_tensors="pt")["input_features"]
        return feats.reshape(fe.feature_size, -1, fe.nb_max_frames).transpose(0, 1).float()

    def prompt_ids(self, text: str, n_chunks: int) -> list[int]:
        """The instruct-format token ids of one user turn: audio (`n_chunks` chunks) then `text`."""
        return ([self.tokenizer.bos_token_id, self.ids["[INST]"], self.ids["[BEGIN_AUDIO]"]]
                + [self.audio_id] * (n_chunks * self.tokens_per_chunk)
                + list(self.tokenizer.encode(text, add_special_tokens=False)) + [self.ids["[/INST]"]])

    def chat_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str] = ()) -> dict:
        """Left-padded prompts and audio chunks (+ the answers' token ids and `</s>`) in the layout of
        `ermgap.scoring.score_labels` / `generate`."""
        chunks = [self.audio_chunks(a) for a in audios]
        prompts = [self.prompt_ids(t, len(c)) for t, c in zip(texts, chunks)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = {"input_features": torch.cat(chunks),
                 "prompt_input_ids": pad_ids(prompts, pad, left=True),
                 "prompt_attention_mask": pad_ids([[1] * len(p) for p in prompts], 0, left=True)}
        if answers:
            seqs = answer_token_ids(self.tokenizer, answers, self.tokenizer.eos_token_id)
            batch["label_input_ids"] = pad_ids(seqs, pad, left=False)
            batch["label_attention_mask"] = pad_ids([[1] * len(s) for s in seqs], 0, left=False)
        return to_device(batch, self.device)

    def predict(self, rows: list[dict]) -> list[Prediction]:
        audios = [load_audio(r["audio_path"], self.sample_rate) for r in rows]
        texts = [instruction_text(self.prompt_cfg, self.modality, r.get("transcript"), task=self.task) for r in rows]
        if self.mode == "score":
            scores = self.score_chat(audios, texts, list(self.task.verbalizers))
            return [Prediction(self.task.labels[int(s.argmax())], tuple(float(v) for v in s)) for s in scores]
        answers = self.generate_chat(audios, texts, self.max_new_tokens)
        return [Prediction(parse_answer(t, self.task.answer_of), None, t) for t in answers]
