"""ERM-MinMaxGAP, the paper's objective (section 2): the ERM term plus λ times the worst within-stratum gap.

    L = erm + λ · Δmax^p,   erm = mean per-sample loss over the GLOBAL batch (per-cell weighted with
                                   stratified batches: `cells.erm_mean`),
    Δmax = max over valid strata s of (max_a mean_{s,a} − min_a mean_{s,a})       (`cells.cell_terms`)

λ (`AdaptiveLambda`, paper 2.3) is this kind's state: after each dev evaluation
λ ← clip(λ + η(Δdev − ε), 0, λmax), Δdev chosen by `lambda.dev_gap` (`MinMaxGAP.on_evaluation`). Its settings
are the `lambda.*` keys (`LambdaConfig`) and `objective.p`.

Where the batch lives. The estimate covers exactly the examples whose losses are passed in, summed
over all ranks of `process_group`. With gradient accumulation, the paper's reference is the
mini-batch estimate over the *effective* batch (all micro-batches of one optimizer step on all ranks).
Two exact ways to get it:
  1. keep every micro-batch's loss graph alive, `torch.cat` the losses (and metadata) and call
     `erm_minmaxgap_loss` once per optimizer step, then backward once (memory of the whole local batch);
  2. two passes: `sample_weights` on the detached losses of all micro-batches (forward under no_grad),
     then per micro-batch backward of `(weights_m * losses_m).sum()` (memory of one micro-batch; exact if
     the second forward reproduces the first, i.e. same dropout RNG or dropout off).
The recipe does 1. Calling the objective per micro-batch is *not* the effective-batch estimate (the max
of per-micro-batch gaps differs from the gap of the union) — avoid it when exactness matters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from ermgap.errors import ErmgapWarning, TrainingError
from ermgap.lazy import LazyModule
from ermgap.objectives.base import Objective, ObjectiveOutput, Table3Row
from ermgap.objectives.cells import CellGrid, CellStats, all_reduce_sum, cell_terms, check_inputs, reduced_cell_stats
from ermgap.settings import Section, Setting

torch = LazyModule("torch")  # imported by the first function that uses it (ermgap.lazy)

__all__ = ["AdaptiveLambda", "LambdaConfig", "MinMaxGAP", "ObjectiveResult", "avg_metric_gap", "erm_minmaxgap_loss",
           "lambda_drive", "minmaxgap_from_cells", "sample_weights"]

# Table 3's sections this kind defines (the paper's ablations), and its penalty power.
LAMBDA_EFFECT, PENALTY_EFFECT = "Lambda effect", "Penalty power effect"
PAPER_P = 2.0  # the paper's penalty power: the adaptive run it calls "Ours"


class LambdaConfig(Section):
    mode: Literal["adaptive", "fixed"] = Field("adaptive", description="(objective.kind=minmaxgap) adaptive: Lagrangian update after each dev evaluation; fixed: λ stays at init.")
    init: float = Field(0.0, ge=0, le=1000, description="λ0 (at most 1000, like λmax).")
    eta: float = Field(0.5, ge=0, le=100, description="Update rate η: each dev evaluation moves λ by η·(Δdev − ε) (at most 100).")
    epsilon: float = Field(
        0.02, ge=0, description="Target tolerance ε for Δdev, in Δdev's units (see lambda.dev_gap). With loss_gap "
                                "the per-utterance loss averages the terminator's near-zero loss with the label's: "
                                "for a one-token answer Δdev is about half the label-token loss gap, so ε = 0.02 "
                                "allows ≈ 0.04 nats on the label token alone.")
    lam_max: float = Field(10.0, ge=0, le=1000, description="Upper clip λmax (at most 1000: the gap term would swamp the task loss).")
    dev_gap: Literal["loss_gap", "avg_metric_gap"] = Field(
        "loss_gap", description="Which dev gap Δdev drives the update. loss_gap: the largest within-stratum "
                                "(objective.stratum) F/M gap of the mean per-utterance answer loss (nats of cross-entropy averaged "
                                "over the answer's tokens and terminator, see prompt.verbalizers). avg_metric_gap: "
                                "the AVG metric gap as a fraction (2 points = 0.02).")

    @model_validator(mode="after")
    def _init_le_max(self) -> LambdaConfig:
        if self.mode == "adaptive" and self.init > self.lam_max:
            raise ValueError(f"init ({self.init}) must not exceed lam_max ({self.lam_max})")
        return self


# --------------------------------------------------------------------------- the loss


@dataclass
class ObjectiveResult(CellStats):
    """What `erm_minmaxgap_loss` returns: the global batch's `CellStats` plus

    total          0-d tensor to backward: erm + lam · gap^p (scaled for data-parallel averaging)
    lam, p         the λ and p it was computed with
    """

    total: torch.Tensor
    lam: float
    p: float

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
    `cells.all_reduce_sum`). λ and p must be the same on all ranks.

    A rank with no examples passes empty tensors; its `losses` should still come from the model (e.g. the
    per-sample loss of an empty batch) so that `total.backward()` reaches the parameters with zero
    gradients, as data-parallel engines expect every rank to backward. The default `process_group=None`
    is the world group, which is the data-parallel group for DDP and for DeepSpeed without model parallelism.

    Raises TrainingError when any loss (on any rank) is NaN/inf, naming how many — on every rank, so
    none is left waiting in a collective; ValueError for shape/dtype/index mistakes or an empty global batch.
    """
    lam, p = _check_lam_p(lam, p)
    check_inputs(losses, stratum, attribute, num_strata, num_attrs)
    sums, counts = reduced_cell_stats(losses, stratum, attribute, num_strata=num_strata, num_attrs=num_attrs,
                                      reduce=lambda t: all_reduce_sum(t, process_group))
    return minmaxgap_from_cells(sums, counts, lam=lam, p=p)


