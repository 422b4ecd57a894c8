"""A refitted or resumed run IS the uninterrupted run: final metrics, every MLflow point, predictions and the
adapter's tensors equal to the last bit (CPU, LoRA dropout on).

Each case is one uninterrupted run (the oracle) and one interrupted run of the same config, stopped right
after a mid-epoch checkpoint: the driver's in-process refit after a worker is killed, or a failed run
continued with `--resume`. The choices that change what a checkpoint must restore are covered pairwise
(data.sampler × feature cache × objective.kind × refit/resume); refits run 2 workers (per-rank RNG).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ermgap.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

# Values that legitimately differ between the two runs (where and how long, not what was learnt).
NOT_COMPARED = {"run_dir", "mlflow_run_id", "tracking_uri", "timing", "feature_cache"}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module's runs (each case reads its own runs by id): a new sqlite store is
    created by running every schema migration, seconds per case that no assertion needs."""
    return f"sqlite:///{tmp_path_factory.mktemp('resume_mlflow')}/mlflow.db"


def _overrides(root: Path, uri: str, manifest: Path, model: Path, sampler: str, cache: str,
               objective: str) -> list[str]:
    return [
        f"data.manifest={manifest}", f"model.name_or_path={model}", "model.dtype=fp32",
        f"tracking.tracking_uri={uri}", f"tracking.storage_path={root}/runs",
        "optim.lr=1e-3", "optim.scheduler=linear", "optim.warmup_ratio=0.3", "optim.epochs=2",
        "optim.effective_batch_size=8", "optim.micro_batch_size=4", "lora.dropout=0.1", "eval.every_steps=2",
        "eval.batch_size=12", "eval.patience=0", f"data.sampler={sampler}", f"data.feature_cache={cache}",
        f"objective.kind={objective}", "lambda.mode=adaptive", "lambda.eta=5", "objective.group_dro.eta=0.5",
        "distributed.cpus_per_worker=1",
    ]


def _history(uri: str, run_id: str) -> dict[str, dict[int, list[float]]]:
    """{metric: {step: [every value logged at that step]}} of an MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_identical(ref: dict, got: dict) -> None:
    """Bit-identical outputs: final metrics, metrics.json, predictions, adapter tensors, every MLflow point."""
    import json

    from safetensors.torch import load_file

    diff = {k: (ref[k], got.get(k)) for k in ref if k not in NOT_COMPARED and not _same(ref[k], got.get(k))}
    assert not diff, f"final metrics differ (reference, resumed): {diff}"
    ref_dir, got_dir = Path(ref["run_dir"]), Path(got["run_dir"])
    mref, mgot = (json.loads((d / "metrics.json").read_text()) for d in (ref_dir, got_dir))
    for key in set(mref) - NOT_COMPARED:
        if key == "history":  # one row per evaluation; each row carries its run's MLflow id
            rows = [[{k: v for k, v in r.items() if k != "mlflow_run_id"} for r in m["history"]] for m in (mref, mgot)]
            assert _same(*rows), "the evaluation history differs"
        else:
            assert _same(mref[key], mgot.get(key)), f"metrics.json {key!r} differs"
    for name in ("dev_preds.csv", "test_preds.csv"):
        assert (ref_dir / name).read_bytes() == (got_dir / name).read_bytes(), name
    wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ref_dir, got_dir))
    assert sorted(wa) == sorted(wb) and wa
    unequal = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not unequal, f"adapter tensors differ: {unequal[:4]} (max |Δ| {max((wa[k] - wb[k]).abs().max().item() for k in unequal)})"
    href, hgot = _history(ref["tracking_uri"], ref["mlflow_run_id"]), _history(got["tracking_uri"], got["mlflow_run_id"])
    keys = {k for k in href if not k.startswith("feature_cache/")}
    assert keys == {k for k in hgot if not k.startswith("feature_cache/")} - {"resumed_at_step"}
    for key in sorted(keys):
        assert sorted(href[key]) == sorted(hgot[key]), f"{key}: logged steps differ"
        for step, values in href[key].items():
            # Every point at a step (a redone step may have been logged by the killed attempt as well).
            assert set(hgot[key][step]) == set(values), f"{key} at step {step}: {hgot[key][step]} vs {values}"


CASES = [  # pairwise over (data.sampler, feature cache, objective.kind, how the run was interrupted)
    ("length", "on", "minmaxgap", "refit"),
    ("length", "off", "group_dro", "resume"),
    ("stratified", "on", "group_dro", "resume"),
    ("stratified", "off", "minmaxgap", "resume"),
    ("stratified", "off", "group_dro", "refit"),
]


@pytest.mark.parametrize(("sampler", "cache", "objective", "interruption"), CASES, ids=["-".join(c) for c in CASES])
def test_a_refitted_or_resumed_run_is_the_uninterrupted_run(sampler, cache, objective, interruption, smallest_manifest,
                                                           tiny_model, tracking_uri, ray_cluster, tmp_path):
    """refit: rank 1 of 2 is killed after step 3 and the driver refits the run from the step-2 checkpoint.
    resume: the only worker is killed after step 5 with no retry allowed, the run fails with `--resume` advice,
    and `run_training(resume_dir=...)` (what `ermgap train --resume` calls) finishes it from the step-4 one."""
    from _faults import KillAfterStep
    from _runs import side_by_side
    from mlflow import MlflowClient

    from ermgap.driver import run_training
    from ermgap.errors import TrainingError

    refit = interruption == "refit"
    cache_value = str(tmp_path / "feature_cache") if cache == "on" else "off"
    overrides = _overrides(tmp_path, tracking_uri, smallest_manifest, tiny_model, sampler, cache_value, objective)
    cfg = load_config(None, overrides + [f"distributed.num_workers={2 if refit else 1}",
                                         f"distributed.max_failures={1 if refit else 0}"])
    run_dir = tmp_path / "runs" / "interrupted"
    seen = Console(file=io.StringIO(), width=200)

    def reference() -> dict:
        return run_training(cfg, run_dir=tmp_path / "runs" / "reference", console=Console(file=io.StringIO()))

    def interrupted() -> dict:
        if refit:
            return run_training(cfg, run_dir=run_dir, console=seen, step_hook=KillAfterStep(3))
        with pytest.raises(TrainingError, match=rf"continue with `ermgap train --resume {run_dir}`"):
            run_training(cfg, run_dir=run_dir, console=seen, step_hook=KillAfterStep(5))
        return run_training(None, resume_dir=run_dir, console=seen)

    # A 1-worker reference trains beside the interrupted run on the session's 2 CPUs (their stores, caches and
    # runs are their own, or shared as a sweep's concurrent trials share them); 2-worker runs one after the other.
    ref, got = (reference(), interrupted()) if refit else side_by_side(reference, interrupted)
    assert ref["step"] == 6 and ref["eval_round"] == 3
    assert (run_dir / ".fault_fired").read_text() == f"killed rank {1 if refit else 0} after step {3 if refit else 5}\n"

    _assert_identical(ref, got)
    # Where the run continued, on the console and in MLflow; the attempt's failure is not the finished run's.
    at = 2 if refit else 4
    assert _history(got["tracking_uri"], got["mlflow_run_id"])["resumed_at_step"] == {at: [float(at)]}
    assert f"resumed at step {at}" in seen.file.getvalue(), seen.file.getvalue()
    run = MlflowClient(got["tracking_uri"]).get_run(got["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "ermgap.error" not in run.data.tags, run.data.tags
