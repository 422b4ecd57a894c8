"""Ray Tune sweeps over training configs: one MLflow parent run per sweep, one child run per trial.

    outcome = run_sweep("sweeps/demo.yaml")            # or a SweepSpec from load_sweep_spec
    outcome.leaderboard                                # pandas frame, one row per trial

The package, one job per module:

    spec.py         the sweep YAML: schema, validation of every trial config before Ray starts
    paths.py        where a sweep lives on disk, its state file (what --resume reads)
    resources.py    what a trial needs vs what the machine/cluster has; pre-flight input checks
    tune.py         search space, search algorithm, ASHA, the trial function, the Tuner
    leaderboard.py  pure pandas over finished trials: leaderboard, selection rule, seed summary
    render.py       console tables, dry-run plan, leaderboard/Pareto files
    run.py          run_sweep: the steps above in order

How a value in the spec reaches a trial: `load_sweep_spec` validates every trial config up front;
Tune samples a params dict ({"variant": "erm", "optim.lr": 3e-4, ...}); the trial function
(`tune.run_trial`) turns it into a RunConfig (`SweepSpec.trial_config`) and runs the training
recipe on its own Ray Train worker group (see ARCHITECTURE.md).
"""

from ermgap.sweep.leaderboard import (
           DEV_METRICS,
           TEST_METRICS,
           TrialRecord,
           build_leaderboard,
           seed_summary,
           select_best,
)
from ermgap.sweep.run import SweepInterrupted, SweepOutcome, run_sweep
from ermgap.sweep.spec import SweepSpec, load_sweep_spec

__all__ = ["DEV_METRICS", "TEST_METRICS", "SweepInterrupted", "SweepOutcome", "SweepSpec", "TrialRecord",
           "build_leaderboard", "load_sweep_spec", "run_sweep", "seed_summary", "select_best"]
