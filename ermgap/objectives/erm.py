"""ERM: the mean per-sample loss over the global batch (no fairness term)."""

from __future__ import annotations

from ermgap.objective import erm_mean
from ermgap.objectives.base import CellGrid, Objective, ObjectiveOutput, diagnostics


class ERM(Objective):
    """total = Σ_i w_{c(i)} ℓ_i / B over the global batch (w = the grid's ERM weights, 1 unless batches are
    stratified). Equals `minmaxgap` with `lambda.mode=fixed lambda.init=0`."""

    kind = "erm"
    label = "ERM (SFT)"

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> ERM:
        return cls(grid)

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        return ObjectiveOutput(total=erm_mean(sums, counts, self.grid.erm_weights),
                               stats=diagnostics(sums, counts, self.grid))
