"""What a sweep needs from the cluster, checked before any trial starts."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ermgap.errors import ConfigError
from ermgap.preflight import check_inputs
from ermgap.sweep.spec import TRIAL_DRIVER_CPU, SweepSpec


def check_resources(spec: SweepSpec, available: dict[str, float], where: str) -> None:
    """Raise ConfigError if any single trial needs more CPUs/GPUs than `available` has."""
    for params in spec.example_trials():
        need = spec.trial_resources(params)
        for res in ("CPU", "GPU"):
            if need[res] > available.get(res, 0.0) + 1e-9:
                d = spec.trial_config(params).distributed
                raise ConfigError(
                    f"{spec.source}: a trial needs {need[res]:g} {res} ({d.num_workers} worker(s) × "
                    f"{d.cpus_per_worker if res == 'CPU' else 1:g} {res} + {TRIAL_DRIVER_CPU if res == 'CPU' else 0:g} "
                    f"for the trial driver) but {where} has {available.get(res, 0.0):g}; lower "
                    f"resources.num_workers / resources.cpus_per_worker / resources.gpus_per_worker")
    for res, amount in spec.model.resources.trial_driver.items():
        if amount > available.get(res, 0.0) + 1e-9:
            # Tune would keep every trial PENDING forever.
            raise ConfigError(
                f"{spec.source}: resources.trial_driver asks for {amount:g} {res!r} per trial driver but {where} has "
                f"{available.get(res, 0.0):g}; start the nodes meant for trial drivers with "
                f"`ray start ... --resources '{{\"{res}\": 1}}'`, or drop resources.trial_driver")


def check_trial_inputs(spec: SweepSpec) -> None:
    """Run the training pre-flight checks (manifest and its audio, model config and processor, batch vs
    data size) once per distinct set of inputs among the trials, so a bad path fails the sweep before any
    trial. GPUs are `check_resources`' business (against the cluster once joined)."""
    seen: set[str] = set()
    for params in spec.example_trials():
        cfg = spec.trial_config(params)
        key = repr([cfg.data.model_dump(), cfg.model.name_or_path, cfg.eval.metric,
                    cfg.optim.effective_batch_size, cfg.distributed.use_gpu])
        if key not in seen:
            seen.add(key)
            check_inputs(cfg)


def local_resources() -> dict[str, float]:
    """What a local Ray cluster started here would have."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def resource_plan(spec: SweepSpec, available: dict[str, float] | None = None) -> dict[str, Any]:
    """Trials × workers × CPUs/GPUs and how many run at once (bounded by the cluster if known)."""
    trials = spec.example_trials()
    per = [spec.trial_resources(p) for p in trials]
    cpu = max(r["CPU"] for r in per)
    gpu = max(r["GPU"] for r in per)
    fit = math.inf
    if available:
        fit = math.floor((available.get("CPU", 0) + 1e-9) / cpu) if cpu else math.inf
        if gpu:
            fit = min(fit, math.floor((available.get("GPU", 0) + 1e-9) / gpu))
    limit = spec.model.max_concurrent_trials or math.inf
    concurrent = int(min(len(trials), limit, fit))
    cfg = spec.trial_config(trials[0]).distributed
    return {
        "trials": len(trials), "workers_per_trial": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
        "gpus_per_worker": 1 if cfg.use_gpu else 0, "cpu_per_trial": cpu, "gpu_per_trial": gpu,
        "max_concurrent_trials": spec.model.max_concurrent_trials, "concurrent": concurrent,
        "waves": math.ceil(len(trials) / max(concurrent, 1)),
        "cluster": available or {},
    }
