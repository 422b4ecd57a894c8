"""A pretrained tiny backbone: `ermgap model tiny --pretrain`.

The paper fine-tunes only the language model of a *pretrained* speech LLM (LoRA on the LM, audio encoder
frozen). A randomly initialised tiny Qwen2-Audio cannot learn that way: its frozen encoder's features carry
no emotion. So the tiny model is first trained in full (encoder, projector and language model) on a
pretraining corpus of its own: the synthetic corpus generator (`ermgap.data.synth`) with voices and sentences
that the demo corpus never uses (`PRETRAIN_VOICES`, `PRETRAIN_SENTENCES`), both genders equally represented
in every language (or one gender only: `PretrainSettings.genders`, `--pretrain-genders`). The pretraining
corpus always expresses emotion through the generator's shared prosodic mapping (no `cue_shift`, no `bias`):
the backbone never learns a cue-shifted group's mapping, so a fine-tuning corpus with one (the bias lab's
positive control) is where that mapping must be learned. The result is saved as an ordinary Qwen2-Audio directory (plus `pretraining.json`: what it
was trained on and its dev trajectory), so everything that loads a hub id or a local directory loads it, and
its zero-shot evaluation on the demo corpus is on unseen voices and unseen sentences.

One process, plain PyTorch (no Ray): it is a model-building step like `ermgap model tiny`, a few minutes on 2
cores. Deterministic given the seed on the same machine and thread count.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ermgap.batching import EmotionCollator, featurize
from ermgap.config import ModelConfig, PromptConfig
from ermgap.data.dataset import UtteranceDataset
from ermgap.data.manifest import read_manifest
from ermgap.data.synth import PRETRAIN_SENTENCES, PRETRAIN_VOICES, synthesize
from ermgap.errors import ConfigError
from ermgap.io import atomic_dir, check_writable_dir
from ermgap.labels import GENDERS
from ermgap.model import build_tiny, load_backbone
from ermgap.scoring import per_sample_loss, score_labels

PRETRAINING_FILE = "pretraining.json"
# The pretraining corpus's seed offset from the model seed: its prosody draws differ from the demo corpus's
# (seed 0) even for model seed 0.
CORPUS_SEED_OFFSET = 1000


@dataclass(frozen=True)
class PretrainSettings:
    """What the pretraining run does. Defaults: 3 languages × 2 genders × 7 emotions × 12 = 504 training
    utterances, 10 epochs at batch 16 (~1.5 min on 2 cores; docs/demo.md, "The pretrained tiny backbone")."""

    epochs: int = 10
    lr: float = 3e-4          # full training of the tiny model from random init: 1e-3 stays at chance (NOTES)
    batch_size: int = 16
    per_cell: int = 12
    eval_per_cell: int = 3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    # Which genders' utterances it trains on: both (balanced), or the majority gender of the fine-tuning
    # corpus only, so the backbone has heard no emotional speech of the minority at all.
    genders: tuple[str, ...] = GENDERS

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "per_cell", "eval_per_cell"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretraining {name}={getattr(self, name)} is out of range; expected an integer >= 1")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"pretraining lr={self.lr} is out of range; expected 0 < lr <= 1")
        bad = [g for g in self.genders if g not in GENDERS]
        if bad or not self.genders or len(set(self.genders)) != len(self.genders):
            raise ConfigError(f"pretraining genders={','.join(self.genders) or '(none)'} is not allowed; expected "
                              f"one or both of {', '.join(GENDERS)}, each once")


# progress(event, fields): "corpus" {done, total}; "epoch" {epoch, epochs, train_loss, dev_acc}
Progress = Callable[[str, dict], None]


def pretrain_corpus(out_dir: str | os.PathLike, settings: PretrainSettings, *, workers: int | None = None,
                    progress: Progress | None = None) -> Path:
    """Synthesise the pretraining corpus (balanced genders, shared prosodic mapping, PRETRAIN_VOICES /
    PRETRAIN_SENTENCES) → manifest. Both genders are synthesised whatever `settings.genders` (the training
    reads only those), so the utterances of a gender are the same whichever genders are kept."""
    return synthesize(out_dir, per_cell=settings.per_cell, eval_per_cell=settings.eval_per_cell, bias={},
                      train_share={}, cue_shift={}, seed=settings.seed + CORPUS_SEED_OFFSET, workers=workers,
                      voices=PRETRAIN_VOICES, sentences=PRETRAIN_SENTENCES, id_prefix="pre",
                      progress=(lambda d, t: progress("corpus", {"done": d, "total": t})) if progress else None)


def _features(processor, manifest: Path, splits: tuple[str, ...], genders: tuple[str, ...] = GENDERS
              ) -> list[list[dict]]:
    """Featurised examples of each split (the given genders' only), the manifest read (and validated) once."""
    df = read_manifest(manifest)
    df = df[df["gender"].isin(genders)]
    out = []
    for split in splits:
        data = UtteranceDataset(df[df["split"] == split], sample_rate=processor.feature_extractor.sampling_rate)
        out.append(featurize(processor, [data[i] for i in range(len(data))]))
    return out


@torch.no_grad()
def accuracy(model, collator: EmotionCollator, examples: list[dict], batch_size: int = 32) -> float:
    """Label-scoring accuracy (argmax over the task's labels) on featurised examples."""
    model.eval()
    right = 0
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start:start + batch_size])
        right += int((score_labels(model, batch).argmax(-1) == batch["gold"]).sum())
    return right / max(1, len(examples))


