"""A run's optimiser, learning-rate schedule and DeepSpeed engine (ZeRO stage from the config).

Gradient accumulation is the recipe's, at the LOSS level (ermgap.recipe): DeepSpeed sees one micro-batch of
micro × accum examples per step and gradient_accumulation_steps=1, so it neither rescales the loss by 1/GAS
nor reduces gradients mid-step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import transformers

from ermgap import deepspeed_ops
from ermgap.config import RunConfig

# The transformers schedule behind each `optim.scheduler` (all with linear warm-up).
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def param_groups(model: torch.nn.Module, lr: float, lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """The optimiser's parameter groups: `model`'s trainable parameters at `lr`, except those of a direct
    submodule named in `lr_scales` ({name: multiple}), which get lr × multiple (an adversary's head must keep
    up with the adapter it is trained against). The schedule scales every group alike. Groups in the model's
    parameter order, the default group first; an empty one is left out."""
    scales = dict(lr_scales or {})
    groups: dict[float, list[torch.nn.Parameter]] = {1.0: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(float(scales.get(name.split(".", 1)[0], 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items() if ps]


def build_engine(model: torch.nn.Module, cfg: RunConfig, *, accum: int, total_steps: int,
                 lr_scales: Mapping[str, float] | None = None):
    """AdamW over `model`'s trainable parameters + the LR schedule, inside a DeepSpeed engine; the direct
    submodules named in `lr_scales` train at that multiple of `optim.lr` (`param_groups`).

    Returns (engine, scheduler, seconds deepspeed.initialize took)."""
    # Imported here, not at module top: importing DeepSpeed takes seconds and logs accelerator
    # detection, and the driver (which imports the recipe) never builds an engine.
    import deepspeed

    # A lock left by a killed process would hang deepspeed.initialize forever (see ermgap.deepspeed_ops).
    deepspeed_ops.clear_stale_lock()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.lr, lr_scales), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = transformers.get_scheduler(
        SCHEDULERS[cfg.optim.scheduler], optimizer,
        num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps),
        num_training_steps=max(1, total_steps))  # a zero-shot run (epochs 0) takes no step
    ds_config = {
        # Accumulation is the recipe's (module docstring): DeepSpeed sees one micro-batch per step.
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size * accum,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.optim.effective_batch_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    t0 = time.perf_counter()
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler, time.perf_counter() - t0


__all__ = ["SCHEDULERS", "build_engine", "param_groups"]
