"""The leaderboard: one row per finished trial, pure pandas over what Tune and MLflow recorded.

    board = build_leaderboard(spec, child_runs_frame, trials)   # no Ray needed: testable on hand-made frames
    best = select_best(board, spec)                            # the spec's documented selection rule
    summary = seed_summary(board, spec)                        # mean ± sd over seeds, per configuration
    versus = objective_comparison(board, spec, test_preds)     # each configuration vs ERM, paired bootstrap

`trials` maps a Tune trial id to `TrialRecord`; `child_runs_frame` is `mlflow.search_runs` output
for the sweep's parent run (`metrics.*` and `tags.*` columns). A trial's numbers are those its
MLflow child run logged last: `best/<metric>` (best checkpoint on dev, its test metrics) for a run
that finished, else the last evaluation's `eval/<metric>` (no test metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ermgap.errors import PredictionsError
from ermgap.metric_registry import direction, reported_keys
from ermgap.metrics import pareto_front
from ermgap.objective_comparison import compare_to_reference
from ermgap.objectives import ERM, describe_objective
from ermgap.sweep.spec import SEED_KEY, SweepSpec
from ermgap.task import TaskError, task_for_predictions
from ermgap.tracking import BEST, EVAL, TAG_TRIAL

# What the recipe reports for each split (the registry's reported metrics; `board_metrics()` also holds a metric
# registered later). *_loss_gap is Δ, the worst within-language gender gap in mean answer loss: the quantity
# MinMaxGAP penalises, shown next to the metric gaps an objective is meant to move.
DEV_METRICS = reported_keys(("dev",))
TEST_METRICS = reported_keys(("test",))


def board_metrics() -> tuple[str, ...]:
    """The leaderboard's metric columns: every reported metric, dev then test."""
    return reported_keys(("dev", "test"))
# The Pareto front's two axes: an accuracy-like metric and a gap, oriented by their registry directions.
PARETO_AXES = ("dev_w_f1", "dev_avg_gap")
# The objective comparison's bootstrap (resamples of the pooled test utterances; fixed seed: reproducible).
N_BOOT, BOOT_SEED = 1000, 0


FAILED = "failed"


@dataclass
class TrialRecord:
    """What Tune knows of one trial: its sampled params, how it ended, its last evaluation round.

    status: "done" (ran to its final report), "stopped" (ended by the scheduler before it), FAILED (its
    training raised: `reason` is the message, e.g. a NaN loss naming the step and utterances).
    """

    params: dict[str, Any] = field(default_factory=dict)
    status: str = "done"
    last_round: int | None = None
    time_total_s: float | None = None
    reason: str | None = None


def failure_reason(error: BaseException) -> str:
    """The message of the exception a trial function raised (Tune hands it back wrapped in a RayTaskError,
    whose text is a traceback)."""
    cause = getattr(error, "cause", None) or error
    return str(cause).strip() or type(cause).__name__


def final_metric(child: pd.Series | None, name: str) -> float | None:
    """A finished run logs `best/<name>` (dev metrics of the best checkpoint, test metrics); a stopped
    run only has its last evaluation's `eval/<name>` (test metrics absent)."""
    if child is None:
        return None
    for key in (f"metrics.{BEST}{name}", f"metrics.{EVAL}{name}"):
        v = child.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return float(v)
    return None


def build_leaderboard(spec: SweepSpec, runs: pd.DataFrame, trials: dict[str, TrialRecord]) -> pd.DataFrame:
    """One row per trial (sorted by trial id): its params, status and the final metrics its MLflow child
    run logged. Pareto-optimal (dev W-F1 ↑, dev AVG gap ↓) and best (selection rule) trials are marked."""
    by_trial: dict[str, list[pd.Series]] = {}
    for _, r in runs.iterrows():
        by_trial.setdefault(r.get(f"tags.{TAG_TRIAL}"), []).append(r)
    rows = []
    for trial_id, info in sorted(trials.items()):
        children = by_trial.get(trial_id, [])
        child = children[-1] if children else None
        row: dict[str, Any] = {"trial": trial_id, **{k: info.params.get(k) for k in spec.param_names()}}
        row.update({"status": info.status, "reason": info.reason, "eval_rounds": info.last_round,
                    "n_child_runs": len(children),
                    # Tune's wall time of the trial up to its last report.
                    "trial_s": info.time_total_s, "mlflow_run_id": None if child is None else child["run_id"]})
        row["objective"] = None if child is None else describe_objective(run_params(child))
        row.update({m: final_metric(child, m) for m in board_metrics()})
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    ok = board[list(PARETO_AXES)].notna().all(axis=1)
    board["pareto"] = False
    if ok.any():
        # pareto_front takes (higher-is-better, lower-is-better) points: orient each axis by its direction.
        sign = [1.0 if direction(m) == "max" else -1.0 for m in PARETO_AXES]
        points = [(sign[0] * a, -sign[1] * g) for a, g in zip(*(board.loc[ok, m] for m in PARETO_AXES))]
        board.loc[ok, "pareto"] = pareto_front(points)
    board["best"] = False
    best = select_best(board, spec)
    if best is not None:
        board.loc[board["trial"] == best, "best"] = True
    return board


