"""Ray Tune wiring: the search space, search algorithm and scheduler of a spec, the trial function
and the Tuner that runs it.

One Tune trial = one training run: the trial function builds the run's `RunConfig` from its sampled
params (`SweepSpec.trial_config`) and fits `ermgap.driver.build_trainer`'s TorchTrainer, the same
recipe `ermgap train` runs, on its own Ray Train worker group. Rank 0's reports reach Tune through
`TuneReportCallback` (Ray's Train-V2-inside-Tune pattern), so ASHA can stop a trial; the run logs its
own MLflow child run, tagged with the sweep's parent run id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from ermgap.driver import build_trainer
from ermgap.failures import fit_run, set_aside_cut_off_snapshot
from ermgap.objectives import OBJECTIVES, register_objective
from ermgap.run_outputs import METRICS_FILE
from ermgap.sweep.leaderboard import FAILED, TrialRecord, failure_reason
from ermgap.sweep.live import SweepProgress, trial_label
from ermgap.sweep.paths import SweepPaths
from ermgap.sweep.spec import SEED_KEY, TRIAL_DRIVER_CPU, VARIANT_PARAM, SweepSpec
from ermgap.tracking import trial_tags


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune param space: grids as grid_search (grid/random), everything else as Tune samplers."""
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


def search_alg(spec: SweepSpec):
    m = spec.model
    if m.algorithm in ("grid", "random"):
        # Tune's max_concurrent_trials does not reach a generator passed in explicitly: set it here.
        return BasicVariantGenerator(max_concurrent=m.max_concurrent_trials or 0, random_state=m.search_seed)
    metrics, modes = list(m.objectives), list(m.objectives.values())
    if m.algorithm == "optuna_tpe":
        return OptunaSearch(metric=metrics[0], mode=modes[0], seed=m.search_seed)
    return OptunaSearch(metric=metrics, mode=modes, seed=m.search_seed)


def scheduler(spec: SweepSpec) -> ASHAScheduler | None:
    s = spec.model.scheduler
    if s is None:
        return None
    # max_t + 1: a run's final report (test metrics, done=True) repeats its last eval_round; a
    # scheduler stop at exactly max_t would cut that report off. The rungs stay those of max_t.
    return ASHAScheduler(time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=s.max_t + 1,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


@dataclass
class TrialContext:
    """Everything a trial needs, shipped to the trial actor with the trainable."""

    spec: SweepSpec
    paths: SweepPaths
    parent_run_id: str
    tracking_uri: str
    experiment: str
    step_hook: Any = None  # a test's per-step hook (ermgap.recipe.StepHook), as `run_training` takes it
    # The objective kinds the sweep driver knows, a kind registered at run time included (register_objective):
    # a trial runs in its own process, whose registry holds only the shipped kinds.
    objective_classes: tuple = field(default_factory=lambda: tuple(OBJECTIVES.values()))


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial = one training run on its own Ray Train worker group."""
    trial_id = tune.get_context().get_trial_id()
    for cls in ctx.objective_classes:
        register_objective(cls)
    cfg = ctx.spec.trial_config(params)
    cfg.tracking.tracking_uri = ctx.tracking_uri
    cfg.tracking.experiment = ctx.experiment
    cfg.tracking.run_name = f"{ctx.spec.name}/{trial_label(ctx.spec, params)}"
    cfg.tracking.storage_path = str(ctx.paths.train)
    # A restored (interrupted) trial continues its Train run from the last checkpoint.
    resume = (ctx.paths.train / trial_id).exists()
    if resume:
        set_aside_cut_off_snapshot(ctx.paths.train / trial_id)  # else Ray's controller cannot start on it
    run_dir = ctx.paths.runs / trial_id

    def make_trainer():
        return build_trainer(
            cfg, run_dir=run_dir, name=trial_id, storage_path=ctx.paths.train,
            callbacks=[TuneReportCallback()], mlflow_parent_run_id=ctx.parent_run_id,
            mlflow_tags=trial_tags(ctx.spec.name, ctx.spec.hash(), trial_id, params), resume=resume,
            mlflow_params={"variant": params[VARIANT_PARAM]} if VARIANT_PARAM in params else None,
            entry_point="ermgap sweep", step_hook=ctx.step_hook)

    # The same driver as `ermgap train`: a worker's user error (a NaN loss) fails the trial with its message
    # (Tune records it: the trial is FAILED, not "stopped"), faults are retried from the last checkpoint.
    fit_run(make_trainer, run_dir=run_dir, tracking_uri=ctx.tracking_uri, max_failures=cfg.distributed.max_failures,
            finished=(run_dir / METRICS_FILE).is_file)


def trainable(ctx: TrialContext):
    fn = partial(run_trial, ctx=ctx)
    fn.__name__ = "ermgap_trial"  # Tune names the trainable after the function
    # The trial function only waits on trainer.fit(); its workers hold the real resources. A custom
    # resource (resources.trial_driver) pins the drivers to nodes that carry it (non-spot ones).
    return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU, **ctx.spec.model.resources.trial_driver})


def tuner(spec: SweepSpec, ctx: TrialContext, resume: bool, *, verbose: bool = False,
          console: Console | None = None) -> tune.Tuner:
    """A new Tuner for the spec, or the interrupted one restored from `<sweep>/tune` on --resume.

    Progress is `SweepProgress`'s one line per trial; Tune's status tables and result boxes only with
    `verbose` (a restored Tuner keeps the settings it was started with)."""
    fn = trainable(ctx)
    tune_path, fs = ctx.paths.tune.ray_storage()
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        return tune.Tuner.restore(tune_path, fn, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    m = spec.model
    return tune.Tuner(
        fn,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=search_alg(spec), scheduler=scheduler(spec), num_samples=m.num_samples,
            # grid/random: the generator holds the limit (search_alg); passing it twice makes Tune warn
            # that it "will be ignored".
            max_concurrent_trials=None if m.algorithm in ("grid", "random") else m.max_concurrent_trials,
            trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=ctx.paths.tune.name, storage_path=ctx.paths.root.ray_storage()[0],
                                  storage_filesystem=fs,
                                  verbose=2 if verbose else 0, callbacks=[SweepProgress(spec, console)]),
    )


def unfinished_trials(results: tune.ResultGrid) -> int:
    """Trials Tune neither finished nor errored (Ctrl-C or a stop ended the sweep early)."""
    return len(results) - results.num_terminated - results.num_errors


def trial_records(results: tune.ResultGrid) -> dict[str, TrialRecord]:
    """Tune's view of each trial (for a sweep that ran to the end: see `unfinished_trials`)."""
    records = {}
    for res in results:
        metrics = res.metrics or {}
        reason = None
        if res.error is not None:
            status, reason = FAILED, failure_reason(res.error)
        elif metrics.get("test_w_f1") is not None:
            status = "done"
        else:
            status = "stopped"  # ended by the scheduler (or its training stopped before the final report)
        records[res.path.rstrip("/").rsplit("/", 1)[-1]] = TrialRecord(
            params=dict(res.config), status=status, last_round=metrics.get("eval_round"),
            time_total_s=metrics.get("time_total_s"), reason=reason)
    return records
