"""Turning UtteranceDataset examples into Qwen2-Audio model inputs (training and label scoring).

The processor's chat template gives the prompt with one `<|AUDIO|>` placeholder; it is expanded to
as many placeholders as the audio encoder outputs for that utterance (what Qwen2AudioProcessor
does), then the prompt and the answer are tokenized separately and concatenated, so the answer
tokens used in training are exactly the ones label scoring scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ermgap.config import PromptConfig
from ermgap.errors import ConfigError
from ermgap.prompts import label_token_ids, prompt_task, prompt_text
from ermgap.task import LABEL_COLUMN, Task

IGNORE = -100


def audio_token_count(feature_lengths: torch.Tensor | Sequence[int]) -> list[int]:
    """Audio placeholders per utterance from its number of valid mel frames (conv stride 2, then pool 2)."""
    return [(((int(n) - 1) // 2 + 1) - 2) // 2 + 1 for n in feature_lengths]


def compute_features(feature_extractor, audios: Sequence[np.ndarray], sample_rate: int = 16000
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features padded/cropped to the extractor's window: (input_features [N, mels, T], mask [N, T])."""
    if sample_rate != feature_extractor.sampling_rate:
        raise ConfigError(f"data.sample_rate is {sample_rate} Hz but the model's feature extractor expects "
                          f"{feature_extractor.sampling_rate} Hz")
    feats = feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=sample_rate,
                              padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt")
    return feats["input_features"].float(), feats["attention_mask"].long()


def featurize(processor, examples: Sequence[dict], *, batch_size: int = 32) -> list[dict]:
    """Copies of `examples` carrying precomputed `input_features` [mels, T] and `feature_attention_mask` [T].

    Compute once, reuse every epoch: EmotionCollator uses these keys instead of `audio` when present.
    """
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        feats, mask = compute_features(processor.feature_extractor, [ex["audio"] for ex in chunk])
        for i, ex in enumerate(chunk):
            item = {k: v for k, v in ex.items() if k != "audio"}
            item["input_features"], item["feature_attention_mask"] = feats[i], mask[i]
            out.append(item)
    return out


