"""Real sweeps with the tiny model on a local Ray cluster: MLflow parent/child runs, leaderboard, ASHA,
and resume after the driver is SIGKILLed. Slow (a few minutes on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from _procs import kill_pids_with_env

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed]

ROOT = Path(__file__).resolve().parents[1]


def _base(manifest: Path, model: Path, tmp: Path) -> dict:
    return {
        "data": {"manifest": str(manifest), "modality": "uni"},
        "model": {"name_or_path": str(model), "dtype": "fp32"},
        "optim": {"lr": 1e-3, "epochs": 2, "effective_batch_size": 16, "micro_batch_size": 4,
                  "scheduler": "constant"},
        "eval": {"patience": 0, "batch_size": 16},
        "distributed": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 2},
    }


def _write(tmp: Path, spec: dict) -> Path:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _children(uri: str, experiment: str, parent: str):
    from ermgap.tracking import child_runs

    return child_runs(uri, experiment, parent)


def _dominated(i: int, pts: list[tuple[float, float]]) -> bool:
    """Brute-force oracle: another point at least as good on both and better on one."""
    a = pts[i]
    return any(b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1]) for j, b in enumerate(pts) if j != i)


def test_sweep_parent_children_leaderboard_and_asha(ray_cluster, tmp_path, small_manifest, tiny_model):
    """3 trials, 2 at a time: two that learn (lr 1e-3) and one that cannot (lr 1e-9). ASHA on dev loss
    with a rung after the first evaluation stops the frozen one: it starts after a learning trial has
    passed that rung, so its dev loss is above the cutoff. In this process, on the session's Ray cluster
    (`run_sweep` joins the cluster this process is connected to)."""
    import numpy as np

    # Independent check of the rung layout this test relies on (Ray's ASHA formula, max_t + 1).
    assert int(np.log((3 + 1) / 1) / np.log(4) + 1) == 2  # rungs at 1 and 4: only 1 is reached
    from mlflow import MlflowClient

    from ermgap.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _write(tmp_path, {
        "name": "t_asha",
        "base": _base(small_manifest, tiny_model, tmp_path),
        "overrides": {"optim.epochs": 3},
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0},
                     "adaptive": {"lambda.mode": "adaptive", "lambda.eta": 2.0},
                     "frozen": {"lambda.mode": "fixed", "lambda.init": 0.0, "optim.lr": 1e-9}},
        # reduction_factor 4 with max_t 3: one rung, after the first evaluation, where λ is still 0 in
        # both learning trials (identical dev loss, so neither stops the other).
        "scheduler": {"metric": "dev_loss", "mode": "min", "grace_period": 1, "reduction_factor": 4, "max_t": 3},
        "max_concurrent_trials": 2,
        "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"experiment": "t", "tracking_uri": uri},
    })
    out = run_sweep(spec)
    board = out.leaderboard.set_index("variant")
    runs = _children(uri, "t", out.parent_run_id)

    # Every trial has exactly one child run, tagged with its trial id.
    assert len(board) == 3 and len(runs) == 3
    assert sorted(runs["tags.ermgap.trial_id"]) == sorted(board["trial"])
    assert (board["n_child_runs"] == 1).all()

    # ASHA stopped the frozen trial after its first evaluation; the others ran to the end.
    assert board.loc["frozen", "status"] == "stopped" and board.loc["frozen", "eval_rounds"] == 1
    assert list(board.loc[["erm", "adaptive"], "status"]) == ["done", "done"]
    client = MlflowClient(uri)
    frozen_run = client.get_run(board.loc["frozen", "mlflow_run_id"])
    assert frozen_run.info.status == "KILLED"
    assert "best/test_w_f1" not in frozen_run.data.metrics
    # Compute a stopped trial still burnt: evaluations its workers logged after Tune's stop decision.
    extra = len(client.get_metric_history(frozen_run.info.run_id, "eval/dev_w_f1")) - 1
    assert 0 <= extra <= 1

    # The leaderboard equals what the training runs wrote themselves (metrics.json in each run dir).
    for variant in ("erm", "adaptive"):
        row = board.loc[variant]
        written = json.loads((out.root / "runs" / row["trial"] / "metrics.json").read_text())
        for key in ("dev_w_f1", "dev_acc", "dev_avg_gap", "dev_worst_lang_gap", "dev_loss_gap",
                    "test_w_f1", "test_acc", "test_avg_gap", "test_worst_lang_gap", "test_loss_gap"):
            assert row[key] == pytest.approx(written[key], rel=1e-9, abs=1e-9), (variant, key)
        child = client.get_run(row["mlflow_run_id"])
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == out.parent_run_id
        assert {"best/test_w_f1", "best/dev_avg_gap", "eval/dev_w_f1", "lambda"} <= set(child.data.metrics)
        # Self-describing: named by variant, variant and objective as params, commit, description, manifest input.
        assert child.info.run_name == f"t_asha/{variant}"
        assert child.data.params["variant"] == variant and child.data.params["objective.kind"] == "minmaxgap"
        assert child.data.params["objective"] == {"erm": "ERM (SFT)", "adaptive": "ERM-MinMaxGAP (p=2)"}[variant]
        assert child.data.tags["mlflow.source.name"] == "ermgap sweep" and child.data.tags.get("mlflow.note.content")
        assert len(child.data.tags.get("mlflow.source.git.commit", "")) == 40
        inputs = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert [i.dataset.source for i in inputs] and Path(small_manifest).name in inputs[0].dataset.source
        assert child.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())  # beside the sqlite store

    # Pareto marks and the best trial follow the documented rules (oracles written here).
    done = out.leaderboard[out.leaderboard["dev_w_f1"].notna()].reset_index(drop=True)
    pts = list(zip(done["dev_w_f1"], done["dev_avg_gap"]))
    assert list(done["pareto"]) == [not _dominated(i, pts) for i in range(len(pts))]
    finished = done[done["status"] == "done"]
    admissible = finished[finished["dev_avg_gap"] <= finished["dev_avg_gap"].min() + 2.0]
    assert out.best_trial == admissible.sort_values("dev_w_f1", ascending=False).iloc[0]["trial"]

    # The parent run carries the spec, the search space and the leaderboard.
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ermgap.sweep"] == "t_asha"
    # Parent and children share the best-checkpoint metric names (one column in the runs table).
    best_keys = {k for k in parent.data.metrics if k.startswith("best/")}
    assert "best/dev_w_f1" in best_keys and "best/test_avg_gap" in best_keys
    done_child = client.get_run(board.loc["erm", "mlflow_run_id"])
    assert best_keys <= set(done_child.data.metrics)
    assert parent.data.metrics["best/dev_w_f1"] == board.loc[board["best"], "dev_w_f1"].iloc[0]
    arts = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"sweep.yaml", "search_space.json", "leaderboard.csv", "leaderboard.md", "pareto.png", "report"} <= arts
    report = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/table2.md", "report/table3.md"} <= report


def _cli(spec: Path, marker: str, *args: str, hold: tuple[int, str] | None = None) -> subprocess.Popen:
    """`ermgap sweep SPEC ARGS`; with `hold` (epoch, run name), that trial waits after that epoch until the
    driver is killed (tests/_faults.py hold-after-epoch: the CLI with a step hook)."""
    # TUNE_GLOBAL_CHECKPOINT_S: Tune saves its experiment state every 2 s instead of every 10-20 s ("auto"), so
    # a test sees a trial's end in it soon after the trial ended.
    env = dict(os.environ, ERMGAP_TEST_SWEEP=marker, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               TUNE_GLOBAL_CHECKPOINT_S="2")
    env.pop("RAY_ADDRESS", None)
    cli = ["-m", "ermgap.cli.main"] if hold is None else [str(ROOT / "tests" / "_faults.py"), "hold-after-epoch",
                                                          str(hold[0]), hold[1]]
    return subprocess.Popen([sys.executable, *cli, "sweep", str(spec), *args], cwd=spec.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


EPOCHS_2 = 3  # trial 2 of test_resume_after_driver_sigkill: 1 before the driver is killed, 2 after


def _tune_statuses(tune_dir: Path) -> dict[str, str]:
    """Trial id → status in the newest Tune experiment state of a sweep (Tune's own file)."""
    states = sorted(tune_dir.glob("experiment_state*.json"))
    if not states:
        return {}
    try:
        body = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    trials = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in body["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def test_resume_after_driver_sigkill(tmp_path, smallest_manifest, tiny_model):
    """Kill the sweep driver (SIGKILL) while trial 2 runs; `--resume` keeps trial 1 as it was and finishes trial 2
    from its checkpoint, even with trial 2's checkpoint list cut off."""
    from mlflow import MlflowClient

    from ermgap.tracking import TAG_TRIAL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _write(tmp_path, {
        "name": "t_resume",
        "base": _base(smallest_manifest, tiny_model, tmp_path),
        # Both trials start together: a trial's start-up is most of its time, and is paid once for both. Trial 1
        # only has to finish before the kill: one epoch. Trial 2 needs a checkpoint to resume from and must still
        # be running once trial 1 has ended and Tune has saved it as ended (3-14 s after its last epoch): it
        # waits after its first epoch until the kill (the first driver's step hook, _cli's `hold`), so --resume
        # pays EPOCHS_2 - 1 epochs. (Without the hold, trial 2 needed epochs to outlast trial 1's end, and
        # --resume paid for all of them but the few done at the kill.)
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0, "optim.epochs": 1},
                     "adaptive": {"lambda.mode": "adaptive", "optim.epochs": EPOCHS_2}},
        "max_concurrent_trials": 2,
        "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"experiment": "r", "tracking_uri": uri},
    })
    state_file = tmp_path / "sweeps" / "t_resume" / "sweep_state.json"
    tune_dir = tmp_path / "sweeps" / "t_resume" / "tune"
    marker = uuid.uuid4().hex
    proc = _cli(spec, marker, hold=(1, "t_resume/adaptive"))
    try:
        # Wait until trial 1's run has finished and Tune's experiment state says so (else --resume runs trial 1
        # again), and trial 2's run has logged a dev evaluation (so it has a checkpoint); then kill the driver
        # and, with it, the Ray processes it started.
        deadline = time.monotonic() + 420
        first = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not state_file.exists():
                continue
            parent = json.loads(state_file.read_text())["parent_run_id"]
            runs = _children(uri, "r", parent)
            done = runs[runs["status"] == "FINISHED"] if len(runs) else runs
            evals = runs["metrics.eval/dev_w_f1"] if "metrics.eval/dev_w_f1" in runs else None
            evaluated = len(runs) == 2 and evals is not None and evals.notna().all()
            ended = len(done) == 1 and _tune_statuses(tune_dir).get(done.iloc[0][f"tags.{TAG_TRIAL}"]) == "TERMINATED"
            if evaluated and ended:
                first = done
                break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert first is not None and len(first) == 1, "trial 1 never finished before the deadline"
        assert first.iloc[0]["tags.mlflow.runName"] == "t_resume/erm"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # The driver's local Ray node dies with it, as when the driver's machine is lost
        kill_pids_with_env("ERMGAP_TEST_SWEEP", marker)
        before = {r["run_id"]: r["start_time"] for _, r in _children(uri, "r", parent).iterrows()}
        first_id = first.iloc[0]["run_id"]
        first_metrics = tmp_path / "sweeps" / "t_resume" / "runs" / first.iloc[0][f"tags.{TAG_TRIAL}"] / "metrics.json"
        first_written = (first_metrics.stat().st_mtime_ns, first_metrics.read_bytes())
        # Ray writes a trial's checkpoint list in place after each checkpoint; a kill or a full disk can leave it
        # cut off: leave trial 2's so, and the resume must set it aside as `ermgap train --resume` does.
        trial2 = _children(uri, "r", parent).set_index("run_id").drop(first_id)[f"tags.{TAG_TRIAL}"].item()
        (tmp_path / "sweeps" / "t_resume" / "train" / trial2 / "checkpoint_manager_snapshot.json").write_text('{"ch')

        proc = _cli(spec, marker, "--resume")
        output, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_pids_with_env("ERMGAP_TEST_SWEEP", marker)

    after = _children(uri, "r", parent)
    # Same parent, the same two child runs (trial 2 continued its run), trial 1 untouched.
    assert json.loads(state_file.read_text())["parent_run_id"] == parent
    assert set(after["run_id"]) == set(before)
    row1 = after.set_index("run_id").loc[first_id]
    assert row1["start_time"] == before[first_id] and row1["status"] == "FINISHED"
    assert (first_metrics.stat().st_mtime_ns, first_metrics.read_bytes()) == first_written  # not run again
    assert (after["status"] == "FINISHED").all()
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    # Trial 2 went on from its checkpoint: each evaluation logged once (one per epoch).
    second = next(r for r in after["run_id"] if r != first_id)
    steps = [m.step for m in client.get_metric_history(second, "eval/dev_w_f1")]
    assert len(steps) == EPOCHS_2 and steps == sorted(set(steps)), steps
    assert "best trial:" in output and not math.isnan(after["metrics.best/test_w_f1"].astype(float).max())
    # the console shows ermgap's trial lines, not Tune's boxes, Ray's auth notice or MLflow's source warning
    noise = ("Configuration for experiment", "View detailed results", "TensorBoard", "Token authentication is enabled",
             "interpreted in multiple ways", "Setting accelerator")
    assert [n for n in noise if n in output] == [], output[-3000:]


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path, smallest_manifest, tiny_model):
    """SIGTERM while a trial trains: the driver exits 130 with the resume hint, and neither the parent nor
    the trial's run is left RUNNING (before: Ray's handler ended the driver at once, every run RUNNING);
    --resume then finishes that trial in its own run. The trial holds after its first epoch until it is
    stopped, so it is still running when the signal comes on any machine, on the smallest corpus."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _write(tmp_path, {
        "name": "t_term", "base": _base(smallest_manifest, tiny_model, tmp_path),
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0}},
        "storage_path": str(tmp_path / "sweeps"), "mlflow": {"experiment": "term", "tracking_uri": uri},
    })
    state_file = tmp_path / "sweeps" / "t_term" / "sweep_state.json"
    marker = uuid.uuid4().hex
    proc = _cli(spec, marker, hold=(1, "t_term/erm"))
    try:
        deadline = time.monotonic() + 300
        parent, started = None, False
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if state_file.exists():
                parent = json.loads(state_file.read_text())["parent_run_id"]
                started = not _children(uri, "term", parent).empty
                if started:
                    break
        assert proc.poll() is None and parent is not None, proc.stdout.read()[-3000:]
        assert started, "the trial opened no MLflow run within 300 s"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, output[-3000:]
        assert "--resume" in output
        client = MlflowClient(uri)
        assert client.get_run(parent).info.status == "KILLED"
        killed = _children(uri, "term", parent)
        assert list(killed["status"]) == ["KILLED"]
        # Tune saved the stopped trial as unfinished: --resume continues it in the same run, to the end.
        proc = _cli(spec, marker, "--resume")
        output, _ = proc.communicate(timeout=420)
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_pids_with_env("ERMGAP_TEST_SWEEP", marker)
    after = _children(uri, "term", parent)
    assert list(after["run_id"]) == list(killed["run_id"]) and list(after["status"]) == ["FINISHED"]
    assert client.get_run(parent).info.status == "FINISHED"
