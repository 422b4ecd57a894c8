"""The leaderboard: one row per finished trial, pure pandas over what Tune and MLflow recorded.

    board = build_leaderboard(spec, child_runs_frame, trials)   # no Ray needed: testable on hand-made frames
    best = select_best(board, spec)                            # the spec's documented selection rule
    summary = seed_summary(board, spec)                        # mean ± sd over seeds, per configuration

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

from ermgap.metrics import pareto_front
from ermgap.sweep.spec import SEED_KEY, SweepSpec
from ermgap.tracking import BEST, EVAL, TAG_TRIAL

# *_loss_gap is Δ, the worst within-language gender gap in mean answer loss: the quantity the
# objective penalises, shown next to the metric gaps it is meant to move.
DEV_METRICS = ("dev_w_f1", "dev_acc", "dev_avg_gap", "dev_worst_lang_gap", "dev_loss_gap")
TEST_METRICS = ("test_w_f1", "test_acc", "test_avg_gap", "test_worst_lang_gap", "test_loss_gap")


@dataclass
class TrialRecord:
    """What Tune knows of one trial: its sampled params, how it ended, its last evaluation round.

    status: "done" (ran to its final report), "stopped" (ended by the scheduler before it), "ERROR".
    """

    params: dict[str, Any] = field(default_factory=dict)
    status: str = "done"
    last_round: int | None = None
    time_total_s: float | None = None


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
        row.update({"status": info.status, "eval_rounds": info.last_round, "n_child_runs": len(children),
                    # Tune's wall time of the trial up to its last report.
                    "trial_s": info.time_total_s, "mlflow_run_id": None if child is None else child["run_id"]})
        row.update({m: final_metric(child, m) for m in DEV_METRICS + TEST_METRICS})
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    ok = board["dev_w_f1"].notna() & board["dev_avg_gap"].notna()
    board["pareto"] = False
    if ok.any():
        board.loc[ok, "pareto"] = pareto_front(list(zip(board.loc[ok, "dev_w_f1"], board.loc[ok, "dev_avg_gap"])))
    board["best"] = False
    best = select_best(board, spec)
    if best is not None:
        board.loc[board["trial"] == best, "best"] = True
    return board


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
        for m in DEV_METRICS + TEST_METRICS:
            values = grp[m].dropna().astype(float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
