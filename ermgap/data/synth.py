"""A synthetic multilingual emotional speech corpus (espeak-ng), optionally with an injected gender bias.

What it is: English, German and Japanese sentences spoken by espeak-ng voice variants (several
female and male "speakers" per language; dev/test voices are never heard in training), the 7 MELD emotions
rendered through prosody only: base pitch (`-p`), pitch range (SSML `<prosody range>`), speaking
rate (`-s`), word gap (`-g`) and amplitude (`-a`), with per-speaker offsets and per-utterance
Gaussian jitter so classes overlap (learnable, not trivial). Pitch, range and rate carry most of
the signal because Whisper-style log-mel features normalise loudness per utterance.

Sentences are neutral unless `lexical_cue_rate` > 0, in which case that fraction of utterances
uses a sentence that states the emotion ("I am so happy about this!").

Three kinds of injected gender bias, each per (language, gender), combinable:

- `cue_shift={("deu", "M"): 1.0}` (*a group-specific prosodic mapping*, learnable): that group expresses
  emotion e with the prosody centre that everyone else uses for CUE_SHIFT[e] (a derangement of the 7
  emotions), in every split; strength s in [0, 1] interpolates every prosodic control linearly from the
  shared centre (s = 0) to the shifted one (s = 1). A model that learns the shared mapping from the other
  groups mispredicts this group (at s = 1 it is systematically wrong, below chance); gender is audible from
  the voice's pitch, so a model that sees enough of the group's own examples can learn both mappings
  (tests/test_data_cue_shift.py measures both with a scikit-learn classifier).
- `train_share={("deu", "F"): 0.25}` (*under-representation*, learnable): that group keeps only 25 % of
  its train utterances (rounded half up, at least 1 per cell: the first ones of each cell, so the kept rows
  are exactly those of the corpus without the share); dev and test stay balanced. The label is in the audio,
  so a model can close the gap by weighting the group up; ERM, which weights every utterance alike,
  under-fits it. With a shared mapping a model transfers what it learns from the other gender, so the gap
  this alone opens is small; with `cue_shift` it is the minority that needs examples of its own.
- `bias={("deu", "F"): 0.7}` (*neutralised prosody*, irreducible): 70 % of the non-neutral utterances of
  each (split, emotion) cell of that group get the group's neutral prosody while keeping their emotional
  label, so the label is simply not in the audio (tests/test_data_learnability.py measures the gap it opens);
  a fairness objective can only close that gap by levelling the other gender down.

Every utterance's random draws (voice, sentence, jitter) come from its own stream, keyed by (seed, split,
language, gender, emotion, index in its cell): corpora that differ only in their biases hold the same
utterances (same ids, same text, same voice, same jitter), differing only where a bias applies. So a
corpus and its copy with a train share restored have identical dev and test splits, and their results can
be compared utterance by utterance (the bias lab's oracle rows).

Sizes: `per_cell` utterances per (language, gender, emotion) in train (before `train_share`),
`eval_per_cell` (default 2 * per_cell // 3, at least 1) in dev and in test. The defaults (per_cell=24,
male train share 0.1) give 21 × (24 + 2) + 2 × 42 × 16 = 1,890 utterances (the demo corpus, 13 s on
2 cores); dev and test are large because a gender gap is a difference of two noisy accuracies.

Output (written atomically): `manifest.csv` (canonical columns + `prosody_neutralised`,
`lexical_cue`, `cue_shift`), `wavs/<split>/<language>/<utt_id>.wav` (16 kHz mono PCM-16) and `corpus.json`
(all generation parameters and counts). Same seed and parameters → byte-identical files,
whatever the number of workers: every random choice is drawn in the parent process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import soundfile as sf

from ermgap.data.audio import resample
from ermgap.data.manifest import format_problems, validate_manifest, write_manifest
from ermgap.errors import ConfigError, ErmgapError
from ermgap.io import atomic_dir, check_writable_dir
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES, SPLITS

SAMPLE_RATE = 16000
DEFAULT_PER_CELL = 24
# The demo's bias: male speakers 12x under-represented in train (2 of 24 per cell), in every language
# (learnable: the gap it opens can be closed by weighting them up). No neutralised prosody by default.
DEMO_BIAS: dict[tuple[str, str], float] = {}
DEMO_TRAIN_SHARE: dict[tuple[str, str], float] = {(lang, "M"): 0.1 for lang in LANGUAGES}
DEMO_CUE_SHIFT: dict[tuple[str, str], float] = {}
ESPEAK_LANG = {"deu": "de", "eng": "en-us", "jpn": "ja"}

# espeak-ng variant file names (`espeak-ng --voices=variant`). The f*/female ones have median F0
# ~170-270 Hz, the male ones ~80-110 Hz. The same variant in different languages is a different speaker
# id. Train voices are never heard in dev or test; dev and test draw different utterances from one pool
# of held-out voices, so that both measure the same population (with disjoint dev/test voices, which
# voices land in dev decided the sign of the dev "gender gap", and the λ rule and model selection
# followed speaker noise, not the bias). The pool was chosen by per-voice accuracy of the tiny
# Qwen2-Audio: an ERM model (LoRA incl. the audio encoder, 8 epochs, 2 seeds) trained on the train
# voices of an unbiased corpus scored 23 unseen voices between 19 % (sandro, Diogo, Henrique, near
# chance) and 74 % (m5); the six per gender from the middle of that range average 51 % (F) and 49 % (M).
VOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "F": {"train": ("f1", "f2", "Annie", "belinda"), "eval": ("f3", "anika", "steph2", "linda", "Andrea", "steph3")},
    "M": {"train": ("m1", "m2", "m3", "m6"), "eval": ("m7", "david", "john", "adam", "michel", "robert")},
}
# The pretraining corpus of `ermgap model tiny --pretrain` (ermgap.pretrain): voices heard nowhere in the
# corpus above (five per gender, so the backbone learns emotion from both genders alike) and its own
# sentences, so a zero-shot evaluation of the pretrained backbone on the demo corpus is on unseen voices
# and unseen sentences.
PRETRAIN_VOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "F": {"train": ("Alicia", "aunty", "steph", "f4"), "eval": ("f5",)},
    "M": {"train": ("m4", "m8", "Andy", "paul"), "eval": ("m5",)},
}


@dataclass(frozen=True)
class Prosody:
    """espeak-ng controls: pitch 0-99 (-p), pitch range in % change (SSML), rate ×175 wpm (-s),
    amplitude 0-200 (-a), extra word gap in 10 ms units (-g)."""

    pitch: float
    range_pct: float
    rate: float
    amplitude: float
    word_gap: float


# Centres per emotion, loosely after the vocal-affect literature (joy/surprise high and wide, sadness
# low, narrow and slow, anger fast and loud, fear high, narrow and fast, disgust low and slow).
EMOTION_PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(pitch=50, range_pct=0, rate=1.00, amplitude=100, word_gap=0),
    "joy": Prosody(pitch=64, range_pct=60, rate=1.15, amplitude=115, word_gap=0),
    "sadness": Prosody(pitch=36, range_pct=-65, rate=0.72, amplitude=80, word_gap=3),
    "anger": Prosody(pitch=54, range_pct=35, rate=1.35, amplitude=140, word_gap=0),
    "fear": Prosody(pitch=72, range_pct=-45, rate=1.25, amplitude=90, word_gap=1),
    "disgust": Prosody(pitch=38, range_pct=25, rate=0.82, amplitude=105, word_gap=2),
    "surprise": Prosody(pitch=80, range_pct=100, rate=0.95, amplitude=120, word_gap=0),
}
# The cue-shifted mapping: a group with `cue_shift` expresses emotion e with the centre of CUE_SHIFT[e] (a
# cyclic derangement of EMOTIONS: no emotion keeps its own centre, so the shared mapping is wrong on every
# one of the group's utterances at strength 1, and the set of centres, hence how separable the emotions are,
# is the same as everyone else's).
CUE_SHIFT: dict[str, str] = {e: EMOTIONS[(i + 1) % len(EMOTIONS)] for i, e in enumerate(EMOTIONS)}
# Per-utterance Gaussian jitter (standard deviations) and per-speaker offsets.
JITTER = Prosody(pitch=5, range_pct=15, rate=0.07, amplitude=10, word_gap=0.7)
SPEAKER_JITTER = Prosody(pitch=4, range_pct=8, rate=0.05, amplitude=0, word_gap=0)

SENTENCES: dict[str, tuple[str, ...]] = {
    "eng": (
        "The train leaves at seven in the morning.", "I put the keys on the kitchen table.",
        "We need to buy bread and milk.", "The meeting is on the second floor.",
        "She called me yesterday after work.", "The book is on the shelf by the window.",
        "He will arrive on Thursday afternoon.", "Turn left at the next corner.",
        "The shop closes at six today.", "I wrote the numbers on a piece of paper.",
        "They moved to a new apartment last month.", "The coffee is in the blue cup.",
        "We walked to the station together.", "The letter came this morning.",
        "My brother works at the hospital.", "The door to the garden is open.",
        "I will send you the file tonight.", "The bus stops in front of the bank.",
        "There are four chairs in the room.", "She is reading the newspaper.",
        "The car is parked outside.", "We talked about the plan for next week.",
        "He painted the fence on Saturday.", "The phone is on the desk.",
    ),
    "deu": (
        "Der Zug fährt um sieben Uhr morgens ab.", "Ich habe die Schlüssel auf den Küchentisch gelegt.",
        "Wir müssen Brot und Milch kaufen.", "Das Treffen ist im zweiten Stock.",
        "Sie hat mich gestern nach der Arbeit angerufen.", "Das Buch liegt im Regal am Fenster.",
        "Er kommt am Donnerstagnachmittag an.", "Biegen Sie an der nächsten Ecke links ab.",
        "Der Laden schließt heute um sechs.", "Ich habe die Zahlen auf ein Blatt Papier geschrieben.",
        "Sie sind letzten Monat in eine neue Wohnung gezogen.", "Der Kaffee ist in der blauen Tasse.",
        "Wir sind zusammen zum Bahnhof gegangen.", "Der Brief kam heute Morgen.",
        "Mein Bruder arbeitet im Krankenhaus.", "Die Tür zum Garten ist offen.",
        "Ich schicke dir die Datei heute Abend.", "Der Bus hält vor der Bank.",
        "Im Zimmer stehen vier Stühle.", "Sie liest die Zeitung.",
        "Das Auto steht draußen.", "Wir haben über den Plan für nächste Woche gesprochen.",
        "Er hat am Samstag den Zaun gestrichen.", "Das Telefon liegt auf dem Schreibtisch.",
    ),
    # Kana only: espeak-ng's Japanese voice reads hiragana/katakana but spells kanji out as
    # "Chinese letter". The topic particle は is avoided (espeak-ng reads it "ha", not "wa").
    "jpn": (
        "でんしゃがあさしちじにでます。", "かぎをだいどころのテーブルにおきました。",
        "パンとぎゅうにゅうをかわなければなりません。", "かいぎがにかいであります。",
        "きのうしごとのあとでかのじょからでんわがありました。", "ほんがまどのそばのたなにあります。",
        "かれがもくようびのごごにつきます。", "つぎのかどをひだりにまがってください。",
        "みせがきょうろくじにしまります。", "かみにすうじをかきました。",
        "かれらがせんげつあたらしいアパートにひっこしました。", "コーヒーがあおいカップにはいっています。",
        "いっしょにえきまであるきました。", "てがみがけさとどきました。",
        "あにがびょういんではたらいています。", "にわのドアがあいています。",
        "こんばんファイルをおくります。", "バスがぎんこうのまえでとまります。",
        "へやにいすがよっつあります。", "かのじょがしんぶんをよんでいます。",
        "くるまがそとにとめてあります。", "らいしゅうのけいかくについてはなしました。",
        "かれがどようびにへいをぬりました。", "でんわがつくえのうえにあります。",
    ),
}

PRETRAIN_SENTENCES: dict[str, tuple[str, ...]] = {
    "eng": (
        "The river runs past the old mill.", "Our neighbours planted two trees.",
        "The report is due at the end of the month.", "A taxi is waiting at the gate.",
        "The museum opens at ten on Sundays.", "He keeps his bicycle in the hall.",
        "The soup needs a little more salt.", "We watched the boats in the harbour.",
        "The printer on the third floor is new.", "Her sister lives near the park.",
        "The lamp is next to the sofa.", "They sold the house in spring.",
    ),
    "deu": (
        "Der Fluss fließt an der alten Mühle vorbei.", "Unsere Nachbarn haben zwei Bäume gepflanzt.",
        "Der Bericht ist Ende des Monats fällig.", "Ein Taxi wartet am Tor.",
        "Das Museum öffnet sonntags um zehn.", "Er stellt sein Fahrrad in den Flur.",
        "Die Suppe braucht etwas mehr Salz.", "Wir haben die Boote im Hafen angeschaut.",
        "Der Drucker im dritten Stock ist neu.", "Ihre Schwester wohnt in der Nähe des Parks.",
        "Die Lampe steht neben dem Sofa.", "Sie haben das Haus im Frühling verkauft.",
    ),
    "jpn": (
        "かわがふるいすいしゃのそばをながれています。", "となりのひとがきをにほんうえました。",
        "レポートのしめきりがつきのおわりです。", "タクシーがもんのまえでまっています。",
        "はくぶつかんがにちようびのじゅうじにあきます。", "かれがじてんしゃをろうかにおいています。",
        "スープにもうすこししおがひつようです。", "みなとでふねをみました。",
        "さんがいのプリンターがあたらしいです。", "かのじょのいもうとがこうえんのちかくにすんでいます。",
        "ランプがソファのとなりにあります。", "かれらがはるにいえをうりました。",
    ),
}

# Sentences that give the label away (used at rate `lexical_cue_rate`).
CUE_SENTENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "eng": {
        "neutral": ("I have no strong feelings about it.", "It is just an ordinary day.", "Fine, that is all."),
        "joy": ("I am so happy about this!", "This is wonderful news!", "I love it, what a great day!"),
        "sadness": ("I feel so sad today.", "This makes me want to cry.", "I miss her so much."),
        "anger": ("I am furious with you!", "Stop it, this makes me so angry!", "How dare you do that!"),
        "fear": ("I am really scared.", "Please help me, I am afraid!", "Something terrible is going to happen."),
        "disgust": ("That is absolutely disgusting.", "Ugh, this smells revolting.", "That makes me feel sick."),
        "surprise": ("Wow, I did not expect that!", "Really? What a surprise!", "No way, are you serious?"),
    },
    "deu": {
        "neutral": ("Dazu habe ich keine besondere Meinung.", "Es ist ein ganz normaler Tag.", "Gut, das ist alles."),
        "joy": ("Ich freue mich so sehr darüber!", "Das sind wunderbare Neuigkeiten!", "Was für ein schöner Tag!"),
        "sadness": ("Ich bin heute so traurig.", "Da möchte ich am liebsten weinen.", "Ich vermisse sie so sehr."),
        "anger": ("Ich bin wütend auf dich!", "Hör auf, das macht mich so sauer!", "Wie kannst du es wagen!"),
        "fear": ("Ich habe große Angst.", "Hilfe, ich fürchte mich!", "Gleich passiert etwas Schreckliches."),
        "disgust": ("Das ist absolut ekelhaft.", "Igitt, das riecht widerlich.", "Davon wird mir schlecht."),
        "surprise": ("Wow, damit habe ich nicht gerechnet!", "Wirklich? Was für eine Überraschung!",
                     "Nein, ist das dein Ernst?"),
    },
    "jpn": {
        "neutral": ("とくになにもかんじません。", "ふつうのいちにちです。", "それだけです。"),
        "joy": ("とてもうれしいです！", "すばらしいニュースですね！", "ほんとうにたのしいです！"),
        "sadness": ("とてもかなしいです。", "なきたいきもちです。", "さびしくてたまりません。"),
        "anger": ("ほんとうにおこっています！", "いいかげんにしてください！", "ふざけないでください！"),
        "fear": ("とてもこわいです。", "たすけてください、こわいです！", "なにかおそろしいことがおきそうです。"),
        "disgust": ("きもちわるいです。", "このにおいがいやです。", "ほんとうにうんざりです。"),
        "surprise": ("えっ、ほんとうですか！", "びっくりしました！", "まさか、しんじられません！"),
    },
}


@dataclass(frozen=True)
class Job:
    """One utterance to render (everything random already decided)."""

    rel_path: str
    voice: str
    text: str
    prosody: Prosody


def _parse_group_value(spec: str, option: str, name: str, example: str, *, zero_ok: bool,
                       default: float | None = None) -> tuple[tuple[str, str], float]:
    parts = spec.split(":")
    where = f"{option} {spec!r}"
    bound = f"0 {'<=' if zero_ok else '<'} {name} <= 1"
    shape = f"LANG:GENDER[:{name}]" if default is not None else f"LANG:GENDER:{name}"
    if len(parts) == 2 and default is not None:
        parts.append(str(default))
    if len(parts) != 3:
        raise ConfigError(f"{where}: expected {shape}, e.g. {example}")
    lang, gender, value_s = (p.strip() for p in parts)
    if lang not in LANGUAGES:
        raise ConfigError(f"{where}: language {lang!r} is not allowed; expected one of {', '.join(LANGUAGES)}")
    if gender not in GENDERS:
        raise ConfigError(f"{where}: gender {gender!r} is not allowed; expected one of {', '.join(GENDERS)}")
    try:
        value = float(value_s)
    except ValueError:
        raise ConfigError(f"{where}: {value_s!r} is not a number; expected {bound}") from None
    if not ((0.0 <= value) if zero_ok else (0.0 < value)) or value > 1.0:
        raise ConfigError(f"{where}: {value} is out of range; expected {bound}")
    return (lang, gender), value


def parse_bias(spec: str) -> tuple[tuple[str, str], float]:
    """Parse 'LANG:GENDER:STRENGTH' (e.g. 'deu:F:0.7') into ((lang, gender), strength); ConfigError if bad."""
    return _parse_group_value(spec, "--bias", "STRENGTH", "deu:F:0.7", zero_ok=True)


def parse_train_share(spec: str) -> tuple[tuple[str, str], float]:
    """Parse 'LANG:GENDER:SHARE' (e.g. 'deu:F:0.25') into ((lang, gender), share); ConfigError if bad."""
    return _parse_group_value(spec, "--train-share", "SHARE", "deu:F:0.25", zero_ok=False)


def parse_cue_shift(spec: str) -> tuple[tuple[str, str], float]:
    """Parse 'LANG:GENDER[:STRENGTH]' (e.g. 'deu:M' = 'deu:M:1') into ((lang, gender), strength)."""
    return _parse_group_value(spec, "--cue-shift", "STRENGTH", "deu:M or deu:M:0.5", zero_ok=True, default=1.0)


def _check_args(per_cell: int, eval_per_cell: int, bias: Mapping, lexical_cue_rate: float, workers: int,
                train_share: Mapping | None = None, cue_shift: Mapping | None = None) -> None:
    if per_cell < 1:
        raise ConfigError(f"per_cell={per_cell} is out of range; expected an integer >= 1")
    if eval_per_cell < 1:
        raise ConfigError(f"eval_per_cell={eval_per_cell} is out of range; expected an integer >= 1")
    if not 0.0 <= lexical_cue_rate <= 1.0:
        raise ConfigError(f"lexical_cue_rate={lexical_cue_rate} is out of range; expected 0 <= rate <= 1")
    if workers < 1:
        raise ConfigError(f"workers={workers} is out of range; expected an integer >= 1")
    _check_group_values("bias", bias, "STRENGTH", zero_ok=True)
    _check_group_values("train_share", train_share or {}, "SHARE", zero_ok=False)
    _check_group_values("cue_shift", cue_shift or {}, "STRENGTH", zero_ok=True)


def _check_group_values(what: str, values: Mapping, name: str, *, zero_ok: bool) -> None:
    """{(language, gender): value in [0, 1] (or (0, 1] unless zero_ok)} as the API receives it."""
    for key, value in values.items():
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in LANGUAGES and key[1] in GENDERS):
            raise ConfigError(f"{what} key {key!r} is not allowed; expected (language, gender) with language in "
                              f"{', '.join(LANGUAGES)} and gender in {', '.join(GENDERS)}")
        if not ((0.0 <= float(value)) if zero_ok else (0.0 < float(value))) or float(value) > 1.0:
            raise ConfigError(f"{what} {value} for {key} is out of range; "
                              f"expected 0 {'<=' if zero_ok else '<'} {name} <= 1")


def _jittered(centre: Prosody, speaker: Prosody, rng: np.random.Generator) -> Prosody:
    z = rng.standard_normal(5)
    return Prosody(
        pitch=float(np.clip(centre.pitch + speaker.pitch + JITTER.pitch * z[0], 0, 99)),
        range_pct=float(np.clip(centre.range_pct + speaker.range_pct + JITTER.range_pct * z[1], -90, 150)),
        rate=float(np.clip(centre.rate * (1 + speaker.rate) * (1 + JITTER.rate * z[2]), 0.5, 2.0)),
        amplitude=float(np.clip(centre.amplitude + JITTER.amplitude * z[3], 20, 200)),
        word_gap=float(np.clip(centre.word_gap + JITTER.word_gap * z[4], 0, 10)),
    )


def expression(emotion: str, shift: float) -> Prosody:
    """The prosody centre of `emotion` for a group with cue-shift strength `shift` (0: the shared centre,
    1: the centre of CUE_SHIFT[emotion]; every control interpolated linearly in between)."""
    shared, shifted = EMOTION_PROSODY[emotion], EMOTION_PROSODY[CUE_SHIFT[emotion]]
    if shift == 0.0:
        return shared
    a, b = asdict(shared), asdict(shifted)
    return Prosody(**{k: (1.0 - shift) * a[k] + shift * b[k] for k in a})


# Independent random streams of plan_corpus (the second entry of every seed key).
_ROW, _FLAT, _SPEAKER = 0, 1, 2


def plan_corpus(*, per_cell: int, eval_per_cell: int, bias: Mapping[tuple[str, str], float], seed: int,
                lexical_cue_rate: float, dev_per_cell: int | None = None,
                train_share: Mapping[tuple[str, str], float] | None = None,
                cue_shift: Mapping[tuple[str, str], float] | None = None,
                voices: Mapping[str, Mapping[str, tuple[str, ...]]] = VOICES,
                sentences: Mapping[str, tuple[str, ...]] = SENTENCES,
                id_prefix: str = "syn") -> tuple[list[dict], list[Job]]:
    """Decide every utterance (rows of the manifest + render jobs) from `seed`; pure, no I/O.
    `voices` ({gender: {"train"|"eval": variants}}) and `sentences` ({language: texts}) default to the
    demo corpus's; the pretraining corpus passes PRETRAIN_VOICES / PRETRAIN_SENTENCES.

    Utterance k of the (split, language, gender, emotion) cell draws from its own stream keyed by those
    indices, so it is the same utterance in every corpus of that seed, whatever the biases and shares."""
    train_share, cue_shift = dict(train_share or {}), dict(cue_shift or {})
    speaker_offset: dict[str, Prosody] = {}
    rows: list[dict] = []
    jobs: list[Job] = []
    sizes = {"train": per_cell, "dev": eval_per_cell if dev_per_cell is None else dev_per_cell, "test": eval_per_cell}
    for si, split in enumerate(SPLITS):
        pool_kind = "train" if split == "train" else "eval"
        for li, lang in enumerate(LANGUAGES):
            for gi, gender in enumerate(GENDERS):
                n = sizes[split]
                if split == "train" and (lang, gender) in train_share:
                    n = max(1, int(np.floor(train_share[(lang, gender)] * n + 0.5)))
                pool_voices = voices[gender][pool_kind]
                strength = float(bias.get((lang, gender), 0.0))
                shift = float(cue_shift.get((lang, gender), 0.0))
                for ei, emotion in enumerate(EMOTIONS):
                    cell = [seed, si, li, gi, ei]
                    # Exactly floor(strength * n + 0.5) utterances of the cell are neutralised (not a coin
                    # flip), so a small corpus still carries the requested bias.
                    flat_rng = np.random.default_rng([seed, _FLAT, *cell[1:]])
                    neutralised = set(flat_rng.permutation(n)[: int(np.floor(strength * n + 0.5))].tolist())
                    for k in range(n):
                        # Voices rotate over the (split, language, gender) block: every voice is used even
                        # when a cell has fewer utterances than there are voices.
                        vi = (k * len(EMOTIONS) + ei) % len(pool_voices)
                        variant = pool_voices[vi]
                        speaker = f"{lang}_{variant}"
                        if speaker not in speaker_offset:
                            z = np.random.default_rng([seed, _SPEAKER, li, gi, int(pool_kind == "eval"), vi]
                                                      ).standard_normal(3)
                            speaker_offset[speaker] = Prosody(
                                pitch=SPEAKER_JITTER.pitch * z[0], range_pct=SPEAKER_JITTER.range_pct * z[1],
                                rate=SPEAKER_JITTER.rate * z[2], amplitude=0, word_gap=0)
                        rng = np.random.default_rng([seed, _ROW, *cell[1:], k])
                        flat = emotion != "neutral" and k in neutralised
                        cue = bool(rng.random() < lexical_cue_rate)
                        pool = CUE_SENTENCES[lang][emotion] if cue else sentences[lang]
                        text = pool[int(rng.integers(len(pool)))]
                        centre = expression("neutral" if flat else emotion, shift)
                        prosody = _jittered(centre, speaker_offset[speaker], rng)
                        utt_id = f"{id_prefix}_{split}_{lang}_{gender}_{ei}_{k:04d}"
                        rel = f"wavs/{split}/{lang}/{utt_id}.wav"
                        rows.append(dict(utt_id=utt_id, split=split, language=lang, emotion=emotion,
                                         speaker=speaker, gender=gender, transcript=text, audio=rel,
                                         prosody_neutralised=int(flat), lexical_cue=int(cue), cue_shift=shift))
                        jobs.append(Job(rel, f"{ESPEAK_LANG[lang]}+{variant}", text, prosody))
    return rows, jobs


def espeak_command(job: Job) -> list[str]:
    """The espeak-ng command line that renders `job` as a 22.05 kHz wav on stdout."""
    p = job.prosody
    ssml = f'<speak><prosody range="{p.range_pct:+.0f}%">{escape(job.text)}</prosody></speak>'
    return ["espeak-ng", "--stdout", "-m", "-z", "-v", job.voice, "-p", f"{p.pitch:.0f}",
            "-s", f"{175 * p.rate:.0f}", "-a", f"{p.amplitude:.0f}", "-g", f"{p.word_gap:.0f}", ssml]


def render(job: Job, out_dir: str) -> float:
    """Synthesise one utterance into out_dir/job.rel_path (16 kHz mono PCM-16); returns its duration (s)."""
    proc = subprocess.run(espeak_command(job), capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise ErmgapError(f"espeak-ng failed for voice {job.voice!r}, text {job.text!r}: "
                          f"{proc.stderr.decode(errors='replace').strip() or 'no audio produced'}")
    x, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    y = np.clip(resample(x, int(sr), SAMPLE_RATE), -1.0, 1.0)
    path = Path(out_dir) / job.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), y, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return round(len(y) / SAMPLE_RATE, 4)


def render_key(job: Job, espeak: str) -> str:
    """What determines a rendered file's bytes: the espeak-ng command line, its version and the output rate."""
    what = json.dumps([espeak, SAMPLE_RATE, espeak_command(job)], ensure_ascii=False)
    return hashlib.blake2b(what.encode("utf-8"), digest_size=16).hexdigest()


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, dst)


