"""The bias lab's controlled corpora: one minority, three kinds of audio, each with its oracle.

All corpora are `ermgap.data.synth` corpora of the same seed and sizes. The male speakers of every language are the
minority: `MINORITY_SHARE` of their train utterances are kept (dev and test stay balanced). What differs is
only how the minority's audio carries the emotion:

- positive control: through a mapping of its own (`cue_shift`): learnable from the minority's own examples but
  not transferable from the majority's, so ERM, which mostly sees the majority, leaves a gap that weighting the
  minority up can close;
- irreducible bias: 80 % of the minority's emotional utterances are spoken with neutral prosody (`bias`), in every
  split: the label is not in the audio, a fairness objective can close the gap only by levelling down;
- negative control: no bias at all. Both genders are drawn from one pool of voices with the shared mapping, so
  gender is a label only (a placebo attribute): nothing in the audio differs between the groups and a gap in
  either direction is noise. The minority is under-represented like the others', so the objectives are active
  (their weights and penalties differ from ERM's) but have no gap to close. Why one voice pool: with gendered
  voices and the shared mapping, ERM leaves a 13.7-point gap in Japanese that restoring the minority's data does
  not close (the synthetic male Japanese voices are harder: docs/bias-lab.md), so such a corpus is not a case
  where no gap exists.

Each corpus has an *oracle* twin with the minority's train share restored (`train_share={}`). Because every
utterance of `ermgap.data.synth` draws from its own random stream, the twin's dev and test splits are the same
utterances, so the oracle row is compared with ERM utterance by utterance. Corpora are written under one root,
and a corpus already there with the same recorded settings is reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ermgap.data.synth import VOICES, synthesize
from ermgap.errors import ConfigError, OutputExistsError
from ermgap.labels import LANGUAGES

MINORITY = "M"
MINORITY_SHARE = 0.25
NEUTRALISED = 0.8
ORACLE_SUFFIX = "_oracle"

Groups = dict[tuple[str, str], float]
Voices = dict[str, dict[str, tuple[str, ...]]]
# The negative control's voices: every gender's train (eval) pool is the union of both genders' train (eval) pools.
ONE_POOL: Voices = {g: {split: tuple(v for gender in VOICES for v in VOICES[gender][split]) for split in VOICES[g]}
                    for g in VOICES}


def _every_language(value: float) -> Groups:
    return {(lang, MINORITY): value for lang in LANGUAGES}


@dataclass(frozen=True)
class Sizes:
    """Utterances per (language, gender, emotion) cell: train (before the minority's share), dev and test.

    test: sized so that a 5-point difference of the worst language's gap between two objectives, pooled over 3
    seeds, has a 95 % bootstrap interval narrower than ±3 points (docs/bias-lab.md, "Test split size")."""

    train: int = 24
    dev: int = 8
    test: int = 48
    seed: int = 0


@dataclass(frozen=True)
class LabCorpus:
    """One controlled corpus: its name (directory and table key), what it is, and its synth settings."""

    name: str
    title: str
    cue_shift: Groups = field(default_factory=dict)
    bias: Groups = field(default_factory=dict)
    train_share: Groups = field(default_factory=lambda: _every_language(MINORITY_SHARE))
    voices: Voices = field(default_factory=lambda: VOICES)

    def oracle(self) -> LabCorpus:
        """The same corpus with the minority's train share restored (same dev and test utterances)."""
        return replace(self, name=self.name + ORACLE_SUFFIX, title=self.title + " (oracle: share restored)",
                       train_share={})

    def settings(self, sizes: Sizes) -> dict:
        """The generator's arguments, as `synthesize` takes them."""
        return {"per_cell": sizes.train, "dev_per_cell": sizes.dev, "eval_per_cell": sizes.test, "seed": sizes.seed,
                "cue_shift": self.cue_shift, "bias": self.bias, "train_share": self.train_share,
                "lexical_cue_rate": 0.0, "voices": self.voices}


CONTROLS: tuple[LabCorpus, ...] = (
    LabCorpus("positive", "positive control: minority cue-shifted and under-represented",
              cue_shift=_every_language(1.0)),
    LabCorpus("irreducible", "irreducible bias: minority prosody neutralised and under-represented",
              bias=_every_language(NEUTRALISED)),
    LabCorpus("negative", "negative control: no bias, gender a label only (one voice pool), minority "
              "under-represented", voices=ONE_POOL),
)


def _recorded(settings: dict) -> dict:
    """The part of corpus.json that `settings` determines (what must match for a corpus to be reused)."""
    groups = {k: [{"language": g[0], "gender": g[1], name: v} for g, v in sorted(settings[k].items())]
              for k, name in (("cue_shift", "strength"), ("bias", "strength"), ("train_share", "share"))}
    return {"per_cell": settings["per_cell"], "dev_per_cell": settings["dev_per_cell"],
            "eval_per_cell": settings["eval_per_cell"], "seed": settings["seed"],
            "lexical_cue_rate": settings["lexical_cue_rate"], **groups,
            # corpus.json holds JSON lists
            "voices": {g: {k: list(v) for k, v in pools.items()} for g, pools in settings["voices"].items()}}


def build_corpus(root: str | Path, corpus: LabCorpus, sizes: Sizes, *, force: bool = False, workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 render_cache: str | Path | None = None) -> tuple[Path, bool]:
    """`root/<name>/manifest.csv`, synthesised unless a corpus with the same settings is there already.

    Returns (manifest, built). A directory holding anything else (another corpus, other files) is replaced only
    with `force`; otherwise OutputExistsError names what differs. `render_cache`: see `synthesize` (the lab's
    corpora share most of their utterances)."""
    out = Path(root) / corpus.name
    settings = corpus.settings(sizes)
    meta_file = out / "corpus.json"
    if out.exists():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        want = _recorded(settings)
        have = {k: meta.get(k) for k in want} if isinstance(meta, dict) else None
        if have == want and (out / "manifest.csv").is_file():
            return out / "manifest.csv", False
        if not force:
            differ = "no corpus.json" if have is None else ", ".join(
                f"{k} {have[k]!r} (want {want[k]!r})" for k in want if have[k] != want[k]) or "no manifest.csv"
            raise OutputExistsError(f"{out} holds another corpus ({differ}); pass --force to replace it")
    return synthesize(out, force=force, workers=workers, progress=progress, render_cache=render_cache, **settings), True


def lab_corpora(names: tuple[str, ...] | None = None) -> tuple[LabCorpus, ...]:
    """The controls named (all when None), in the lab's order; ConfigError for an unknown name."""
    known = {c.name: c for c in CONTROLS}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ConfigError(f"unknown corpus {', '.join(map(repr, unknown))}; the lab's corpora are {', '.join(known)}")
    return tuple(c for c in CONTROLS if names is None or c.name in names)
