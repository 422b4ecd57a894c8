"""`run_sweep`: validate → plan resources → start or join Ray → parent run → Tune → leaderboard → report."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray
from rich.console import Console

from ermgap import tracking
from ermgap.config import default_tracking_uri, flatten, set_dotted
from ermgap.errors import ConfigError, ErmgapError, OutputExistsError, TrainingError
from ermgap.io import discard_aside, restore_aside
from ermgap.multinode import check_shared_paths, input_paths
from ermgap.preflight import absolute_paths, run_manifest
from ermgap.ray_runtime import ensure_ray, shutdown_ray
from ermgap.report import report_from_mlflow, run_test_predictions
from ermgap.storage import Location
from ermgap.sweep import render
from ermgap.sweep.leaderboard import (
    FAILED,
    board_metrics,
    build_leaderboard,
    objective_comparison,
    run_params,
    seed_summary,
    select_best,
)
from ermgap.sweep.paths import SweepPaths
from ermgap.sweep.resources import check_resources, check_trial_inputs, local_resources, resource_plan
from ermgap.sweep.spec import SweepSpec, load_sweep_spec
from ermgap.sweep.tune import TrialContext, trial_records, tuner, unfinished_trials


class SweepInterrupted(ErmgapError):
    """The sweep stopped before every trial ended; it can be resumed."""

    exit_code = 130


class TrialsFailed(TrainingError):
    """The sweep ran to the end but some of its trials failed (their training raised); `outcome` holds the
    leaderboard of all of them, the failed ones with status "failed" and their reason."""

    def __init__(self, message: str, outcome: SweepOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class SweepOutcome:
    """What a finished sweep leaves: the leaderboard frame, the chosen trial and where things are."""

    name: str
    root: Location
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    leaderboard: pd.DataFrame = field(default_factory=pd.DataFrame)
    seed_summary: pd.DataFrame | None = None  # per-configuration mean ± sd when the spec repeats seeds
    objective_comparison: pd.DataFrame | None = None  # each configuration vs the ERM one (paired bootstrap)
    best_trial: str | None = None
    artifacts: dict[str, Path | Location] = field(default_factory=dict)
    wall_s: float = 0.0
    ray_start_s: float = 0.0


def run_sweep(spec: SweepSpec | str | os.PathLike, *, overrides: list[str] | None = None, address: str | None = None,
              resume: bool = False, dry_run: bool = False, force: bool = False, allow_local_paths: bool = False,
              console: Console | None = None, verbose: bool = False, step_hook=None) -> SweepOutcome:
    """Run (or resume, or only plan) a sweep; returns the leaderboard and where everything went.

    Every trial config is validated and resources are checked before any trial starts: against
    this machine before starting a local Ray cluster, against the cluster after joining `address`
    (on more than one node also its shared storage, tracking server and inputs: ermgap.multinode;
    `allow_local_paths` accepts directories on NFS). The sweep may live in a directory or under an
    s3:// / gs:// prefix (ermgap.storage), and --resume needs nothing but that location.
    `verbose` shows Tune's status tables and the trials' worker output (hidden by default: each trial
    is one live line, see sweep/live.py). `step_hook` (ermgap.recipe.StepHook) reaches every trial's
    workers (tests inject faults with it).
    """
    out = console or render.console()
    t0 = time.perf_counter()
    if not isinstance(spec, SweepSpec):
        spec = load_sweep_spec(spec, overrides)
    paths = SweepPaths.of(spec)
    spec.base_tree.update(absolute_paths(spec.base_tree))
    _absolute_variant_paths(spec)
    tracking_uri = spec.model.mlflow.tracking_uri or default_tracking_uri(spec.trial_config(spec.example_trials()[0]))
    outcome = SweepOutcome(spec.name, paths.root, None, tracking_uri, spec.model.mlflow.experiment)
    if dry_run:
        render.print_plan(spec, resource_plan(spec, None if address else local_resources()), out)
        return outcome
    state = _claim_root(spec, paths, resume=resume, force=force)
    if state is not None:
        outcome.tracking_uri, outcome.experiment = state["tracking_uri"], state["experiment"]
    tracking.check_server(outcome.tracking_uri, "the sweep driver")
    if address is None:
        check_resources(spec, local_resources(), "this machine")
        check_trial_inputs(spec)

    started_here = not ray.is_initialized()
    t_ray = time.perf_counter()
    ensure_ray(address, log_to_driver=verbose)
    outcome.ray_start_s = time.perf_counter() - t_ray
    aside = None
    try:
        check_resources(spec, ray.cluster_resources(), "the Ray cluster")
        for inputs in {tuple(input_paths(spec.trial_config(p)).items()) for p in spec.example_trials()}:
            check_shared_paths(storage=str(paths.root), tracking_uri=outcome.tracking_uri, inputs=dict(inputs),
                               allow_local_paths=allow_local_paths, where=spec.source)
        if address is not None:
            check_trial_inputs(spec)
        # Only now, with every check passed, does --force move the previous sweep out of the way.
        aside = paths.root.set_aside("sweep") if force else None
        try:
            paths.root.claim("sweep", spec.name)
            outcome.parent_run_id = _open_parent(spec, paths, outcome, state)
        except BaseException:
            restore_aside(aside, str(paths.root))
            raise
        results = _fit(spec, paths, outcome, resume=state is not None, verbose=verbose, out=out, step_hook=step_hook)
        discard_aside(aside)
        failed = _summarise(spec, paths, outcome, results, out)
    finally:
        if started_here:
            shutdown_ray()
    outcome.wall_s = time.perf_counter() - t0
    render.print_outcome(outcome, spec, out)
    if failed:
        raise TrialsFailed(failed, outcome)
    return outcome


def _absolute_variant_paths(spec: SweepSpec) -> None:
    """A variant's own local paths (e.g. a corpus of its own), absolute like the base config's (`absolute_paths`)."""
    for settings in (spec.model.variants or {}).values():
        tree: dict = {}
        for key, value in settings.items():
            set_dotted(tree, key, value)
        fixed = absolute_paths(tree)
        for key in settings:
            section, _, leaf = key.partition(".")
            if section in ("data", "model") and leaf in fixed.get(section, {}):
                settings[key] = fixed[section][leaf]


def _claim_root(spec: SweepSpec, paths: SweepPaths, *, resume: bool, force: bool) -> dict | None:
    """The sweep's directory for this invocation: its saved state on --resume, else a fresh start."""
    paths.root.check_reachable("the sweep driver")
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: resume continues the sweep, force starts over")
    if resume:
        state = paths.read_state()
        if state["spec_hash"] != spec.hash():
            raise ConfigError(f"{spec.source}: the spec changed since the sweep started (hash {state['spec_hash']} → "
                              f"{spec.hash()}); resume with the same spec and overrides, or pass --force to start over")
        return state
    if paths.root.exists() and not force:
        raise OutputExistsError(f"{paths.root} already holds sweep '{spec.name}'; pass --resume to continue "
                                "it or --force to start over")
    if force:  # refused here, before Ray starts, when it is not a sweep (set_aside checks again later)
        paths.root.check_replaceable("sweep")
    return None


