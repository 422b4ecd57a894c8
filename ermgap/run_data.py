"""One worker's data for a run: the three splits with their features, the cells of a frame, the
predictions of a split sharded over the workers and gathered, and a split's reported metrics.

Features: log-mel computed once per worker and reused every epoch (`CachedFeatures`), or, when the audio
encoder is frozen, the encoder's output from the run's feature cache (ermgap.feature_cache), which each
rank fills for its share of the missing utterances before every rank reads all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ermgap.batching import EmotionCollator, featurize, to_device
from ermgap.config import RunConfig
from ermgap.data.dataset import UtteranceDataset
from ermgap.evaluate import predictions_frame
from ermgap.feature_cache import EncodedDataset, FeatureCache, encoder_fingerprint, supports
from ermgap.metric_registry import METRICS
from ermgap.metric_registry import split_metrics as reported_metrics
from ermgap.metrics import compute_metrics, per_key
from ermgap.objectives import Objective
from ermgap.objectives.cells import loss_gap
from ermgap.sampler import shard_for_eval
from ermgap.scoring import answer_loss_from_scores, per_sample_loss, score_labels
from ermgap.task import RUN_MODALITY, Task

SPLIT_NAMES = ("train", "dev", "test")



@dataclass(frozen=True)
class Strata:
    """The groups inside which the attribute gap is measured (`objective.stratum`, resolved into the run's
    Task): their names, in index order. Batches carry each example's index (`batch["stratum"]`)."""

    names: tuple[str, ...]

    @classmethod
    def from_task(cls, task: Task) -> Strata:
        return cls(task.stratum_values)

    @property
    def num(self) -> int:
        return len(self.names)

    def named(self, prefix: str, values) -> dict[str, float]:
        """{prefix + stratum name: value} for the strata whose value is defined (not NaN)."""
        flat = torch.as_tensor(values).detach().flatten().tolist()
        return {f"{prefix}{n}": v for n, v in zip(self.names, flat) if v == v}


class CachedFeatures(torch.utils.data.Dataset):
    """UtteranceDataset items with log-mel features computed once per worker and reused every epoch."""

    def __init__(self, base: UtteranceDataset, processor) -> None:
        self.base, self.processor, self.cache = base, processor, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        if i not in self.cache:
            self.cache[i] = featurize(self.processor, [self.base[i]])[0]
        return self.cache[i]


@dataclass
class Split:
    rows: pd.DataFrame          # the manifest rows of the split, in manifest order
    base: UtteranceDataset      # decoded audio (lengths for batching)
    features: CachedFeatures | EncodedDataset   # what the collator consumes: log-mels, or cached encoder output


def open_feature_cache(directory, cfg: RunConfig, model, processor) -> FeatureCache | None:
    """The encoder-output cache in `directory` (the driver's cache_dir: an S3 endpoint travels with it) when
    the audio encoder is frozen, else None."""
    if directory is None or not supports(model):
        return None
    fingerprint = encoder_fingerprint(model, processor.feature_extractor, sample_rate=cfg.data.sample_rate,
                                      max_audio_s=cfg.data.max_audio_s)
    return FeatureCache(directory, fingerprint)


def load_splits(df: pd.DataFrame, cfg: RunConfig, task: Task, processor, model, *, cache: FeatureCache | None,
                rank: int, world: int, device: torch.device) -> dict[str, Split]:
    """train/dev/test of the run's manifest rows `df`, with their features (see the module docstring)."""
    splits: dict[str, Split] = {}
    for split in SPLIT_NAMES:
        rows = df[df["split"] == split].reset_index(drop=True)
        base = UtteranceDataset(rows, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s,
                                extra_columns=(task.attribute, *task.stratum))
        features = CachedFeatures(base, processor) if cache is None else EncodedDataset(
            base, cache, model, processor, batch_size=cfg.eval.batch_size, device=device)
        splits[split] = Split(rows, base, features)
    if cache is not None:
        # Each rank encodes its share of the missing entries, then every rank reads all of them. A run
        # that trains nothing (zero-shot) never reads the train split.
        for name, data in splits.items():
            if name != "train" or cfg.optim.epochs > 0:
                data.features.fill(range(rank, len(data.features), world))
        if world > 1:
            torch.distributed.barrier()
    return splits


