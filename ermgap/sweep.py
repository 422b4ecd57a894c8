"""Ray Tune sweeps over training configs, one MLflow parent run per sweep and one child run per trial.

    outcome = run_sweep("sweeps/demo.yaml")            # or a SweepSpec from load_sweep_spec
    outcome.leaderboard                                # pandas frame, one row per trial

How a value in the spec reaches a trial: `load_sweep_spec` validates every trial config up front;
Tune samples a params dict ({"variant": "erm", "optim.lr": 3e-4, ...}); the trial function turns it
into a RunConfig (`SweepSpec.trial_config`) and runs `ermgap.train.build_trainer(...).fit()`: one Ray
Train worker group per trial whose rank-0 reports reach Tune through `TuneReportCallback` (Train V2
inside Tune, see NOTES), so ASHA can stop it. The training run logs its own MLflow child run,
tagged with the sweep's parent run id.

On disk, `<storage_path>/<name>/` holds `tune/` (the Tune experiment, what --resume restores),
`train/` (Train V2 runs and checkpoints), `runs/<trial_id>/` (each training run's outputs),
`sweep_state.json` (the parent run id and spec hash) and the final leaderboard files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ermgap.config import default_tracking_uri, flatten
from ermgap.errors import ConfigError, ErmgapError, OutputExistsError, TrainingError
from ermgap.io import atomic_write_text
from ermgap.sweep_spec import SEED_KEY, TRIAL_DRIVER_CPU, VARIANT_PARAM, SweepSpec, dump_spec_yaml, load_sweep_spec

STATE_FILE = "sweep_state.json"
TAG_SWEEP = "ermgap.sweep"
TAG_HASH = "ermgap.sweep_hash"
TAG_TRIAL = "ermgap.trial_id"
TAG_ROLE = "ermgap.role"
PARENT_TAG = "mlflow.parentRunId"
# Leaderboard columns read from each child run (final logged values).
# *_loss_gap is Δ, the worst within-language gender gap in mean answer loss: the quantity the
# objective penalises, shown next to the metric gaps it is meant to move.
DEV_METRICS = ("dev_w_f1", "dev_acc", "dev_avg_gap", "dev_worst_lang_gap", "dev_loss_gap")
TEST_METRICS = ("test_w_f1", "test_acc", "test_avg_gap", "test_worst_lang_gap", "test_loss_gap")


class SweepInterrupted(ErmgapError):
    """The sweep stopped before every trial ended; it can be resumed."""

    exit_code = 130


@dataclass
class SweepPaths:
    root: Path

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE


@dataclass
class SweepOutcome:
    """What a finished sweep leaves: the leaderboard frame, the chosen trial and where things are."""

    name: str
    root: Path
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    leaderboard: pd.DataFrame = field(default_factory=pd.DataFrame)
    seed_summary: pd.DataFrame | None = None  # per-configuration mean ± sd when the spec repeats seeds
    best_trial: str | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    ray_start_s: float = 0.0


# --------------------------------------------------------------------------- paths and resources


def _is_uri(path: str) -> bool:
    return "://" in path


def sweep_paths(spec: SweepSpec) -> SweepPaths:
    if _is_uri(spec.model.storage_path):
        raise ConfigError(f"{spec.source}: storage_path {spec.model.storage_path!r}: the sweep driver keeps its "
                          "state next to the Tune experiment, so give a local or NFS directory")
    return SweepPaths(Path(spec.model.storage_path).resolve() / spec.name)


def _absolute_paths(tree: dict[str, Any]) -> None:
    """Relative data/model paths are relative to the driver's CWD; trials run in other directories."""
    data = tree.setdefault("data", {})
    if "manifest" in data and not os.path.isabs(data["manifest"]):
        data["manifest"] = str(Path(data["manifest"]).resolve())
    model = tree.setdefault("model", {})
    name = model.get("name_or_path")
    if name and Path(name).exists():
        model["name_or_path"] = str(Path(name).resolve())


