"""`ermgap train`'s driver: validate → start or join Ray → build the TorchTrainer → fit (refit after a fault)
→ the final metrics.

    run_training(cfg)     one run: pre-flight (ermgap.preflight), the run directory, Ray, MLflow checks, then
                          `fit_run` (ermgap.failures) over `build_trainer`, with live progress (ermgap.progress)
    build_trainer(cfg)    a Ray Train TorchTrainer whose workers run `ermgap.recipe.train_loop_per_worker`;
                          a sweep's trial driver (ermgap.sweep.tune) builds the same one

Re-running `build_trainer` with the same storage_path + name resumes from the latest checkpoint (Ray Train
V2 reloads the run's checkpoint manager): that is how a refit after a fault and `--resume RUN_DIR` continue.
A test may pass a `step_hook` (ermgap.recipe.StepHook), which travels to every worker in the loop config.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from ermgap import checkpointing
from ermgap.config import RunConfig, config_from_dict, default_tracking_uri, dump_yaml, flatten, load_config
from ermgap.errors import ConfigError, ErmgapError, TrainingError
from ermgap.failures import RunFault, fit_run, set_aside_cut_off_snapshot
from ermgap.feature_cache import cache_dir
from ermgap.io import discard_aside, restore_aside
from ermgap.multinode import check_shared_paths, input_paths
from ermgap.objectives import describe_objective, live_values, objective_class
from ermgap.preflight import check_cluster_gpus, check_inputs, resolve_task, resolved_config, with_task
from ermgap.progress import ProgressBox, TrainProgress
from ermgap.ray_runtime import ensure_ray
from ermgap.run_outputs import CONFIG_FILE, METRICS_FILE
from ermgap.storage import Location
from ermgap.tracking import check_server, close_orphaned_runs, driver_tag, mark_run, source_tags

if TYPE_CHECKING:
    from ermgap.recipe import StepHook


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the recipe (ermgap.recipe.train_loop_per_worker). Imported there, not
    here: the driver, a sweep's trial driver and the Train controller never load the model stack (peft,
    DeepSpeed, the recipe's modules), which only the workers use."""
    from ermgap.recipe import train_loop_per_worker as run

    run(loop_config)


def build_trainer(cfg: RunConfig, *, run_dir: str | os.PathLike | Location, name: str,
                  storage_path: str | os.PathLike | Location, callbacks=(), mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None,
                  resume: bool = False, step_hook: StepHook | None = None, progress=None,
                  mlflow_params: dict | None = None, entry_point: str = "ermgap train") -> TorchTrainer:
    """A TorchTrainer for one run. Re-running it with the same storage_path + name resumes from the
    latest checkpoint (Ray Train V2 restores the run's checkpoint manager from storage).
    progress: a `ProgressBox` actor handle rank 0 reports its steps to (ermgap.progress), or None.
    step_hook: a test's per-step hook every worker calls (ermgap.recipe.StepHook; fault injection), or None.
    mlflow_params: extra params of the MLflow run (a sweep trial's `variant`); `entry_point` and the git
    commit become the run's source tags. Both locations may be local/NFS directories or s3:// / gs://
    prefixes (ermgap.storage)."""
    run_loc = Location.of(run_dir)
    cfg = resolved_config(cfg)
    task = resolve_task(cfg)
    cfg = with_task(cfg, task)
    loop_config = {
        "config": cfg.to_dict(),
        "task": task.to_dict(),
        "run_dir": run_loc,  # a Location: an object store's endpoint travels with it
        "feature_cache": _feature_cache_location(cfg, storage_path),
        # A run without a name of its own is named after its directory and its objective ("… · Group DRO (η=0.01)").
        "mlflow": {"tracking_uri": default_tracking_uri(cfg), "experiment": cfg.tracking.experiment,
                   "run_name": cfg.tracking.run_name or f"{name} · {describe_objective(flatten(cfg.to_dict()))}", "parent_run_id": mlflow_parent_run_id,
                   "tags": {**source_tags(entry_point), **(mlflow_tags or {})}, "params": dict(mlflow_params or {})},
        "step_hook": step_hook,
        # A kind registered at run time (register_objective) is not in the workers' registry: it travels.
        "objective_class": objective_class(cfg.objective.kind),
        "resume": resume,
        "progress": progress,
    }
    d = cfg.distributed
    storage, storage_fs = Location.of(storage_path).ray_storage()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker},
                                     placement_strategy=d.placement_strategy),
        run_config=RayRunConfig(
            name=name, storage_path=storage, storage_filesystem=storage_fs,
            # Retries are fit_run's (ermgap.failures): Ray's would retry user errors too.
            failure_config=FailureConfig(max_failures=0),
            # The latest checkpoint is what resumes; the best adapter travels inside every checkpoint.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks)),
    )


