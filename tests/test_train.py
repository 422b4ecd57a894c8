"""Training recipe pieces that need no Ray cluster: the batch plan, eval sharding, checkpoint RNG state,
and config/input errors that must be raised before any Ray worker starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from ermgap.config import load_config
from ermgap.errors import ConfigError
from ermgap.sampler import GlobalBatchPlan, shard_for_eval

LENGTHS = np.random.default_rng(0).integers(8_000, 80_000, size=203).tolist()


@pytest.mark.parametrize("epoch", [0, 3])
def test_global_batches_are_the_same_for_any_number_of_workers(epoch):
    plans = [GlobalBatchPlan(LENGTHS, effective_batch=16, num_workers=w, accum=a, seed=7)
             for w, a in ((1, 4), (2, 2), (4, 1), (1, 1))]
    reference = [sorted(b.tolist()) for b in plans[0].global_batches(epoch)]
    assert len(reference) == len(LENGTHS) // 16
    for plan in plans:
        # What all workers see in one step, put together, is exactly the global batch.
        per_step: list[list[int]] = [[] for _ in reference]
        for rank in range(plan.num_workers):
            for step, micro in enumerate(plan.worker_micro_batches(epoch, rank)):
                assert len(micro) == plan.accum and all(len(m) == plan.micro for m in micro)
                per_step[step] += [i for m in micro for i in m]
        assert [sorted(s) for s in per_step] == reference


def test_epoch_plan_covers_rows_once_and_reshuffles():
    plan = GlobalBatchPlan(LENGTHS, effective_batch=16, num_workers=2, accum=1, seed=7)
    e0 = np.concatenate(plan.global_batches(0))
    e1 = np.concatenate(plan.global_batches(1))
    assert len(set(e0.tolist())) == len(e0) == 16 * (len(LENGTHS) // 16)
    assert e0.tolist() != e1.tolist()
    again = GlobalBatchPlan(LENGTHS, effective_batch=16, num_workers=2, accum=1, seed=7)
    assert [b.tolist() for b in again.global_batches(0)] == [b.tolist() for b in plan.global_batches(0)]
    # Resuming at step k gives the tail of the same epoch.
    assert plan.worker_micro_batches(0, 1, start_step=5) == plan.worker_micro_batches(0, 1)[5:]


def test_length_grouping_cuts_padding():
    def padding(plan: GlobalBatchPlan) -> int:
        total = 0
        for rank in range(plan.num_workers):
            for step in plan.worker_micro_batches(0, rank):
                for micro in step:
                    lens = [LENGTHS[i] for i in micro]
                    total += max(lens) * len(lens) - sum(lens)
        return total

    # Oracle: the same plan without grouping (window = one batch, so no sorting across batches).
    ungrouped = GlobalBatchPlan(LENGTHS, effective_batch=16, num_workers=2, accum=2, seed=7, group_factor=1)
    grouped = GlobalBatchPlan(LENGTHS, effective_batch=16, num_workers=2, accum=2, seed=7, group_factor=8)
    assert padding(grouped) < 0.6 * padding(ungrouped)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_eval_shards_cover_every_row_once_with_equal_batch_counts(workers):
    lengths = LENGTHS[:31]
    shards = [shard_for_eval(lengths, rank=r, num_workers=workers, batch_size=4) for r in range(workers)]
    kept = sorted(i for shard in shards for batch in shard for i, keep in batch if keep)
    assert kept == list(range(len(lengths)))
    assert len({len(s) for s in shards}) == 1
    assert len({tuple(len(b) for b in s) for s in shards}) == 1


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    from ermgap.checkpointing import rng_state, set_rng_state

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# ----------------------------------------------------------------------------- errors before Ray starts


def _ray_up() -> bool:
    return ray.is_initialized()


def test_missing_manifest_is_caught_before_ray(tmp_path):
    from ermgap.driver import run_training

    cfg = load_config(None, [f"data.manifest={tmp_path}/nope.csv", f"tracking.storage_path={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="data.manifest"):
        run_training(cfg, run_dir=tmp_path / "run")
    assert not _ray_up()


def test_input_errors_are_caught_before_ray(tmp_path, synth_corpus, tiny_model):
    from ermgap.driver import run_training

    good = [f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}",
            f"tracking.storage_path={tmp_path}/runs", "optim.effective_batch_size=8", "optim.micro_batch_size=4"]
    cases = [
        (["model.name_or_path=" + str(tmp_path / "no_model")], "model.name_or_path"),
        (["eval.metric=f1_macro"], "eval.metric"),
        (["optim.effective_batch_size=4096", "optim.micro_batch_size=2048", "distributed.num_workers=2"],
         "effective_batch_size"),
        (["data.languages=[deu, fra]"], "data.languages"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key):  # some (eval.metric) are refused already at load
            run_training(load_config(None, good + overrides), run_dir=tmp_path / "run")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="--force"):
        run_training(load_config(None, good), run_dir=existing)
    with pytest.raises(ConfigError, match="not a run directory"):
        run_training(None, resume_dir=tmp_path / "missing")
    assert not _ray_up()


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1e-4\n")
    proc = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "train", str(cfg), "optim.lrr=0.1"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- issue 20: nothing lost


def _finished_run(folder: Path) -> dict[str, bytes]:
    """A run directory as a finished run leaves it (ermgap's marker, metrics, adapter); returns its files."""
    from ermgap.io import claim_dir

    claim_dir(folder, "run")
    (folder / "config.yaml").write_text("{}\n")
    (folder / "metrics.json").write_text('{"test_w_f1": 0.5}\n')
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_validates_before_replacing_and_only_replaces_ermgap_runs(tmp_path, synth_corpus, tiny_model):
    from ermgap.driver import run_training

    good = [f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}",
            f"tracking.storage_path={tmp_path}/runs", "optim.effective_batch_size=8", "optim.micro_batch_size=4"]
    run = tmp_path / "runs" / "myrun"
    before = _finished_run(run)
    with pytest.raises(ConfigError, match="data.manifest"):
        run_training(load_config(None, good + [f"data.manifest={tmp_path}/missing.csv"]), run_dir=run, force=True)
    assert _snapshot(run) == before  # the finished run is untouched
    folder = tmp_path / "my_thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    with pytest.raises(ConfigError, match=r"my_thesis is not a training run ermgap created .*--force only"):
        run_training(load_config(None, good), run_dir=folder, force=True)
    assert (folder / "chapter1.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing set aside
    assert not _ray_up()


def test_pre_flight_catches_worker_side_input_errors(tmp_path, synth_corpus, tiny_model, monkeypatch):
    """Errors that used to surface only inside Ray workers (after retries) are found before Ray starts."""
    import shutil

    from ermgap.driver import run_training
    from ermgap.errors import ManifestError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    good = [f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}",
            f"tracking.storage_path={tmp_path}/runs", "optim.effective_batch_size=8", "optim.micro_batch_size=4"]
    with pytest.raises(ConfigError, match="models/nope does not exist"):  # not a hub id retried for minutes
        run_training(load_config(None, good + ["model.name_or_path=models/nope"]), run_dir=tmp_path / "r1")
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "whisper"}')
    with pytest.raises(ConfigError, match="is a 'whisper' model; expected model_type 'qwen2_audio'"):
        run_training(load_config(None, good + [f"model.name_or_path={broken}"]), run_dir=tmp_path / "r2")
    no_processor = tmp_path / "models" / "weights_only"
    no_processor.mkdir()
    shutil.copy(tiny_model / "config.json", no_processor / "config.json")
    with pytest.raises(ConfigError, match="cannot load the processor"):
        run_training(load_config(None, good + [f"model.name_or_path={no_processor}"]), run_dir=tmp_path / "r3")
    corpus = tmp_path / "corpus"
    shutil.copytree(synth_corpus.parent, corpus)
    df = pd.read_csv(corpus / synth_corpus.name, dtype=str, keep_default_na=False)
    bad = corpus / df.loc[df["split"] == "train", "audio"].iloc[3]
    bad.write_bytes(b"RIFF\x00\x00garbage-not-a-wav" * 10)
    with pytest.raises(ManifestError, match=rf"{bad.name}.*cannot be decoded"):
        run_training(load_config(None, good + [f"data.manifest={corpus / synth_corpus.name}"]), run_dir=tmp_path / "r4")
    assert not _ray_up()
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


