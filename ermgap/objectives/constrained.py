"""Per-stratum constrained ERM: minimise the ERM loss subject to Δ_s ≤ ε in EVERY stratum s, by a Lagrangian
with one non-negative multiplier per stratum.

    L = erm + Σ_s μ_s · Δ_s,     Δ_s = max_a mean_{s,a} − min_a mean_{s,a}   (|mean F − mean M| for two values)

over the strata valid in the GLOBAL batch (from the same all-reduced cell sums as every kind: `cells`); an
invalid stratum contributes 0. After each dev evaluation every multiplier takes one projected dual-ascent
step on its own stratum's dev gap:

    μ_s ← clip(μ_s + η · (Δdev_s − ε), 0, μmax)

Relation to ERM-MinMaxGAP (`minmaxgap.py`): the paper's adaptive λ is the same dual step with ONE multiplier on
the max, erm + λ·Δmax^p with λ driven by the largest dev gap. With one stratum the two coincide for p = 1
(`tests/test_objective_constrained.py` checks the trajectory). With several, MinMaxGAP pushes only on the
stratum that is currently worst, so a second stratum can drift as long as it stays below the first; here each
stratum whose dev gap exceeds ε keeps its own pressure, and a stratum inside the tolerance lets its μ fall to 0.

The dual step is hand-written (a clip), not `cooper-optim`'s: Cooper's ConstrainedOptimizer wraps the primal
torch optimiser and steps primal and dual together from each batch's constraint values, while here the
primal optimiser lives inside DeepSpeed's engine and the dual step runs on dev gaps at evaluation time, with
an upper cap Cooper's projection does not have; its state would also have to be made rank-identical and
JSON-checkpointed again. The update is the clip in `Multipliers.update`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from ermgap.errors import ErmgapWarning, TrainingError
from ermgap.lazy import LazyModule
from ermgap.objectives.base import Objective, ObjectiveOutput
from ermgap.objectives.cells import CellGrid, cell_stats, erm_mean, stratum_gap_terms
from ermgap.settings import Section, Setting

torch = LazyModule("torch")  # imported by the first function that uses it (ermgap.lazy)

__all__ = ["ConstrainedConfig", "ConstrainedERM", "Multipliers", "constrained_from_cells"]


class ConstrainedConfig(Section):
    init: float = Field(0.0, ge=0, le=1000, description="μ_s at the start, the same for every stratum (at most μmax).")
    eta: float = Field(0.5, ge=0, le=100, description="Dual step size η: each dev evaluation moves μ_s by η·(Δdev_s − ε).")
    epsilon: float = Field(0.02, ge=0, description="Tolerance ε of every stratum's dev gap, in Δdev's units (objective.constrained.dev_gap).")
    mu_max: float = Field(10.0, ge=0, le=1000, description="Upper clip μmax of every multiplier.")
    dev_gap: Literal["loss_gap", "avg_metric_gap"] = Field(
        "loss_gap", description="Which per-stratum dev gap drives μ_s: loss_gap (the stratum's attribute gap of the "
                                "mean answer loss, nats; dev_loss_gap_<stratum>) or avg_metric_gap (its AVG metric "
                                "gap as a fraction, dev_avg_gap_<stratum> / 100).")

    @model_validator(mode="after")
    def _init_le_max(self) -> ConstrainedConfig:
        if self.init > self.mu_max:
            raise ValueError(f"init ({self.init}) must not exceed mu_max ({self.mu_max})")
        return self


def constrained_from_cells(sums: torch.Tensor, counts: torch.Tensor, mu: torch.Tensor, *,
                           erm_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, gaps): erm + Σ_s μ_s·Δ_s over the valid strata, from GLOBAL cell sums (autograd) and counts
    [num_strata, num_attrs]; mu [num_strata] ≥ 0 constants; gaps [num_strata] with autograd (0 where invalid)."""
    _, gaps, valid = stratum_gap_terms(sums, counts)
    gaps = torch.where(valid, gaps, torch.zeros_like(gaps))
    total = erm_mean(sums, counts, erm_weights) + (mu.to(device=gaps.device, dtype=gaps.dtype) * gaps).sum()
    return total, gaps


