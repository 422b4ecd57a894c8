"""The ERM-MinMaxGAP objective (paper section 2): group losses, the one distributed seam, λ.

The math every objective kind shares lives here (`reduced_cell_stats`: global cell sums/counts in one
all-reduce); `ermgap.objectives` puts ERM, MinMaxGAP, Group DRO and reweighting behind one interface.

    L = erm + λ · Δmax^p,   erm = mean per-sample loss over the GLOBAL batch (per-cell weighted with
                                   stratified batches: `erm_mean`),
    Δmax = max over valid strata s of (max_a mean_{s,a} − min_a mean_{s,a})

`stratum` is the group inside which the gender gap is measured (language, or language × modality);
`attribute` is the protected attribute (0 = F, 1 = M; any k ≥ 2 values). For k = 2 the within-stratum
gap is |mean_F − mean_M| as in the paper. A stratum is *valid* (counts towards the max) only when every
attribute value has at least one example in the global batch — the paper's "maximum valid gap".

Where the batch lives. The estimate covers exactly the examples whose losses are passed in, summed
over all ranks of `process_group`. With gradient accumulation, the paper's reference is the
mini-batch estimate over the *effective* batch (all micro-batches of one optimizer step on all ranks).
Two exact ways to get it:
  1. keep every micro-batch's loss graph alive, `torch.cat` the losses (and metadata) and call
     `erm_minmaxgap_loss` once per optimizer step, then backward once (memory of the whole local batch);
  2. two passes: `sample_weights` on the detached losses of all micro-batches (forward under no_grad),
     then per micro-batch backward of `(weights_m * losses_m).sum()` (memory of one micro-batch; exact if
     the second forward reproduces the first, i.e. same dropout RNG or dropout off).
With variant 1 the engine sees one backward per optimizer step (DeepSpeed: gradient_accumulation_steps=1,
micro-batch = the whole local batch of the step). Calling the objective per micro-batch is *not* the
effective-batch estimate (the max of per-micro-batch gaps differs from the gap of the union) — avoid it
when exactness matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ermgap.errors import TrainingError

__all__ = [
    "AdaptiveLambda",
    "ObjectiveResult",
    "all_reduce_sum",
    "avg_metric_gap",
    "dev_gap",
    "erm_mean",
    "lambda_drive",
    "erm_minmaxgap_loss",
    "group_stats",
    "minmaxgap_from_cells",
    "reduced_cell_stats",
    "sample_weights",
]


# --------------------------------------------------------------------------- the distributed seam


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: this rank's incoming gradient times world size.

    Why ×W and not an all-reduce of the gradient (the exact adjoint of all-reduce, as in
    `torch.distributed.nn.functional.all_reduce`): everything downstream of the reduced tensor in this
    module is a function of reduced (rank-identical) values and of λ, p (identical by contract), so every
    rank receives the same upstream gradient g. The true adjoint would sum W identical copies = W·g; we
    produce W·g locally and save a second collective (and a hang if a rank skipped backward).
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


def all_reduce_sum(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `process_group`, differentiably. The module's only collective.

    Without an initialised `torch.distributed` this is the identity (single process).

    Gradient scaling, stated once: let J be the objective on the concatenated global batch and g_r the
    part of ∇J that flows through rank r's own examples (∇J = Σ_r g_r). The backward of this function
    hands rank r's local summand W × (∂J/∂reduced), so `total.backward()` leaves W·g_r in rank r's
    parameters. Data-parallel engines (DDP, DeepSpeed) then AVERAGE over ranks: (1/W)·Σ_r W·g_r = ∇J —
    exactly the single-process gradient. `process_group` must therefore be the data-parallel group over
    which the engine averages gradients, and every rank must backward the same function of the result
    (true for `ObjectiveResult.total` when λ and p agree on all ranks).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    return _AllReduceSum.apply(tensor, process_group)


# --------------------------------------------------------------------------- group statistics


def _check_inputs(losses, stratum, attribute, num_strata: int, num_attrs: int) -> None:
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
    _check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    return _group_stats(losses, stratum, attribute, num_strata, num_attrs)


def _group_stats(losses, stratum, attribute, num_strata, num_attrs):
    dtype = _work_dtype(losses)
    cell = (stratum.to(losses.device) * num_attrs + attribute.to(losses.device)).long()
    n_cells = num_strata * num_attrs
    sums = torch.zeros(n_cells, dtype=dtype, device=losses.device).index_add(0, cell, losses.to(dtype))
    counts = torch.bincount(cell, minlength=n_cells).to(dtype)
    return sums.view(num_strata, num_attrs), counts.view(num_strata, num_attrs)


# --------------------------------------------------------------------------- the objective


@dataclass
class ObjectiveResult:
    """What `erm_minmaxgap_loss` returns. Scalars are read lazily so the hot path does not sync a GPU.

    total          0-d tensor to backward: erm + lam · gap^p (scaled for data-parallel averaging)
    erm            float, mean loss over the global batch
    gap            float, Δmax over valid strata (0.0 when none is valid)
    stratum_gaps   [num_strata] detached tensor, NaN where the stratum is invalid
    valid          [num_strata] bool tensor, strata that counted
    counts         [num_strata, num_attrs] global example counts
    group_means    [num_strata, num_attrs] global mean losses, NaN for empty cells
    """

    total: torch.Tensor
    erm_tensor: torch.Tensor
    gap_tensor: torch.Tensor
    stratum_gaps: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    group_means: torch.Tensor
    lam: float
    p: float

    @property
    def erm(self) -> float:
        return float(self.erm_tensor)

    @property
    def gap(self) -> float:
        return float(self.gap_tensor)

    @property
    def regularizer(self) -> float:
        """gap^p (0 when no stratum is valid)."""
        return self.gap ** self.p if self.gap > 0 else 0.0


def erm_minmaxgap_loss(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                       lam: float, p: float, num_strata: int, num_attrs: int = 2,
                       process_group=None) -> ObjectiveResult:
    """ERM-MinMaxGAP on the global batch: the union of every rank's `losses` in `process_group`.

    losses [B] per-sample mean CE (grad-enabled; B may differ per rank and may be 0), stratum [B] and
    attribute [B] integer indices. With `torch.distributed` initialised, group sums and counts are summed
    over ranks (one all-reduce of 2·num_strata·num_attrs+1 numbers), so `erm`, `gap` and `stratum_gaps`
    are identical on all ranks and equal the single-process values; `total`'s gradient is scaled so that
    after the engine's gradient AVERAGING the parameters hold the single-process gradient (see
    `all_reduce_sum`). λ and p must be the same on all ranks.

    A rank with no examples passes empty tensors; its `losses` should still come from the model (e.g. the
    per-sample loss of an empty batch) so that `total.backward()` reaches the parameters with zero
    gradients, as data-parallel engines expect every rank to backward. The default `process_group=None`
    is the world group, which is the data-parallel group for DDP and for DeepSpeed without model parallelism.

    Raises TrainingError when any loss (on any rank) is NaN/inf, naming how many — on every rank, so
    none is left waiting in a collective; ValueError for shape/dtype/index mistakes or an empty global batch.
    """
    lam, p = _check_lam_p(lam, p)
    _check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    return _objective(losses, stratum, attribute, lam=lam, p=p, num_strata=num_strata,
                      num_attrs=num_attrs, reduce=lambda t: all_reduce_sum(t, process_group))


def _check_lam_p(lam, p) -> tuple[float, float]:
    lam, p = float(lam), float(p)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p}")
    return lam, p


def _objective(losses, stratum, attribute, *, lam, p, num_strata, num_attrs, reduce) -> ObjectiveResult:
    sums, counts = reduced_cell_stats(losses, stratum, attribute, num_strata=num_strata, num_attrs=num_attrs,
                                      reduce=reduce)
    return minmaxgap_from_cells(sums, counts, lam=lam, p=p)


def reduced_cell_stats(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                       num_strata: int, num_attrs: int, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """GLOBAL per-cell loss sums (with autograd) and counts [num_strata, num_attrs], in one collective.

    `reduce` is `lambda t: all_reduce_sum(t, group)` (or the identity for already-gathered data). Inputs
    are trusted (checked by the caller). Raises TrainingError on every rank alike when any rank holds a
    NaN/inf loss, ValueError when the global batch is empty. Every objective kind builds on this, so
    the number and shape of collectives per step is the same whatever the objective.
    """
    sums, counts = _group_stats(losses, stratum, attribute, num_strata, num_attrs)
    n_bad_local = (~torch.isfinite(losses)).sum().to(sums.dtype).reshape(1)
    # One collective for everything: sums (with grad), counts and the non-finite count.
    packed = reduce(torch.cat([sums.flatten(), counts.flatten(), n_bad_local]))
    n = num_strata * num_attrs
    sums = packed[:n].view(num_strata, num_attrs)
    counts = packed[n:2 * n].detach().view(num_strata, num_attrs)
    n_bad, n_total = packed[2 * n].detach(), counts.sum()
    n_bad_i, n_total_i = (int(v) for v in torch.stack([n_bad, n_total]).tolist())
    if n_bad_i:
        local = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
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


def minmaxgap_from_cells(sums: torch.Tensor, counts: torch.Tensor, *, lam: float, p: float,
                         erm_weights: torch.Tensor | None = None) -> ObjectiveResult:
    """ERM-MinMaxGAP from global cell sums/counts [num_strata, num_attrs] (see `reduced_cell_stats`).
    erm_weights: per-cell weights of the ERM term (`erm_mean`); the gap term uses cell means, which no
    per-cell weight changes."""
    erm = erm_mean(sums, counts, erm_weights)
    nonempty = counts > 0
    # Safe denominators: empty cells get 1 (their sum is 0), so no 0/0 NaN can reach the gradient.
    means = sums / torch.where(nonempty, counts, torch.ones_like(counts))
    valid = nonempty.all(dim=1)
    gaps = means.amax(dim=1) - means.amin(dim=1)
    # Gaps are ≥ 0, so a 0 for invalid strata never wins the max over a valid one; with no valid
    # stratum Δmax = 0 and the regulariser below is a constant 0.
    delta = torch.where(valid, gaps, torch.zeros_like(gaps)).amax()
    # Δ^p has an infinite slope at 0 for p < 1 and autograd would give 0·inf = NaN; at Δ = 0 use the
    # subgradient 0 (also what |x| gives at 0 for p = 1).
    positive = delta > 0
    safe_delta = torch.where(positive, delta, torch.ones_like(delta))
    reg = torch.where(positive, safe_delta ** p, torch.zeros_like(delta))
    total = erm + lam * reg
    with torch.no_grad():
        nan = torch.full_like(gaps, float("nan"))
        stratum_gaps = torch.where(valid, gaps, nan)
        group_means = torch.where(nonempty, means, torch.full_like(means, float("nan")))
    return ObjectiveResult(total=total, erm_tensor=erm.detach(), gap_tensor=delta.detach(),
                           stratum_gaps=stratum_gaps, valid=valid, counts=counts,
                           group_means=group_means, lam=lam, p=p)


def sample_weights(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
                   lam: float, p: float, num_strata: int, num_attrs: int = 2,
                   process_group=None) -> tuple[torch.Tensor, ObjectiveResult]:
    """d total / d losses_i for this rank's examples, for exact two-pass gradient accumulation.

    Give the (detached) per-sample losses of ALL micro-batches of one optimizer step. Returns
    (weights [B], result). Backward of `(weights[m] * losses_m).sum()` for each micro-batch m (recomputed
    with grad) then accumulates exactly the gradient `result.total.backward()` would give, including the
    ×world-size factor for data-parallel averaging. If the engine divides each micro-batch loss by the
    number of accumulation steps (DeepSpeed's default), multiply the surrogate by that number.
    """
    leaf = losses.detach().requires_grad_(True)
    with torch.enable_grad():
        result = erm_minmaxgap_loss(leaf, stratum, attribute, lam=lam, p=p, num_strata=num_strata,
                                    num_attrs=num_attrs, process_group=process_group)
        (weights,) = torch.autograd.grad(result.total, leaf)
    return weights, result


# --------------------------------------------------------------------------- dev-set gap


def dev_gap(losses: torch.Tensor, stratum: torch.Tensor, attribute: torch.Tensor, *,
            num_strata: int, num_attrs: int = 2) -> tuple[float, torch.Tensor]:
    """Δdev for `lambda.dev_gap = "loss_gap"`: the max valid within-stratum loss gap on the whole dev set.

    Pass the dev set's per-sample losses ALREADY gathered from all ranks (no collective happens here).
    Returns (gap in loss units, 0.0 when no stratum is valid; stratum_gaps [num_strata], NaN if invalid).
    """
    _check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    with torch.no_grad():
        res = _objective(losses.detach(), stratum, attribute, lam=0.0, p=1.0, num_strata=num_strata,
                         num_attrs=num_attrs, reduce=lambda t: t)
    return res.gap, res.stratum_gaps


def avg_metric_gap(avg_gap_percent: float) -> float:
    """Δdev for `lambda.dev_gap = "avg_metric_gap"`: the metrics module's AVG gap (percent) as a fraction.

    The caller picks which AVG (e.g. `compute_metrics(dev)["overall"]["avg_gap"]`); this only converts
    units so ε keeps its meaning as a fraction (ε = 0.02 ↔ 2 % AVG gap).
    """
    value = float(avg_gap_percent)
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise TrainingError(f"AVG metric gap must be a percentage in [0, 100], got {avg_gap_percent!r}")
    return value / 100.0


def lambda_drive(kind: str, *, loss_gap: float, avg_gap_percent: float) -> float | None:
    """Δdev of one dev evaluation as `lambda.dev_gap` = `kind` defines it: "loss_gap" (`dev_gap`'s value)
    or "avg_metric_gap" (`avg_metric_gap` of the AVG gap in percent, range-checked).

    None when it is undefined (NaN: e.g. no dev stratum has every attribute value, so there is no AVG gap):
    the caller skips that evaluation's λ update. Treating it as 0 would lower λ by η·ε with no evidence.
    """
    if kind == "loss_gap":  # ±inf is not "undefined": AdaptiveLambda.update refuses it
        return None if math.isnan(float(loss_gap)) else float(loss_gap)
    if kind == "avg_metric_gap":
        return None if math.isnan(float(avg_gap_percent)) else avg_metric_gap(avg_gap_percent)
    raise ValueError(f"lambda.dev_gap must be 'loss_gap' or 'avg_metric_gap', got {kind!r}")


# --------------------------------------------------------------------------- adaptive λ


@dataclass
class AdaptiveLambda:
    """The fairness weight λ (paper 2.3): after each dev evaluation k,

        λ ← clip(λ + η · (Δdev − ε), 0, λmax)       (mode="adaptive")

    mode="fixed" keeps λ = init forever (the λ ∈ {0, 1, 5, 10} ablations; ERM is fixed with init 0).
    `history` is a list of (eval_index, dev_gap, λ_after), eval_index = 1, 2, ...; `state_dict()` /
    `load_state_dict()` restore value and history so a resumed run continues the same trajectory.
    """

    init: float = 0.0
    eta: float = 0.5
    epsilon: float = 0.02
    lam_max: float = 10.0
    mode: str = "adaptive"
    value: float = field(init=False)
    history: list[tuple[int, float, float]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "fixed"):
            raise ValueError(f"mode must be 'adaptive' or 'fixed', got {self.mode!r}")
        for name in ("init", "eta", "epsilon", "lam_max"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            setattr(self, name, v)
        if self.mode == "adaptive" and self.init > self.lam_max:
            raise ValueError(f"init ({self.init}) must not exceed lam_max ({self.lam_max})")
        self.value = self.init

    @classmethod
    def from_config(cls, cfg) -> AdaptiveLambda:
        """From a `LambdaConfig` (the `lambda:` section of a RunConfig)."""
        return cls(init=cfg.init, eta=cfg.eta, epsilon=cfg.epsilon, lam_max=cfg.lam_max, mode=cfg.mode)

    def update(self, dev_gap: float) -> float:
        """Record one evaluation's Δdev and return λ for the next training steps."""
        gap = float(dev_gap)
        if not math.isfinite(gap):
            raise TrainingError(f"dev gap is {gap}; cannot update λ (check the dev losses)")
        if self.mode == "adaptive":
            self.value = min(max(self.value + self.eta * (gap - self.epsilon), 0.0), self.lam_max)
        self.history.append((len(self.history) + 1, gap, self.value))
        return self.value

    def _hparams(self) -> dict:
        return {"mode": self.mode, "init": self.init, "eta": self.eta, "epsilon": self.epsilon,
                "lam_max": self.lam_max}

    def state_dict(self) -> dict:
        """Plain JSON-able dict (hyperparameters, current value, history)."""
        return {**self._hparams(), "value": self.value, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore value and history; refuses a state saved with different hyperparameters."""
        diff = {k: (state.get(k), v) for k, v in self._hparams().items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in diff.items())
            raise ValueError(f"AdaptiveLambda state was saved with other hyperparameters ({detail})")
        self.value = float(state["value"])
        self.history = [(int(i), float(g), float(v)) for i, g, v in state["history"]]
