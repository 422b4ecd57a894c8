"""Training objectives, one module per kind behind one interface (`Objective`), chosen by `objective.kind`.

    cells.py       the cells (stratum × attribute), their global loss sums/counts in ONE all-reduce (THE seam:
                   `all_reduce_sum`), the ERM term, the gap diagnostics every kind logs, `CellGrid`
    base.py        the interface
    erm.py, minmaxgap.py, group_dro.py, reweight.py, constrained.py, adversarial.py        the kinds

A kind owns everything about itself: its settings (pydantic models with a help string per field, declared
as `settings` and composed into the config tree at their user-facing keys: `objective.p` and `lambda.*`
for MinMaxGAP, `objective.group_dro.*` for Group DRO, `objective.constrained.*` for the per-stratum
constrained kind), its state and checkpoint, its name
(`describe(params)`: run names, tables, the leaderboard; `table3_rows`: its place in the paper's Table 3),
the values a live display shows (`live_values`) and its reaction to a dev evaluation (`on_evaluation`).
The recipe, CLI, sweep, tracking and report only ask. Adding a kind: one module with one `Objective`
subclass, and one line in OBJECTIVES below (`objective.kind` accepts what OBJECTIVES holds).

Life cycle on every worker (ermgap.recipe):

    objective = build_objective(cfg, CellGrid.count(train_stratum, train_attribute, strata=..., attributes=...))
    model.add_module(..., objective.module(hidden_size))   # when it has trainable parameters (before DeepSpeed)
    out = objective(losses, stratum, attribute, inputs={name: tensor for name in objective.forward_inputs})
    engine.backward(out.total); engine.step()
    objective.after_step(out)                           # commits per-step state (Group DRO's q)
    ...
    objective.on_evaluation(dev_metrics, eval_round=k)  # per-evaluation state (MinMaxGAP's weight)
    checkpoint["objective"] = objective.state_dict()

Hooks for kinds that need more than cell losses:
- trainable parameters of its own (e.g. an adversary's head): return an `nn.Module` from `module()`; the
  recipe attaches it to the model before the DeepSpeed engine exists, so the run's optimiser trains it
  under DeepSpeed (gradient averaging, ZeRO, checkpoints) like the LoRA weights.
- inputs from the forward pass: list them in `forward_inputs`; the recipe passes them per sample in
  `inputs` ("answer_hidden": the last hidden state at the position that predicts the answer's first token,
  [B, hidden], with autograd; "audio_hidden": the mean over the audio positions; both from `hidden_layer`).
  Override `__call__` to use them; reduce anything global through
  `cells.reduced_cell_stats` / `cells.all_reduce_sum` so every rank agrees.
- state per stratum or per cell (e.g. one multiplier per stratum): `on_evaluation` receives the dev metrics,
  with the per-stratum gaps (`dev_loss_gap_<stratum>`, `dev_avg_gap_<stratum>`); keep the state in
  `_state`/`_load` so checkpoints restore it, and log it through `log_values`.

Every kind computes its loss from the GLOBAL cell sums and counts (or other all-reduced values), so
`total` is a function of rank-identical reduced values and rank-identical state: after the engine's
gradient averaging every rank holds the gradient one process would get on the concatenated global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ermgap.objectives.adversarial import AdversarialERM
from ermgap.objectives.base import Objective, ObjectiveOutput, Table3Row
from ermgap.objectives.cells import CellGrid
from ermgap.objectives.constrained import ConstrainedERM
from ermgap.objectives.erm import ERM
from ermgap.objectives.group_dro import GroupDRO
from ermgap.objectives.minmaxgap import MinMaxGAP
from ermgap.objectives.reweight import Reweight

OBJECTIVES: dict[str, type[Objective]] = {cls.kind: cls for cls in (ERM, MinMaxGAP, GroupDRO, Reweight, ConstrainedERM,
                                                                          AdversarialERM)}

# The paper's Table 3: its first section and where runs no kind places go (kinds add their own sections).
TABLE3_MAIN, TABLE3_OTHER = "Main components", "Other objectives"
ZERO_SHOT = "zero-shot"

__all__ = ["ERM", "OBJECTIVES", "AdversarialERM", "ConstrainedERM", "TABLE3_MAIN", "TABLE3_OTHER", "ZERO_SHOT", "CellGrid", "GroupDRO", "MinMaxGAP",
           "Objective", "ObjectiveOutput", "Reweight", "Table3Row", "build_objective", "describe_objective",
           "is_zero_shot", "live_values", "objective_class", "objective_kind", "register_objective",
           "trajectory_metric"]


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add a kind at run time (a test's, a notebook's); a kind shipped with ermgap is a line in OBJECTIVES.
    Its config keys are composed when ermgap.config is imported, so a kind registered later may not declare
    `settings`. Ray workers receive the class with the run (ermgap.driver.build_trainer)."""
    known = OBJECTIVES.get(cls.kind)
    if known is cls:
        return cls
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective kind {cls.kind!r} is already {known.__module__}.{known.__qualname__}")
    if cls.settings:
        raise ValueError(f"objective kind {cls.kind!r} declares settings {[s.path for s in cls.settings]}; "
                         "a kind registered at run time cannot add config keys (list its module in OBJECTIVES)")
    OBJECTIVES[cls.kind] = cls
    return cls


def objective_kind(params: Mapping[str, Any]) -> str:
    """A run's kind from its flattened config params."""
    # Runs logged before `objective.kind` existed all trained ERM-MinMaxGAP (ERM was `lambda.init=0`, fixed).
    return params.get("objective.kind", "minmaxgap")


def objective_class(kind: str) -> type[Objective]:
    """The class behind `objective.kind` (a validated RunConfig names one of OBJECTIVES)."""
    return OBJECTIVES[kind]


def build_objective(cfg, grid: CellGrid) -> Objective:
    """The objective `cfg.objective.kind` names, over the cells of `grid`."""
    return objective_class(cfg.objective.kind).from_config(cfg, grid)


def is_zero_shot(params: Mapping[str, Any]) -> bool:
    """Whether a run trained nothing (`optim.epochs` 0): its metrics are the backbone's, as it is."""
    try:
        return int(float(params.get("optim.epochs", 1))) == 0
    except (TypeError, ValueError):
        return False


def describe_objective(params: Mapping[str, Any]) -> str:
    """A run's objective as a person reads it, from its flattened config params: its kind's `describe`
    ("ERM (SFT)", "ERM-MinMaxGAP (p=2)", "Group DRO (η=0.05)"), "zero-shot" for a run that trained nothing,
    the kind's name for a kind this installation does not know. The MLflow param `objective`, the run name,
    the leaderboard's and the report's row names."""
    if is_zero_shot(params):
        return ZERO_SHOT
    kind = objective_kind(params)
    return OBJECTIVES[kind].describe(params) if kind in OBJECTIVES else kind


def trajectory_metric(params: Mapping[str, Any]) -> str | None:
    """The MLflow metric holding a run's objective state over training (MinMaxGAP's weight), or None."""
    cls = OBJECTIVES.get(objective_kind(params))
    return cls.trajectory if cls is not None else None


def live_values(params: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, float]:
    """What a live display shows of a run's objective state ({"max q": 0.31}; {} for ERM), from the
    run's flattened config params and a report of its `log_values`."""
    if is_zero_shot(params):  # trained nothing: its kind's settings did nothing either
        return {}
    cls = OBJECTIVES.get(objective_kind(params))
    return cls.live_values(reported) if cls is not None else {}
