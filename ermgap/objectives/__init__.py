"""Fairness objectives behind one interface (`Objective`), chosen by `objective.kind`.

`ermgap.objective` holds the math every kind shares (cell sums/counts, the one all-reduce seam,
MinMaxGAP's gap and λ); this package holds the kinds. Adding a kind: one class in its own module plus
one entry in OBJECTIVES, and its name (with its keys, if any) in `ermgap.config.ObjectiveConfig`.

    objective = build_objective(cfg, CellGrid.count(train_stratum, train_gender, strata=..., attributes=...))
"""

from __future__ import annotations

from ermgap.objectives.base import CellGrid, Objective, ObjectiveOutput
from ermgap.objectives.erm import ERM
from ermgap.objectives.group_dro import GroupDRO
from ermgap.objectives.minmaxgap import MinMaxGAP
from ermgap.objectives.reweight import Reweight

OBJECTIVES: dict[str, type[Objective]] = {cls.kind: cls for cls in (ERM, MinMaxGAP, GroupDRO, Reweight)}

__all__ = ["ERM", "OBJECTIVES", "CellGrid", "GroupDRO", "MinMaxGAP", "Objective", "ObjectiveOutput", "Reweight",
           "build_objective"]


def build_objective(cfg, grid: CellGrid) -> Objective:
    """The objective `cfg.objective.kind` names, over the cells of `grid` (a RunConfig is validated, so
    the kind is one of OBJECTIVES)."""
    return OBJECTIVES[cfg.objective.kind].from_config(cfg, grid)