class Multipliers:
    """One multiplier per stratum and its dual ascent. `history`: (eval_round, [Δdev_s or None], [μ_s after])."""

    def __init__(self, settings: ConstrainedConfig, strata: tuple[str, ...]) -> None:
        self.settings, self.strata = settings, strata
        self.values = [float(settings.init)] * len(strata)
        self.history: list[tuple[int, list[float | None], list[float]]] = []

    def update(self, dev_gaps: list[float | None], *, eval_round: int) -> list[float]:
        """μ_s ← clip(μ_s + η(Δdev_s − ε), 0, μmax) for every stratum whose Δdev_s is defined (None: kept)."""
        s = self.settings
        for i, gap in enumerate(dev_gaps):
            if gap is None:
                continue
            if not math.isfinite(gap):
                raise TrainingError(f"dev gap of stratum {self.strata[i]} is {gap}; cannot update its multiplier")
            self.values[i] = min(max(self.values[i] + s.eta * (gap - s.epsilon), 0.0), s.mu_max)
        self.history.append((int(eval_round), list(dev_gaps), list(self.values)))
        return self.values

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "history": [[r, list(g), list(v)] for r, g, v in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = [float(v) for v in state["values"]]
        if len(values) != len(self.strata) or any(not 0 <= v <= self.settings.mu_max for v in values):
            raise ValueError(f"constrained state: {len(self.strata)} multipliers in [0, {self.settings.mu_max}] "
                             f"expected, got {state['values']!r}")
        self.values = values
        self.history = [(int(r), [None if g is None else float(g) for g in gaps], [float(v) for v in vals])
                        for r, gaps, vals in state["history"]]


class ConstrainedERM(Objective):
    kind = "constrained"
    label = "Constrained ERM"
    summary = "erm + Σ_s μ_s·Δ_s, one multiplier per stratum by projected dual ascent on the dev gaps (`objective.constrained`)"
    settings = (Setting("objective.constrained", ConstrainedConfig),)

    def __init__(self, grid: CellGrid, settings: ConstrainedConfig) -> None:
        super().__init__(grid)
        self.settings = settings
        self.mu = Multipliers(settings, grid.strata)

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> ConstrainedERM:
        return cls(grid, cfg.objective.constrained)

    @classmethod
    def describe(cls, params: Mapping[str, Any]) -> str:
        eps = params.get("objective.constrained.epsilon")
        return f"{cls.label} (ε={float(eps):g})" if eps is not None else cls.label

    @classmethod
    def live_values(cls, reported: Mapping[str, Any]) -> dict[str, float]:
        """The largest multiplier: the pressure on the stratum furthest over its tolerance."""
        mu = [v for k, v in reported.items() if k.startswith("mu_") and v is not None]
        return {"max μ": max(mu)} if mu else {}

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        mu = torch.tensor(self.mu.values, dtype=torch.float64)
        total, _ = constrained_from_cells(sums, counts, mu, erm_weights=self.grid.erm_weights)
        return ObjectiveOutput(total=total, stats=cell_stats(sums, counts, self.grid.erm_weights), logs=self.log_values())

    def on_evaluation(self, metrics: Mapping[str, float], *, eval_round: int) -> None:
        """One dual step per stratum on its dev gap; a stratum without a dev gap (not every attribute value in
        its dev rows, or a NaN) keeps its μ, with a warning."""
        key = "dev_loss_gap_{}" if self.settings.dev_gap == "loss_gap" else "dev_avg_gap_{}"
        scale = 1.0 if self.settings.dev_gap == "loss_gap" else 0.01
        gaps: list[float | None] = []
        for name in self.grid.strata:
            value = metrics.get(key.format(name))
            gaps.append(None if value is None or math.isnan(float(value)) else float(value) * scale)
        missing = [n for n, g in zip(self.grid.strata, gaps) if g is None]
        if missing:
            warnings.warn(f"evaluation {eval_round}: no dev gap ({self.settings.dev_gap}) for strata {missing}; "
                          "their multipliers keep their values", ErmgapWarning, stacklevel=2)
        self.mu.update(gaps, eval_round=eval_round)

    def log_values(self) -> dict[str, float]:
        return {f"mu_{name}": v for name, v in zip(self.grid.strata, self.mu.values)}

    def hparams(self) -> dict:
        return self.settings.model_dump()

    def _state(self) -> dict:
        return {"multipliers": self.mu.state_dict()}

    def _load(self, state: dict) -> None:
        self.mu.load_state_dict(state["multipliers"])