def _open_parent(spec: SweepSpec, paths: SweepPaths, outcome: SweepOutcome, state: dict | None) -> str:
    """The sweep's MLflow parent run: reopened on --resume, else created and recorded in the state file."""
    if state is not None:
        tracking.set_status(outcome.tracking_uri, state["parent_run_id"], "RUNNING")
        return state["parent_run_id"]
    paths.root.mkdir()
    params = flatten({k: v for k, v in spec.raw.items() if k != "base"})
    params["base"] = spec.model.base if isinstance(spec.model.base, str) else "<inline>"
    params.update({f"base.{k}": v for k, v in flatten(spec.base_tree).items()})
    parent_id = tracking.start_sweep_run(outcome.tracking_uri, outcome.experiment, name=spec.name,
                                         spec_hash=spec.hash(), description=spec.model.description, params=params)
    manifest = (spec.base_tree.get("data") or {}).get("manifest")
    if manifest:  # the trials' shared data, as the sweep's dataset input (each child logs its own too)
        # validated for the trials' task (a corpus with its own attribute has no gender column)
        tracking.log_manifest_input(outcome.tracking_uri, parent_id, manifest, run_manifest(spec.first_trial_config()))
    paths.write_state({"name": spec.name, "spec_hash": spec.hash(), "parent_run_id": parent_id,
                       "tracking_uri": outcome.tracking_uri, "experiment": outcome.experiment,
                       "tune_path": str(paths.tune), "spec_source": spec.source})
    return parent_id


