"""What a user sees while training: rank 0's progress on the driver, and no library noise (real Ray,
DeepSpeed and the tiny model for the end-to-end check)."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from ermgap.progress import StepRate, TrainProgress, format_duration

STEP_LINE = re.compile(r"epoch (\d+)/(\d+) · step (\d+)/(\d+) · loss [\d.]+ · λ [\d.]+ · ([\d.]+) steps/s · "
                       r"ETA (\d+):(\d\d):(\d\d)")
NOISE = ("TrainingReport(", "PreemptionWatcher", "built successfully", "FutureWarning", "Setting accelerator")


def test_rate_and_eta_by_hand():
    rate = StepRate(t0=100.0, step0=10, total=50)  # resumed at step 10
    assert rate.rate(100.0, 10) is None and rate.eta(104.0, 10) is None
    assert rate.rate(108.0, 14) == pytest.approx(0.5)  # 4 steps in 8 s
    assert rate.eta(108.0, 14) == pytest.approx(72.0)  # 36 steps left at 0.5 steps/s
    assert format_duration(72.4) == "0:01:12" and format_duration(3 * 3600 + 5) == "3:00:05"
    assert format_duration(None) == "?"


def test_plain_lines_name_epoch_step_rate_eta_and_evaluations():
    p = TrainProgress(None, Console(width=300), live=False)
    p._on_start({"kind": "start", "t": 0.0, "step": 0, "total_steps": 12, "steps_per_epoch": 6, "epochs": 2})
    line = p.step_line({"kind": "step", "t": 4.0, "step": 2, "epoch": 0, "loss": 1.23456, "shown": {"λ": 0.5}})
    assert line == "epoch 1/2 · step 2/12 · loss 1.2346 · λ 0.500 · 0.50 steps/s · ETA 0:00:20"
    ev = p.eval_line({"kind": "eval", "t": 9.0, "round": 1, "step": 6, "shown": {"λ": 0.75}, "metric": "w_f1", "best": 41.5,
                      "best_round": 1, "metrics": {"dev_w_f1": 41.5, "dev_worst_lang_gap": 12.25, "dev_loss_gap": 0.0312}})
    assert ev == ("eval 1 @ step 6: dev W-F1 41.50 · dev worst-lang gap 12.25 · dev Δloss 0.0312 · λ → 0.750 · "
                  "best dev W-F1 41.50 (eval 1)")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_train_output_shows_progress_and_no_library_noise(reference_run):
    """`ermgap train` with stdout a pipe (as in CI or `ray job logs`): plain progress lines with steps/s
    and ETA, one line per evaluation, and none of Ray's, DeepSpeed's or transformers' chatter. The command is
    the session's reference run (tests/conftest.py): 2 epochs × 6 steps, evaluation every 3 steps, 2 workers."""
    out, final = reference_run.output, reference_run.final
    steps = [m for m in STEP_LINE.finditer(out)]
    assert steps, out[-3000:]
    # the first step, then the end of each epoch (and where the steps stand at each evaluation)
    assert {(m.group(1), m.group(2)) for m in steps} == {("1", "2"), ("2", "2")}
    assert [m.group(4) for m in steps] == ["12"] * len(steps) and steps[-1].group(3) == "12"
    assert all(float(m.group(5)) > 0 for m in steps)
    for k, step in enumerate((3, 6, 9, 12), start=1):
        assert re.search(rf"eval {k} @ step {step}: dev W-F1 [\d.]+ · dev worst-lang gap", out), k
    assert f"final evaluation: best checkpoint (eval {final['best_eval_round']}) on dev and test" in out
    assert [n for n in NOISE if n in out] == []
    assert out.index("eval 4 @ step 12") < out.index("ermgap train: best checkpoint")  # progress, then the table
