"""The one objective interface: per-sample losses + stratum + attribute → the tensor to backward.

    out = objective(losses, stratum, attribute)      # one all-reduce (ermgap.objective.reduced_cell_stats)
    engine.backward(out.total); engine.step()
    objective.after_step(out)                         # commits per-step state (Group DRO's q)
    ...
    objective.after_eval(dev_gap)                     # per-evaluation state (MinMaxGAP's λ)
    checkpoint["objective"] = objective.state_dict()

Every kind computes its loss from the GLOBAL cell sums and counts, so the distributed contract of
`ermgap.objective.all_reduce_sum` holds for all of them: `total` is a function of rank-identical reduced
values and of rank-identical objective state, hence after the engine's gradient averaging every rank
holds the gradient one process would get on the concatenated global batch. State that changes during
training (λ, q) is updated only from reduced values, so it stays identical on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ermgap.objective import ObjectiveResult, _check_inputs, all_reduce_sum, minmaxgap_from_cells, reduced_cell_stats

__all__ = ["CellGrid", "Objective", "ObjectiveOutput"]


@dataclass(frozen=True)
class CellGrid:
    """The groups of a run: strata × attribute values, with each cell's number of TRAIN examples.

    strata / attributes name the indices the recipe passes (e.g. ("eng", "deu", "jpn"), ("F", "M"));
    train_counts [num_strata, num_attrs] (float64) is what Group DRO's size adjustment and reweighting need.
    erm_weights [num_strata, num_attrs] (float64, > 0) or None (all 1): how much one example of each cell
    weighs in the ERM mean, the population share over the batch plan's sampling share when batches are
    stratified (`with_erm_weights`); every kind's ERM term and logged `erm` use them.
    """

    strata: tuple[str, ...]
    attributes: tuple[str, ...]
    train_counts: torch.Tensor
    erm_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        counts = torch.as_tensor(self.train_counts, dtype=torch.float64)
        if counts.shape != (len(self.strata), len(self.attributes)):
            raise ValueError(f"train_counts has shape {tuple(counts.shape)}, expected "
                             f"[{len(self.strata)} strata, {len(self.attributes)} attributes]")
        if len(self.attributes) < 2:
            raise ValueError(f"need at least 2 attribute values, got {self.attributes}")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or bool((counts != counts.round()).any()):
            raise ValueError(f"train_counts must be non-negative whole numbers, got {counts.tolist()}")
        if not float(counts.sum()):
            raise ValueError("train_counts are all 0: the train split has no examples")
        object.__setattr__(self, "train_counts", counts)
        if self.erm_weights is not None:
            w = torch.as_tensor(self.erm_weights, dtype=torch.float64)
            if w.shape != counts.shape or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
                raise ValueError(f"erm_weights must be finite numbers > 0 of shape {tuple(counts.shape)}, got {w.tolist()}")
            object.__setattr__(self, "erm_weights", w)

    @classmethod
    def count(cls, stratum: torch.Tensor, attribute: torch.Tensor, *, strata, attributes) -> CellGrid:
        """The grid of a train split given its per-example stratum and attribute indices."""
        dummy = torch.zeros(len(stratum), dtype=torch.float64)
        _check_inputs(dummy, stratum, attribute, len(strata), len(attributes))
        cell = stratum.long() * len(attributes) + attribute.long()
        counts = torch.bincount(cell, minlength=len(strata) * len(attributes)).view(len(strata), len(attributes))
        return cls(tuple(strata), tuple(attributes), counts.to(torch.float64))

    def with_erm_weights(self, weights: Mapping[int, float]) -> CellGrid:
        """This grid with ERM weights {row-major cell index: weight} (cells not listed: 1)."""
        w = torch.ones(self.num_strata * self.num_attrs, dtype=torch.float64)
        for cell, value in weights.items():
            w[int(cell)] = float(value)
        return replace(self, erm_weights=w.view(self.num_strata, self.num_attrs))

    @property
    def num_strata(self) -> int:
        return len(self.strata)

    @property
    def num_attrs(self) -> int:
        return len(self.attributes)

    def cell_names(self) -> list[str]:
        """Row-major names of the cells, e.g. ["eng_F", "eng_M", ...] (the order of flattened cell tensors)."""
        return [f"{s}_{a}" for s in self.strata for a in self.attributes]


@dataclass
class ObjectiveOutput:
    """What an objective returns for one optimizer step.

    total    0-d tensor to backward (scaled for data-parallel averaging, see all_reduce_sum)
    stats    global-batch diagnostics every kind reports alike (erm, gap, stratum_gaps, group_means, counts)
    logs     this kind's own values for this step (λ used, Group DRO's q after the update)
    pending  state `after_step` commits once the optimizer step has been taken
    """

    total: torch.Tensor
    stats: ObjectiveResult
    logs: dict[str, float] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)

    @property
    def erm(self) -> float:
        return self.stats.erm

    @property
    def gap(self) -> float:
        return self.stats.gap

    @property
    def stratum_gaps(self) -> torch.Tensor:
        return self.stats.stratum_gaps


class Objective(ABC):
    """A training objective over the stratum × attribute cells of `grid`. See the module docstring."""

    kind: ClassVar[str]    # the `objective.kind` value
    label: ClassVar[str]   # the name in reports

    def __init__(self, grid: CellGrid) -> None:
        self.grid = grid

    @classmethod
    @abstractmethod
    def from_config(cls, cfg, grid: CellGrid) -> Objective:
        """Build from a RunConfig (its `objective` section, and `lambda` for MinMaxGAP)."""

    def __call__(self, losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                 process_group=None) -> ObjectiveOutput:
        """The objective on the global batch (the union of every rank's examples in `process_group`).

        losses [B] per-sample loss with autograd (B may differ per rank and be 0), stratum [B] and
        attribute [B] integer cell indices into `grid`. Pure: state changes only in `after_step`.
        Raises TrainingError on every rank when any rank holds a NaN/inf loss.
        """
        g = self.grid
        _check_inputs(losses, stratum, attribute, g.num_strata, g.num_attrs)
        sums, counts = reduced_cell_stats(losses, stratum, attribute, num_strata=g.num_strata,
                                          num_attrs=g.num_attrs, reduce=lambda t: all_reduce_sum(t, process_group))
        return self.from_cells(sums, counts)

    @abstractmethod
    def from_cells(self, sums: torch.Tensor, counts: torch.Tensor) -> ObjectiveOutput:
        """The loss from GLOBAL cell sums (with autograd) and counts, both [num_strata, num_attrs]."""

    def after_step(self, out: ObjectiveOutput) -> None:
        """Called once after the optimizer step that backpropagated `out.total`."""

    def after_eval(self, dev_gap: float) -> None:
        """Called after each dev evaluation with Δdev (the `lambda.dev_gap` measure, rank-identical)."""

    def log_values(self) -> dict[str, float]:
        """Current state worth logging (λ, q), keyed by name."""
        return {}

    def outputs(self) -> dict[str, Any]:
        """What a finished run's metrics.json records of this objective: its final state (with its λ or q
        trajectory) under "objective", plus any kind-specific top-level entries."""
        return {"objective": self.state_dict()}

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters a saved state must agree with (JSON-able)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: kind, hyperparameters, train cell counts and the evolving state."""
        return {"kind": self.kind, "hparams": self.hparams(), "train_counts": self.grid.train_counts.tolist(),
                **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the evolving state; refuses a state saved by another kind, other hparams or other data."""
        if state.get("kind") != self.kind:
            raise ValueError(f"objective state was saved by kind {state.get('kind')!r}, this run is {self.kind!r}")
        saved = state.get("hparams", {})
        diff = {k: (saved.get(k), v) for k, v in self.hparams().items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in diff.items())
            raise ValueError(f"{self.kind} state was saved with other hyperparameters ({detail})")
        if state.get("train_counts") != self.grid.train_counts.tolist():
            raise ValueError(f"{self.kind} state was saved for other train cell counts "
                             f"({state.get('train_counts')} vs now {self.grid.train_counts.tolist()})")
        self._load(state)

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        pass


def diagnostics(sums: torch.Tensor, counts: torch.Tensor, grid: CellGrid) -> ObjectiveResult:
    """erm (with the grid's ERM weights), Δmax and per-stratum gaps of the global batch, detached (logged
    for every kind alike)."""
    with torch.no_grad():
        return minmaxgap_from_cells(sums.detach(), counts, lam=0.0, p=1.0, erm_weights=grid.erm_weights)


def check_cells_in_train(counts: torch.Tensor, grid: CellGrid, kind: str) -> None:
    """A batch example in a cell with no train examples means the grid was built from other data."""
    stray = (counts > 0) & (grid.train_counts.to(counts.device) == 0)
    if bool(stray.any()):
        names = [n for n, bad in zip(grid.cell_names(), stray.flatten().tolist()) if bad]
        raise ValueError(f"{kind}: the batch has examples in cells {names}, which have no train examples; "
                         "build the CellGrid from the train split the batches come from")
