"""The protected attribute a trained run's representation still carries: the pooled hidden states that
`objective.kind=adversarial`'s attribute head reads, for any manifest split, from a finished run's directory,
and a fresh probe fitted on them (`ermgap leakage`).

    rows, feats = pooled_features("runs/adv", "test")        # feats: float32 [N, hidden]
    result = probe_runs(["runs/erm", "runs/adv"], fit="dev", score="test")

A probe fitted afterwards on these features measures the leakage independently of the run's own head
(`<split>_attr_acc` is that head's accuracy, a weak witness: the adapter can fool the head it trains against,
and a head that learnt only the attribute's prior reads balanced splits at chance whatever the features hold).
The probe is scikit-learn's logistic regression on standardised features with balanced class weights, scored
by balanced accuracy (chance is 1 / the number of attribute values, whatever the split's shares), with a
bootstrap 95 % interval over the scored utterances; runs scored on the same utterances are compared with paired
resamples. The features are the training forward's own
(`scoring.per_sample_loss`'s forward inputs), of the backbone with the run's best adapter, pooled and read
from the layer the run's `objective.adversarial` names unless told otherwise; a run of another kind is
read with those keys' defaults (the mean over the audio positions of the last layer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
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

__all__ = ["POOLS", "ProbeResult", "balanced_accuracy_ci", "fit_probe", "pooled_features", "probe_runs"]

POOLS = {"audio": "audio_hidden", "answer": "answer_hidden"}  # objective.adversarial.pool → forward input
RESAMPLE_BLOCK = 1 << 20  # bootstrap draws held at once (balanced_accuracy_ci)


def pooled_features(run_dir: str | os.PathLike, split: str = "test", *, manifest: str | os.PathLike | None = None,
                    pool: str | None = None, layer: int | None = None, batch_size: int | None = None,
                    device: str = "cpu") -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, features): the rows of `split` in the run's manifest (or `manifest`), in manifest order, and one
    pooled hidden state per row, float32 [N, hidden], from the run's backbone with its best adapter
    (`run_dir/adapter`). pool ("audio" | "answer") and layer default to the run's `objective.adversarial`
    keys; batch_size to its `eval.batch_size`. ConfigError names what is missing or unknown."""
    inputs = _run_inputs(run_dir, (split,), manifest=manifest, pool=pool, layer=layer)
    return _features(inputs, batch_size=batch_size, device=device)[split]


@dataclass(frozen=True)
class _RunInputs:
    """What a run's features are read from, checked without loading a model."""

    run_dir: Path
    cfg: object
    task: object
    pool: str
    layer: int
    rows: dict[str, pd.DataFrame]  # split → its manifest rows, in manifest order


def _run_inputs(run_dir: str | os.PathLike, splits: Sequence[str], *, manifest: str | os.PathLike | None = None,
                pool: str | None = None, layer: int | None = None) -> _RunInputs:
    """The run's config, task, pool/layer (defaults: its `objective.adversarial` keys) and each split's rows;
    ConfigError naming what is missing or unknown (no config.yaml, an unknown pool, an empty split)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE}; not a run directory of `ermgap train`")
    cfg = load_config(run_dir / CONFIG_FILE, [f"data.manifest={manifest}"] if manifest is not None else [])
    adversarial = cfg.objective.adversarial
    pool = adversarial.pool if pool is None else pool
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is unknown; choose one of {', '.join(POOLS)}")
    df = run_manifest(cfg)
    task = resolve_task(cfg, df)  # the run's config.yaml declares its task: the same indices as in training
    rows = {}
    for split in splits:
        rows[split] = df[df["split"] == split].reset_index(drop=True)
        if rows[split].empty:
            raise ConfigError(f"{cfg.data.manifest}: no rows in split {split!r}")
    return _RunInputs(run_dir, cfg, task, pool, adversarial.layer if layer is None else layer, rows)


def _features(inputs: _RunInputs, *, batch_size: int | None = None,
              device: str = "cpu") -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """{split: (rows, pooled features float32 [N, hidden])} with one load of the backbone and the run's adapter."""
    cfg, task, name = inputs.cfg, inputs.task, POOLS[inputs.pool]
    model, processor = load_backbone(cfg.model, device=device)
    model = load_adapter(model, inputs.run_dir / "adapter").to(device).eval()
    collator = EmotionCollator(processor, cfg.prompt, cfg.data.modality, sample_rate=cfg.data.sample_rate, task=task)
    step = batch_size or cfg.eval.batch_size
    result = {}
    for split, rows in inputs.rows.items():
        data = UtteranceDataset(rows, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s,
                                extra_columns=(task.attribute, *task.stratum))
        out = []
        with torch.no_grad():
            for start in range(0, len(data), step):
                batch = to_device(collator([data[i] for i in range(start, min(start + step, len(data)))]), device)
                _, pooled = per_sample_loss(model, batch, inputs=(name,), layer=inputs.layer)
                out.append(pooled[name].float().cpu())
        result[split] = (rows, torch.cat(out).numpy())
    return result


@dataclass(frozen=True)
class ProbeResult:
    """A fresh probe of one run's pooled features: fitted on `fit`, scored on `score` by balanced accuracy."""

    run: str
    objective: str
    attribute: str
    values: tuple[str, ...]          # the attribute's values (chance = 1 / len)
    fit: str
    n_fit: int
    score: str
    n_score: int
    balanced_acc: float
    ci: tuple[float, float]
    head_acc: float | None = None    # the run's own attribute head on `score` (`<score>_attr_acc`), if it has one
    delta: float | None = None       # balanced_acc − the first run's, paired over the same utterances
    delta_ci: tuple[float, float] | None = None

    @property
    def chance(self) -> float:
        return 1.0 / len(self.values)