def pad_ids(seqs: Sequence[Sequence[int]], value: int, *, left: bool) -> torch.Tensor:
    """Token-id lists padded with `value` to the longest (on the left or right) → LongTensor[N, L]."""
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + list(s)) if left else (list(s) + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class EmotionCollator:
    """Collate UtteranceDataset items into one batch for training, label scoring and generation.

    Batch layout (B examples, K labels in the task's order; the paper's task: MELD's 7 emotions):

    - ``input_ids`` LongTensor[B, L]: prompt + gold answer (verbaliser tokens + ``<|im_end|>``), RIGHT-padded
      with the tokenizer's pad id.
    - ``attention_mask`` LongTensor[B, L]: 1 on real tokens.
    - ``labels`` LongTensor[B, L]: the answer token ids on answer positions, -100 on prompt, audio and padding.
      Examples whose ``emotion`` is None have no answer: their row is the prompt and labels are all -100.
    - ``input_features`` FloatTensor[B, n_mels, T]: log-mel features padded to the extractor window.
    - ``feature_attention_mask`` LongTensor[B, T]: 1 on valid mel frames.
    - ``prompt_input_ids`` LongTensor[B, Lp]: the prompt only (ends with ``<|im_start|>assistant\\n``), LEFT-padded,
      so the last column is every example's last prompt token (label scoring and generation continue from it).
    - ``prompt_attention_mask`` LongTensor[B, Lp].
    - ``label_input_ids`` LongTensor[K, La]: each label's answer tokens (terminator included), right-padded.
    - ``label_attention_mask`` LongTensor[K, La].
    - ``utt_id`` list[str]; ``stratum`` LongTensor[B] (index in task.stratum_values); ``attribute``
      LongTensor[B] (index in task.attribute_values); ``gold`` LongTensor[B] (index in task.labels, -1 when
      unknown); -1 also marks a stratum or attribute value the task lacks. The stratum and attribute tensors
      are also keyed by their names (``language`` and ``gender`` in the paper's task).

    Examples are dicts from UtteranceDataset (``audio`` float32 at 16 kHz) or from `featurize`
    (``input_features`` / ``feature_attention_mask`` precomputed). ``modality`` "multi" puts the
    example's ``transcript`` into the prompt.
    """

    def __init__(self, processor, prompt_cfg: PromptConfig, modality: str, *, sample_rate: int = 16000,
                 task: Task | None = None):
        if modality not in ("uni", "multi"):
            raise ConfigError(f"data.modality must be 'uni' or 'multi', got {modality!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_cfg = prompt_cfg
        self.task = prompt_task(prompt_cfg, task)
        self.label_index = {lab: i for i, lab in enumerate(self.task.labels)}
        self.modality = modality
        self.sample_rate = sample_rate
        self.audio_token = getattr(processor, "audio_token", "<|AUDIO|>")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ConfigError("the tokenizer has no pad token")
        self.answers = label_token_ids(self.tokenizer, prompt_cfg, task=self.task)
        self.label_input_ids = pad_ids(self.answers, self.pad_id, left=False)
        self.label_attention_mask = pad_ids([[1] * len(a) for a in self.answers], 0, left=False)
        self._uni_prompt = prompt_text(processor, prompt_cfg, "uni", task=self.task) if modality == "uni" else None

    def prompt_ids(self, transcript: str | None, n_audio: int) -> list[int]:
        text = self._uni_prompt if self._uni_prompt is not None else \
            prompt_text(self.processor, self.prompt_cfg, self.modality, transcript, task=self.task)
        if text.count(self.audio_token) != 1:
            raise ConfigError(f"the chat template must place exactly one {self.audio_token} per prompt, "
                              f"found {text.count(self.audio_token)}")
        text = text.replace(self.audio_token, self.audio_token * n_audio)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if all("input_features" in ex for ex in examples):
            feats = torch.stack([torch.as_tensor(ex["input_features"]) for ex in examples]).float()
            fmask = torch.stack([torch.as_tensor(ex["feature_attention_mask"]) for ex in examples]).long()
        else:
            feats, fmask = compute_features(self.processor.feature_extractor, [ex["audio"] for ex in examples],
                                            self.sample_rate)
        n_audio = audio_token_count(fmask.sum(-1))
        prompts, fulls, labels, gold = [], [], [], []
        for ex, n in zip(examples, n_audio):
            p = self.prompt_ids(ex.get("transcript"), n)
            label = ex.get(LABEL_COLUMN)
            g = self.label_index[label] if label is not None else -1
            answer = self.answers[g] if g >= 0 else []
            prompts.append(p)
            fulls.append(p + answer)
            labels.append([IGNORE] * len(p) + answer)
            gold.append(g)
        task = self.task
        stratum = torch.from_numpy(task.codes([task.stratum_key(ex, self.modality) for ex in examples],
                                              task.stratum_values))
        attribute = torch.from_numpy(task.attribute_codes([ex.get(task.attribute) for ex in examples]))
        return {
            "input_ids": pad_ids(fulls, self.pad_id, left=False),
            "attention_mask": pad_ids([[1] * len(s) for s in fulls], 0, left=False),
            "labels": pad_ids(labels, IGNORE, left=False),
            "input_features": feats,
            "feature_attention_mask": fmask,
            "prompt_input_ids": pad_ids(prompts, self.pad_id, left=True),
            "prompt_attention_mask": pad_ids([[1] * len(s) for s in prompts], 0, left=True),
            "label_input_ids": self.label_input_ids.clone(),
            "label_attention_mask": self.label_attention_mask.clone(),
            "utt_id": [str(ex.get("utt_id", "")) for ex in examples],
            "stratum": stratum, task.stratum_name: stratum,
            "attribute": attribute, task.attribute: attribute,
            "gold": torch.tensor(gold, dtype=torch.long),
        }


def to_device(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Move every tensor in the batch to `device` (lists of ids stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


__all__ = ["EmotionCollator", "audio_token_count", "compute_features", "featurize", "pad_ids", "to_device"]
