"""Adversarial debiasing: an attribute classifier behind a gradient-reversal layer (Ganin & Lempitsky 2015; for
speech emotion recognition against gender, Gorrostieta et al., Interspeech 2019).

A small head reads one vector per utterance from the language model (`objective.adversarial.pool`: the mean
hidden state over the audio positions, or the state that predicts the answer; `layer`: which hidden layer)
and predicts the protected attribute. Between the features and the head sits a gradient-reversal layer:
identity forward, −α × the gradient backward. So one loss

    L = erm + Σ_i w_(a_i) CE(head(GRL_α(h_i)), a_i) / Σ_i w_(a_i)     (both over the GLOBAL batch)

with w_a = 1 / (A × value a's train share) (`balanced`, the default; all 1 otherwise): with a plain mean the
head's CE is lowest for the majority value's prior, and on an imbalanced train split that is all it learns.

trains the head to predict the attribute (its own parameters see the ordinary gradient) while the adapter
(everything upstream of h) receives −α times that gradient: it learns features from which the attribute is
hard to predict. The head's per-sample CE is summed per cell in the SAME all-reduce as the task losses
(`cells.reduced_cell_sums`), so the head's loss is the global batch's mean and 2 workers train what 1 does.
The head is the objective's `module()`: the recipe attaches it to the model before DeepSpeed is built, so
the run's optimiser trains it, checkpoints hold it and the best adapter is saved with it
(`objective_module.safetensors` beside the peft adapter; inference never loads it).

What the head can read decides what the reversal can remove: a head that reads no gender gives the adapter
nothing to push against. Two keys help it read: `input_norm: batch` standardises each feature by the global
batch's mean and variance (an LM's hidden states carry large per-feature offsets that a small head's plain
gradient steps barely see past; BatchNorm1d without its affine part, the discriminator's input layer in the
domain-adversarial literature), and `head_lr_scale` trains the head faster than the adapter (its own
parameter group). The batch statistics are all-reduced (one more collective of 2H + 1 sums) and enter as
constants, so the gradient stays every rank's exact share of one process's; the running averages at
evaluation are buffers of the head, updated in `after_step`, in checkpoints and in the saved head.

α (`strength`) may ramp up linearly over `warmup_steps` optimizer steps (the adversary first learns what
leaks, then the reversal acts). Logged: α, the head's train loss and accuracy per step, and the attribute
accuracy of the head on dev (and on test at the end) as `<split>_attr_acc`: the leakage a reader wants to see
(chance is the majority attribute value's share).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ermgap.lazy import LazyModule
from ermgap.objectives.base import Objective, ObjectiveOutput
from ermgap.objectives.cells import CellGrid, all_reduce_sum, cell_stats, check_inputs, erm_mean, reduced_cell_sums
from ermgap.settings import Section, Setting

if TYPE_CHECKING:
    from ermgap.objectives.adversarial_head import AttributeHead

# Imported by the first method that uses them (ermgap.lazy): `ermgap.config` imports this module.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

__all__ = ["AdversarialConfig", "AdversarialERM"]


class AdversarialConfig(Section):
    strength: float = Field(1.0, ge=0, le=100, description="Reversal strength α: the adapter receives −α × the attribute head's gradient (0: the head only watches).")
    warmup_steps: int = Field(0, ge=0, description="α rises linearly from α/N at step 1 to α at step N (0: α from the first step).")
    head_size: int = Field(64, ge=0, description="Hidden units of the attribute head (one ReLU layer; 0: a linear head).")
    layer: int = Field(-1, ge=-1, description="Hidden layer the head reads: -1 the last (after the final norm, what the LM head reads); k ≥ 0 the model's hidden_states[k] (0: the embeddings, k: decoder layer k's output).")
    pool: Literal["audio", "answer"] = Field(
        "audio", description="audio: the mean hidden state over the utterance's audio positions; answer: the hidden state at the position that predicts the answer.")
    input_norm: Literal["none", "batch"] = Field(
        "batch", description="batch: standardise every feature the head reads by the global batch's mean and std (constants to the gradient; running averages at evaluation), BatchNorm without its affine part, synchronised over the workers; none: the raw hidden states.")
    head_lr_scale: float = Field(
        10.0, gt=0, le=1000, description="The head's learning rate as a multiple of optim.lr (its own parameter group; the adversary must keep up with the adapter it is trained against).")
    balanced: bool = Field(True, description="Weigh the head's CE so every attribute value counts alike (weight 1/(A × its train share), scikit-learn's class_weight='balanced'); false: a plain mean, which a head can minimise by predicting the majority value.")


class AdversarialERM(Objective):
    kind = "adversarial"
    label = "Adversarial"
    summary = "erm + an attribute head's CE behind a gradient-reversal layer (`objective.adversarial`)"
    settings = (Setting("objective.adversarial", AdversarialConfig),)
    eval_metrics = ("attr_acc",)

    def __init__(self, grid: CellGrid, settings: AdversarialConfig, *, seed: int = 0) -> None:
        super().__init__(grid)
        self.settings, self.seed = settings, int(seed)
        self.hidden_layer = settings.layer
        self.module_lr_scale = settings.head_lr_scale
        self.forward_inputs = ("audio_hidden",) if settings.pool == "audio" else ("answer_hidden",)
        # [A] the head's CE weight per attribute value: 1 / (A × its train share) when balanced (0 for a value the
        # train split lacks), else 1
        per_value = grid.train_counts.sum(0)
        share = per_value / per_value.sum()
        self.attr_weights = (torch.where(share > 0, 1 / (len(share) * share.clamp_min(1e-12)), torch.zeros_like(share))
                             if settings.balanced else torch.ones_like(share))
        self.head: AttributeHead | None = None
        self.steps = 0
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, grid: CellGrid) -> AdversarialERM:
        return cls(grid, cfg.objective.adversarial, seed=cfg.optim.seed)

    @classmethod
    def describe(cls, params: Mapping[str, Any]) -> str:
        alpha = params.get("objective.adversarial.strength")
        return f"{cls.label} (α={float(alpha):g})" if alpha is not None else cls.label

    @classmethod
    def live_values(cls, reported: Mapping[str, Any]) -> dict[str, float]:
        """The head's attribute accuracy on the last training batch (how much it still reads off)."""
        acc = reported.get("adversary_acc")
        return {"adv acc": acc} if acc is not None else {}

    def module(self, hidden_size: int) -> torch.nn.Module:
        from ermgap.objectives.adversarial_head import AttributeHead

        # Its own seeded generator: the same head on every rank and for any worker count, whatever the data
        # set-up drew from the global RNG before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = AttributeHead(hidden_size, self.grid.num_attrs, self.settings.head_size,
                                      standardize=self.settings.input_norm == "batch")
        return self.head

    def alpha(self) -> float:
        """α of the next optimizer step (step number self.steps + 1)."""
        s = self.settings
        if not s.warmup_steps:
            return s.strength
        return s.strength * min(1.0, (self.steps + 1) / s.warmup_steps)

    def _logits(self, inputs: Mapping[str, torch.Tensor], alpha: float, stats=None) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("the adversarial objective's head does not exist yet: call module(hidden_size) first")
        from ermgap.objectives.adversarial_head import grad_reverse

        return self.head(grad_reverse(inputs[self.forward_inputs[0]], alpha), stats)

    def _batch_stats(self, h: torch.Tensor, process_group) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The global batch's per-feature mean and (biased) variance and its size, detached: constants to the
        gradient, so every rank's gradient is exactly its share of one process's (float64 sums, one all-reduce)."""
        x = h.detach().to(torch.float64)
        sums = all_reduce_sum(torch.cat([x.sum(0), x.square().sum(0), x.new_tensor([len(x)])]), process_group)
        width = x.shape[1]
        n = float(sums[-1])
        mean = sums[:width] / max(n, 1.0)
        return mean, (sums[width:2 * width] / max(n, 1.0) - mean.square()).clamp_min(0), n

    def __call__(self, losses, stratum, attribute, *, inputs=None, process_group=None) -> ObjectiveOutput:
        g = self.grid
        check_inputs(losses, stratum, attribute, g.num_strata, g.num_attrs)
        if not inputs or self.forward_inputs[0] not in inputs:
            raise ValueError(f"the adversarial objective needs inputs[{self.forward_inputs[0]!r}] from the forward pass")
        alpha = self.alpha()
        batch = (self._batch_stats(inputs[self.forward_inputs[0]], process_group)
                 if self.settings.input_norm == "batch" else None)  # (mean, var, n)
        logits = self._logits(inputs, alpha, batch[:2] if batch else None)
        target = attribute.to(logits.device).long()
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target, reduction="none")
        hits = (logits.detach().argmax(-1) == target).to(ce.dtype)
        (sums, head_sums, hit_sums), counts = reduced_cell_sums(
            [losses, ce.to(losses.device), hits.to(losses.device)], stratum, attribute, num_strata=g.num_strata,
            num_attrs=g.num_attrs, reduce=lambda t: all_reduce_sum(t, process_group))
        out = self.from_cells(sums, counts, head_sums=head_sums, hit_sums=hit_sums, alpha=alpha)
        if batch is not None:  # committed in after_step, as every kind's state
            out.pending = {**out.pending, "_batch_stats": batch}
        return out

    def from_cells(self, sums, counts, *, head_sums=None, hit_sums=None, alpha: float | None = None) -> ObjectiveOutput:
        """erm + the head's mean CE from GLOBAL cell sums of the task losses, of the head's CE and of its hits."""
        if head_sums is None or hit_sums is None:
            raise ValueError("the adversarial objective needs the head's cell sums (call the objective with inputs)")
        n = counts.sum()
        # A weighted mean as F.cross_entropy(weight=w) takes it (balanced: the majority value's prior no longer wins)
        w = self.attr_weights.to(head_sums)
        adv = (head_sums.sum(0) * w).sum() / (counts.sum(0).to(head_sums) * w).sum()
        total = erm_mean(sums, counts, self.grid.erm_weights) + adv
        logs = {"adversary_strength": self.alpha() if alpha is None else alpha,
                "adversary_loss": float(adv.detach()), "adversary_acc": float(hit_sums.detach().sum() / n)}
        return ObjectiveOutput(total=total, stats=cell_stats(sums, counts, self.grid.erm_weights), logs=logs,
                               pending=logs)

    def after_step(self, out: ObjectiveOutput) -> None:
        self.steps += 1
        pending = dict(out.pending)
        if (stats := pending.pop("_batch_stats", None)) is not None:
            self.head.update_running(*stats)
        self.last = pending

    def evaluation_sums(self, inputs, stratum, attribute) -> dict[str, tuple[float, float]]:
        logits = self._logits(inputs, 0.0)
        hits = logits.argmax(-1) == attribute.to(logits.device)
        return {"attr_acc": (float(hits.sum()), float(hits.numel()))}

    def log_values(self) -> dict[str, float]:
        """The last step's α, head loss and head accuracy (before any step: the first step's α)."""
        return {"adversary_strength": self.alpha(), **self.last}

    def hparams(self) -> dict:
        return self.settings.model_dump()

    def _state(self) -> dict:
        return {"steps": self.steps, "last": dict(self.last)}

    def _load(self, state: dict) -> None:
        self.steps, self.last = int(state["steps"]), {k: float(v) for k, v in state.get("last", {}).items()}
