"""Test-only faults for training runs, injected through the recipe's per-step hook (ermgap.recipe.StepHook)
that `run_training`, `build_trainer` and `run_sweep` pass to every worker in the loop config:

    run_training(cfg, step_hook=KillAfterStep(5))      # the last rank dies after step 5, once per run dir
    run_training(cfg, step_hook=KillAfterStep(3, 5))   # ... after step 3, and again after step 5
    run_sweep(spec, step_hook=NanAtStep(7))            # the last rank's first loss of step 7 is NaN

As a script it is `ermgap train` with a fault, a driver a test can SIGKILL, or `ermgap sweep` with one trial held:

    python tests/_faults.py kill-after-step 5 train CONFIG.yaml [key=value ...] [--run-dir D] [--address A]
    python tests/_faults.py hold-after-epoch 1 SWEEP/VARIANT sweep SPEC.yaml [--address A]
"""

from __future__ import annotations

import functools
import os
import sys
import time

import ray.cloudpickle
import torch

from ermgap.recipe import StepHook

FAULT_MARKER = ".fault_fired"


class KillAfterStep(StepHook):
    """The last rank exits without cleanup (like a lost node) after optimizer step `step` (and after each of
    `more`), once per step: the marker file in the (local) run directory, one line per kill done, keeps a
    refitted or resumed run that redoes the step from dying there again."""

    def __init__(self, step: int, *more: int) -> None:
        self.steps = {step, *more}

    def after_step(self, recipe, step: int) -> None:
        if step not in self.steps or recipe.rank != recipe.world - 1 or recipe.run_dir.is_remote:
            return
        marker = recipe.run_dir.local / FAULT_MARKER
        done = marker.read_text() if marker.exists() else ""
        if f"after step {step}\n" in done:
            return
        marker.write_text(f"{done}killed rank {recipe.rank} after step {step}\n")
        os._exit(1)


class HoldAfterEpoch(StepHook):
    """The run named `run_name` (a sweep trial's MLflow run name, "<sweep>/<variant>") stops training at the
    first step after its epoch `epoch` (evaluated and checkpointed) and waits there until its process is
    killed: a trial that is still running, with a checkpoint, for as long as a test needs (no race)."""

    def __init__(self, epoch: int, run_name: str) -> None:
        self.epoch, self.run_name = epoch, run_name

    def after_step(self, recipe, step: int) -> None:
        if recipe.cfg.tracking.run_name == self.run_name and recipe.state.epoch >= self.epoch:
            while True:
                time.sleep(1)


class NanAtStep(StepHook):
    """The last rank's first per-sample loss of optimizer step `step` becomes NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def losses(self, recipe, step: int, losses: torch.Tensor) -> torch.Tensor:
        if step != self.step or recipe.rank != recipe.world - 1:
            return losses
        return losses * torch.where(torch.arange(len(losses)) == 0, float("nan"), 1.0)


if __name__ == "__main__":
    import ermgap.driver
    import ermgap.sweep.run
    from ermgap.cli.main import main

    if sys.argv[1] == "kill-after-step":
        # The CLI calls ermgap.driver.run_training; this run's one gets the hook.
        ermgap.driver.run_training = functools.partial(ermgap.driver.run_training,
                                                       step_hook=KillAfterStep(int(sys.argv[2])))
        sys.argv = ["ermgap", *sys.argv[3:]]
    else:
        assert sys.argv[1] == "hold-after-epoch", sys.argv
        # `ermgap sweep` looks run_sweep up in ermgap.sweep.run when it runs.
        ermgap.sweep.run.run_sweep = functools.partial(ermgap.sweep.run.run_sweep,
                                                       step_hook=HoldAfterEpoch(int(sys.argv[2]), sys.argv[3]))
        sys.argv = ["ermgap", *sys.argv[4:]]
    main()
else:  # Ray workers cannot import this module (tests/ is not on their path): ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