def check_resources(spec: SweepSpec, available: dict[str, float], where: str) -> None:
    """Raise ConfigError if any single trial needs more CPUs/GPUs than `available` has."""
    for params in spec.example_trials():
        need = spec.trial_resources(params)
        for res in ("CPU", "GPU"):
            if need[res] > available.get(res, 0.0) + 1e-9:
                d = spec.trial_config(params).distributed
                raise ConfigError(
                    f"{spec.source}: a trial needs {need[res]:g} {res} ({d.num_workers} worker(s) × "
                    f"{d.cpus_per_worker if res == 'CPU' else 1:g} {res} + {TRIAL_DRIVER_CPU if res == 'CPU' else 0:g} "
                    f"for the trial driver) but {where} has {available.get(res, 0.0):g}; lower "
                    f"resources.num_workers / resources.cpus_per_worker / resources.gpus_per_worker")


def check_trial_inputs(spec: SweepSpec) -> None:
    """Run the training module's pre-flight checks (manifest, model dir, batch vs data size, GPU) once
    per distinct set of inputs among the trials, so a bad path fails the sweep before any trial."""
    from ermgap.train import check_inputs

    seen: set[str] = set()
    for params in spec.example_trials():
        cfg = spec.trial_config(params)
        key = json.dumps([cfg.data.model_dump(), cfg.model.name_or_path, cfg.eval.metric,
                          cfg.optim.effective_batch_size, cfg.distributed.use_gpu], default=str)
        if key not in seen:
            seen.add(key)
            check_inputs(cfg)


def local_resources() -> dict[str, float]:
    """What a local Ray cluster started here would have."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - torch without CUDA support reports no GPU either way
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def resource_plan(spec: SweepSpec, available: dict[str, float] | None = None) -> dict[str, Any]:
    """Trials × workers × CPUs/GPUs and how many run at once (bounded by the cluster if known)."""
    trials = spec.example_trials()
    per = [spec.trial_resources(p) for p in trials]
    cpu = max(r["CPU"] for r in per)
    gpu = max(r["GPU"] for r in per)
    fit = math.inf
    if available:
        fit = math.floor((available.get("CPU", 0) + 1e-9) / cpu) if cpu else math.inf
        if gpu:
            fit = min(fit, math.floor((available.get("GPU", 0) + 1e-9) / gpu))
    limit = spec.model.max_concurrent_trials or math.inf
    concurrent = int(min(len(trials), limit, fit))
    cfg = spec.trial_config(trials[0]).distributed
    return {
        "trials": len(trials), "workers_per_trial": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
        "gpus_per_worker": 1 if cfg.use_gpu else 0, "cpu_per_trial": cpu, "gpu_per_trial": gpu,
        "max_concurrent_trials": spec.model.max_concurrent_trials, "concurrent": concurrent,
        "waves": math.ceil(len(trials) / max(concurrent, 1)),
        "cluster": available or {},
    }


# --------------------------------------------------------------------------- Tune wiring


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune param space: grids as grid_search (grid/random), everything else as Tune samplers."""
    from ray import tune

    m = spec.model
    optuna = m.algorithm.startswith("optuna")
    space: dict[str, Any] = {}
    if m.variants:
        names = list(m.variants)
        space[VARIANT_PARAM] = tune.choice(names) if optuna else tune.grid_search(names)
    for key, d in m.space.items():
        if d.kind == "grid":
            space[key] = tune.grid_search(list(d.grid))
        elif d.kind == "choice":
            space[key] = tune.choice(list(d.choice))
        elif d.kind == "uniform":
            space[key] = tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            space[key] = tune.loguniform(*d.loguniform)
        else:
            space[key] = tune.randint(d.randint[0], d.randint[1] + 1)  # Tune's upper bound is exclusive
    if m.seeds:
        space[SEED_KEY] = m.seeds[0] if optuna else tune.grid_search(list(m.seeds))
    return space


