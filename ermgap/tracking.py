"""Everything ermgap writes to or reads from MLflow: a training run (rank 0's `RunLogger`) and a
sweep's parent run with its children.

All MLflow calls go through an explicit `MlflowClient` bound to the run's tracking URI (no global
active run), so a Ray worker, a Tune trial and a notebook can each hold their own run.
The run id is stored in every checkpoint and in `<run_dir>/mlflow_run_id`, so a restarted worker
group or `ermgap train --resume` continues the SAME run instead of opening a new one.
A sweep is one parent run (tag `ermgap.role=sweep`); each trial's training run is a child of it
through MLflow's own parent tag, so the UI nests them and `child_runs` finds them.

Metric names (one namespace each, shared by a sweep's parent and its children so the runs table
shows them in the same columns):
    best/<split>_<metric>   the best checkpoint's dev and test metrics (a child: its own best
                            checkpoint; the parent: the selected trial's), logged once at the end
    eval/<split>_<metric>   every dev evaluation, by optimizer step (also eval/<name> of the objective's
                            `log_values` after it)
    train/…, lr, <name>     every optimizer step (per-stratum gaps train/gap_<stratum>; the objective's state
                            under its `log_values` names: its trajectory)
Artifacts of a sqlite store go next to the database (`<db dir>/artifacts/<experiment>`), not into
./mlruns of whatever directory a process happened to start in.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from ermgap.errors import ConfigError, ErmgapWarning, StorageError
from ermgap.mlflow_ui import SUMMARY_PREFIX as BEST  # the best/ namespace
from ermgap.mlflow_ui import chart_sections, mark_kind, runs_view_fragment
from ermgap.storage import Location
from ermgap.store_lock import first_open_lock

RUN_ID_FILE = "mlflow_run_id"
PARENT_TAG = MLFLOW_PARENT_RUN_ID
TAG_SWEEP = "ermgap.sweep"
TAG_HASH = "ermgap.sweep_hash"
TAG_TRIAL = "ermgap.trial_id"
TAG_ROLE = "ermgap.role"
TAG_ERROR = "ermgap.error"  # why a run FAILED (or was KILLED): one message
DRIVER_TAG = "ermgap.driver"  # "<host>:<pid>" of the process whose trainer.fit() drives the run
TAG_PARAM_PREFIX = "ermgap.param."  # a trial's sampled params, as tags (the report groups runs by them)
TAG_NOTE = "mlflow.note.content"   # the run's description in the UI
TAG_WORKER_NODES = "ermgap.worker_nodes"  # Ray node ids of the run's workers, in rank order
TAG_WORKER_IPS = "ermgap.worker_ips"
EVAL = "eval/"
# A tracking server that does not answer within this fails the run at start instead of hanging it.
SERVER_CHECK_TIMEOUT_S = 15.0


def is_node_local(tracking_uri: str) -> bool:
    """A store that lives on one node's disk (sqlite, a file path) rather than a server every node reaches."""
    if tracking_uri.startswith("databricks"):
        return False
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def check_server(tracking_uri: str, where: str = "this node") -> None:
    """Fail now, with the reason, if `where` cannot reach the tracking server (`/health`)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=SERVER_CHECK_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise StorageError(f"{where} cannot reach the MLflow tracking server {tracking_uri}: {err}") from err


def check_store_exists(tracking_uri: str) -> None:
    """For commands that only read runs: a sqlite store must already be there (MLflow would create an empty
    one and find no run in it). ConfigError naming the option otherwise."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri {tracking_uri}: no MLflow store there (no file "
                          f"{tracking_uri.removeprefix('sqlite:///')}); run `ermgap train` or `ermgap sweep` first, "
                          "or point --tracking-uri (or $MLFLOW_TRACKING_URI) at the store that has the runs")


def client(tracking_uri: str) -> MlflowClient:
    with first_open_lock(tracking_uri):  # MlflowClient opens (a new one: creates) the store
        return MlflowClient(tracking_uri=tracking_uri)


def _param(key: str, value: Any) -> Param:
    # Long values (target-module lists, prompts) are cut to what MLflow accepts.
    return Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])


def artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite database; the server's choice otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri, name))
        except Exception:  # another process created it between our get and create
            if client.get_experiment_by_name(name) is None:
                raise
        exp = client.get_experiment_by_name(name)
    return mark_kind(client, exp)