@contextlib.contextmanager
def _stop_signals(stopped: threading.Event):
    """Ctrl-C and SIGTERM (a scheduler, `kill`, `docker stop`) set `stopped` and end Tune gracefully (SIGUSR1:
    Tune saves its state with the running trials as they were, so --resume continues them). Tune's own SIGINT
    handler is off: after it, the stopped trials look TERMINATED, like finished ones. Installed after Ray
    started: Ray's driver installs a SIGTERM handler that ends the process at once, every run left RUNNING."""

    def stop(*_):
        stopped.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before


def _interrupted(outcome: SweepOutcome) -> None:
    """A sweep that stopped early: the parent and the trials' runs still RUNNING become KILLED (a resume
    reopens them)."""
    runs = tracking.child_runs(outcome.tracking_uri, outcome.experiment, outcome.parent_run_id)
    tracking.close_unfinished(outcome.tracking_uri, list(runs["run_id"]) if not runs.empty else [])
    tracking.set_status(outcome.tracking_uri, outcome.parent_run_id, "KILLED")


def _fit(spec: SweepSpec, paths: SweepPaths, outcome: SweepOutcome, *, resume: bool, verbose: bool, out: Console,
         step_hook=None):
    """Run Tune to the end; an interrupted sweep (Ctrl-C, SIGTERM) marks its runs KILLED and stays resumable."""
    ctx = TrialContext(spec, paths, outcome.parent_run_id, outcome.tracking_uri, outcome.experiment,
                       step_hook=step_hook)
    stopped = threading.Event()
    try:
        with _stop_signals(stopped):
            results = tuner(spec, ctx, resume=resume, verbose=verbose, console=out).fit()
    except BaseException:
        _interrupted(outcome)
        raise
    unfinished = unfinished_trials(results)
    if stopped.is_set() or unfinished:
        # Ctrl-C (or a stop) ended Tune early: keep everything resumable, claim no result.
        _interrupted(outcome)
        raise SweepInterrupted(
            f"sweep {spec.name} interrupted{f' with {unfinished} unfinished trial(s)' if unfinished else ''}; continue it with "
            f"`ermgap sweep {spec.source.removesuffix(' + overrides')} --resume` (same overrides)")
    return results