def cell_indices(frame: pd.DataFrame, task: Task, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratum and attribute index (the task's orders) of each row of a manifest or predictions frame."""
    stratum = torch.from_numpy(task.stratum_codes(frame, modality))
    return stratum, torch.from_numpy(task.attribute_codes(frame[task.attribute]))


@torch.no_grad()
def predict_split(engine, data: Split, collator: EmotionCollator, task: Task, cfg: RunConfig, *, rank: int,
                  world: int, device: torch.device, gather: Callable[[Any], list[Any]]) -> pd.DataFrame:
    """Loss, label scores and prediction for every row of `data`, sharded over workers and gathered
    (`gather`: every rank's object, on every rank). One row per utterance (manifest order), on every rank."""
    engine.eval()
    rows = []
    for chunk in shard_for_eval(data.base.lengths, rank=rank, num_workers=world, batch_size=cfg.eval.batch_size):
        batch = to_device(collator([data.features[i] for i, _ in chunk]), device)
        scores = score_labels(engine, batch).float()
        loss = answer_loss_from_scores(scores, batch).cpu()
        scores = scores.cpu()
        for j, (i, keep) in enumerate(chunk):
            if keep:
                rows.append((i, float(loss[j]), scores[j].tolist()))
    gathered = sorted((r for part_rows in gather(rows) for r in part_rows), key=lambda r: r[0])
    scores = np.array([r[2] for r in gathered], dtype=np.float64).reshape(len(gathered), task.num_labels)
    part = data.rows
    frame = predictions_frame(part["utt_id"], None, part[task.attribute], part["emotion"],
                              scores.argmax(1) if len(gathered) else [], scores=scores,
                              modality=cfg.data.modality, task=task,
                              columns={c: part[c] for c in task.stratum if c != RUN_MODALITY})
    frame["loss"] = [r[1] for r in gathered]  # per-sample dev loss (for Δdev), not written to PREDS.csv
    return frame


def objective_metrics(engine, data: Split, prefix: str, collator: EmotionCollator, objective: Objective,
                      cfg: RunConfig, *, rank: int, world: int, device, gather: Callable[[Any], list[Any]]
                      ) -> dict[str, float]:
    """The objective's own metrics of a split (`Objective.eval_metrics`), `<prefix>_<name>`: one forward pass
    over this rank's shard for its `forward_inputs`, the batches' (numerator, denominator) sums added over
    every rank. {} for a kind that has none (no forward pass)."""
    if not objective.eval_metrics:
        return {}
    totals = {name: [0.0, 0.0] for name in objective.eval_metrics}
    engine.eval()
    with torch.no_grad():
        for chunk in shard_for_eval(data.base.lengths, rank=rank, num_workers=world, batch_size=cfg.eval.batch_size):
            rows = [i for i, keep in chunk if keep]
            if not rows:
                continue
            batch = to_device(collator([data.features[i] for i in rows]), device)
            _, inputs = per_sample_loss(engine, batch, inputs=objective.forward_inputs, layer=objective.hidden_layer)
            for name, (num, den) in objective.evaluation_sums(inputs, batch["stratum"], batch["attribute"]).items():
                totals[name][0] += num
                totals[name][1] += den
    summed = {name: [sum(part[name][i] for part in gather(totals)) for i in (0, 1)] for name in totals}
    return {f"{prefix}_{name}": num / den if den else float("nan") for name, (num, den) in summed.items()}


class SplitLosses:
    """A split's per-sample answer losses with their cells: what the `losses` metrics are computed from."""

    def __init__(self, frame: pd.DataFrame, task: Task, modality: str) -> None:
        self.losses = torch.tensor(frame["loss"].to_numpy())
        self.stratum, self.attribute = cell_indices(frame, task, modality)
        self.strata, self.num_attrs = task.stratum_values, len(task.attribute_values)

    def mean(self) -> float:
        return float(self.losses.mean())

    def gap(self) -> tuple[float, dict[str, float]]:
        """The largest within-stratum attribute gap of the mean loss, and each valid stratum's gap."""
        gap, per = loss_gap(self.losses, self.stratum, self.attribute, num_strata=len(self.strata),
                            num_attrs=self.num_attrs)
        return float(gap), {name: v for name, v in zip(self.strata, per.tolist()) if v == v}


def split_metrics(frame: pd.DataFrame, prefix: str, task: Task, modality: str) -> dict[str, float]:
    """Every reported metric (ermgap.metric_registry) of a predictions frame with per-sample losses:
    `<prefix>_<metric>`, and `<prefix>_<metric>_<stratum>` for the per-stratum ones."""
    computed = compute_metrics(preds_only(frame), task)
    per = computed[per_key(task)]
    losses = SplitLosses(frame, task, modality)
    out: dict[str, float] = {}
    by_stratum: dict[str, float] = {}
    for name in reported_metrics():
        metric = METRICS[name]
        if metric.source == "counts":
            value, strata = computed["overall"][name], {s: block[name] for s, block in per.items()}
        elif metric.source == "strata":
            value, strata = metric.formula(per), {}
        else:
            value, strata = metric.formula(losses)
        out[f"{prefix}_{name}"] = float(value)
        if metric.per_stratum:
            by_stratum.update({f"{prefix}_{name}_{s}": float(v) for s, v in strata.items()})
    return {**out, **by_stratum}


def preds_only(frame: pd.DataFrame) -> pd.DataFrame:
    """A predictions frame without the per-sample loss column (what PREDS.csv holds)."""
    return frame.drop(columns=["loss"])


__all__ = ["CachedFeatures", "Split", "SplitLosses", "Strata", "cell_indices", "load_splits", "objective_metrics",
           "open_feature_cache",
           "predict_split", "preds_only", "split_metrics"]