def run_params(child: pd.Series) -> dict[str, str]:
    """The flattened config an MLflow child run logged (`params.*` columns of `mlflow.search_runs`)."""
    return {k.removeprefix("params."): v for k, v in child.items()
            if k.startswith("params.") and isinstance(v, str)}


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
        if "objective" in grp:
            row["objective"] = ", ".join(sorted({str(o) for o in grp["objective"].dropna()}))
        for m in board_metrics():
            values = grp[m].dropna().astype(float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _configurations(board: pd.DataFrame, spec: SweepSpec) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Finished trials grouped by configuration (the params without `optim.seed`), in board order."""
    keys = [p for p in spec.param_names() if p != SEED_KEY]
    done = board[board["test_w_f1"].notna() & board["mlflow_run_id"].notna()]
    if not keys:
        return [({}, done)] if len(done) else []
    return [(dict(zip(keys, k if isinstance(k, tuple) else (k,))), g)
            for k, g in done.groupby(keys, sort=False, dropna=False)]


def objective_comparison(board: pd.DataFrame, spec: SweepSpec, test_preds: dict[str, pd.DataFrame], *,
                         n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> pd.DataFrame | None:
    """Each configuration against the sweep's ERM configuration, seed-paired on the same test utterances.

    test_preds maps an MLflow run id to that run's test predictions. Per configuration: its objective,
    n_seeds, mean ± sd over seeds of test W-F1 and test worst-lang gap, and (`ermgap.objective_comparison`)
    the paired-bootstrap difference vs ERM, pooled over the seeds both finished, of test W-F1
    (`d_test_w_f1`, `_lo`, `_hi`: 95 % percentile interval) and of the AVG gap of ERM's worst language
    (`worst_language`, `d_test_worst_gap`, `_lo`, `_hi`), in points. None unless exactly one configuration
    trains ERM (described as ERM: `objective.kind=erm`, or a kind set up to be ERM) and it finished with predictions.
    """
    if board.empty or "objective" not in board:
        return None
    groups = []
    for params, grp in _configurations(board, spec):
        seeds = grp[SEED_KEY] if SEED_KEY in grp else pd.Series(range(len(grp)), index=grp.index)
        preds = {int(s): test_preds[r] for s, r in zip(seeds, grp["mlflow_run_id"]) if r in test_preds}
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "all"
        groups.append((label, params, grp, preds))
    erm = [label for label, _, grp, preds in groups if preds and grp["objective"].eq(ERM.label).all()]
    if len(erm) != 1:
        return None
    # The trials' task (attribute, stratum) read off their predictions: a corpus may have no gender column.
    cfg = spec.first_trial_config()
    try:
        task = task_for_predictions(next(iter(test_preds.values())), attribute=cfg.data.attribute,
                                    by=cfg.objective.stratum)
        versus = compare_to_reference({label: preds for label, _, _, preds in groups if preds}, erm[0],
                                      n_boot=n_boot, seed=seed, task=task).set_index("config")
    except (PredictionsError, TaskError):  # e.g. runs of one configuration predicted other test utterances
        return None
    rows = []
    for label, params, grp, _ in groups:
        row: dict[str, Any] = {**params, "objective": ", ".join(sorted(set(grp["objective"].dropna())))}
        row["n_seeds"] = len(grp)
        for m in ("test_w_f1", "test_worst_lang_gap"):
            v = grp[m].dropna().astype(float)
            row[f"{m}_mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{m}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        row["reference"] = label == erm[0]
        if label in versus.index:
            row.update(versus.loc[label].drop("seeds").to_dict())
            row["paired_seeds"] = int(versus.loc[label, "seeds"])
        rows.append(row)
    return pd.DataFrame(rows)