def _check_lam_p(lam, p) -> tuple[float, float]:
    lam, p = float(lam), float(p)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p}")
    return lam, p


def minmaxgap_from_cells(sums: torch.Tensor, counts: torch.Tensor, *, lam: float, p: float,
                         erm_weights: torch.Tensor | None = None) -> ObjectiveResult:
    """ERM-MinMaxGAP from global cell sums/counts [num_strata, num_attrs] (see `cells.reduced_cell_stats`).
    erm_weights: per-cell weights of the ERM term (`cells.erm_mean`); the gap term uses cell means, which no
    per-cell weight changes."""
    erm, delta, stats = cell_terms(sums, counts, erm_weights)
    # Δ^p has an infinite slope at 0 for p < 1 and autograd would give 0·inf = NaN; at Δ = 0 use the
    # subgradient 0 (also what |x| gives at 0 for p = 1). With no valid stratum Δmax = 0: the term is 0.
    positive = delta > 0
    safe_delta = torch.where(positive, delta, torch.ones_like(delta))
    reg = torch.where(positive, safe_delta ** p, torch.zeros_like(delta))
    total = erm + lam * reg
    return ObjectiveResult(**vars(stats), total=total, lam=lam, p=p)


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


# --------------------------------------------------------------------------- Δdev and λ


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
    """Δdev of one dev evaluation as `lambda.dev_gap` = `kind` defines it: "loss_gap" (the dev split's
    `loss_gap` metric, `cells.loss_gap`) or "avg_metric_gap" (`avg_metric_gap` of the AVG gap in percent,
    range-checked).

    None when it is undefined (NaN: e.g. no dev stratum has every attribute value, so there is no AVG gap):
    the caller skips that evaluation's λ update. Treating it as 0 would lower λ by η·ε with no evidence.
    """
    if kind == "loss_gap":  # ±inf is not "undefined": AdaptiveLambda.update refuses it
        return None if math.isnan(float(loss_gap)) else float(loss_gap)
    if kind == "avg_metric_gap":
        return None if math.isnan(float(avg_gap_percent)) else avg_metric_gap(avg_gap_percent)
    raise ValueError(f"lambda.dev_gap must be 'loss_gap' or 'avg_metric_gap', got {kind!r}")


class AdaptiveLambda:
    """The fairness weight λ (paper 2.3): after each dev evaluation k,

        λ ← clip(λ + η · (Δdev − ε), 0, λmax)       (mode="adaptive")

    mode="fixed" keeps λ = init forever (the λ ∈ {0, 1, 5, 10} ablations; ERM is fixed with init 0).
    Its settings are a `LambdaConfig` (validated there, once): `AdaptiveLambda(cfg.lam)`, or keyword values
    of its fields. `history` is a list of (eval_index, dev_gap, λ_after), eval_index = 1, 2, ...;
    `state_dict()` / `load_state_dict()` restore value and history so a resumed run continues the same
    trajectory.
    """

    def __init__(self, settings: LambdaConfig | None = None, **fields: Any) -> None:
        self.settings = settings if settings is not None else LambdaConfig(**fields)
        self.value = float(self.settings.init)
        self.history: list[tuple[int, float, float]] = []

    @classmethod
    def from_config(cls, settings: LambdaConfig) -> AdaptiveLambda:
        """From the `lambda:` section of a RunConfig (`cfg.lam`)."""
        return cls(settings)

    def __getattr__(self, name: str) -> Any:  # mode, init, eta, epsilon, lam_max: the settings' values
        if name in LambdaConfig.model_fields:
            return getattr(self.settings, name)
        raise AttributeError(name)

    def update(self, dev_gap: float) -> float:
        """Record one evaluation's Δdev and return λ for the next training steps."""
        gap, s = float(dev_gap), self.settings
        if not math.isfinite(gap):
            raise TrainingError(f"dev gap is {gap}; cannot update λ (check the dev losses)")
        if s.mode == "adaptive":
            self.value = min(max(self.value + s.eta * (gap - s.epsilon), 0.0), s.lam_max)
        self.history.append((len(self.history) + 1, gap, self.value))
        return self.value

    def _hparams(self) -> dict:
        s = self.settings
        return {"mode": s.mode, "init": s.init, "eta": s.eta, "epsilon": s.epsilon, "lam_max": s.lam_max}

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


