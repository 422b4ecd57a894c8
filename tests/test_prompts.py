"""Prompts: uni vs multimodal content, verbaliser prefix check, and the en/de/ja free-text answer parser."""

from __future__ import annotations

import pytest

from ermgap.config import PromptConfig
from ermgap.errors import ConfigError
from ermgap.labels import EMOTIONS, INVALID
from ermgap.prompts import check_no_prefix, instruction_text, label_token_ids, parse_answer, prompt_text

PARSER_TABLE = [
    # exact labels and case / punctuation
    ("joy", "joy"), ("Neutral.", "neutral"), ("  SADNESS!", "sadness"), ("'anger'", "anger"),
    # English synonyms and sentences: first label mentioned wins
    ("The speaker sounds happy.", "joy"), ("happiness", "joy"), ("She is scared.", "fear"),
    ("I'd say angry, maybe a bit sad.", "anger"), ("Disgusted.", "disgust"), ("He seems surprised", "surprise"),
    ("Emotion: fear", "fear"), ("The emotion is sadness, not joy.", "sadness"),
    ("They are not happy, they are angry.", "anger"),  # negated mention skipped
    # German
    ("Freude", "joy"), ("Die Sprecherin ist fröhlich.", "joy"), ("wütend", "anger"), ("Trauer", "sadness"),
    ("Angst", "fear"), ("Ekel", "disgust"), ("überrascht", "surprise"), ("Die Stimme klingt traurig.", "sadness"),
    ("Er ist nicht traurig, sondern wütend.", "anger"),
    # Japanese
    ("喜び", "joy"), ("怒り", "anger"), ("悲しい", "sadness"), ("怖い", "fear"), ("嫌悪", "disgust"),
    ("驚き", "surprise"), ("中立", "neutral"), ("話者は悲しそうです。", "sadness"), ("この声は怒っているように聞こえます", "anger"),
    # unparseable
    ("", INVALID), ("I don't know.", INVALID), ("Das weiß ich nicht.", INVALID), ("わかりません", INVALID),
    (None, INVALID), ("joyful?", "joy"),
    ("Enjoy the show.", INVALID),  # word boundaries: "joy" inside "enjoy" is not a label
]


@pytest.mark.parametrize(("text", "expected"), PARSER_TABLE)
def test_parse_answer_table(text, expected):
    assert parse_answer(text) == expected


def test_parse_answer_knows_custom_verbalizers():
    verb = dict(PromptConfig().verbalizers, joy="happy-ish")
    assert parse_answer("happy-ish", verb) == "joy"


def test_multimodal_prompt_has_transcript_unimodal_does_not(tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model))
    cfg = PromptConfig()
    transcript = "Wir fahren morgen früh zum Bahnhof."
    multi = prompt_text(processor, cfg, "multi", transcript)
    uni = prompt_text(processor, cfg, "uni", transcript)
    assert transcript in multi and transcript not in uni
    for text in (multi, uni):
        assert text.count("<|AUDIO|>") == 1
        assert text.endswith("<|im_start|>assistant\n")
        assert ", ".join(EMOTIONS) in text
    with pytest.raises(ConfigError, match="transcript"):
        instruction_text(cfg, "multi", "  ")


def test_label_tokens_end_with_terminator_and_prefix_check(tiny_model):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(str(tiny_model)).tokenizer
    seqs = label_token_ids(tok, PromptConfig())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(s[-1] == end for s in seqs) and len({tuple(s) for s in seqs}) == 7
    verb = dict(PromptConfig().verbalizers, sadness="sad", anger="sad news")
    cfg = PromptConfig(verbalizers=verb)
    with pytest.raises(ConfigError, match="'sadness'.*prefix.*'anger'"):
        label_token_ids(tok, cfg, terminator=False)
    label_token_ids(tok, cfg)  # the terminator disambiguates "sad" from "sad news"
    with pytest.raises(ConfigError, match="prefix"):
        check_no_prefix([[1, 2], [1, 2, 3], [4], [5], [6], [7], [8]], PromptConfig())