def fit_probe(fit_x: np.ndarray, fit_y: np.ndarray, score_x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Logistic regression on standardised features with balanced class weights: fitted on (fit_x, fit_y),
    the predicted labels of score_x."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000,
                                                               random_state=seed))
    return probe.fit(fit_x, fit_y).predict(score_x)


def _balanced(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Balanced accuracy under each row of utterance multiplicities weights [R, N] → [R] (a value absent from
    a resample does not count, as in scikit-learn)."""
    recalls = []
    for v in values:
        of_v = y == v
        total = weights[:, of_v].sum(1)
        hits = weights[:, of_v & (pred == v)].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(total > 0, hits / total, np.nan))
    return np.nanmean(np.stack(recalls, 1), 1)


def balanced_accuracy_ci(y: np.ndarray, preds: Sequence[np.ndarray], *, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """(points, intervals, difference intervals): each prediction vector's balanced accuracy against y with a
    percentile bootstrap interval over the utterances, and each one's difference from preds[0] with an interval
    from the same (paired) resamples."""
    from ermgap.metrics import percentile_ci

    y = np.asarray(y)
    preds = [np.asarray(p) for p in preds]
    values = np.unique(y)
    n = len(y)
    rng = np.random.default_rng(seed)
    # Resamples in blocks of about RESAMPLE_BLOCK draws: memory O(block), not O(n_boot × n). Drawing block by
    # block gives the same draws as one (n_boot, n) call.
    rows = max(1, RESAMPLE_BLOCK // max(n, 1))
    parts: list[list[np.ndarray]] = [[] for _ in preds]
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        draws = rng.integers(0, n, size=(k, n))
        weights = np.bincount((draws + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        for part, p in zip(parts, preds):
            part.append(_balanced(weights, y, p, values))
    points = [float(_balanced(np.ones((1, n)), y, p, values)[0]) for p in preds]
    samples = [np.concatenate(part) for part in parts]
    cis = [percentile_ci(s, level) for s in samples]
    deltas = [percentile_ci(s - samples[0], level) for s in samples[1:]]
    return points, cis, deltas


def probe_runs(run_dirs: Sequence[str | os.PathLike], *, fit: str = "dev", score: str = "test",
               pool: str | None = None, layer: int | None = None, n_boot: int = 1000, seed: int = 0,
               progress=None) -> list[ProbeResult]:
    """A fresh probe of each run's protected attribute (see the module docstring). Every run is checked before
    any model loads (a run directory with config.yaml and its best adapter, both splits present, two attribute
    values to fit on; fit ≠ score). Runs scored on the same utterances get their difference from the first run
    with a paired interval. `progress(text)` hears of each run as it starts."""
    from ermgap.config import flatten
    from ermgap.objectives import describe_objective

    if fit == score:
        raise ConfigError(f"--fit and --score are both {fit!r}: a probe scored on the utterances it was fitted on "
                          "measures memory, not leakage; choose two splits")
    checked = []
    for run in map(Path, run_dirs):
        inputs = _run_inputs(run, (fit, score), pool=pool, layer=layer)
        if not (run / "adapter").is_dir():
            raise ConfigError(f"{run}: no adapter/; the run has not finished (its best adapter is written at the end)")
        values = inputs.rows[fit][inputs.task.attribute]
        if values.nunique() < 2:
            raise ConfigError(f"{run}: split {fit!r} has one {inputs.task.attribute} value only "
                              f"({values.iloc[0]!r}); a probe needs two to fit")
        checked.append(inputs)
    preds = []
    for inputs in checked:
        if progress is not None:
            progress(f"{inputs.run_dir}: pooled features of {fit} and {score}")
        feats = _features(inputs)
        attribute = inputs.task.attribute
        preds.append(fit_probe(feats[fit][1], feats[fit][0][attribute].to_numpy(), feats[score][1], seed=seed))

    def labels(inputs: _RunInputs) -> pd.Series:
        return inputs.rows[score][inputs.task.attribute]

    first = checked[0]
    paired = [i for i, inputs in enumerate(checked) if inputs.task.attribute == first.task.attribute
              and inputs.rows[score]["utt_id"].tolist() == first.rows[score]["utt_id"].tolist()]
    points, cis, deltas = balanced_accuracy_ci(labels(first).to_numpy(), [preds[i] for i in paired], n_boot=n_boot,
                                               seed=seed)
    by_run = {i: (points[j], cis[j], None if j == 0 else deltas[j - 1]) for j, i in enumerate(paired)}
    results = []
    for i, (inputs, pred) in enumerate(zip(checked, preds)):
        if i in by_run:
            point, ci, delta_ci = by_run[i]
        else:  # other utterances: its own interval, no difference from the first run
            (point,), (ci,), _ = balanced_accuracy_ci(labels(inputs).to_numpy(), [pred], n_boot=n_boot, seed=seed)
            delta_ci = None
        metrics = inputs.run_dir / "metrics.json"
        head = json.loads(metrics.read_text()).get(f"{score}_attr_acc") if metrics.is_file() else None
        results.append(ProbeResult(
            run=str(inputs.run_dir), objective=describe_objective(flatten(inputs.cfg.to_dict())),
            attribute=inputs.task.attribute, values=tuple(str(v) for v in sorted(labels(inputs).unique())), fit=fit,
            n_fit=len(inputs.rows[fit]), score=score, n_score=len(inputs.rows[score]), balanced_acc=point,
            ci=(ci[0], ci[1]), head_acc=None if head is None else float(head),
            delta=None if delta_ci is None else point - by_run[0][0],
            delta_ci=None if delta_ci is None else (delta_ci[0], delta_ci[1])))
    return results
