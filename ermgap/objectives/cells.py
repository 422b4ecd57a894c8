"""The cells every objective is computed on, and THE distributed seam.

A cell is one (stratum, attribute value) pair: (language, gender) in the paper. Every objective kind sees
the global batch only through its per-cell loss sums and counts, summed over ranks in ONE all-reduce
(`reduced_cell_stats` → `all_reduce_sum`), so the number and shape of collectives per step is the same
whatever the objective, and every value derived from them is rank-identical.

    sums, counts = reduced_cell_stats(losses, stratum, attribute, num_strata=S, num_attrs=A,
                                      reduce=lambda t: all_reduce_sum(t, group))     # [S, A] each
    erm_mean(sums, counts, weights)        the ERM term (per-cell weighted with stratified batches)
    cell_stats(sums, counts, weights)      erm, Δmax (the largest valid within-stratum gap), per-stratum
                                           gaps and cell means: what every kind logs
    loss_gap(losses, stratum, attribute)   Δmax of an already gathered set (the dev split's `loss_gap`)

`stratum` is the group inside which the attribute gap is measured (language, or language × modality);
`attribute` is the protected attribute (0 = F, 1 = M; any k ≥ 2 values). For k = 2 the within-stratum
gap is |mean_F − mean_M| as in the paper. A stratum is *valid* (counts towards the max) only when every
attribute value has at least one example in the global batch — the paper's "maximum valid gap".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ermgap.errors import TrainingError
from ermgap.lazy import LazyModule

# Imported by the first function that uses them (ermgap.lazy): `ermgap.config` imports this module.
torch = LazyModule("torch")
dist = LazyModule("torch.distributed")

__all__ = ["CellGrid", "CellStats", "all_reduce_sum", "cell_stats", "check_cells_in_train", "check_inputs",
           "erm_mean", "group_stats", "loss_gap", "reduced_cell_stats", "reduced_cell_sums", "stratum_gap_terms"]


# --------------------------------------------------------------------------- the distributed seam


@functools.cache
def _all_reduce_function() -> type:
    """The autograd function of `all_reduce_sum`, defined on first use (its base class is torch's)."""

    class AllReduceSum(torch.autograd.Function):
        """Forward: sum over ranks. Backward: this rank's incoming gradient times world size.

        Why ×W and not an all-reduce of the gradient (the exact adjoint of all-reduce, as in
        `torch.distributed.nn.functional.all_reduce`): everything downstream of the reduced tensor in this
        module is a function of reduced (rank-identical) values and of the objective's state and
        hyperparameters (identical by contract), so every rank receives the same upstream gradient g. The true
        adjoint would sum W identical copies = W·g; we produce W·g locally and save a second collective (and a
        hang if a rank skipped backward).
        """

        @staticmethod
        def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
            ctx.world_size = dist.get_world_size(group)
            out = tensor.clone()
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
            return out

        @staticmethod
        def backward(ctx, grad_output: torch.Tensor):
            return grad_output * ctx.world_size, None

    return AllReduceSum


def all_reduce_sum(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `process_group`, differentiably. The module's only collective.

    Without an initialised `torch.distributed` this is the identity (single process).

    Gradient scaling, stated once: let J be the objective on the concatenated global batch and g_r the
    part of ∇J that flows through rank r's own examples (∇J = Σ_r g_r). The backward of this function
    hands rank r's local summand W × (∂J/∂reduced), so `total.backward()` leaves W·g_r in rank r's
    parameters. Data-parallel engines (DDP, DeepSpeed) then AVERAGE over ranks: (1/W)·Σ_r W·g_r = ∇J —
    exactly the single-process gradient. `process_group` must therefore be the data-parallel group over
    which the engine averages gradients, and every rank must backward the same function of the result
    (true for every kind's `total`: its state is updated from reduced values only).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    return _all_reduce_function().apply(tensor, process_group)


# --------------------------------------------------------------------------- group statistics


def check_inputs(losses, stratum, attribute, num_strata: int, num_attrs: int) -> None:
    """Programming errors (shapes, dtypes, index range) -> ValueError naming the argument."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError(f"losses must be a 1-D floating tensor [B], got {_describe(losses)}")
    for name, t in (("stratum", stratum), ("attribute", attribute)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool \
                or t.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor [B], got {_describe(t)}")
        if t.shape[0] != losses.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} entries but losses has {losses.shape[0]}; they must match")
    if not isinstance(num_strata, int) or num_strata < 1:
        raise ValueError(f"num_strata must be an int >= 1, got {num_strata!r}")
    if not isinstance(num_attrs, int) or num_attrs < 2:
        raise ValueError(f"num_attrs must be an int >= 2 (a gap needs two groups), got {num_attrs!r}")
    if not losses.numel():
        return
    out_of_range = (stratum < 0) | (stratum >= num_strata) | (attribute < 0) | (attribute >= num_attrs)
    if bool(out_of_range.any()):  # one host sync on the happy path; details only when raising
        for name, t, n in (("stratum", stratum, num_strata), ("attribute", attribute, num_attrs)):
            bad = (t < 0) | (t >= n)
            if bool(bad.any()):
                values = sorted(set(t[bad].tolist()))
                raise ValueError(f"{name} has {int(bad.sum())} value(s) outside [0, {n - 1}]: {values[:10]}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _work_dtype(losses: torch.Tensor) -> torch.dtype:
    # bf16/fp16 sums and counts lose exactness quickly (bf16 counts stop at 256); do group math in ≥ fp32.
    return torch.promote_types(losses.dtype, torch.float32)


def group_stats(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor,
                num_strata: int, num_attrs: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell loss sums and counts of THIS process's examples (no reduction across ranks).

    losses [B] float, stratum [B] int in [0, num_strata), attribute [B] int in [0, num_attrs).
    Returns (sums, counts), both [num_strata, num_attrs] in ≥ float32; sums carry autograd.
    """
    check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    return _group_stats(losses, stratum, attribute, num_strata, num_attrs)


def _group_stats(losses, stratum, attribute, num_strata, num_attrs):
    dtype = _work_dtype(losses)
    cell = (stratum.to(losses.device) * num_attrs + attribute.to(losses.device)).long()
    n_cells = num_strata * num_attrs
    sums = torch.zeros(n_cells, dtype=dtype, device=losses.device).index_add(0, cell, losses.to(dtype))
    counts = torch.bincount(cell, minlength=n_cells).to(dtype)
    return sums.view(num_strata, num_attrs), counts.view(num_strata, num_attrs)


def reduced_cell_stats(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                       num_strata: int, num_attrs: int, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """GLOBAL per-cell loss sums (with autograd) and counts [num_strata, num_attrs], in one collective.

    `reduce` is `lambda t: all_reduce_sum(t, group)` (or the identity for already-gathered data). Inputs
    are trusted (checked by the caller). Raises TrainingError on every rank alike when any rank holds a
    NaN/inf loss, ValueError when the global batch is empty. Every objective kind builds on this, so
    the number and shape of collectives per step is the same whatever the objective.
    """
    (sums,), counts = reduced_cell_sums([losses], stratum, attribute, num_strata=num_strata, num_attrs=num_attrs,
                                        reduce=reduce)
    return sums, counts


def reduced_cell_sums(columns: list[torch.Tensor], stratum: torch.Tensor, attribute: torch.Tensor, *,
                      num_strata: int, num_attrs: int, reduce) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`reduced_cell_stats` for several per-sample columns at once (the task losses first, then e.g. an
    adversary's loss): their GLOBAL per-cell sums (with autograd), each [num_strata, num_attrs], and the
    counts, still in ONE collective. A sample with a non-finite value in any column counts as a bad loss."""
    parts = [_group_stats(c, stratum, attribute, num_strata, num_attrs) for c in columns]
    counts = parts[0][1]
    finite = torch.stack([torch.isfinite(c.detach()) for c in columns]).all(dim=0)
    n_bad_local = (~finite).sum().to(counts.dtype).reshape(1)
    # One collective for everything: every column's sums (with grad), counts and the non-finite count.
    packed = reduce(torch.cat([*(sums.flatten().to(counts.dtype) for sums, _ in parts), counts.flatten(),
                               n_bad_local]))
    n, k = num_strata * num_attrs, len(columns)
    sums = [packed[i * n:(i + 1) * n].view(num_strata, num_attrs) for i in range(k)]
    counts = packed[k * n:(k + 1) * n].detach().view(num_strata, num_attrs)
    n_bad, n_total = packed[(k + 1) * n].detach(), counts.sum()
    n_bad_i, n_total_i = (int(v) for v in torch.stack([n_bad, n_total]).tolist())
    if n_bad_i:
        local = torch.nonzero(~finite).flatten().tolist()
        raise TrainingError(
            f"{n_bad_i} of {n_total_i} per-sample losses in the global batch are NaN or inf "
            f"(this process: {len(local)}, at batch positions {local[:20]}); refusing to continue")
    if n_total_i == 0:
        raise ValueError("the global batch is empty (0 examples on all ranks); nothing to compute a loss on")
    return sums, counts


def erm_mean(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ERM term from global cell sums/counts: Σ_c w_c · sum_c / Σ_c count_c (w = 1: the batch mean).

    weights [num_strata, num_attrs] are per-cell constants, identical on every rank (a stratified batch
    plan's population share / sampling share, `ermgap.sampler.StratifiedBatchPlan.importance_weights`), so
    the weighted sum is still a sum of the all-reduced cell sums and the distributed contract holds.
    """
    if weights is None:
        return sums.sum() / counts.sum()
    return (weights.to(device=sums.device, dtype=sums.dtype) * sums).sum() / counts.sum()


@dataclass
class CellStats:
    """Diagnostics of the global batch from its cell sums/counts. Scalars are read lazily so the hot path does
    not sync a GPU.

    erm            float, (weighted) mean loss over the global batch
    gap            float, Δmax over valid strata (0.0 when none is valid)
    stratum_gaps   [num_strata] detached tensor, NaN where the stratum is invalid
    valid          [num_strata] bool tensor, strata that counted
    counts         [num_strata, num_attrs] global example counts
    group_means    [num_strata, num_attrs] global mean losses, NaN for empty cells
    """

    erm_tensor: torch.Tensor
    gap_tensor: torch.Tensor
    stratum_gaps: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    group_means: torch.Tensor

    @property
    def erm(self) -> float:
        return float(self.erm_tensor)

    @property
    def gap(self) -> float:
        return float(self.gap_tensor)


def stratum_gap_terms(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means [S, A], gaps [S], valid [S]) from global cell sums/counts, means and gaps with autograd: each
    stratum's gap max_a mean − min_a mean (Δ_s), valid where every attribute value has examples. An empty
    cell's mean is 0 and an invalid stratum's gap is meaningless: mask with `valid`."""
    nonempty = counts > 0
    # Safe denominators: empty cells get 1 (their sum is 0), so no 0/0 NaN can reach the gradient.
    means = sums / torch.where(nonempty, counts, torch.ones_like(counts))
    return means, means.amax(dim=1) - means.amin(dim=1), nonempty.all(dim=1)


def cell_terms(sums: torch.Tensor, counts: torch.Tensor, erm_weights: torch.Tensor | None = None):
    """(erm, Δmax, stats) from global cell sums/counts [num_strata, num_attrs]: erm and Δmax carry autograd
    (an objective builds its loss from them), `stats` is their detached `CellStats`."""
    erm = erm_mean(sums, counts, erm_weights)
    nonempty = counts > 0
    means, gaps, valid = stratum_gap_terms(sums, counts)
    # Gaps are ≥ 0, so a 0 for invalid strata never wins the max over a valid one; with no valid
    # stratum Δmax = 0.
    delta = torch.where(valid, gaps, torch.zeros_like(gaps)).amax()
    with torch.no_grad():
        nan = torch.full_like(gaps, float("nan"))
        stratum_gaps = torch.where(valid, gaps, nan)
        group_means = torch.where(nonempty, means, torch.full_like(means, float("nan")))
    return erm, delta, CellStats(erm_tensor=erm.detach(), gap_tensor=delta.detach(), stratum_gaps=stratum_gaps,
                                 valid=valid, counts=counts, group_means=group_means)


def cell_stats(sums: torch.Tensor, counts: torch.Tensor, erm_weights: torch.Tensor | None = None) -> CellStats:
    """erm (with `erm_weights`), Δmax and per-stratum gaps of the global batch, detached (logged for every
    kind alike)."""
    with torch.no_grad():
        return cell_terms(sums.detach(), counts, erm_weights)[2]


def loss_gap(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
             num_strata: int, num_attrs: int = 2) -> tuple[float, torch.Tensor]:
    """The max valid within-stratum loss gap of a whole set (the dev split's `loss_gap` metric).

    Pass the per-sample losses ALREADY gathered from all ranks (no collective happens here).
    Returns (gap in loss units, 0.0 when no stratum is valid; stratum_gaps [num_strata], NaN if invalid).
    """
    check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    with torch.no_grad():
        sums, counts = reduced_cell_stats(losses.detach(), stratum, attribute, num_strata=num_strata,
                                          num_attrs=num_attrs, reduce=lambda t: t)
        stats = cell_stats(sums, counts)
    return stats.gap, stats.stratum_gaps


# --------------------------------------------------------------------------- the train cells


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
        check_inputs(dummy, stratum, attribute, len(strata), len(attributes))
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



def check_cells_in_train(counts: torch.Tensor, grid: CellGrid, kind: str) -> None:
    """A batch example in a cell with no train examples means the grid was built from other data."""
    stray = (counts > 0) & (grid.train_counts.to(counts.device) == 0)
    if bool(stray.any()):
        names = [n for n, bad in zip(grid.cell_names(), stray.flatten().tolist()) if bad]
        raise ValueError(f"{kind}: the batch has examples in cells {names}, which have no train examples; "
                         "build the CellGrid from the train split the batches come from")
