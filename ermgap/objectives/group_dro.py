"""Group DRO (Sagawa et al. 2020, "Distributionally Robust Neural Networks", Algorithm 1), data-parallel.

Groups are the stratum × attribute cells with train examples. Each optimizer step, on the GLOBAL group
means L_g of the step's batch (all ranks' examples, one all-reduce):

    q_g ← q_g · exp(η_q · (L_g + C/√n_g))   for cells g present in the global batch (others: factor 1)
    q   ← q / Σ_g q_g
    total = Σ_{g present} q_g · L_g          (q treated as a constant, as in the reference code)

n_g is cell g's number of train examples (C = 0 disables the adjustment); q starts uniform over the cells
with train examples. The weights are updated BEFORE the loss is formed, as in Algorithm 1 and the
reference implementation (github.com/kohpangwei/group_DRO, loss.py). Differences from that code, on
purpose: (1) q is updated from all-reduced means, so every rank holds the same q and the step equals one
process on the global batch (per-process updates make ranks drift apart); (2) a cell absent from the
batch keeps its unnormalised weight instead of being updated with L_g = 0 plus the adjustment.
The update runs in log space (a softmax), which is the same arithmetic without overflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from ermgap.lazy import LazyModule
from ermgap.objectives.base import Objective, ObjectiveOutput
from ermgap.objectives.cells import CellGrid, cell_stats, check_cells_in_train
from ermgap.settings import Section, Setting

torch = LazyModule("torch")  # imported by the first function that uses it (ermgap.lazy)


class GroupDROConfig(Section):
    eta: float = Field(0.01, gt=0, description="Step size η_q of the group-weight update q_g ← q_g·exp(η_q·L_g) (Sagawa et al. 2020: 0.01).")
    size_adjustment: float = Field(0.0, ge=0, description="C of the group-size adjustment L_g + C/√n_g in the q update (n_g: train examples of the cell; 0: off).")


class GroupDRO(Objective):
    kind = "group_dro"
    label = "Group DRO"
    summary = "online Group DRO over stratum × gender cells"
    settings = (Setting("objective.group_dro", GroupDROConfig),)

    def __init__(self, grid: CellGrid, *, eta: float, size_adjustment: float = 0.0) -> None:
        super().__init__(grid)
        eta, c = float(eta), float(size_adjustment)
        if not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"size_adjustment must be a finite number >= 0, got {c!r}")
        self.eta, self.size_adjustment = eta, c
        n = grid.train_counts
        in_train = n > 0
        self.q = in_train.to(torch.float64) / in_train.sum()  # [S, A], 0 for cells without train data
        self.adjustment = torch.where(in_train, c / n.clamp(min=1).sqrt(), torch.zeros_like(n))
        self.steps = 0
        self.history: list[list[float]] = []  # q (row-major cells) after each step: the trajectory

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> GroupDRO:
        g = cfg.objective.group_dro
        return cls(grid, eta=g.eta, size_adjustment=g.size_adjustment)

    @classmethod
    def describe(cls, params: Mapping[str, Any]) -> str:
        return f"{cls.label} (η={float(params.get('objective.group_dro.eta', 'nan')):g})"

    @classmethod
    def live_values(cls, reported: Mapping[str, Any]) -> dict[str, float]:
        """The largest group weight: how far q has moved from uniform towards the worst cell."""
        q = [v for k, v in reported.items() if k.startswith("q_") and v is not None]
        return {"max q": max(q)} if q else {}

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        check_cells_in_train(counts, self.grid, self.kind)
        present = counts > 0
        means = sums / torch.where(present, counts, torch.ones_like(counts))  # empty cells: 0, no 0/0
        with torch.no_grad():
            step = torch.where(present.cpu(), self.eta * (means.detach().cpu().double() + self.adjustment),
                               torch.zeros_like(self.adjustment))
            q = torch.softmax((self.q.log() + step).flatten(), dim=0).view_as(self.q)
        total = (q.to(device=means.device, dtype=means.dtype) * torch.where(present, means, torch.zeros_like(means))).sum()
        logs = {f"q_{name}": v for name, v in zip(self.grid.cell_names(), q.flatten().tolist())}
        return ObjectiveOutput(total=total, stats=cell_stats(sums, counts, self.grid.erm_weights), logs=logs, pending={"q": q})

    def after_step(self, out: ObjectiveOutput) -> None:
        self.q = out.pending["q"]
        self.steps += 1
        self.history.append(self.q.flatten().tolist())

    def log_values(self) -> dict[str, float]:
        return {f"q_{name}": v for name, v in zip(self.grid.cell_names(), self.q.flatten().tolist())}

    def hparams(self) -> dict:
        return {"eta": self.eta, "size_adjustment": self.size_adjustment}

    def _state(self) -> dict:
        return {"q": self.q.tolist(), "steps": self.steps, "history": self.history}

    def _load(self, state: dict) -> None:
        q = torch.tensor(state["q"], dtype=torch.float64)
        if q.shape != self.q.shape or not bool(torch.isfinite(q).all()) or abs(float(q.sum()) - 1) > 1e-9:
            raise ValueError(f"group_dro state: q must be a [{self.grid.num_strata}, {self.grid.num_attrs}] "
                             f"probability table, got {state['q']!r}")
        if len(state.get("history", [])) != int(state["steps"]):
            raise ValueError(f"group_dro state: {len(state.get('history', []))} history rows for {state['steps']} steps")
        self.q, self.steps = q, int(state["steps"])
        self.history = [[float(v) for v in row] for row in state["history"]]
