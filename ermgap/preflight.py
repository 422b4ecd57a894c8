"""Pre-flight: everything `ermgap train` and a sweep check and resolve before Ray starts.

    resolved_config(cfg)   absolute local paths, the tracking URI and storage path fixed (what workers receive)
    run_manifest(cfg)      the run's manifest rows, validated for its task, `data.languages` applied
    resolve_task(cfg)      the run's Task (labels, stratum, attribute values) from config + manifest, once
    with_task(cfg, task)   the config declaring that Task explicitly (config.yaml and MLflow reproduce it)
    check_inputs(cfg)      the manifest, every audio file, the model directory, batch size vs the train split;
                           returns the run's Task
    check_model_once       the model directory's check, skipped when it passed unchanged before (a stamp)
    check_cluster_gpus     after joining a cluster: a GPU per worker when distributed.use_gpu

Errors are `ConfigError`/`ManifestError` naming the key, the file and the value (exit 2, no traceback).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from ermgap.config import ModelConfig, RunConfig, config_from_dict, default_tracking_uri
from ermgap.data.manifest import read_manifest
from ermgap.errors import ConfigError, ManifestError
from ermgap.io import atomic_write_text
from ermgap.sampler import cell_quotas
from ermgap.task import Task, TaskSpec


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree whose local data and model paths are absolute: trials and Ray workers
    start in other directories than the driver, whose CWD relative paths refer to."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    data, model = out.get("data") or {}, out.get("model") or {}
    if data.get("manifest") and not os.path.isabs(data["manifest"]):
        data["manifest"] = str(Path(data["manifest"]).resolve())
    if data.get("feature_cache") not in (None, "", "off", False) and "://" not in str(data["feature_cache"]):
        data["feature_cache"] = str(Path(data["feature_cache"]).expanduser().resolve())
    name = model.get("name_or_path")
    if name and Path(name).expanduser().exists():
        model["name_or_path"] = str(Path(name).expanduser().resolve())
    return out


def resolved_config(cfg: RunConfig) -> RunConfig:
    """The config as shipped to workers: absolute local paths, the tracking URI and storage path fixed."""
    tree = absolute_paths(cfg.to_dict())
    if not tree["tracking"]["tracking_uri"]:
        tree["tracking"]["tracking_uri"] = default_tracking_uri(cfg)
    if "://" not in tree["tracking"]["storage_path"]:
        tree["tracking"]["storage_path"] = str(Path(tree["tracking"]["storage_path"]).resolve())
    return config_from_dict(tree, source="resolved config")


def run_manifest(cfg: RunConfig, *, check_audio: bool = False) -> pd.DataFrame:
    """The run's manifest rows (validated for its task; coverage warnings logged), `data.languages` applied.
    check_audio: also open every audio file (the driver's pre-flight)."""
    df = read_manifest(cfg.data.manifest, task=TaskSpec.from_config(cfg), modality=cfg.data.modality,
                       allow_warnings=True, check_audio=check_audio)
    if cfg.data.languages:
        if "language" not in df.columns:
            raise ConfigError(f"data.languages: {cfg.data.manifest} has no 'language' column to restrict")
        df = df[df["language"].isin(cfg.data.languages)]
    return df


def resolve_task(cfg: RunConfig, df: pd.DataFrame | None = None) -> Task:
    """The run's Task from its config and manifest (see ermgap.task for the order rules)."""
    df = run_manifest(cfg) if df is None else df
    return Task.from_config(cfg, df, file=cfg.data.manifest)


def with_task(cfg: RunConfig, task: Task) -> RunConfig:
    """`cfg` declaring `task` explicitly (data.labels in class order, data.attribute_values), so that the
    run's config.yaml, its MLflow params and a later `evaluate --config` reproduce the same indices."""
    tree = cfg.to_dict()
    declared = tree["data"]["labels"]
    if isinstance(declared, dict):
        tree["data"]["labels"] = dict(zip(task.labels, task.verbalizers))
    else:
        tree["data"]["labels"] = list(task.labels)
    tree["data"]["attribute_values"] = list(task.attribute_values)
    return config_from_dict(tree, source="resolved config")


def check_inputs(cfg: RunConfig) -> Task:
    """Everything that can be checked before a Ray worker starts (errors name the key and value); returns the
    run's Task (resolve_task(cfg), from the rows read here: the caller need not read the manifest again)."""
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        raise ConfigError(f"data.manifest: {manifest} does not exist (generate one with `ermgap data synth`)")
    check_model_once(cfg.model)  # a missing local path, a folder that is not Qwen2-Audio, no processor
    # Every audio file is opened once here (header + first frames; float files whole, for NaN/inf): a file
    # that cannot be decoded would otherwise fail inside a worker, after Ray's retries.
    df = run_manifest(cfg.model_copy(update={"data": cfg.data.model_copy(update={"languages": None})}),
                      check_audio=True)
    if cfg.data.languages:
        present = sorted(set(df["language"]))
        unknown = sorted(set(cfg.data.languages) - set(present))
        if unknown:
            raise ConfigError(f"data.languages: {unknown} not in {manifest}; it has: {present}")
        df = df[df["language"].isin(cfg.data.languages)]
    task = resolve_task(cfg, df)
    n_train, n_dev = int((df["split"] == "train").sum()), int((df["split"] == "dev").sum())
    if n_train < cfg.optim.effective_batch_size:
        raise ConfigError(f"optim.effective_batch_size ({cfg.optim.effective_batch_size}) is larger than the train "
                          f"split of {manifest} ({n_train} utterances): not one optimizer step per epoch")
    if n_dev == 0:
        raise ManifestError(f"{manifest}: no dev rows; dev evaluation drives the objective's updates and early stopping")
    if cfg.data.sampler == "stratified":
        check_stratified(cfg, task, df[df["split"] == "train"])
    return task


def check_model_once(model_cfg: ModelConfig) -> None:
    """ermgap.model.check_model, skipped for a local model directory that passed it before unchanged (every file's
    name, size and mtime) under the same transformers and tokenizers: the check only opens the config and the
    processor, so its answer cannot differ. It is what loads transformers into the driver (seconds of a run's
    start); the workers load the model themselves."""
    stamp = _model_check_stamp(model_cfg.name_or_path)
    if stamp is not None and stamp.is_file():
        return
    # Imported here: the modules a driver imports (ermgap.driver, a sweep's trial drivers) never load
    # transformers, and only this check of the driver's pre-flight needs it.
    from ermgap.model import check_model

    check_model(model_cfg)
    if stamp is not None:
        try:
            atomic_write_text(stamp, "", force=True)
        except OSError:  # an unwritable cache only costs the next run the check again
            pass


def _model_check_stamp(name_or_path: str) -> Path | None:
    """The file that records a passed check_model of this model directory as it is now (None: a hub id, which
    the check resolves over the network or the hub cache, or no such directory)."""
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        return None
    key = hashlib.sha256()
    for lib in ("transformers", "tokenizers"):
        key.update(f"{lib}={importlib.metadata.version(lib)}\n".encode())
    key.update(f"{root.resolve()}\n".encode())
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        key.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\n".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ermgap" / "model-checks" / key.hexdigest()


def check_stratified(cfg: RunConfig, task: Task, train: pd.DataFrame) -> None:
    """data.sampler=stratified: the quotas of every train cell must fit in one global batch."""
    cells, counts = np.unique(task.cell_codes(train, cfg.data.modality), return_counts=True)
    try:
        cell_quotas(dict(zip(cells.tolist(), counts.tolist())), batch=cfg.optim.effective_batch_size,
                    min_per_cell=cfg.data.min_per_cell)
    except ValueError:
        names = [f"{s}_{a}" for s in task.stratum_values for a in task.attribute_values]
        raise ConfigError(
            f"data.min_per_cell: {cfg.data.min_per_cell} rows of each of the {len(cells)} (stratum, attribute) cells "
            f"in the train split of {cfg.data.manifest} ({', '.join(names[c] for c in cells)}) need "
            f"{cfg.data.min_per_cell * len(cells)} slots, but optim.effective_batch_size is "
            f"{cfg.optim.effective_batch_size}; expected data.min_per_cell ≤ "
            f"{cfg.optim.effective_batch_size // len(cells)} or a larger batch") from None


def check_cluster_gpus(cfg: RunConfig, where: str = "the Ray cluster") -> None:
    """With distributed.use_gpu, the connected cluster must have a GPU per worker (checked after joining
    it: the driver's own machine, e.g. a CPU-only login node, says nothing about the cluster's GPUs)."""
    if not cfg.distributed.use_gpu:
        return
    need, have = cfg.distributed.num_workers, ray.cluster_resources().get("GPU", 0.0)
    if have < need:
        raise ConfigError(f"distributed.use_gpu is true and distributed.num_workers={need} needs {need} GPU(s), but "
                          f"{where} has {have:g}; lower distributed.num_workers, join a cluster with GPUs "
                          "(--address), or set distributed.use_gpu=false")


__all__ = ["absolute_paths", "check_cluster_gpus", "check_inputs", "check_model_once", "check_stratified", "resolve_task",
           "resolved_config", "run_manifest", "with_task"]