class RunLogger:
    """One MLflow run: params once, metrics by step, artifacts, status at the end.

    A resumed run redoes the steps after its checkpoint; MLflow cannot delete points: a redone step is logged
    again only when its value differs from what an earlier attempt logged (`logged`). """

    def __init__(self, tracking_uri: str, run_id: str, logged: dict[str, dict[int, set[float]]] | None = None) -> None:
        self.client = client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.logged = logged or {}

    @classmethod
    def open(cls, mlflow_cfg: dict[str, Any], *, run_dir: str | os.PathLike | Location, run_id: str | None = None,
             params: dict[str, Any] | None = None) -> RunLogger:
        """Reuse `run_id` (or the id recorded in run_dir) or create a new run and record its id."""
        uri = mlflow_cfg["tracking_uri"]
        mlflow_client = client(uri)
        id_file = Location.of(run_dir) / RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        tags = {str(k): str(v) for k, v in (mlflow_cfg.get("tags") or {}).items()}
        if run_id is not None:
            # A resumed run: running again, under its new driver (DRIVER_TAG); an earlier attempt's TAG_ERROR goes.
            mlflow_client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in mlflow_client.get_run(run_id).data.tags:
                mlflow_client.delete_tag(run_id, TAG_ERROR)
            if tags:
                mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return cls(uri, run_id, logged=logged_points(mlflow_client, run_id))
        if mlflow_cfg.get("parent_run_id"):
            tags[PARENT_TAG] = mlflow_cfg["parent_run_id"]
        run = mlflow_client.create_run(experiment_id(mlflow_client, mlflow_cfg["experiment"]),
                                run_name=mlflow_cfg.get("run_name"), tags=tags)
        logger = cls(uri, run.info.run_id)
        id_file.write_text(logger.run_id, force=True)
        if params:
            logger.log_params(params)
        return logger

    def log_params(self, params: dict[str, Any]) -> None:  # log_batch splits into MLflow's request limits
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in sorted(params.items())])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                and float(v) not in self.logged.get(k, {}).get(int(step), ())]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


def logged_points(c: MlflowClient, run_id: str) -> dict[str, dict[int, set[float]]]:
    """{metric key: {step: the values logged at that step}} of a run."""
    out: dict[str, dict[int, set[float]]] = {key: {} for key in c.get_run(run_id).data.metrics}
    for key, points in out.items():
        for m in c.get_metric_history(run_id, key):
            points.setdefault(m.step, set()).add(m.value)
    return out


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
            c.set_tag(run.info.run_id, TAG_ERROR, f"driver {run.data.tags[DRIVER_TAG]} died without ending the run")
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


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's source tags for a run started by `entry_point` ("ermgap train", "ermgap sweep"): the git
    commit of the ermgap checkout (and whether it had local changes), or the installed version."""
    import ermgap

    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL",
            "ermgap.version": getattr(ermgap, "__version__", "unknown")}
    here = Path(ermgap.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            tags["ermgap.git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine: an installed package has its version
        pass
    return tags


def log_manifest_input(tracking_uri: str, run_id: str, manifest: str | os.PathLike, frame: pd.DataFrame,
                       context: str = "training") -> None:
    """The manifest as the run's MLflow dataset input (name, digest, schema, source path)."""
    path = Path(manifest).resolve()
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice ("file" and "") and warns, on every local path,
        # that the two identical candidates are ambiguous; either one records the same source.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted",
                                category=UserWarning)
        dataset = from_pandas(frame, source=str(path), name=f"{path.parent.name}/{path.name}")
    # _to_mlflow_entity is what mlflow.log_input calls; the client API takes the entity, and we keep
    # no global active run (module docstring).
    client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


def run_description(params: dict[str, Any], split_sizes: dict[str, int]) -> str:
    """The run's note in the MLflow UI (Markdown): objective (the param `objective`, its description), variant,
    data, model, schedule."""
    sizes = ", ".join(f"{n} {k}" for k, n in split_sizes.items())
    lines = [f"**{params['objective']}**"
             + (f" (variant `{params['variant']}`)" if params.get("variant") else ""),
             "",
             f"- data: `{params.get('data.manifest')}` ({sizes} utterances), modality {params.get('data.modality')}",
             f"- model: `{params.get('model.name_or_path')}` + LoRA r={params.get('lora.r')}",
             f"- {params.get('optim.epochs')} epochs, effective batch {params.get('optim.effective_batch_size')}, "
             f"lr {params.get('optim.lr')}, seed {params.get('optim.seed')}",
             "- metrics: `best/…` best checkpoint on dev (dev and test), `eval/…` every dev evaluation, "
             "`train/…` every step"]
    return "\n".join(lines)


