"""The Objective interface every kind implements (see the package docstring for the life cycle)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ermgap.lazy import LazyModule
from ermgap.objectives.cells import CellGrid, CellStats, all_reduce_sum, check_inputs, reduced_cell_stats
from ermgap.settings import Setting

torch = LazyModule("torch")  # imported by the first function that uses it (ermgap.lazy)

__all__ = ["Objective", "ObjectiveOutput", "Table3Row"]


@dataclass
class ObjectiveOutput:
    """What an objective returns for one optimizer step.

    total    0-d tensor to backward (scaled for data-parallel averaging, see cells.all_reduce_sum)
    stats    global-batch diagnostics every kind reports alike (erm, gap, stratum_gaps, group_means, counts)
    logs     this kind's own values for this step (its state as used, e.g. Group DRO's q after the update)
    pending  state `after_step` commits once the optimizer step has been taken
    """

    total: torch.Tensor
    stats: CellStats
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


@dataclass(frozen=True)
class Table3Row:
    """Where the paper's Table 3 shows run `name`: its section, row label and order inside the section."""

    name: str
    section: str
    label: str
    order: float = 0.0


class Objective(ABC):
    """A training objective over the stratum × attribute cells of `grid`. See the package docstring."""

    kind: ClassVar[str]                      # the `objective.kind` value
    label: ClassVar[str]                     # the kind's name in reports ("Group DRO")
    summary: ClassVar[str]                   # what it optimises, in `objective.kind`'s help
    settings: ClassVar[tuple[Setting, ...]] = ()        # its config keys, composed into RunConfig
    forward_inputs: ClassVar[tuple[str, ...]] = ()      # per-sample tensors it needs from the forward pass
    hidden_layer: int = -1                              # the hidden layer they are read from (scoring.FORWARD_INPUTS)
    module_lr_scale: float = 1.0                        # `module()`'s learning rate as a multiple of optim.lr
    eval_metrics: ClassVar[tuple[str, ...]] = ()        # its own metrics of an evaluated split (`evaluation_sums`)
    table3_sections: ClassVar[tuple[str, ...]] = ()     # Table 3 comparison sections it defines (`table3_rows`)
    trajectory: ClassVar[str | None] = None             # the `log_values` key a report plots over training

    def __init__(self, grid: CellGrid) -> None:
        self.grid = grid

    # ------------------------------------------------------------------------- building and naming
    @classmethod
    @abstractmethod
    def from_config(cls, cfg, grid: CellGrid) -> Objective:
        """Build from a RunConfig (its own settings, at the paths `settings` declares)."""

    @classmethod
    def describe(cls, params: Mapping[str, Any]) -> str:
        """The name a person reads in run names, tables and Table 3, from a run's flattened config params
        (what MLflow holds: "Group DRO (η=0.05)")."""
        return cls.label

    @classmethod
    def live_values(cls, reported: Mapping[str, Any]) -> dict[str, float]:
        """The values of this kind's state a live display shows ({name: value}), from a report of `log_values`
        keys (a Tune result, a progress event). Default: none."""
        return {}

    @classmethod
    def table3_rows(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[Table3Row]:
        """The rows this kind places in the paper's Table 3 among `runs` ({name: flattened params}, trained
        runs only). A run no kind places goes to "Other objectives" under its `describe`."""
        return []

    # ------------------------------------------------------------------------- training
    def module(self, hidden_size: int) -> torch.nn.Module | None:
        """Trainable parameters of the objective itself (e.g. an adversary's head), or None; `hidden_size` is
        the width of the model's hidden states (what `forward_inputs` hold). The recipe attaches the module to
        the model before the DeepSpeed engine is built, so the same optimiser trains it, DeepSpeed averages
        its gradients, checkpoints hold it and the best adapter is saved with it."""
        return None

    def __call__(self, losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                 inputs: Mapping[str, torch.Tensor] | None = None, process_group=None) -> ObjectiveOutput:
        """The objective on the global batch (the union of every rank's examples in `process_group`).

        losses [B] per-sample loss with autograd (B may differ per rank and be 0), stratum [B] and
        attribute [B] integer cell indices into `grid`; `inputs` holds the per-sample tensors named in
        `forward_inputs` (this rank's, [B, ...]). Pure: state changes only in `after_step`.
        Raises TrainingError on every rank when any rank holds a NaN/inf loss.
        """
        g = self.grid
        check_inputs(losses, stratum, attribute, g.num_strata, g.num_attrs)
        sums, counts = reduced_cell_stats(losses, stratum, attribute, num_strata=g.num_strata,
                                          num_attrs=g.num_attrs, reduce=lambda t: all_reduce_sum(t, process_group))
        return self.from_cells(sums, counts)

    @abstractmethod
    def from_cells(self, sums: torch.Tensor, counts: torch.Tensor) -> ObjectiveOutput:
        """The loss from GLOBAL cell sums (with autograd) and counts, both [num_strata, num_attrs]."""

    def evaluation_sums(self, inputs: Mapping[str, torch.Tensor], stratum: torch.Tensor,
                        attribute: torch.Tensor) -> dict[str, tuple[float, float]]:
        """This kind's own metrics (`eval_metrics`) of one batch of an evaluated split, as (numerator,
        denominator) sums: the recipe adds them over the split's batches and every rank and logs
        `<split>_<name>` = numerator / denominator (e.g. an adversary's attribute accuracy). Called under
        no_grad with the model in eval mode; `inputs` as in `__call__`. Default: none."""
        return {}

    def after_step(self, out: ObjectiveOutput) -> None:
        """Called once after the optimizer step that backpropagated `out.total`."""

    def on_evaluation(self, metrics: Mapping[str, float], *, eval_round: int) -> None:
        """This kind's reaction to a dev evaluation: `metrics` are the recipe's split metrics (`dev_*`, the
        same gathered dev set on every rank, so the state stays rank-identical). Default: none."""

    def log_values(self) -> dict[str, float]:
        """Current state worth logging (e.g. Group DRO's q), keyed by name: MLflow metrics and the reports' keys."""
        return {}

    def outputs(self) -> dict[str, Any]:
        """What a finished run's metrics.json records of this objective: its final state (with its
        trajectory) under "objective", plus any kind-specific top-level entries."""
        return {"objective": self.state_dict()}

    # ------------------------------------------------------------------------- checkpoints
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
