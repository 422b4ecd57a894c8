"""Prompts, label verbalisers and free-text answer parsing (paper section 3.3).

Unimodal input is speech + task instruction; multimodal adds the ground-truth transcript.
Prompts go through the processor's chat template (the real Qwen2-Audio-Instruct template), so
the same code serves the tiny local model and the 7B checkpoint:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n

The answer the model is trained to produce (and that label scoring scores) is the verbaliser's
token sequence followed by the end-of-turn token `<|im_end|>`. The terminator is what makes
scoring well defined when one answer string is a prefix of another ("sad" / "sadness").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from ermgap.config import PromptConfig
from ermgap.errors import ConfigError
from ermgap.labels import EMOTIONS, INVALID
from ermgap.task import Task

END_OF_TURN = "<|im_end|>"


def prompt_task(prompt_cfg: PromptConfig, task: Task | None = None) -> Task:
    """`task`, or the paper's task answering with `prompt_cfg.verbalizers` (callers without a manifest)."""
    if task is not None:
        return task
    return Task(verbalizers=tuple(prompt_cfg.verbalizers[e] for e in EMOTIONS))


def label_list(task: Task) -> str:
    """The answer strings in label order, comma-separated (what `{labels}` expands to)."""
    return ", ".join(task.verbalizers)


def instruction_text(prompt_cfg: PromptConfig, modality: str, transcript: str | None = None, *,
                     task: Task | None = None) -> str:
    """The user instruction for one utterance; multimodal needs a non-empty transcript."""
    labels = label_list(prompt_task(prompt_cfg, task))
    if modality == "uni":
        return prompt_cfg.instruction.format(labels=labels)
    if modality == "multi":
        if transcript is None or not str(transcript).strip():
            raise ConfigError("multimodal prompts need a transcript, but this utterance has an empty one")
        return prompt_cfg.multimodal_instruction.format(labels=labels, transcript=str(transcript).strip())
    raise ConfigError(f"modality must be 'uni' or 'multi', got {modality!r}")


def chat_messages(prompt_cfg: PromptConfig, modality: str, transcript: str | None = None, *,
                  task: Task | None = None) -> list[dict[str, Any]]:
    """One user turn: the audio placeholder, then the instruction (the order Qwen2-Audio-Instruct was tuned on)."""
    return user_turn(instruction_text(prompt_cfg, modality, transcript, task=task))


def user_turn(text: str) -> list[dict[str, Any]]:
    """The chat messages of one user turn holding an audio placeholder followed by `text`."""
    return [{"role": "user", "content": [{"type": "audio", "audio": "<audio>"}, {"type": "text", "text": text}]}]


def prompt_text(processor, prompt_cfg: PromptConfig, modality: str, transcript: str | None = None, *,
                task: Task | None = None) -> str:
    """The chat-templated prompt ending with the assistant header, with ONE `<|AUDIO|>` placeholder."""
    return processor.apply_chat_template(chat_messages(prompt_cfg, modality, transcript, task=task),
                                         add_generation_prompt=True, tokenize=False)


def label_token_ids(tokenizer, prompt_cfg: PromptConfig, *, terminator: bool = True,
                    task: Task | None = None) -> list[list[int]]:
    """Answer token ids per label (the task's label order); with `terminator`, `<|im_end|>` is appended.

    Raises ConfigError when a verbaliser tokenizes to nothing, or when one label's sequence is a
    prefix of another's (with the terminator this only happens for identical tokenizations).
    """
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN) if terminator else None
    if terminator and (end_id is None or end_id == tokenizer.unk_token_id):
        raise ConfigError(f"the tokenizer has no {END_OF_TURN} token; this is not a Qwen2-Audio chat tokenizer")
    task = prompt_task(prompt_cfg, task)
    return answer_token_ids(tokenizer, task.verbalizers, end_id, names=[f"'{lab}'" for lab in task.labels],
                            what="prompt.verbalizers")


def answer_token_ids(tokenizer, answers: Sequence[str], end_id: int | None, *, names: Sequence[str] | None = None,
                     what: str = "labels") -> list[list[int]]:
    """Token ids of each answer string (+ `end_id` when given), checked to be non-empty and prefix-free.

    `names` (default: the quoted answers) and `what` (the setting they come from) word the ConfigError.
    """
    names = list(names) if names is not None else [repr(a) for a in answers]
    seqs: list[list[int]] = []
    for name, answer in zip(names, answers):
        ids = list(tokenizer.encode(answer, add_special_tokens=False))
        if not ids:
            raise ConfigError(f"{what}: the answer for {name} ({answer!r}) tokenizes to no tokens")
        seqs.append(ids + ([end_id] if end_id is not None else []))
    _check_prefix_free(seqs, answers, names, what)
    return seqs