def render_cached(job: Job, out_dir: str, cache: str, espeak: str) -> float:
    """`render`, through a directory of rendered files keyed by `render_key`: a job rendered before (by this or
    another corpus) is linked (or copied) from it, a new one is rendered and added (atomically)."""
    entry = Path(cache) / (render_key(job, espeak) + ".wav")
    path = Path(out_dir) / job.rel_path
    if entry.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _link(entry, path)
        return round(sf.info(str(path)).frames / SAMPLE_RATE, 4)
    duration = render(job, out_dir)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    _link(path, tmp)
    os.replace(tmp, entry)
    return duration


def _render_chunk(jobs: list[Job], out_dir: str, cache: str | None = None, espeak: str = "") -> list[float]:
    if cache is None:
        return [render(job, out_dir) for job in jobs]
    return [render_cached(job, out_dir, cache, espeak) for job in jobs]


def espeak_version() -> str:
    """The installed espeak-ng version line; ErmgapError with an install hint when missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ErmgapError("espeak-ng is not installed; install it (Debian/Ubuntu: `sudo apt-get install espeak-ng`, "
                          "or `make setup` as root) to generate the synthetic corpus")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().split(":")[1].strip().split()[0] if ":" in out else out.strip()


def synthesize(
    out_dir: str | os.PathLike,
    *,
    per_cell: int = DEFAULT_PER_CELL,
    eval_per_cell: int | None = None,
    dev_per_cell: int | None = None,
    bias: Mapping[tuple[str, str], float] | None = None,
    train_share: Mapping[tuple[str, str], float] | None = None,
    cue_shift: Mapping[tuple[str, str], float] | None = None,
    seed: int = 0,
    lexical_cue_rate: float = 0.0,
    force: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    voices: Mapping[str, Mapping[str, tuple[str, ...]]] = VOICES,
    sentences: Mapping[str, tuple[str, ...]] = SENTENCES,
    id_prefix: str = "syn",
    render_cache: str | os.PathLike | None = None,
) -> Path:
    """Generate the corpus into `out_dir` (atomically; refuses an existing dir unless force) and return
    the manifest path. bias: {(language, gender): strength in [0, 1]}; None means DEMO_BIAS, {} none.
    train_share: {(language, gender): share in (0, 1]}; None means DEMO_TRAIN_SHARE, {} balanced.
    cue_shift: {(language, gender): strength in [0, 1]}; None means DEMO_CUE_SHIFT, {} the shared mapping.
    dev_per_cell overrides eval_per_cell for the dev split only.
    workers: processes (default: CPU count). progress(done, total) is called as utterances finish.
    render_cache: a directory of rendered utterances shared by corpora (`render_cached`): corpora that hold
    the same utterances (the bias lab's, which differ only where a bias applies) render each once; the
    corpus's files are hard links to its entries where the filesystem allows. The output is the same."""

    bias = dict(DEMO_BIAS if bias is None else bias)
    train_share = dict(DEMO_TRAIN_SHARE if train_share is None else train_share)
    cue_shift = dict(DEMO_CUE_SHIFT if cue_shift is None else cue_shift)
    eval_per_cell = max(1, 2 * per_cell // 3) if eval_per_cell is None else eval_per_cell
    workers = workers or os.cpu_count() or 1
    _check_args(per_cell, eval_per_cell, bias, lexical_cue_rate, workers, train_share, cue_shift)
    if dev_per_cell is not None and dev_per_cell < 1:
        raise ConfigError(f"dev_per_cell={dev_per_cell} is out of range; expected an integer >= 1")
    check_writable_dir(out_dir, "corpus", force)
    version = espeak_version()
    rows, jobs = plan_corpus(per_cell=per_cell, eval_per_cell=eval_per_cell, bias=bias, seed=seed,
                             lexical_cue_rate=lexical_cue_rate, dev_per_cell=dev_per_cell, train_share=train_share,
                             cue_shift=cue_shift, voices=voices, sentences=sentences, id_prefix=id_prefix)
    total = len(jobs)
    cache = None
    if render_cache is not None:
        Path(render_cache).mkdir(parents=True, exist_ok=True)
        cache = str(render_cache)
    with atomic_dir(out_dir, kind="corpus", force=force) as tmp:
        # Chunks keep process overhead low; order of results is the order of jobs, so output is
        # independent of scheduling.
        size = max(1, min(32, total // (workers * 4) or 1))
        chunks = [jobs[i:i + size] for i in range(0, total, size)]
        durations: list[float] = []
        if workers == 1:
            for chunk in chunks:
                durations += _render_chunk(chunk, str(tmp), cache, version)
                if progress:
                    progress(len(durations), total)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_render_chunk, chunk, str(tmp), cache, version) for chunk in chunks]
                try:
                    for fut in futures:
                        durations += fut.result()
                        if progress:
                            progress(len(durations), total)
                except BaseException:  # a failed chunk or Ctrl-C: drop the queued work instead of finishing it
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

        df = pd.DataFrame(rows)
        df["duration_s"] = durations
        manifest = tmp / "manifest.csv"
        write_manifest(df, manifest)
        problems = validate_manifest(manifest, modality="multi")
        if problems:  # a bug here, not a user error: fail loudly before anything is published
            raise RuntimeError(f"generated manifest is invalid:\n{format_problems(problems, 20)}")
        meta = {
            "generator": "ermgap.data.synth", "espeak_ng": version, "seed": seed, "per_cell": per_cell,
            "eval_per_cell": eval_per_cell, "dev_per_cell": dev_per_cell or eval_per_cell,
            "lexical_cue_rate": lexical_cue_rate,
            "bias": [{"language": k[0], "gender": k[1], "strength": v} for k, v in sorted(bias.items())],
            "train_share": [{"language": k[0], "gender": k[1], "share": v} for k, v in sorted(train_share.items())],
            "cue_shift": [{"language": k[0], "gender": k[1], "strength": v} for k, v in sorted(cue_shift.items())],
            "cue_shift_mapping": CUE_SHIFT,
            "sample_rate": SAMPLE_RATE, "voices": voices, "espeak_language": ESPEAK_LANG,
            "emotion_prosody": {e: asdict(p) for e, p in EMOTION_PROSODY.items()},
            "jitter_sd": asdict(JITTER), "speaker_jitter_sd": asdict(SPEAKER_JITTER),
            "num_utterances": total, "num_prosody_neutralised": int(df["prosody_neutralised"].sum()),
            "num_lexical_cue": int(df["lexical_cue"].sum()), "total_duration_s": round(float(sum(durations)), 2),
        }
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out_dir) / "manifest.csv"
