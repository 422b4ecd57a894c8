"""What a run records outside its checkpoints: the MLflow run rank 0 opens (params, tags, config, manifest)
and what a finished run leaves in its directory and in MLflow (predictions, metrics.json, the best adapter).
Every MLflow call goes through `ermgap.tracking.RunLogger`."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ermgap import checkpointing
from ermgap.config import RunConfig, dump_yaml, flatten
from ermgap.formatting import json_safe
from ermgap.io import atomic_path
from ermgap.metric_registry import RUN_COVERAGE
from ermgap.objectives import describe_objective
from ermgap.run_data import preds_only
from ermgap.storage import Location
from ermgap.task import Task
from ermgap.tracking import (
    BEST,
    TAG_NOTE,
    TAG_WORKER_IPS,
    TAG_WORKER_NODES,
    RunLogger,
    log_manifest_input,
    run_description,
)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


def open_run_logger(mlflow: dict[str, Any], *, run_dir: Location, run_id: str | None, cfg: RunConfig, task: Task,
                    derived: dict[str, Any], nodes: list[tuple[str, str]], split_sizes: dict[str, int],
                    manifest: pd.DataFrame | None, resumed_at: int | None) -> RunLogger:
    """Rank 0 opens (or, resumed, reopens: `run_id`) the run's MLflow run, with the flattened config, the
    task and `derived` values as params and the workers' placement as tags. A new run also records its
    config.yaml, a one-line description and the manifest as its input; a resumed one the step it
    continues from (`resumed_at`)."""
    params = flatten(cfg.to_dict())
    params.update(task.mlflow_params())
    params.update(derived)
    params.update(mlflow.get("params") or {})
    params["objective"] = describe_objective(params)
    logger = RunLogger.open(mlflow, run_dir=run_dir, run_id=run_id, params=params)
    # A restarted worker group may land elsewhere: the tags show the latest placement.
    logger.set_tags({TAG_WORKER_NODES: ",".join(n for n, _ in nodes), TAG_WORKER_IPS: ",".join(ip for _, ip in nodes)})
    if resumed_at is None:
        # run_training writes it; a sweep trial's run_dir may not have it yet.
        cfg_file = run_dir / CONFIG_FILE
        if not cfg_file.is_file():
            cfg_file.write_text(dump_yaml(cfg), force=True)
        logger.log_text(cfg_file.read_text(), CONFIG_FILE)
        logger.set_tags({TAG_NOTE: run_description(params, split_sizes)})
        log_manifest_input(logger.tracking_uri, logger.run_id, cfg.data.manifest, manifest)
    else:  # the checkpoint step this attempt continues from (the redone steps are logged once: RunLogger)
        logger.log_metrics({"resumed_at_step": resumed_at}, step=resumed_at)
    return logger


def write_outputs(run_dir: Location, logger: RunLogger, final: dict[str, Any], dev: pd.DataFrame,
                  test: pd.DataFrame, *, extra: dict[str, Any], adapter: tuple[Any, dict] | None,
                  step: int, best_round: int | None) -> None:
    """Rank 0: predictions, metrics.json (`final` + `extra`: the objective's outputs, history, timing, cache)
    and the best adapter (`adapter`: (peft model, adapter state), or None) in the run directory
    (written locally and uploaded when it is on object storage) and in MLflow."""
    with run_dir.staged() as out:
        for name, frame in (("dev_preds.csv", dev), ("test_preds.csv", test)):
            with atomic_path(out / name, force=True) as tmp:
                preds_only(frame).to_csv(tmp, index=False)
        with atomic_path(out / METRICS_FILE, force=True) as tmp:
            tmp.write_text(json.dumps({**json_safe(final, nan_to_none=False), **extra}, indent=1))
        if adapter is not None:
            checkpointing.save_adapter(adapter[0], adapter[1], out / "adapter")
        logger.log_metrics({f"{BEST}{k}": v for k, v in final.items() if k.startswith(("dev_", "test_"))}
                           | {f"{BEST}eval_round": best_round}, step=step)
        logger.log_metrics({f"train_{k}": final[f"train_{k}"] for k in RUN_COVERAGE}, step=step)
        if extra.get("feature_cache") is not None:
            logger.log_metrics({f"feature_cache/{k}": v for k, v in extra["feature_cache"].items()}, step=step)
        logger.log_artifact(out / "dev_preds.csv", "predictions")
        logger.log_artifact(out / "test_preds.csv", "predictions")
        logger.log_artifact(out / METRICS_FILE)
        if (out / "adapter").is_dir():
            logger.log_artifact(out / "adapter", "adapter")
    logger.set_tags({"ermgap.stopped_early": final["stopped_early"], "ermgap.best_eval_round": best_round})


__all__ = ["CONFIG_FILE", "METRICS_FILE", "open_run_logger", "write_outputs"]
