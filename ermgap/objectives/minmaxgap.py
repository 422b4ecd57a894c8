"""ERM-MinMaxGAP (the paper's objective): erm + λ·Δmax^p, λ adapted after each dev evaluation."""

from __future__ import annotations

from ermgap.objective import AdaptiveLambda, minmaxgap_from_cells
from ermgap.objectives.base import CellGrid, Objective, ObjectiveOutput


class MinMaxGAP(Objective):
    """`ermgap.objective.erm_minmaxgap_loss` with λ from `AdaptiveLambda` — the same function chain, so the
    same numbers as calling them directly."""

    kind = "minmaxgap"
    label = "ERM-MinMaxGAP"

    def __init__(self, grid: CellGrid, *, p: float, lam: AdaptiveLambda) -> None:
        super().__init__(grid)
        if not float(p) > 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        self.p, self.lam = float(p), lam

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> MinMaxGAP:
        return cls(grid, p=cfg.objective.p, lam=AdaptiveLambda.from_config(cfg.lam))

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        res = minmaxgap_from_cells(sums, counts, lam=self.lam.value, p=self.p, erm_weights=self.grid.erm_weights)
        return ObjectiveOutput(total=res.total, stats=res, logs={"lambda": self.lam.value})

    def after_eval(self, dev_gap: float) -> None:
        self.lam.update(dev_gap)

    def log_values(self) -> dict[str, float]:
        return {"lambda": self.lam.value}

    def outputs(self) -> dict:
        # `lambda_history` ([eval_round, Δdev, λ] rows) is what `ermgap report` reads for the λ plot.
        return {**super().outputs(), "lambda_history": [list(h) for h in self.lam.history]}

    def hparams(self) -> dict:
        return {"p": self.p}

    def _state(self) -> dict:
        return {"lambda": self.lam.state_dict()}

    def _load(self, state: dict) -> None:
        self.lam.load_state_dict(state["lambda"])