def _feature_cache_location(cfg: RunConfig, storage_path) -> Path | Location | None:
    """cache_dir(cfg), on an object store with the run storage's S3 endpoint: this process may be a sweep's
    trial driver on a node without $AWS_ENDPOINT_URL, but the storage Location carries the sweep driver's."""
    where = cache_dir(cfg)
    if isinstance(where, Location):
        where = Location.of(where.uri, endpoint=Location.of(storage_path).endpoint or where.endpoint)
    return where


def _run_config(run_path: Location) -> RunConfig:
    """A run's saved config.yaml (a local file, or an object under an s3:// / gs:// run prefix)."""
    if not run_path.is_remote:
        return load_config(run_path.local / CONFIG_FILE)
    return config_from_dict(yaml.safe_load((run_path / CONFIG_FILE).read_text()) or {},
                            source=str(run_path / CONFIG_FILE))



def run_training(cfg: RunConfig, *, address: str | None = None, resume_dir: str | os.PathLike | None = None,
                 run_dir: str | os.PathLike | None = None, force: bool = False, num_cpus: int | None = None,
                 mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None,
                 console: Console | None = None, verbose: bool = False,
                 allow_local_paths: bool = False, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train one model and return its final metrics (the `done=True` report; also in RUN_DIR/metrics.json),
    with `run_dir`, `tracking_uri` and the objective's `objective_name` and `objective_shown` (see `_described`).

    Progress (rank 0's steps and evaluations) is shown on `console` (default: stdout) while it runs;
    `verbose` lets worker output (DeepSpeed, transformers, Ray Train) through to this process when
    this call starts the Ray connection.

    resume_dir: continue the run in that directory (its config.yaml is used, `cfg` is ignored).
    run_dir: where the run lives (default: <tracking.storage_path>/<timestamp>-<run_name or 'train'>).
    Both may be local/NFS directories or s3:// / gs:// prefixes (ermgap.storage).
    allow_local_paths: on a Ray cluster of more than one node, accept a directory run_dir and a sqlite/file
    tracking URI (NFS mounted at the same path on every node; ermgap.multinode).
    force: replace an existing run directory. Everything is validated first; only a directory ermgap
    created is replaced (io.OWNER_MARKER); the old one is moved aside and deleted once the new run
    has finished, and moved back if the new one fails before training starts (an s3:// / gs:// prefix
    cannot be moved: ermgap's old one is deleted once the checks passed).
    step_hook: what every worker calls at each optimizer step (tests inject faults with it), or None.
    """
    aside = None
    if resume_dir is not None:
        run_path = Location.of(resume_dir)
        if not (run_path / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume_dir}: not a run directory (no {CONFIG_FILE})")
        cfg = _run_config(run_path)
        if (run_path / METRICS_FILE).is_file():  # finished already: nothing to resume
            final = json.loads((run_path / METRICS_FILE).read_text())
            return _described({**final, "run_dir": str(run_path), "tracking_uri": default_tracking_uri(cfg)}, cfg)
        if not run_path.is_remote:  # warns here, where the user sees it, about checkpoints it cannot resume from
            checkpointing.newest_on_disk(run_path.local, cfg.distributed.num_workers)
        cfg = with_task(cfg, check_inputs(cfg))
        set_aside_cut_off_snapshot(run_path)  # else Ray's controller cannot start on it
    else:
        cfg = resolved_config(cfg)
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Location.of(cfg.tracking.storage_path) / f"{stamp}-{cfg.tracking.run_name or 'train'}"
        run_path = Location.of(run_dir)
        if (run_path.is_file() or run_path.list()) and not force:
            raise ConfigError(f"run directory {run_path} already exists; pass --force to replace it "
                              f"or --resume {run_path} to continue it")
        if force:
            run_path.check_replaceable("run")
        cfg = with_task(cfg, check_inputs(cfg))  # before anything on disk changes
    uri = default_tracking_uri(cfg)
    run_path.check_reachable("the driver")
    check_server(uri, "the driver")
    if resume_dir is None and force:
        aside = run_path.set_aside("run")
    try:
        run_path.claim("run")
        if resume_dir is None:
            (run_path / CONFIG_FILE).write_text(dump_yaml(cfg), force=True)
        # The store's first open runs beside Ray's start, which mostly waits on the processes it starts: a fresh
        # sqlite store costs seconds there (MLflow creates its tables and runs every migration).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ermgap-mlflow") as pool:
            orphans = pool.submit(close_orphaned_runs, uri, cfg.tracking.experiment)
            ensure_ray(address, num_cpus=num_cpus, log_to_driver=verbose)
            check_cluster_gpus(cfg, f"the Ray cluster at {address}" if address else "the local Ray cluster")
            check_shared_paths(storage=str(run_path), tracking_uri=uri, inputs=input_paths(cfg),
                               allow_local_paths=allow_local_paths)
        orphans.result()
        box = ProgressBox.remote()
        make_trainer = partial(build_trainer, cfg, run_dir=run_path, name=run_path.name, storage_path=run_path.parent,
                               mlflow_parent_run_id=mlflow_parent_run_id,
                               mlflow_tags={**(mlflow_tags or {}), **driver_tag()},
                               resume=resume_dir is not None, step_hook=step_hook, progress=box)
        first = [make_trainer()]  # built here, so that an error in it brings the replaced run back
    except BaseException:
        restore_aside(aside, str(run_path))  # nothing was trained: the replaced run comes back as it was
        raise
    kept = f"; the run it replaced is kept at {aside}" if aside is not None else ""
    try:
        with TrainProgress(box, console or Console()):
            fit_run(lambda: first.pop() if first else make_trainer(), run_dir=run_path, tracking_uri=uri,
                    max_failures=cfg.distributed.max_failures, finished=(run_path / METRICS_FILE).is_file)
    except KeyboardInterrupt:
        mark_run(uri, run_path, "KILLED")
        raise
    except ErmgapError as err:  # a user error in a worker: retrying or resuming would meet it again
        raise type(err)(f"{err} (run directory {run_path}{kept})") from None
    except RunFault as fault:
        err = fault.cause
        raise TrainingError(f"training failed ({type(err).__name__}, {fault.attempts} attempt(s)); run directory "
                            f"{run_path}; continue with `ermgap train --resume {run_path}`{kept}:\n{err}") from err
    discard_aside(aside)
    metrics_file = run_path / METRICS_FILE
    if not metrics_file.is_file():
        raise TrainingError(f"training ended without final metrics ({metrics_file} missing)")
    final = json.loads(metrics_file.read_text())
    final["run_dir"] = str(run_path)
    final["tracking_uri"] = uri
    return _described(final, cfg)


def _described(final: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """`final` with what the run's objective says of itself: its description (`objective_name`) and the
    values of its final state a person is shown (`objective_shown`: `Objective.live_values`; {} for ERM)."""
    params = flatten(cfg.to_dict())
    return {**final, "objective_name": describe_objective(params), "objective_shown": live_values(params, final)}


__all__ = ["build_trainer", "run_training"]