def _check_prefix_free(seqs: Sequence[Sequence[int]], answers: Sequence[str], names: Sequence[str], what: str) -> None:
    for i, a in enumerate(seqs):
        for j, b in enumerate(seqs):
            if i != j and len(a) <= len(b) and list(b[: len(a)]) == list(a):
                raise ConfigError(
                    f"{what}: the answer for {names[i]} ({answers[i]!r}, tokens {list(a)}) is a prefix of the answer "
                    f"for {names[j]} ({answers[j]!r}, tokens {list(b)}); label scoring could not tell them apart. "
                    "Choose answer strings that differ in their tokens.")


def check_no_prefix(seqs: list[list[int]], task: Task | PromptConfig) -> None:
    """ConfigError naming the two labels when one token sequence is a prefix of (or equal to) another."""
    task = prompt_task(task) if isinstance(task, PromptConfig) else task
    _check_prefix_free(seqs, task.verbalizers, [f"'{lab}'" for lab in task.labels], "prompt.verbalizers")


# --------------------------------------------------------------------------- free-text answers

# Lower-cased surface forms per emotion in English, German and Japanese (stems where inflection varies).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutrality", "calm", "no emotion", "neutrale", "neutraler", "ruhig", "sachlich",
                "keine emotion", "中立", "ニュートラル", "平静", "普通", "無感情", "感情なし"),
    "joy": ("joy", "happy", "happiness", "joyful", "glad", "delighted", "cheerful", "excited", "freude", "fröhlich",
            "froh", "glücklich", "glück", "heiter", "喜び", "喜", "嬉しい", "うれしい", "嬉し", "楽しい", "幸せ", "幸福", "歓喜"),
    "sadness": ("sadness", "sad", "unhappy", "sorrow", "depressed", "grief", "traurigkeit", "traurig", "trauer",
                "betrübt", "悲しみ", "悲しい", "悲し", "悲", "哀しみ", "寂しい", "落ち込"),
    "anger": ("anger", "angry", "mad", "furious", "annoyed", "irritated", "rage", "wut", "wütend", "ärger", "ärgerlich",
              "verärgert", "zorn", "zornig", "怒り", "怒って", "怒", "腹立", "イライラ", "憤"),
    "fear": ("fear", "afraid", "scared", "frightened", "anxious", "anxiety", "terrified", "angst", "ängstlich",
             "furcht", "verängstigt", "恐怖", "怖い", "恐れ", "不安", "怯え", "こわい"),
    "disgust": ("disgust", "disgusted", "disgusting", "revulsion", "ekel", "angeekelt", "ekelhaft", "abscheu",
                "嫌悪", "嫌悪感", "気持ち悪い", "うんざり"),
    "surprise": ("surprise", "surprised", "astonished", "amazed", "shocked", "überraschung", "überrascht", "erstaunt",
                 "erstaunen", "驚き", "驚いて", "驚", "びっくり", "意外"),
}
# Negated mentions ("not happy", "nicht traurig") must not count as the label.
_NEGATIONS = ("not ", "no ", "n't ", "nicht ", "kein ", "keine ", "weder ")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _find_all(text: str, form: str) -> list[int]:
    """Start offsets of `form` in `text`: word-bounded for Latin script, substring for Japanese."""
    if _CJK.search(form):
        return [m.start() for m in re.finditer(re.escape(form), text)]
    return [m.start() for m in re.finditer(rf"(?<![\w]){re.escape(form)}(?![\w])", text)]


def parse_answer(text: str | None, verbalizers: dict[str, str] | None = None) -> str:
    """Map a free-text answer to a label, or INVALID. `verbalizers`: {label: answer string} (default: MELD's
    seven emotions answering with their names); MELD emotions also match their en/de/ja SYNONYMS.

    Rules, in order: the whole answer (stripped of punctuation) is a label, its answer string or a synonym;
    otherwise the label mentioned FIRST in the text wins (negated mentions such as "not happy" are skipped).
    Nothing recognisable → INVALID.
    """
    if text is None:
        return INVALID
    norm = _normalise(text).strip()
    bare = norm.strip(" \t\n\r.,;:!?。、！？\"'「」『』()[]*")
    table: dict[str, tuple[str, ...]] = {}
    for label in (verbalizers or EMOTIONS):
        forms = (_normalise(verbalizers[label]),) if verbalizers else ()
        table[label] = tuple(dict.fromkeys(forms + (_normalise(label),) + SYNONYMS.get(label, ())))
    for emotion, forms in table.items():
        if bare in forms:
            return emotion
    best: tuple[int, int, str] | None = None  # (offset, -length, emotion): earliest, then longest form
    for emotion, forms in table.items():
        for form in forms:
            for start in _find_all(norm, form):
                before = norm[max(0, start - 8):start]
                if any(before.endswith(neg) for neg in _NEGATIONS):
                    continue
                key = (start, -len(form), emotion)
                if best is None or key < best:
                    best = key
    return best[2] if best else INVALID
