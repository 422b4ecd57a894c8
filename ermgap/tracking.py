"""Everything ermgap writes to or reads from MLflow: a training run (rank 0's `RunLogger`) and a
sweep's parent run with its children.

All MLflow calls go through an explicit `MlflowClient` bound to the run's tracking URI (no global
active run), so a Ray worker, a Tune trial and a notebook can each hold their own run.
The run id is stored in every checkpoint and in `<run_dir>/mlflow_run_id`, so a restarted worker
group or `ermgap train --resume` continues the SAME run instead of opening a new one.
A sweep is one parent run (tag `ermgap.role=sweep`); each trial's training run is a child of it
through MLflow's own parent tag, so the UI nests them and `child_runs` finds them.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from ermgap.errors import ErmgapWarning

RUN_ID_FILE = "mlflow_run_id"
PARENT_TAG = MLFLOW_PARENT_RUN_ID
TAG_SWEEP = "ermgap.sweep"
TAG_HASH = "ermgap.sweep_hash"
TAG_TRIAL = "ermgap.trial_id"
TAG_ROLE = "ermgap.role"
DRIVER_TAG = "ermgap.driver"  # "<host>:<pid>" of the process whose trainer.fit() drives the run
TAG_PARAM_PREFIX = "ermgap.param."  # a trial's sampled params, as tags (the report groups runs by them)


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _param(key: str, value: Any) -> Param:
    # Long values (target-module lists, prompts) are cut to what MLflow accepts.
    return Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])


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
        self.client = client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    @classmethod
    def open(cls, mlflow_cfg: dict[str, Any], *, run_dir: str | os.PathLike, run_id: str | None = None,
             params: dict[str, Any] | None = None) -> RunLogger:
        """Reuse `run_id` (or the id recorded in run_dir) or create a new run and record its id."""
        uri = mlflow_cfg["tracking_uri"]
        mlflow_client = client(uri)
        id_file = Path(run_dir) / RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        tags = {str(k): str(v) for k, v in (mlflow_cfg.get("tags") or {}).items()}
        if run_id is not None:
            # A resumed run: mark it running again, under its new driver (DRIVER_TAG).
            mlflow_client.update_run(run_id, status="RUNNING")
            if tags:
                mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return cls(uri, run_id)
        if mlflow_cfg.get("parent_run_id"):
            tags[PARENT_TAG] = mlflow_cfg["parent_run_id"]
        run = mlflow_client.create_run(experiment_id(mlflow_client, mlflow_cfg["experiment"]),
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
        # log_batch splits into MLflow's per-request limits itself.
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in sorted(params.items())])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=rows)

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


def driver_tag() -> dict[str, str]:
    """{DRIVER_TAG: "<host>:<pid>"} of this process, the driver of the runs it starts or resumes."""
    return {DRIVER_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def close_orphaned_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Mark KILLED (and return) the RUNNING runs of `experiment` whose driver ran on this host and is gone.

    A SIGKILLed driver cannot end its MLflow run, which would stay RUNNING until resumed. Runs whose
    driver is on another host are left alone (whether it lives cannot be told from here).
    """
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                            f"tags.`{DRIVER_TAG}` LIKE '{host}:%'")
    closed = []
    for run in runs:
        pid = run.data.tags[DRIVER_TAG].rpartition(":")[2]
        if pid.isdigit() and not _alive(int(pid)):
            c.set_tag(run.info.run_id, "ermgap.error", f"driver {run.data.tags[DRIVER_TAG]} died without ending the run")
            c.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            warnings.warn(f"MLflow run {run.info.run_id} ({run.info.run_name}) was still RUNNING but its driver "
                          f"{run.data.tags[DRIVER_TAG]} is gone; marked KILLED (resume its run directory with "
                          "`ermgap train --resume`)", ErmgapWarning, stacklevel=2)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def mark_run(tracking_uri: str, run_dir: str | os.PathLike, status: str) -> str | None:
    """Set the status of the run recorded in run_dir (the driver's view of a failed/killed run)."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    client(tracking_uri).set_terminated(run_id, status=status)
    return run_id


# --------------------------------------------------------------------------- a sweep's parent run


def start_sweep_run(tracking_uri: str, experiment: str, *, name: str, spec_hash: str, description: str,
                    params: dict[str, Any]) -> str:
    """Create the parent run of sweep `name` with its flattened spec as params; returns its run id."""
    c = client(tracking_uri)
    run = c.create_run(experiment_id(c, experiment), run_name=name,
                       tags={TAG_SWEEP: name, TAG_HASH: spec_hash, TAG_ROLE: "sweep",
                             "mlflow.note.content": description or f"ermgap sweep {name}"})
    c.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    return run.info.run_id


def trial_tags(sweep: str, spec_hash: str, trial_id: str, params: dict[str, Any]) -> dict[str, str]:
    """Tags of a trial's child run: which sweep and trial it is, and its sampled params."""
    tags = {TAG_SWEEP: sweep, TAG_HASH: spec_hash, TAG_TRIAL: trial_id, TAG_ROLE: "trial"}
    tags.update({f"{TAG_PARAM_PREFIX}{k}": str(v) for k, v in params.items()})
    return tags


def child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> pd.DataFrame:
    """All MLflow runs whose parent is the sweep's run (one row per run, `metrics.*`/`tags.*` columns)."""
    exp = client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)


def close_unfinished(tracking_uri: str, run_ids: list[str], status: str = "KILLED") -> None:
    """Mark runs still RUNNING (a trial whose workers the scheduler killed mid-run) as `status`."""
    c = client(tracking_uri)
    for run_id in run_ids:
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, status=status)


def log_sweep_summary(tracking_uri: str, parent_run_id: str, *, files: list[Path], tags: dict[str, str],
                      metrics: dict[str, float]) -> None:
    """The parent run's artifacts (leaderboard, plots, spec), best-trial tags and metrics."""
    c = client(tracking_uri)
    for f in files:
        c.log_artifact(parent_run_id, str(f))
    now = int(time.time() * 1000)
    c.log_batch(parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                         if v is not None and math.isfinite(float(v))])


def set_status(tracking_uri: str, run_id: str, status: str) -> None:
    """RUNNING, FINISHED, FAILED or KILLED."""
    c = client(tracking_uri)
    if status == "RUNNING":
        c.update_run(run_id, status="RUNNING")
    else:
        c.set_terminated(run_id, status=status)