def _search_alg(spec: SweepSpec):
    m = spec.model
    if m.algorithm in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune's max_concurrent_trials does not reach a generator passed in explicitly: set it here.
        return BasicVariantGenerator(max_concurrent=m.max_concurrent_trials or 0, random_state=m.search_seed)
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = list(m.objectives), list(m.objectives.values())
    if m.algorithm == "optuna_tpe":
        return OptunaSearch(metric=metrics[0], mode=modes[0], seed=m.search_seed)
    return OptunaSearch(metric=metrics, mode=modes, seed=m.search_seed)


def _scheduler(spec: SweepSpec):
    s = spec.model.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t + 1: a run's final report (test metrics, done=True) repeats its last eval_round; a
    # scheduler stop at exactly max_t would cut that report off. The rungs stay those of max_t.
    return ASHAScheduler(time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=s.max_t + 1,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


@dataclass
class _TrialContext:
    """Everything a trial needs, shipped to the trial actor with the trainable."""

    spec: SweepSpec
    paths: SweepPaths
    parent_run_id: str
    tracking_uri: str
    experiment: str
    trainer_factory: str = "ermgap.train:build_trainer"


def _trial_fn(params: dict[str, Any], ctx: _TrialContext) -> None:
    """One Tune trial = one training run on its own Ray Train worker group."""
    import importlib

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = ctx.spec.trial_config(params)
    cfg.tracking.tracking_uri = ctx.tracking_uri
    cfg.tracking.experiment = ctx.experiment
    cfg.tracking.run_name = f"{ctx.spec.name}/{trial_id}"
    cfg.tracking.storage_path = str(ctx.paths.train)
    tags = {TAG_SWEEP: ctx.spec.name, TAG_HASH: ctx.spec.hash(), TAG_TRIAL: trial_id, TAG_ROLE: "trial"}
    tags.update({f"ermgap.param.{k}": str(v) for k, v in params.items()})
    module, _, attr = ctx.trainer_factory.partition(":")
    build_trainer = getattr(importlib.import_module(module), attr)
    # A restored (interrupted) trial continues its Train run from the last checkpoint.
    resume = (ctx.paths.train / trial_id).exists()
    trainer = build_trainer(
        cfg, run_dir=str(ctx.paths.runs / trial_id), name=trial_id, storage_path=str(ctx.paths.train),
        callbacks=[TuneReportCallback()], mlflow_parent_run_id=ctx.parent_run_id, mlflow_tags=tags,
        resume=resume)
    trainer.fit()


def _trainable(ctx: _TrialContext):
    from functools import partial

    from ray import tune

    fn = partial(_trial_fn, ctx=ctx)
    fn.__name__ = "ermgap_trial"  # Tune names the trainable after the function
    # The trial function only waits on trainer.fit(); its workers hold the real resources.
    return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU})


def _tuner(spec: SweepSpec, ctx: _TrialContext, resume: bool):
    from ray import tune

    trainable = _trainable(ctx)
    if resume and tune.Tuner.can_restore(str(ctx.paths.tune)):
        return tune.Tuner.restore(str(ctx.paths.tune), trainable, resume_unfinished=True, resume_errored=True)
    m = spec.model
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=_search_alg(spec), scheduler=_scheduler(spec), num_samples=m.num_samples,
            max_concurrent_trials=m.max_concurrent_trials,
            trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=ctx.paths.tune.name, storage_path=str(ctx.paths.root), verbose=1),
    )


# --------------------------------------------------------------------------- MLflow parent run


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it between the two calls
        return client.get_experiment_by_name(name).experiment_id


def _start_parent(spec: SweepSpec, tracking_uri: str, experiment: str) -> str:
    from mlflow.entities import Param

    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment)
    run = client.create_run(exp_id, run_name=spec.name,
                            tags={TAG_SWEEP: spec.name, TAG_HASH: spec.hash(), TAG_ROLE: "sweep",
                                  "mlflow.note.content": spec.model.description or f"ermgap sweep {spec.name}"})
    params = {k: str(v)[:6000] for k, v in flatten({k: v for k, v in spec.raw.items() if k != "base"}).items()}
    params["base"] = str(spec.model.base)[:6000] if isinstance(spec.model.base, str) else "<inline>"
    params.update({f"base.{k}": str(v)[:6000] for k, v in flatten(spec.base_tree).items()})
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def _write_state(paths: SweepPaths, state: dict[str, Any]) -> None:
    atomic_write_text(paths.state, json.dumps(state, indent=2) + "\n", force=True)