# --------------------------------------------------------------------------- the kind


class MinMaxGAP(Objective):
    """`erm_minmaxgap_loss` with λ from `AdaptiveLambda` — the same function chain, so the same numbers as
    calling them directly."""

    kind = "minmaxgap"
    label = "ERM-MinMaxGAP"
    summary = "the paper's erm + λ·Δmax^p (uses `p` and the `lambda` block)"
    settings = (
        Setting("objective.p", (float, Field(2.0, gt=0, description="minmaxgap: exponent of the worst-language gap (paper: 1 or 2)."))),
        Setting("lambda", LambdaConfig, attr="lam"),
    )
    table3_sections = (LAMBDA_EFFECT, PENALTY_EFFECT)
    trajectory = "lambda"

    def __init__(self, grid: CellGrid, *, p: float, lam: AdaptiveLambda) -> None:
        super().__init__(grid)
        if not float(p) > 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        self.p, self.lam = float(p), lam

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> MinMaxGAP:
        return cls(grid, p=cfg.objective.p, lam=AdaptiveLambda(cfg.lam))

    @classmethod
    def describe(cls, params: Mapping[str, Any]) -> str:
        mode, init, p = params.get("lambda.mode"), params.get("lambda.init"), params.get("objective.p")
        if mode == "fixed":
            if init is None:
                return "fixed λ"
            return "ERM (SFT)" if float(init) == 0 else f"λ = {float(init):g}"  # the paper's Table 3 rows
        if mode == "adaptive":
            return f"{cls.label} (p={float(p):g})" if p else cls.label
        return "run"

    @classmethod
    def live_values(cls, reported: Mapping[str, Any]) -> dict[str, float]:
        return {"λ": reported["lambda"]} if reported.get("lambda") is not None else {}

    @classmethod
    def table3_rows(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[Table3Row]:
        """Lambda effect: "λ = 0 (SFT)" (ERM, also `objective.kind=erm`: λ fixed at 0 is ERM), "λ = 1", …,
        "λ = adaptive (Ours)"; Penalty power effect: "p = 1", "p = 2 (Ours)"; Main components: a fixed
        λ = 0 run as "+ ERM (SFT)", and "ERM-MinMaxGAP (Ours)" (adaptive λ with p = 2, else the only
        adaptive run)."""
        from ermgap.objectives import TABLE3_MAIN, objective_kind  # the registry imports this module

        adaptive = {n: float(p.get("objective.p", PAPER_P)) for n, p in runs.items()
                    if objective_kind(p) == cls.kind and p.get("lambda.mode") == "adaptive"}
        ours = next((n for n, p in adaptive.items() if p == PAPER_P), next(iter(adaptive), None))
        rows = []
        for name, params in runs.items():
            kind = objective_kind(params)
            fixed = kind == cls.kind and params.get("lambda.mode") == "fixed"
            lam = float(params.get("lambda.init", 0.0)) if fixed else None
            if kind == "erm" or lam == 0.0:
                if kind == cls.kind:
                    rows.append(Table3Row(name, TABLE3_MAIN, "+ ERM (SFT)"))
                rows.append(Table3Row(name, LAMBDA_EFFECT, "λ = 0 (SFT)", 0.0))
            elif lam is not None:
                rows.append(Table3Row(name, LAMBDA_EFFECT, f"λ = {lam:g}", lam))
            elif name in adaptive:
                if name == ours:
                    rows.append(Table3Row(name, TABLE3_MAIN, f"{cls.label} (Ours)", 1.0))
                    rows.append(Table3Row(name, LAMBDA_EFFECT, "λ = adaptive (Ours)", float("inf")))
                rows.append(Table3Row(name, PENALTY_EFFECT, f"p = {adaptive[name]:g}" + (" (Ours)" if name == ours
                                                                                           else ""), adaptive[name]))
        return rows

    def from_cells(self, sums, counts) -> ObjectiveOutput:
        res = minmaxgap_from_cells(sums, counts, lam=self.lam.value, p=self.p, erm_weights=self.grid.erm_weights)
        return ObjectiveOutput(total=res.total, stats=res, logs={"lambda": self.lam.value})

    def on_evaluation(self, metrics: Mapping[str, float], *, eval_round: int) -> None:
        """λ ← clip(λ + η(Δdev − ε), 0, λmax) on this evaluation's Δdev (`lambda.dev_gap`); an undefined Δdev
        skips the update with a warning."""
        kind = self.lam.settings.dev_gap
        drive = lambda_drive(kind, loss_gap=metrics["dev_loss_gap"], avg_gap_percent=metrics["dev_avg_gap"])
        if drive is None:
            warnings.warn(f"evaluation {eval_round}: the dev gap lambda.dev_gap={kind} is undefined (NaN); "
                          f"the objective's update (λ) is skipped this evaluation", ErmgapWarning, stacklevel=2)
            return
        self.after_eval(drive)

    def after_eval(self, dev_gap: float) -> None:
        """λ's update on one evaluation's Δdev."""
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
