"""Group reweighting: each example weighted inversely to its cell's train frequency (the simple baseline
for under-representation; e.g. Idrissi et al. 2022 "Simple data balancing", reweighting variant)."""

from __future__ import annotations

from ermgap.lazy import LazyModule
from ermgap.objectives.base import Objective, ObjectiveOutput
from ermgap.objectives.cells import CellGrid, cell_stats, check_cells_in_train, erm_mean

torch = LazyModule("torch")  # imported by the first function that uses it (ermgap.lazy)


class Reweight(Objective):
    """total = Σ_i w_{c(i)} ℓ_i / B over the global batch, w_c = N / (K · n_c).

    n_c: train examples in cell c, N = Σ n_c, K = number of cells with train examples. So the weights have
    mean 1 over the train split (Σ_c n_c w_c / N = 1) and every cell carries the same total weight N/K:
    over an epoch the objective is the cell-balanced risk at the scale of ERM's. With stratified batches the
    grid's ERM weights (population share / sampling share) multiply w_c, so the target stays the same risk.
    """

    kind = "reweight"
    label = "Reweighting"
    summary = "examples weighted inversely to their cell's train frequency"

    def __init__(self, grid: CellGrid) -> None:
        super().__init__(grid)
        n = grid.train_counts
        in_train = n > 0
        self.weights = torch.where(in_train, n.sum() / (in_train.sum() * n.clamp(min=1)), torch.zeros_like(n))

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> Reweight:
        return cls(grid)

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        check_cells_in_train(counts, self.grid, self.kind)
        w = self.weights if self.grid.erm_weights is None else self.weights * self.grid.erm_weights
        return ObjectiveOutput(total=erm_mean(sums, counts, w), stats=cell_stats(sums, counts, self.grid.erm_weights))

    def log_values(self) -> dict[str, float]:
        return {f"weight_{name}": v for name, v in zip(self.grid.cell_names(), self.weights.flatten().tolist())}