# Runs in its own process: joining a cluster whose auth mode differs from the next test's would leave this
# process's Ray client in that mode (CI: every later in-process `ray.init` then failed with InvalidAuthToken).
_GPU_CHECK = """
import json, sys
import ray
from ermgap.config import load_config
from ermgap.errors import ConfigError
from ermgap.driver import run_training
from ermgap.preflight import check_cluster_gpus
good, run, address = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
try:
    run_training(load_config(None, good + ["distributed.num_workers=2"]), address=address, run_dir=run, force=True)
except ConfigError as err:
    out["error"] = str(err)
out["joined"] = ray.is_initialized() and ray.cluster_resources().get("GPU")
check_cluster_gpus(load_config(None, good + ["distributed.num_workers=1"]))  # raises if it does not pass
out["one_worker_passes"] = True
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_uses_the_cluster_it_joined(tmp_path, synth_corpus, tiny_model):
    """A CPU-only driver joining a cluster with a GPU passes the check; one GPU for two workers is refused,
    naming the cluster's count; the finished run that --force would have replaced comes back intact."""
    import json
    import os

    from _ray_head import LocalHead

    good = [f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}",
            f"tracking.storage_path={tmp_path}/runs", "optim.effective_batch_size=8", "optim.micro_batch_size=4",
            "distributed.use_gpu=true"]
    run = tmp_path / "runs" / "myrun"
    before = _finished_run(run)
    with LocalHead(token=None, num_cpus=2, num_gpus=1) as head:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.run([sys.executable, "-c", _GPU_CHECK, json.dumps(good), str(run), head.gcs_address],
                              env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert f"num_workers=2 needs 2 GPU(s), but the Ray cluster at {head.gcs_address} has 1" in got["error"]
    assert got["joined"] == 1 and got["one_worker_passes"] is True
    assert _snapshot(run) == before
    assert [p.name for p in run.parent.iterdir()] == ["myrun"]  # nothing left set aside


@pytest.mark.parametrize("kind", ["avg_metric_gap", "loss_gap"])
def test_an_undefined_dev_gap_skips_the_lambda_update(kind):
    """Δdev NaN (e.g. a dev split where no language has both genders: no AVG gap) must leave λ where it is,
    with a warning; it used to count as Δdev = 0 and lower λ by η·ε. A defined gap still moves λ by hand:
    λ ← clip(1 + 0.5·(Δ − 0.02), 0, 10)."""
    from ermgap.checkpointing import TrainerState
    from ermgap.errors import ErmgapWarning, TrainingError
    from ermgap.objectives import CellGrid, build_objective
    from ermgap.recipe import LoRARecipe

    recipe = LoRARecipe()  # only what update_objective reads: the config, the objective, the eval round
    recipe.cfg = load_config(None, ["objective.kind=minmaxgap", "lambda.mode=adaptive", "lambda.init=1",
                                    "lambda.eta=0.5", "lambda.epsilon=0.02", f"lambda.dev_gap={kind}"])
    recipe.objective = build_objective(recipe.cfg, CellGrid(("eng", "deu"), ("F", "M"), torch.ones(2, 2)))
    recipe.state = TrainerState(eval_round=3)
    defined = {"dev_loss_gap": 0.12, "dev_avg_gap": 12.0}  # 12 AVG points = 0.12 as a fraction
    undefined = {"dev_loss_gap": float("nan"), "dev_avg_gap": float("nan")}
    with pytest.warns(ErmgapWarning, match=rf"evaluation 3: the dev gap lambda.dev_gap={kind} is undefined"):
        recipe.update_objective(undefined)
    assert recipe.objective.log_values()["lambda"] == 1.0 and recipe.objective.lam.history == []
    recipe.update_objective(defined)
    assert recipe.objective.log_values()["lambda"] == pytest.approx(1.0 + 0.5 * (0.12 - 0.02))
    if kind == "avg_metric_gap":  # avg_metric_gap() range-checks: an AVG gap above 100 points is a bug upstream
        with pytest.raises(TrainingError, match=r"percentage in \[0, 100\]"):
            recipe.update_objective({"dev_loss_gap": 0.1, "dev_avg_gap": 250.0})


def test_starting_an_epoch_leaves_the_global_rng_alone():
    """A DataLoader draws its workers' base seed from the global torch RNG when an epoch's iterator starts; a
    run resumed mid-epoch starts one where the uninterrupted run did not, so every later LoRA dropout mask
    was drawn one step off (the resume divergence of the old code). The recipe's loader has its own seed."""
    from ermgap.recipe import LoRARecipe

    recipe = LoRARecipe()  # only what _loader reads
    recipe.cfg, recipe.rank, recipe.collator = load_config(None), 1, list
    torch.manual_seed(0)
    before = torch.get_rng_state()
    got = list(recipe._loader(list(range(8)), [[0, 1], [5, 2]]))
    assert got == [[0, 1], [5, 2]] and torch.equal(torch.get_rng_state(), before)