def train_full(model, processor, manifest: Path, settings: PretrainSettings, *,
               progress: Progress | None = None) -> list[dict]:
    """Train every parameter on the corpus's train split; keep the weights of the best dev accuracy.
    Returns the per-epoch history [{epoch, train_loss, dev_acc, seconds}]."""
    collator = EmotionCollator(processor, PromptConfig(), "uni")
    train, dev = _features(processor, manifest, ("train", "dev"), settings.genders)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    best_acc, best_state, history = -1.0, None, []
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        losses = []
        for start in range(0, len(order), settings.batch_size):
            batch = collator([train[i] for i in order[start:start + settings.batch_size]])
            loss = per_sample_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
        dev_acc = accuracy(model, collator, dev)
        row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev_acc": dev_acc,
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        if dev_acc > best_acc:
            best_acc, best_state = dev_acc, copy.deepcopy(model.state_dict())
        if progress:
            progress("epoch", {**row, "epochs": settings.epochs})
    model.load_state_dict(best_state)
    model.eval()
    return history


def pretrain_tiny(out_dir: str | os.PathLike, *, settings: PretrainSettings = PretrainSettings(), force: bool = False,
                  d_model: int = 128, layers: int = 2, chunk_length_s: int = 4, workers: int | None = None,
                  progress: Progress | None = None) -> Path:
    """Build the tiny Qwen2-Audio (seed `settings.seed`), pretrain it in full and save it (atomically) at
    `out_dir` as an ordinary Qwen2-Audio directory with `pretraining.json`. Returns `out_dir`."""
    check_writable_dir(out_dir, "model", force)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ermgap-pretrain-") as work:
        manifest = pretrain_corpus(Path(work) / "corpus", settings, workers=workers, progress=progress)
        init = build_tiny(Path(work) / "init", seed=settings.seed, d_model=d_model, layers=layers,
                          chunk_length_s=chunk_length_s)
        model, processor = load_backbone(ModelConfig(name_or_path=str(init), dtype="fp32"))
        history = train_full(model, processor, manifest, settings, progress=progress)
        corpus = json.loads((manifest.parent / "corpus.json").read_text(encoding="utf-8"))
        with atomic_dir(out_dir, kind="model", force=force) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            best = max(history, key=lambda r: r["dev_acc"])
            (tmp / PRETRAINING_FILE).write_text(json.dumps({
                "settings": asdict(settings), "architecture": {"d_model": d_model, "layers": layers,
                                                               "audio_seconds": chunk_length_s},
                "corpus": {**{k: corpus[k] for k in ("seed", "per_cell", "eval_per_cell", "voices", "num_utterances",
                                                     "total_duration_s", "espeak_ng", "cue_shift", "bias")},
                           "genders_trained": list(settings.genders)},
                "sentences": PRETRAIN_SENTENCES, "best_epoch": best["epoch"], "best_dev_acc": best["dev_acc"],
                "history": history, "seconds": round(time.perf_counter() - t0, 1),
            }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out_dir)
