"""How runs and sweep trials fail, end to end on a real local Ray cluster (tiny model, 1 worker, DeepSpeed on
CPU): a user error inside a worker ends the run once with one message and exit 2 (no Ray retry); a sweep
trial whose loss turns NaN is a failed trial (status, reason, MLflow FAILED, exit status), not "stopped"."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _faults import NanAtStep

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parent.parent


def _actors(address: str, class_name: str) -> set[str]:
    """Ids of every actor of that class the cluster at `address` has started (alive or dead): Ray's own record."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=address, filters=[("class_name", "=", class_name)],
                                            limit=10_000, raise_on_missing_output=False)}


@pytest.fixture
def corpus(synth_corpus, tmp_path) -> Path:
    """A private copy of the synthetic corpus (the test corrupts a file of it)."""
    shutil.copytree(Path(synth_corpus).parent, tmp_path / "corpus")
    return tmp_path / "corpus" / Path(synth_corpus).name


def _overrides(manifest: Path, model: Path, root: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"model.name_or_path={model}", "model.dtype=fp32",
            f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.storage_path={root}/runs",
            "optim.epochs=1", "optim.effective_batch_size=8", "optim.micro_batch_size=4", "eval.batch_size=16",
            "distributed.num_workers=1", "distributed.cpus_per_worker=1", "distributed.max_failures=2"]


def test_a_user_error_inside_a_worker_ends_the_run_once_with_one_message(corpus, tiny_model, tmp_path, ray_cluster):
    """A train audio file is corrupted after the pre-flight passed (as if the disk or a sync changed it): the
    worker's ManifestError ends the run at the first attempt although max_failures=2 allows retries, and the
    CLI prints that error on one line, exit 2, without "--resume" advice (resuming would meet it again)."""
    df = pd.read_csv(corpus, dtype=str, keep_default_na=False)
    bad = corpus.parent / df.loc[df["split"] == "train", "audio"].iloc[0]
    run_dir = tmp_path / "runs" / "corrupted"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    workers, controllers = _actors(ray_cluster, "RayTrainWorker"), _actors(ray_cluster, "TrainController")
    proc = subprocess.Popen([sys.executable, "-m", "ermgap.cli.main", "train", str(cfg),
                             *_overrides(corpus, tiny_model, tmp_path), "--run-dir", str(run_dir),
                             "--address", ray_cluster],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # config.yaml is written once every pre-flight check has passed, seconds before Ray starts a worker.
        deadline = time.monotonic() + 300
        while not (run_dir / "config.yaml").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        bad.write_bytes(b"RIFF\x00\x00garbage-not-a-wav" * 10)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: audio file ") and bad.name in lines[0] and "cannot be decoded" in lines[0]
    assert f"(run directory {run_dir}" in lines[0]
    assert "--resume" not in out + err and "Traceback" not in out + err
    # Ray started one controller and one worker: no retry of the worker group, none of the run.
    assert len(_actors(ray_cluster, "TrainController") - controllers) == 1
    assert len(_actors(ray_cluster, "RayTrainWorker") - workers) == 1


def test_a_trial_whose_loss_turns_nan_is_a_failed_trial(small_manifest, tiny_model, tmp_path, ray_cluster):
    """Two trials: "short" (1 epoch) ends before the injected NaN (the first step of epoch 2), "long" (2 epochs)
    reaches it. The leaderboard says failed with the NaN message for "long" and done for "short"; the child
    run is FAILED with that reason; run_sweep raises (the CLI exits 2) naming the failed trial."""
    from mlflow import MlflowClient

    from ermgap.sweep import run_sweep
    from ermgap.sweep.run import TrialsFailed

    df = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    steps_per_epoch = int((df["split"] == "train").sum()) // 16
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tmp_path / "t_nan.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "t_nan",
        "base": {"data": {"manifest": str(small_manifest)},
                 "model": {"name_or_path": str(tiny_model), "dtype": "fp32"},
                 "optim": {"effective_batch_size": 16, "micro_batch_size": 8}, "eval": {"batch_size": 16},
                 "distributed": {"num_workers": 1, "cpus_per_worker": 0.9}},
        "variants": {"short": {"optim.epochs": 1}, "long": {"optim.epochs": 2}},
        "max_concurrent_trials": 2,
        "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"experiment": "nan", "tracking_uri": uri},
    }, sort_keys=False))
    with pytest.raises(TrialsFailed, match=r"sweep t_nan: 1 of 2 trial\(s\) failed") as caught:
        run_sweep(spec, step_hook=NanAtStep(steps_per_epoch + 1))
    board = caught.value.outcome.leaderboard.set_index("variant")
    assert board.loc["short", "status"] == "done" and board.loc["long", "status"] == "failed"
    reason = board.loc["long", "reason"]
    assert reason.startswith(f"non-finite training loss at optimizer step {steps_per_epoch + 1} (epoch 1)")
    assert f"  {board.loc['long', 'trial']}: {reason}" in str(caught.value)
    client = MlflowClient(uri)
    failed = client.get_run(board.loc["long", "mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["ermgap.error"] == reason
    assert client.get_run(board.loc["short", "mlflow_run_id"]).info.status == "FINISHED"
    parent = client.get_run(caught.value.outcome.parent_run_id)
    assert parent.info.status == "FAILED" and reason in parent.data.tags["ermgap.error"]
    written = pd.read_csv(caught.value.outcome.artifacts["leaderboard_csv"]).set_index("variant")
    assert written.loc["long", "status"] == "failed" and written.loc["long", "reason"] == reason


def test_a_fault_after_the_final_metrics_leaves_the_finished_run_finished(tmp_path, ray_cluster):
    """Tune ends a sweep trial at its final report (done=True) and removes its placement group: the trial's Train
    controller dies under its driver's fit(). That fault came after the run wrote its final metrics and ended its
    MLflow run FINISHED; fit_run must not raise nor mark the run FAILED (a two-node sweep's finished trial showed
    FAILED: "ActorDiedError after 1 attempt(s)"). Here the real worker group fails right after writing them."""
    from mlflow import MlflowClient
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ermgap.failures import fit_run
    from ermgap.tracking import RUN_ID_FILE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.set_terminated(run_id, status="FINISHED")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text(run_id)

    def metrics_then_die(config) -> None:  # defined here: the workers receive it by value
        Path(config["run_dir"], "metrics.json").write_text("{}\n")
        raise RuntimeError("the worker group fails after the final metrics")  # not a user error: a fault

    def make_trainer():
        return TorchTrainer(metrics_then_die, train_loop_config={"run_dir": str(run_dir)},
                            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                            run_config=RunConfig(name="after", storage_path=str(tmp_path / "ray")))

    assert fit_run(make_trainer, run_dir=run_dir, tracking_uri=uri, max_failures=0,
                   finished=(run_dir / "metrics.json").is_file) is None
    assert client.get_run(run_id).info.status == "FINISHED"
