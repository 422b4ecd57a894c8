"""What a sweep prints fits a 100-column terminal or log: the leaderboard, the seed summary and the objectives
against ERM keep few columns (the CSV/MD files have them all) and never break a trial's name; a zero-shot trial's
live line says "zero-shot", not "epoch 0.0/0"."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
from rich.console import Console

from ermgap.sweep.live import SweepProgress
from ermgap.sweep.render import print_leaderboard, print_objective_comparison, print_seed_summary
from ermgap.sweep.spec import load_sweep_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
OBJECTIVES = {"zero_shot": "zero-shot", "erm": "ERM (SFT)", "fixed_lam3": "λ = 3",
              "adaptive_p2": "ERM-MinMaxGAP (p=2)", "adaptive_p1": "ERM-MinMaxGAP (p=1)"}


def _render(fn, frame, spec) -> list[str]:
    out = io.StringIO()
    fn(frame, spec, Console(file=out, width=100, color_system=None))
    return out.getvalue().splitlines()


def _fits(lines: list[str], names: list[str]) -> None:
    assert lines and max(len(ln) for ln in lines) <= 100, max(lines, key=len)
    for name in names:  # each on one line: not wrapped inside its cell
        assert any(name in ln for ln in lines), name


def test_leaderboard_fits_100_columns():
    spec = load_sweep_spec(SWEEPS / "demo.yaml")
    rows = []
    for i, (variant, objective) in enumerate(OBJECTIVES.items()):
        rows.append({"trial": f"3f9a1_0000{i}", "variant": variant, "objective": objective, "status": "ended",
                     "eval_rounds": 5, "best": i == 1, "pareto": i in (1, 4), "mlflow_run_id": "a" * 32,
                     **{k: 40.0 + i + 0.123 for k in ("dev_w_f1", "dev_acc", "test_w_f1", "test_acc")},
                     **{k: 5.0 + i + 0.456 for k in ("dev_avg_gap", "dev_worst_lang_gap", "test_avg_gap",
                                                     "test_worst_lang_gap")},
                     "dev_loss_gap": 0.1234, "test_loss_gap": 0.2345})
    lines = _render(print_leaderboard, pd.DataFrame(rows), spec)
    _fits(lines, [*OBJECTIVES, *OBJECTIVES.values()])
    assert any("dev W-F1" in ln or "W-F1" in ln for ln in lines) and any("Δloss" in ln for ln in lines)
    assert not any("3f9a1_0000" in ln for ln in lines)  # Tune's trial ids stay in leaderboard.csv


def test_seed_summary_and_objective_comparison_fit_100_columns():
    spec = load_sweep_spec(SWEEPS / "demo_seeds.yaml")
    variants = {"erm": "ERM (SFT)", "minmaxgap": "ERM-MinMaxGAP (p=2)", "reweight": "Reweighting",
                "group_dro": "Group DRO (η=0.1)"}
    summary = pd.DataFrame([{"variant": v, "n_seeds": 3, **{f"{m}_{s}": 12.3456 for m in (
        "dev_w_f1", "dev_worst_lang_gap", "test_w_f1", "test_avg_gap", "test_worst_lang_gap", "test_loss_gap")
        for s in ("mean", "sd")}} for v in variants])
    _fits(_render(print_seed_summary, summary, spec), list(variants))
    versus = []
    for i, (v, objective) in enumerate(variants.items()):
        row = {"variant": v, "objective": objective, "n_seeds": 3, "reference": i == 0, "worst_language": "jpn",
               "test_w_f1_mean": 46.54, "test_w_f1_sd": 1.08, "test_worst_lang_gap_mean": 16.25,
               "test_worst_lang_gap_sd": 3.16}
        for col in ("d_test_w_f1", "d_test_worst_gap", "d_test_worst_gap_rel"):
            scale = 0.01 if col.endswith("rel") else 1.0
            row.update({col: -4.76 * scale, f"{col}_lo": -16.34 * scale, f"{col}_hi": 12.85 * scale})
        row.update({"d_test_w_f1_seed_mean": -4.7, "d_test_worst_gap_seed_mean": 0.3})
        versus.append(row)
    lines = _render(print_objective_comparison, pd.DataFrame(versus), spec)
    _fits(lines, list(variants.values()))
    assert sum("[-16.34, 12.85]" in ln or "[−16.34, 12.85]" in ln for ln in lines) >= 3  # the intervals are shown


def test_a_zero_shot_trial_is_shown_as_zero_shot():
    progress = SweepProgress(load_sweep_spec(SWEEPS / "demo.yaml"), Console(file=io.StringIO()))
    start = time.time() - 30
    row = {"status": "running", "start": start, "objective": "-", "shown": {}}
    zero = progress.cells({**row, "label": "zero_shot", "epochs": 0, "epoch": 0.0})
    erm = progress.cells({**row, "label": "erm", "epochs": 5, "epoch": 2.0})
    at = progress.headers().index("epoch")
    assert zero[at] == "zero-shot" and erm[at] == "2.0/5"


def test_a_trials_line_names_its_state_once_and_omits_an_empty_one():
    """'λ 0.268' for MinMaxGAP, nothing for ERM: not 'state λ 0.268' nor 'state -'."""
    progress = SweepProgress(load_sweep_spec(SWEEPS / "demo.yaml"), Console(file=io.StringIO()))
    row = {"status": "running", "start": time.time() - 30, "epochs": 5, "epoch": 2.0}
    erm = progress.line({**row, "label": "erm", "objective": "ERM (SFT)", "shown": {}})
    ours = progress.line({**row, "label": "adaptive", "objective": "ERM-MinMaxGAP (p=2)", "shown": {"λ": 0.268}})
    assert erm.startswith("erm · objective ERM (SFT) · status running · epoch 2.0/5 · dev W-F1") and "state" not in erm
    assert "· epoch 2.0/5 · λ 0.268 · dev W-F1" in ours and "state" not in ours


def test_a_zero_shot_trial_shows_no_objective_state():
    """The demo's zero-shot trial keeps the sweep's MinMaxGAP settings but trained nothing: no 'λ 0.000'."""
    from ermgap.objectives import live_values

    params = {"objective.kind": "minmaxgap", "lambda.mode": "adaptive", "optim.epochs": 0}
    assert live_values(params, {"lambda": 0.0}) == {}
    assert live_values({**params, "optim.epochs": 5}, {"lambda": 0.25}) == {"λ": 0.25}
