"""MLflow logging for one training run, used by rank 0 only.

All MLflow calls go through an explicit `MlflowClient` bound to the run's tracking URI (no global
active run), so a Ray worker, a Tune trial and a notebook can each hold their own run.
The run id is stored in every checkpoint and in `<run_dir>/mlflow_run_id`, so a restarted worker
group or `ermgap train --resume` continues the SAME run instead of opening a new one.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

RUN_ID_FILE = "mlflow_run_id"
# MLflow rejects params longer than this; long lists (target modules, prompts) are cut with a marker.
_MAX_PARAM_LEN = 6000


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it between our get and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """One MLflow run: params once, metrics by step, artifacts, status at the end."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    @classmethod
    def open(cls, mlflow_cfg: dict[str, Any], *, run_dir: str | os.PathLike, run_id: str | None = None,
             params: dict[str, Any] | None = None) -> RunLogger:
        """Reuse `run_id` (or the id recorded in run_dir) or create a new run and record its id."""
        uri = mlflow_cfg["tracking_uri"]
        client = _client(uri)
        id_file = Path(run_dir) / RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is not None:
            # A resumed run: mark it running again.
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        tags = {str(k): str(v) for k, v in (mlflow_cfg.get("tags") or {}).items()}
        if mlflow_cfg.get("parent_run_id"):
            tags["mlflow.parentRunId"] = mlflow_cfg["parent_run_id"]
        run = client.create_run(experiment_id(client, mlflow_cfg["experiment"]),
                                run_name=mlflow_cfg.get("run_name"), tags=tags)
        logger = cls(uri, run.info.run_id)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_name(f".{RUN_ID_FILE}.tmp")
        tmp.write_text(logger.run_id)
        os.replace(tmp, id_file)
        if params:
            logger.log_params(params)
        return logger

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow's batch limit on params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[start:start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


def mark_run(tracking_uri: str, run_dir: str | os.PathLike, status: str) -> str | None:
    """Set the status of the run recorded in run_dir (the driver's view of a failed/killed run)."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    _client(tracking_uri).set_terminated(run_id, status=status)
    return run_id