def mark_run(tracking_uri: str, run_dir: str | os.PathLike | Location, status: str, *,
             reason: str | None = None) -> str | None:
    """Set the status of the run recorded in run_dir (the driver's view of a failed/killed run); `reason`
    becomes its `ermgap.error` tag."""
    id_file = Location.of(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    c = client(tracking_uri)
    if reason is not None:
        c.set_tag(run_id, TAG_ERROR, reason[:5000])  # MLflow's tag value limit is 8000; keep it readable
    c.set_terminated(run_id, status=status)
    return run_id


# --------------------------------------------------------------------------- a sweep's parent run


def start_sweep_run(tracking_uri: str, experiment: str, *, name: str, spec_hash: str, description: str,
                    params: dict[str, Any]) -> str:
    """Create the parent run of sweep `name` with its flattened spec as params; returns its run id."""
    c = client(tracking_uri)
    run = c.create_run(experiment_id(c, experiment), run_name=name,
                       tags={TAG_SWEEP: name, TAG_HASH: spec_hash, TAG_ROLE: "sweep", **source_tags("ermgap sweep"),
                             TAG_NOTE: description or f"ermgap sweep {name}"})
    c.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    share_runs_view(tracking_uri, run.info.experiment_id, name)
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
    # mlflow.search_runs reads the process-wide tracking URI, and set_tracking_uri also exports it as
    # $MLFLOW_TRACKING_URI, which default_tracking_uri reads: both are put back, or reading another store's runs
    # (the bias lab's --add-sweep, before its own sweep) would send this process's next runs to that store.
    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=10000)
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def finished_child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> pd.DataFrame:
    """The sweep's child runs that ran to the end: FINISHED, with test metrics (an interrupted sweep's too)."""
    runs = child_runs(tracking_uri, experiment, parent_run_id)
    if runs.empty or "metrics.best/test_w_f1" not in runs:
        return runs.iloc[:0]
    return runs[(runs["status"] == "FINISHED") & runs["metrics.best/test_w_f1"].notna()]


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


# --------------------------------------------------------------------------- finding runs


def _all_runs(c: MlflowClient, experiment: str | None = None, filter_string: str = "") -> list:
    """Every run (all pages) of `experiment` (a name), or of every experiment."""
    if experiment is None:
        exp_ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    else:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--experiment {experiment!r}: no such MLflow experiment at {c.tracking_uri}")
        exp_ids = [exp.experiment_id]
    runs, token = [], None
    while exp_ids:
        page = c.search_runs(exp_ids, filter_string=filter_string, run_view_type=ViewType.ALL, max_results=5000,
                             order_by=["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def training_runs(tracking_uri: str, *, parent_run_id: str | None = None, run_ids: Sequence[str] = ()) -> list:
    """The children of a sweep's parent run (oldest first), or the runs `run_ids`; ConfigError naming the store
    when MLflow cannot find them."""
    c = client(tracking_uri)
    try:
        if parent_run_id:
            runs = c.search_runs([c.get_run(parent_run_id).info.experiment_id], max_results=10_000,
                                 filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                 order_by=["attributes.start_time ASC"])
            if not runs:
                raise ConfigError(f"MLflow run {parent_run_id} at {tracking_uri} has no child runs")
            return runs
        return [c.get_run(r) for r in run_ids]
    except MlflowException as err:
        raise ConfigError(f"MLflow ({tracking_uri}): {err.message}") from None


def download_artifact(tracking_uri: str, run_id: str, artifact_path: str, dst: str | os.PathLike) -> str | None:
    """A run's artifact downloaded under `dst` (its local path), or None when the run has none."""
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst),
                                                   tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        return None


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[float, float]]:
    """[(step, value)] of one metric of a run."""
    return [(float(m.step), float(m.value)) for m in client(tracking_uri).get_metric_history(run_id, key)]


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | os.PathLike, artifact_path: str) -> None:
    """Log a whole folder as artifacts of `run_id` under `artifact_path`."""
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def resolve_run_id(tracking_uri: str, ref: str, *, what: str = "run id") -> str:
    """The full id of the run whose id is `ref` or starts with it (the 8 characters `ermgap runs list`
    shows are enough while they are unique). ConfigError when no run or several runs match."""
    ref = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", ref):
        raise ConfigError(f"{what} {ref!r}: expected an MLflow run id (32 hex digits) or a prefix of it")
    c = client(tracking_uri)
    if len(ref) == 32:
        try:
            return c.get_run(ref).info.run_id
        except mlflow.exceptions.MlflowException:
            raise ConfigError(f"{what} {ref}: no such run at {tracking_uri}") from None
    hits = [r for r in _all_runs(c) if r.info.run_id.startswith(ref)]
    if not hits:
        raise ConfigError(f"{what} {ref}: no run id at {tracking_uri} starts with it (see `ermgap runs list`)")
    if len(hits) > 1:
        shown = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in hits[:5])
        raise ConfigError(f"{what} {ref} is ambiguous: {len(hits)} runs start with it: {shown}; give more characters")
    return hits[0].info.run_id


