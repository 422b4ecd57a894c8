"""Training runs for the end-to-end tests: the shared schedule, a finished run as tests see it, and the
oracles that compare two runs (per-step losses, λ trajectory, final metrics, best adapter).

The schedule (`train_overrides`) is the 12-step one every end-to-end training test builds on: the small corpus
slice (8 train / 4 dev / 4 test rows per language × gender: 48 / 24 / 24 utterances), 2 epochs of 6 optimizer
steps of 8 utterances, evaluation every 3 steps, adaptive λ with a large η (so λ moves), 2 workers with DeepSpeed
ZeRO-2. LoRA dropout is 0: dropout masks are drawn per rank, so runs on different worker counts would
(legitimately) see different masks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch


def small_slice(synth_corpus: Path, out: Path, *, train: int = 8, held_out: int = 4) -> Path:
    """The first `train` train rows and `held_out` dev / test rows of each (language, gender) of the synthetic
    corpus, audio paths made absolute; written to `out` (a manifest path)."""
    df = pd.read_csv(synth_corpus, dtype=str, keep_default_na=False)
    df["audio"] = [str(Path(synth_corpus).parent / a) for a in df["audio"]]
    parts = [g.head(train if split == "train" else held_out)
             for (split, _, _), g in df.groupby(["split", "language", "gender"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(parts).to_csv(out, index=False)
    return out


def train_overrides(manifest: Path, model: Path, root: Path) -> list[str]:
    """The 12-step schedule (module docstring) with its tracking store and run storage under `root`.
    `tracking.tracking_uri` is always the 4th entry (tests read it back from there)."""
    return [
        f"data.manifest={manifest}", f"model.name_or_path={model}", "model.dtype=fp32",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.storage_path={root}/runs",
        "optim.lr=5e-4", "optim.scheduler=constant", "optim.epochs=2", "optim.effective_batch_size=8",
        "optim.micro_batch_size=4", "lora.dropout=0", "eval.every_steps=3", "eval.batch_size=12",
        "eval.patience=0", "lambda.mode=adaptive", "lambda.eta=20", "objective.p=2",
        "distributed.num_workers=2", "distributed.cpus_per_worker=1", "distributed.zero_stage=2",
    ]


def side_by_side(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """(first(), second()) with `first` run in a thread while `second` runs here: two runs of 1 worker each on the
    session's 2-CPU cluster, where one run alone leaves a CPU idle through most of its start-up (actors started
    one after another, each importing Ray Train). Returns once both have ended; an error of either is raised."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(first)
        second_result = second()
        return pending.result(), second_result


@dataclass(frozen=True)
class FinishedRun:
    """A run as a test reads it: `final` is what `run_training` returns (metrics.json + run_dir + tracking_uri),
    `output` what `ermgap train` printed (stdout and stderr, a pipe), `overrides` its command line."""

    final: dict
    output: str
    overrides: list[str]
    root: Path

    @property
    def run_dir(self) -> Path:
        return Path(self.final["run_dir"])


def finished_run(run_dir: Path, tracking_uri: str, output: str, overrides: list[str], root: Path) -> FinishedRun:
    final = json.loads((run_dir / "metrics.json").read_text())
    return FinishedRun({**final, "run_dir": str(run_dir), "tracking_uri": tracking_uri}, output, overrides, root)


def history(final: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) of every MLflow point of a metric of the run `final` describes."""
    from mlflow import MlflowClient

    client = MlflowClient(final["tracking_uri"])
    return [(m.step, m.value) for m in client.get_metric_history(final["mlflow_run_id"], key)]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: dict, b: dict, *, tol: float = 1e-5) -> None:
    """Same per-step training losses, λ trajectory, dev/test metrics and best adapter (12-step schedule)."""
    la, lb = dict(history(a, "train/loss")), dict(history(b, "train/loss"))
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=tol, rel=tol), f"train loss differs at step {step}"
    assert len(a["lambda_history"]) == len(b["lambda_history"]) == 4
    for (ia, ga, va), (ib, gb, vb) in zip(a["lambda_history"], b["lambda_history"]):
        assert ia == ib and ga == pytest.approx(gb, abs=tol) and va == pytest.approx(vb, abs=1e-4)
    assert_same_outputs(a, b)


def assert_same_outputs(a: dict, b: dict) -> None:
    """Same final dev/test losses, loss gaps and W-F1, and the same best adapter."""
    for key in ("dev_loss", "dev_loss_gap", "test_loss", "test_loss_gap", "dev_w_f1", "test_w_f1"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    wa, wb = adapter(Path(a["run_dir"])), adapter(Path(b["run_dir"]))
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
