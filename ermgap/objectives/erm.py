"""ERM: the mean per-sample loss over the global batch (no fairness term)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ermgap.objectives.base import Objective, ObjectiveOutput, Table3Row
from ermgap.objectives.cells import CellGrid, cell_stats, erm_mean


class ERM(Objective):
    """total = Σ_i w_{c(i)} ℓ_i / B over the global batch (w = the grid's ERM weights, 1 unless batches are
    stratified). Equals `minmaxgap` with `lambda.mode=fixed lambda.init=0`."""

    kind = "erm"
    label = "ERM (SFT)"
    summary = "global-batch mean"

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> ERM:
        return cls(grid)

    @classmethod
    def table3_rows(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[Table3Row]:
        from ermgap.objectives import TABLE3_MAIN, objective_kind  # the registry imports this module

        return [Table3Row(name, TABLE3_MAIN, "+ ERM (SFT)") for name, params in runs.items()
                if objective_kind(params) == cls.kind]

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        return ObjectiveOutput(total=erm_mean(sums, counts, self.grid.erm_weights),
                               stats=cell_stats(sums, counts, self.grid.erm_weights))
