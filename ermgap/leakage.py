"""The protected attribute a trained run's representation still carries: the pooled hidden states that
`objective.kind=adversarial`'s attribute head reads, for any manifest split, from a finished run's directory.

    rows, feats = pooled_features("runs/adv", "test")        # feats: float32 [N, hidden]
    LogisticRegression().fit(dev_feats, dev_rows["gender"]).score(feats, rows["gender"])

A probe fitted afterwards on these features measures the leakage independently of the run's own head
(`<split>_attr_acc` is that head's accuracy). The features are the training forward's own
(`scoring.per_sample_loss`'s forward inputs), of the backbone with the run's best adapter, pooled and read
from the layer the run's `objective.adversarial` names unless told otherwise; a run of another kind is
read with those keys' defaults (the mean over the audio positions of the last layer).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ermgap.batching import EmotionCollator, to_device
from ermgap.config import load_config
from ermgap.data.dataset import UtteranceDataset
from ermgap.errors import ConfigError
from ermgap.model import load_adapter, load_backbone
from ermgap.preflight import resolve_task, run_manifest
from ermgap.run_outputs import CONFIG_FILE
from ermgap.scoring import per_sample_loss

__all__ = ["POOLS", "pooled_features"]

POOLS = {"audio": "audio_hidden", "answer": "answer_hidden"}  # objective.adversarial.pool → forward input


def pooled_features(run_dir: str | os.PathLike, split: str = "test", *, manifest: str | os.PathLike | None = None,
                    pool: str | None = None, layer: int | None = None, batch_size: int | None = None,
                    device: str = "cpu") -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, features): the rows of `split` in the run's manifest (or `manifest`), in manifest order, and one
    pooled hidden state per row, float32 [N, hidden], from the run's backbone with its best adapter
    (`run_dir/adapter`). pool ("audio" | "answer") and layer default to the run's `objective.adversarial`
    keys; batch_size to its `eval.batch_size`. ConfigError names what is missing or unknown."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE}; not a run directory of `ermgap train`")
    cfg = load_config(run_dir / CONFIG_FILE, [f"data.manifest={manifest}"] if manifest is not None else [])
    adversarial = cfg.objective.adversarial
    pool = adversarial.pool if pool is None else pool
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is unknown; choose one of {', '.join(POOLS)}")
    layer = adversarial.layer if layer is None else layer
    df = run_manifest(cfg)
    task = resolve_task(cfg, df)  # the run's config.yaml declares its task: the same indices as in training
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ConfigError(f"{cfg.data.manifest}: no rows in split {split!r}")
    model, processor = load_backbone(cfg.model, device=device)
    model = load_adapter(model, run_dir / "adapter").to(device).eval()
    collator = EmotionCollator(processor, cfg.prompt, cfg.data.modality, sample_rate=cfg.data.sample_rate, task=task)
    data = UtteranceDataset(rows, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s,
                            extra_columns=(task.attribute, *task.stratum))
    step = batch_size or cfg.eval.batch_size
    out = []
    with torch.no_grad():
        for start in range(0, len(data), step):
            batch = to_device(collator([data[i] for i in range(start, min(start + step, len(data)))]), device)
            _, inputs = per_sample_loss(model, batch, inputs=(POOLS[pool],), layer=layer)
            out.append(inputs[POOLS[pool]].float().cpu())
    return rows, torch.cat(out).numpy()
