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

import importlib

# Loaded on first use (PEP 562): `ermgap.sweep.spec` is read by commands that never run a sweep (`ermgap
# submit`, `--help`), and `run` pulls in Ray Tune, the training recipe, peft and transformers (seconds).
_EXPORTS = {
    "DEV_METRICS": "leaderboard", "TEST_METRICS": "leaderboard", "TrialRecord": "leaderboard",
    "build_leaderboard": "leaderboard", "seed_summary": "leaderboard", "select_best": "leaderboard",
    "SweepInterrupted": "run", "SweepOutcome": "run", "run_sweep": "run",
    "SweepSpec": "spec", "load_sweep_spec": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ermgap.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ermgap.sweep.{_EXPORTS[name]}"), name)