LISTED_METRICS = ("best/dev_w_f1", "best/dev_avg_gap", "best/test_w_f1", "best/test_avg_gap")
# The MLflow UI's "share view" state lives in an experiment tag with this prefix; the runs table opens
# with the view when the URL carries `?viewStateShareKey=<key>`.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY_PREFIX = "ermgap-"  # view keys ermgap wrote: ermgap-<sweep>
TABLE_PARAMS = ("variant", "objective", "optim.seed")


def share_runs_view(tracking_uri: str, experiment_id_: str, sweep: str) -> str:
    """Store a runs-table view of sweep `sweep`: its runs only, with the variant, objective and seed
    and the best checkpoint's W-F1 and gaps as columns, best dev W-F1 first. Returns the URL fragment
    that opens it (append to the UI's address)."""
    key = VIEW_KEY_PREFIX + sweep
    columns = [*(f"params.`{p}`" for p in TABLE_PARAMS),
               *(f"metrics.`{m}`" for m in (*LISTED_METRICS, f"{BEST}test_worst_lang_gap"))]
    view = {"searchFilter": f"tags.`{TAG_SWEEP}` = '{sweep}'", "orderByKey": f"metrics.`{BEST}dev_w_f1`",
            "orderByAsc": False, "selectedColumns": columns, **chart_sections(VIEW_KEY_PREFIX + sweep)}
    client(tracking_uri).set_experiment_tag(experiment_id_, SHARED_VIEW_TAG + key, json.dumps(view))
    return runs_view_fragment(experiment_id_, key)


def shared_runs_views(tracking_uri: str) -> list[tuple[str, str]]:
    """(sweep, URL fragment) of every runs-table view ermgap stored in the store, newest experiment first."""
    views = []
    for e in client(tracking_uri).search_experiments(order_by=["last_update_time DESC"]):
        for tag in e.tags:
            key = tag.removeprefix(SHARED_VIEW_TAG)
            if key != tag and key.startswith(VIEW_KEY_PREFIX):
                views.append((key.removeprefix(VIEW_KEY_PREFIX), runs_view_fragment(e.experiment_id, key)))
    return views


def list_runs(tracking_uri: str, *, experiment: str | None = None, sweeps_only: bool = False) -> pd.DataFrame:
    """One row per run, newest first: experiment, name, id, status, start, parent id and `LISTED_METRICS`."""
    c = client(tracking_uri)
    names = {e.experiment_id: e.name for e in c.search_experiments(view_type=ViewType.ALL)}
    runs = _all_runs(c, experiment, f"tags.`{TAG_ROLE}` = 'sweep'" if sweeps_only else "")
    rows = []
    for r in runs:
        rows.append({"experiment": names.get(r.info.experiment_id, r.info.experiment_id), "name": r.info.run_name,
                     "run_id": r.info.run_id, "status": r.info.status,
                     "start": pd.Timestamp(r.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M"),
                     "parent": r.data.tags.get(PARENT_TAG), "role": r.data.tags.get(TAG_ROLE),
                     **{m: r.data.metrics.get(m) for m in LISTED_METRICS}})
    return pd.DataFrame(rows, columns=["experiment", "name", "run_id", "status", "start", "parent", "role",
                                       *LISTED_METRICS])