def _read_state(paths: SweepPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{paths.root}: no sweep to resume ({STATE_FILE} missing); run without --resume") from None


# --------------------------------------------------------------------------- leaderboard


def child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> pd.DataFrame:
    """All MLflow runs whose parent is the sweep's run (one row per run, `metrics.*`/`tags.*` columns)."""
    import mlflow

    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)


def build_leaderboard(spec: SweepSpec, runs: pd.DataFrame, tune_rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per trial: its params, status and the final metrics its MLflow child run logged.

    `tune_rows`: trial_id -> {"params": {...}, "status": ..., "last_round": int} from Tune.
    Pareto-optimal (dev W-F1 ↑, dev AVG gap ↓) and best (selection rule) trials are marked.
    """
    from ermgap.metrics import pareto_front

    rows = []
    by_trial: dict[str, list[pd.Series]] = {}
    for _, r in runs.iterrows():
        by_trial.setdefault(r.get(f"tags.{TAG_TRIAL}"), []).append(r)
    for trial_id, info in sorted(tune_rows.items()):
        children = by_trial.get(trial_id, [])
        row: dict[str, Any] = {"trial": trial_id, **{k: info["params"].get(k) for k in spec.param_names()}}
        row["status"] = info["status"]
        row["eval_rounds"] = info.get("last_round")
        row["n_child_runs"] = len(children)
        row["trial_s"] = info.get("time_total_s")  # Tune's wall time of the trial up to its last report
        child = children[-1] if children else None
        row["mlflow_run_id"] = None if child is None else child["run_id"]
        for m in DEV_METRICS + TEST_METRICS:
            row[m] = _final_metric(child, m)
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    ok = board["dev_w_f1"].notna() & board["dev_avg_gap"].notna()
    board["pareto"] = False
    if ok.any():
        pts = list(zip(board.loc[ok, "dev_w_f1"], board.loc[ok, "dev_avg_gap"]))
        board.loc[ok, "pareto"] = pareto_front(pts)
    board["best"] = False
    best = select_best(board, spec)
    if best is not None:
        board.loc[board["trial"] == best, "best"] = True
    return board


def seed_summary(board: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame | None:
    """Mean and sample standard deviation over seeds of each configuration's final metrics.

    A configuration is the trial's params without `optim.seed`; only trials that ran to the end
    (test metrics logged) count, and `n_seeds` says how many did. None unless the spec has 2+ seeds:
    a single run's gap is mostly sampling noise, so sweeps that repeat seeds are compared on this.
    """
    if not spec.model.seeds or len(spec.model.seeds) < 2 or board.empty:
        return None
    keys = [p for p in spec.param_names() if p != SEED_KEY]
    done = board[board["test_w_f1"].notna()]
    rows = []
    groups = done.groupby(keys, sort=False, dropna=False) if keys else [((), done)]
    for key, grp in groups:
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_seeds"] = len(grp)
        for m in DEV_METRICS + TEST_METRICS:
            values = grp[m].dropna().astype(float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def print_seed_summary(summary: pd.DataFrame, spec: SweepSpec, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    keys = [p for p in spec.param_names() if p != SEED_KEY]
    shown = ("dev_w_f1", "dev_worst_lang_gap", "test_w_f1", "test_avg_gap", "test_worst_lang_gap", "test_loss_gap")
    table = Table(title=f"sweep {spec.name}: mean ± sd over seeds {spec.model.seeds}")
    for c in [*keys, "seeds", *shown]:
        table.add_column(c, justify="left" if c in keys else "right")
    for _, r in summary.iterrows():
        table.add_row(*[_fmt(r[k]) for k in keys], str(r["n_seeds"]),
                      *[f"{_fmt(r[f'{m}_mean'])} ± {_fmt(r[f'{m}_sd'])}" for m in shown])
    console.print(table)


def _final_metric(child: pd.Series | None, name: str) -> float | None:
    """A finished run logs `final/<name>` (dev metrics of the best checkpoint, test metrics); a stopped
    run only has its last evaluation's `<name>` (test metrics absent)."""
    if child is None:
        return None
    for key in (f"metrics.final/{name}", f"metrics.{name}"):
        v = child.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return float(v)
    return None


def select_best(board: pd.DataFrame, spec: SweepSpec) -> str | None:
    """The documented rule: among trials whose gap metric is within `tolerance` of the lowest,
    the best `metric` (default: best dev W-F1 with dev AVG gap ≤ min + 2 points). Only trials
    that ran to the end (test metrics logged) compete; ties go to the lower gap."""
    sel = spec.model.selection
    done = board[board["test_w_f1"].notna() & board[sel.metric].notna() & board[sel.gap_metric].notna()]
    if done.empty:
        return None
    admissible = done[done[sel.gap_metric] <= done[sel.gap_metric].min() + sel.tolerance]
    ranked = admissible.sort_values([sel.metric, sel.gap_metric], ascending=[sel.mode == "min", True])
    return str(ranked.iloc[0]["trial"])


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
    return str(v)


def leaderboard_markdown(board: pd.DataFrame) -> str:
    cols = [c for c in board.columns if c not in ("mlflow_run_id", "trial_s")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in board.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def print_leaderboard(board: pd.DataFrame, spec: SweepSpec, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    sel = spec.model.selection
    table = Table(title=f"sweep {spec.name}: {len(board)} trials  (★ best: {sel.metric} {sel.mode} among "
                        f"{sel.gap_metric} ≤ min + {sel.tolerance:g};  ◆ Pareto: dev W-F1 ↑ / dev AVG gap ↓)")
    short = {"dev_w_f1": "dev W-F1", "dev_acc": "dev ACC", "dev_avg_gap": "dev AVG gap",
             "dev_worst_lang_gap": "dev worst-lang gap", "dev_loss_gap": "dev Δloss",
             "test_w_f1": "test W-F1", "test_acc": "test ACC", "test_avg_gap": "test AVG gap",
             "test_worst_lang_gap": "test worst-lang gap", "test_loss_gap": "test Δloss"}
    params = spec.param_names()
    for c in ["", "trial", *params, "status", "rounds", *short.values()]:
        table.add_column(c, justify="right" if c in short.values() or c == "rounds" else "left")
    for _, r in board.iterrows():
        mark = ("★" if r["best"] else "") + ("◆" if r["pareto"] else "")
        table.add_row(mark, r["trial"], *[_fmt(r[p]) for p in params], str(r["status"]), _fmt(r["eval_rounds"]),
                      *[_fmt(r[k]) for k in short])
    console.print(table)


# --------------------------------------------------------------------------- the sweep


def _trial_states(results) -> dict[str, str]:
    """Tune's own status per trial id (TERMINATED, ERROR, or PENDING/RUNNING/PAUSED when interrupted)."""
    return {t.trial_id: t.status for t in results._experiment_analysis.trials}


def _tune_rows(results) -> dict[str, dict[str, Any]]:
    rows = {}
    states = _trial_states(results)
    for res in results:
        trial_id = Path(res.path).name
        metrics = res.metrics or {}
        if res.error is not None:
            status = "ERROR"
        elif states.get(trial_id, "TERMINATED") != "TERMINATED":
            status = "interrupted"
        elif metrics.get("test_w_f1") is not None:
            status = "done"
        else:
            status = "stopped"  # ended by the scheduler (or its training stopped before the final report)
        rows[trial_id] = {"params": dict(res.config), "status": status, "last_round": metrics.get("eval_round"),
                          "time_total_s": metrics.get("time_total_s")}
    return rows


def _close_stopped_children(client, board: pd.DataFrame) -> None:
    """A trial ASHA stopped had its workers killed mid-run: mark its child run KILLED, not RUNNING."""
    for _, r in board.iterrows():
        if r["status"] != "done" and r["mlflow_run_id"]:
            run = client.get_run(r["mlflow_run_id"])
            if run.info.status == "RUNNING":
                client.set_terminated(r["mlflow_run_id"], status="KILLED")


def _log_parent_artifacts(client, parent_id: str, spec: SweepSpec, paths: SweepPaths, board: pd.DataFrame,
                          outcome: SweepOutcome) -> None:
    art = paths.root / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    files = {
        "spec": atomic_write_text(art / "sweep.yaml", dump_spec_yaml(spec), force=True),
        "search_space": atomic_write_text(art / "search_space.json", json.dumps(
            {"algorithm": spec.model.algorithm, "space": {k: d.model_dump(exclude_none=True) for k, d in spec.model.space.items()},
             "variants": spec.model.variants, "seeds": spec.model.seeds,
             "scheduler": None if spec.model.scheduler is None else spec.model.scheduler.model_dump(),
             "trials": spec.example_trials()}, indent=2, default=str) + "\n", force=True),
        "leaderboard_csv": atomic_write_text(art / "leaderboard.csv", board.to_csv(index=False), force=True),
        "leaderboard_md": atomic_write_text(art / "leaderboard.md", leaderboard_markdown(board), force=True),
    }
    summary = outcome.seed_summary
    if summary is not None:
        files["seed_summary_csv"] = atomic_write_text(art / "seed_summary.csv", summary.to_csv(index=False), force=True)
        files["seed_summary_md"] = atomic_write_text(art / "seed_summary.md", leaderboard_markdown(summary), force=True)
    files.update(_pareto_artifacts(board, art))
    for f in files.values():
        client.log_artifact(parent_id, str(f))
    outcome.artifacts = files
    best = board[board["best"]] if "best" in board else board.iloc[:0]
    if not best.empty:
        b = best.iloc[0]
        client.set_tag(parent_id, "ermgap.best_trial", b["trial"])
        if b["mlflow_run_id"]:
            client.set_tag(parent_id, "ermgap.best_run_id", b["mlflow_run_id"])
        for m in DEV_METRICS + TEST_METRICS:
            if b[m] is not None and not (isinstance(b[m], float) and math.isnan(b[m])):
                client.log_metric(parent_id, f"best_{m}", float(b[m]))


def _pareto_artifacts(board: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The Pareto plot (dev W-F1 vs dev AVG gap, one point per trial)."""
    from ermgap.plots import pareto_plot

    ok = board[board["dev_w_f1"].notna() & board["dev_avg_gap"].notna()].copy()
    if ok.empty:
        return {}
    ok["label"] = [f"{v} ({t})" if isinstance(v, str) else t for v, t in zip(ok.get(VARIANT_PARAM, ok["trial"]), ok["trial"])]
    path = out / "pareto.png"
    pareto_plot(ok, path, x="dev_avg_gap", y="dev_w_f1", label="label")
    return {"pareto_plot": path}


def _paper_report(tracking_uri: str, parent_id: str, out: Path, console) -> dict[str, Path]:
    """The metrics area's tables (Table 2/3 layout) and plots from the finished child runs' test
    predictions, written under `out` and logged to the parent run (artifacts/report)."""
    from ermgap.report import report_from_mlflow

    try:
        paths, skipped = report_from_mlflow(tracking_uri, out, parent_run_id=parent_id, force=True, log_to=parent_id)
    except ConfigError as err:  # e.g. every trial was stopped before writing predictions
        console.print(f"[yellow]note:[/] no report tables: {err}")
        return {}
    for note in skipped:
        console.print(f"report: skipped {note}")
    keep = ("table2_md", "table3_md", "fairness_accuracy_png", "gender_gaps_png", "lambda_trajectory_png")
    return {f"report_{k}": v for k, v in paths.items() if k in keep}


def _console():
    """A console wide enough for the leaderboard even when stdout is a pipe or a CI log."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal and c.width >= 160 else Console(width=200)


def ui_command(tracking_uri: str) -> str:
    return f"ermgap ui --tracking-uri '{tracking_uri}'"


def run_sweep(spec: SweepSpec | str | os.PathLike, *, overrides: list[str] | None = None, address: str | None = None,
              resume: bool = False, dry_run: bool = False, force: bool = False, console=None,
              trainer_factory: str = "ermgap.train:build_trainer") -> SweepOutcome:
    """Run (or resume, or only plan) a sweep; returns the leaderboard and where everything went.

    Every trial config is validated and resources are checked before any trial starts: against
    this machine before starting a local Ray cluster, against the cluster after joining `address`.
    `trainer_factory` ("module:function") must have `ermgap.train.build_trainer`'s signature.
    """
    console = console or _console()
    t0 = time.perf_counter()
    if not isinstance(spec, SweepSpec):
        spec = load_sweep_spec(spec, overrides)
    paths = sweep_paths(spec)
    _absolute_paths(spec.base_tree)
    base_cfg = spec.trial_config(spec.example_trials()[0])
    tracking_uri = spec.model.mlflow.tracking_uri or default_tracking_uri(base_cfg)
    experiment = spec.model.mlflow.experiment
    outcome = SweepOutcome(spec.name, paths.root, None, tracking_uri, experiment)

    if dry_run:
        print_plan(spec, resource_plan(spec, None if address else local_resources()), console)
        return outcome
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: resume continues the sweep, force starts over")
    if resume:
        state = _read_state(paths)
        if state["spec_hash"] != spec.hash():
            raise ConfigError(f"{spec.source}: the spec changed since the sweep started (hash {state['spec_hash']} → "
                              f"{spec.hash()}); resume with the same spec and overrides, or pass --force to start over")
        tracking_uri, experiment = state["tracking_uri"], state["experiment"]
    elif paths.root.exists():
        if not force:
            raise OutputExistsError(f"{paths.root} already holds sweep '{spec.name}'; pass --resume to continue "
                                    "it or --force to start over")
        shutil.rmtree(paths.root)

    if address is None:
        check_resources(spec, local_resources(), "this machine")
        check_trial_inputs(spec)
    from ermgap.ray_runtime import ensure_ray

    import ray

    started_here = not ray.is_initialized()
    t_ray = time.perf_counter()
    ensure_ray(address, log_to_driver=False)
    outcome.ray_start_s = time.perf_counter() - t_ray
    try:
        check_resources(spec, ray.cluster_resources(), "the Ray cluster")
        if address is not None:
            check_trial_inputs(spec)
        client = _client(tracking_uri)
        if resume:
            parent_id = state["parent_run_id"]
            client.update_run(parent_id, status="RUNNING")
        else:
            paths.root.mkdir(parents=True, exist_ok=True)
            parent_id = _start_parent(spec, tracking_uri, experiment)
            _write_state(paths, {"name": spec.name, "spec_hash": spec.hash(), "parent_run_id": parent_id,
                                 "tracking_uri": tracking_uri, "experiment": experiment,
                                 "tune_path": str(paths.tune), "spec_source": spec.source})
        outcome.parent_run_id = parent_id
        ctx = _TrialContext(spec, paths, parent_id, tracking_uri, experiment, trainer_factory)
        try:
            results = _tuner(spec, ctx, resume).fit()
        except BaseException:
            client.set_terminated(parent_id, status="KILLED")
            raise
        tune_rows = _tune_rows(results)
        unfinished = [t for t, r in tune_rows.items() if r["status"] == "interrupted"]
        if unfinished:
            # Ctrl-C (or a stop) ended Tune early: keep everything resumable, claim no result.
            client.set_terminated(parent_id, status="KILLED")
            raise SweepInterrupted(
                f"sweep {spec.name} interrupted with {len(unfinished)} unfinished trial(s); continue it with "
                f"`ermgap sweep {spec.source.removesuffix(' + overrides')} --resume` (same overrides)")
        board = build_leaderboard(spec, child_runs(tracking_uri, experiment, parent_id), tune_rows)
        _close_stopped_children(client, board)
        outcome.leaderboard = board
        outcome.seed_summary = seed_summary(board, spec)
        outcome.best_trial = select_best(board, spec) if not board.empty else None
        _log_parent_artifacts(client, parent_id, spec, paths, board, outcome)
        outcome.artifacts.update(_paper_report(tracking_uri, parent_id, paths.root / "report", console))
        failed = board.empty or (board["status"] == "ERROR").all()
        client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")
    finally:
        if started_here:
            ray.shutdown()
    outcome.wall_s = time.perf_counter() - t0
    print_leaderboard(board, spec, console)
    if outcome.seed_summary is not None:
        print_seed_summary(outcome.seed_summary, spec, console)
    console.print(f"best trial: {outcome.best_trial or '- (no trial finished)'}")
    for k, p in outcome.artifacts.items():
        console.print(f"{k}: {p}")
    console.print(f"MLflow: experiment '{experiment}', parent run {parent_id} at {tracking_uri}")
    console.print(f"open the UI: {ui_command(tracking_uri)}")
    if failed:
        errs = [res.error for res in results if res.error is not None]
        raise TrainingError(f"sweep {spec.name}: every trial failed; first error: {errs[0] if errs else 'no trials'}")
    return outcome


def print_plan(spec: SweepSpec, plan: dict[str, Any], console) -> None:
    """--dry-run: the trials with their resolved hyperparameters, and the resource plan."""
    from rich.table import Table

    m = spec.model
    trials = spec.example_trials()
    sampled = [k for k, d in m.space.items() if d.kind != "grid"]
    title = f"sweep {spec.name}: {len(trials)} trials, algorithm {m.algorithm}"
    if sampled:
        title += f" (sampled at run time, example draws shown: {', '.join(sampled)})"
    table = Table(title=title)
    params = spec.param_names()
    for c in ["#", *params, "resolved changes vs base"]:
        table.add_column(c)
    ref = flatten(_validate_base(spec).to_dict())
    for i, p in enumerate(trials):
        cfg = flatten(spec.trial_config(p).to_dict())
        changed = {k: v for k, v in cfg.items() if ref.get(k) != v}
        table.add_row(str(i), *[_fmt(p.get(k)) for k in params], ", ".join(f"{k}={_fmt(v)}" for k, v in changed.items()))
    console.print(table)
    inf = "unbounded" if plan["max_concurrent_trials"] is None else plan["max_concurrent_trials"]
    console.print(
        f"resources: {plan['trials']} trials × {plan['workers_per_trial']} worker(s) × "
        f"{plan['cpus_per_worker']:g} CPU / {plan['gpus_per_worker']} GPU per worker "
        f"(+{TRIAL_DRIVER_CPU:g} CPU trial driver) = {plan['cpu_per_trial']:g} CPU, {plan['gpu_per_trial']:g} GPU per trial; "
        f"max_concurrent_trials {inf}; {plan['concurrent']} at once on "
        f"{_fmt_cluster(plan['cluster'])}" + (f" → {plan['waves']} wave(s)" if plan["concurrent"] else ""))
    if plan["cluster"] and plan["concurrent"] == 0:
        console.print(f"[yellow]note:[/] one trial needs more than {_fmt_cluster(plan['cluster'])}: run this sweep "
                      "on a cluster with --address (a local run would be refused before starting)")
    if m.scheduler:
        s = m.scheduler
        console.print(f"scheduler: ASHA on {s.metric} ({s.mode}) over {s.time_attr}, grace {s.grace_period}, "
                      f"reduction {s.reduction_factor:g}, max_t {s.max_t}")
    if m.algorithm.startswith("optuna"):
        console.print(f"objectives: {', '.join(f'{k} ({v})' for k, v in m.objectives.items())}")


def _validate_base(spec: SweepSpec):
    from ermgap.config import validate_tree

    return validate_tree(dict(spec.base_tree), f"{spec.source}: base")


def _fmt_cluster(c: dict[str, float]) -> str:
    if not c:
        return "the cluster at --address (checked when joining)"
    return f"{c.get('CPU', 0):g} CPU / {c.get('GPU', 0):g} GPU"