def _summarise(spec: SweepSpec, paths: SweepPaths, outcome: SweepOutcome, results, out: Console) -> str | None:
    """Leaderboard, seed summary, best trial, parent-run artifacts and the paper's report; returns the
    message naming the failed trials and their reasons (None when no trial failed)."""
    uri, parent_id = outcome.tracking_uri, outcome.parent_run_id
    runs = tracking.child_runs(uri, outcome.experiment, parent_id)
    board = build_leaderboard(spec, runs, trial_records(results))
    if not board.empty:
        tracking.close_unfinished(uri, [r for r, s in zip(board["mlflow_run_id"], board["status"])
                                        if isinstance(r, str) and s != "done"])
    outcome.leaderboard = board
    outcome.seed_summary = seed_summary(board, spec)
    outcome.objective_comparison = objective_comparison(board, spec, _test_predictions(uri, board, runs))
    outcome.best_trial = select_best(board, spec) if not board.empty else None
    tags, metrics = {}, {}
    best = board[board["best"]] if "best" in board else board.iloc[:0]
    if not best.empty:
        b = best.iloc[0]
        tags["ermgap.best_trial"] = b["trial"]
        if b["mlflow_run_id"]:
            tags["ermgap.best_run_id"] = b["mlflow_run_id"]
        # The children's names (best/<metric>): the runs table shows parent and children in the same columns.
        metrics = {f"{tracking.BEST}{m}": b[m] for m in board_metrics() if b[m] is not None}
    # Written locally (staged, and uploaded when the sweep lives on object storage), then logged.
    with paths.artifacts.staged() as art:
        files = render.write_artifacts(spec, board, outcome.seed_summary, art, outcome.objective_comparison)
        tracking.log_sweep_summary(uri, parent_id, files=list(files.values()), tags=tags, metrics=metrics)
    outcome.artifacts = _stored(files, art, paths.artifacts)
    with paths.report.staged() as rep_dir:
        outcome.artifacts.update(_stored(_paper_report(uri, parent_id, rep_dir, out), rep_dir, paths.report))
    failed = failure_message(spec.name, board)
    if failed is not None:
        tracking.client(uri).set_tag(parent_id, tracking.TAG_ERROR, failed[:5000])
    tracking.set_status(uri, parent_id, "FAILED" if failed else "FINISHED")
    return failed


def _stored(files: dict[str, Path], staged: Path, loc: Location) -> dict[str, Path | Location]:
    """Where files written under `staged` live now: there, or (object storage) their uploaded copies."""
    if not loc.is_remote:
        return dict(files)
    return {k: loc / p.relative_to(staged).as_posix() for k, p in files.items()}


def failure_message(name: str, board: pd.DataFrame) -> str | None:
    """One line per failed trial (its id and reason) under a headline; None when none failed."""
    if board.empty:
        return f"sweep {name}: no trial ran"
    bad = board[board["status"] == FAILED]
    if bad.empty:
        return None
    lines = [f"  {r['trial']}: {r['reason']}" for _, r in bad.iterrows()]
    return "\n".join([f"sweep {name}: {len(bad)} of {len(board)} trial(s) failed (status 'failed' in the leaderboard):",
                      *lines])


def _test_predictions(tracking_uri: str, board: pd.DataFrame, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{MLflow run id: test predictions} of the trials that ran to the end (`runs`: their child runs)."""
    if board.empty:
        return {}
    params = {r["run_id"]: run_params(r) for _, r in runs.iterrows()}
    done = board[board["test_w_f1"].notna() & board["mlflow_run_id"].notna()]
    out = {}
    with tempfile.TemporaryDirectory(prefix="ermgap-preds-") as tmp:
        for run_id in done["mlflow_run_id"]:
            got = run_test_predictions(tracking_uri, run_id, params.get(run_id, {}), tmp)
            if got is not None:
                out[run_id] = got[0]
    return out


REPORT_BOOTSTRAP = 1000


def _paper_report(tracking_uri: str, parent_id: str, out_dir: Path, out: Console) -> dict[str, Path]:
    """The paper's tables (Table 2/3 layout) and plots from the finished child runs' test predictions,
    written under `out_dir` and logged to the parent run (artifacts/report). With bootstrap 95 % intervals
    (REPORT_BOOTSTRAP resamples: well under a second each), drawn as the plots' error bars."""
    try:
        paths, skipped = report_from_mlflow(tracking_uri, out_dir, parent_run_id=parent_id, force=True, log_to=parent_id,
                                            n_boot=REPORT_BOOTSTRAP)
    except ConfigError as err:  # e.g. every trial was stopped before writing predictions
        out.print(f"[yellow]note:[/] no report tables: {err}")
        return {}
    for note in skipped:
        out.print(f"report: skipped {note}")
    keep = ("table2_md", "table3_md", "fairness_accuracy_png", "gender_gaps_png", "lambda_trajectory_png")
    return {f"report_{k}": v for k, v in paths.items() if k in keep}
