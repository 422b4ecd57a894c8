"""MLflow bookkeeping against a real sqlite store: runs left RUNNING by a driver that died are closed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from ermgap.errors import ErmgapWarning
from ermgap.tracking import DRIVER_TAG, RunLogger, child_runs, close_orphaned_runs, driver_tag


def test_runs_of_a_dead_driver_are_marked_killed_and_live_ones_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)  # that process has exited: a driver killed with SIGKILL looks like this
    host = socket.gethostname()
    cfg = {"tracking_uri": uri, "experiment": "e", "run_name": "r"}
    orphan = RunLogger.open({**cfg, "tags": {DRIVER_TAG: f"{host}:{dead_pid}"}}, run_dir=tmp_path / "a").run_id
    live = RunLogger.open({**cfg, "tags": driver_tag()}, run_dir=tmp_path / "b").run_id
    remote = RunLogger.open({**cfg, "tags": {DRIVER_TAG: f"other-host-{host}:{dead_pid}"}},
                            run_dir=tmp_path / "c").run_id
    untagged = RunLogger.open(cfg, run_dir=tmp_path / "d").run_id
    with pytest.warns(ErmgapWarning, match=rf"{orphan} \(r\) was still RUNNING but its driver .*:{dead_pid} is gone"):
        assert close_orphaned_runs(uri, "e") == [orphan]
    c = MlflowClient(uri)
    status = {rid: c.get_run(rid).info.status for rid in (orphan, live, remote, untagged)}
    assert status == {orphan: "KILLED", live: "RUNNING", remote: "RUNNING", untagged: "RUNNING"}
    assert "died" in c.get_run(orphan).data.tags["ermgap.error"]
    # Resuming the orphan makes this process its driver: it is no longer an orphan.
    RunLogger.open({**cfg, "tags": driver_tag()}, run_dir=tmp_path / "a")
    assert c.get_run(orphan).info.status == "RUNNING" and c.get_run(orphan).data.tags[DRIVER_TAG] == \
        driver_tag()[DRIVER_TAG]
    assert "ermgap.error" not in c.get_run(orphan).data.tags  # why the killed attempt ended is no longer true
    assert close_orphaned_runs(uri, "e") == [] and close_orphaned_runs(uri, "no-such-experiment") == []


@pytest.mark.parametrize("env", [None, "sqlite:///elsewhere.db"])
def test_reading_a_sweeps_runs_leaves_the_tracking_uri_as_it_was(tmp_path, monkeypatch, env):
    """child_runs reads another store's runs; the URI this process logs to next ($MLFLOW_TRACKING_URI, which
    config.default_tracking_uri reads, and MLflow's own) is the one it had before. It was left pointing at the
    store read: a bias lab with --add-sweep logged its own sweep into the added sweep's store."""
    import os

    import mlflow

    from ermgap.config import default_tracking_uri

    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    c = MlflowClient(uri)
    parent = c.create_run(c.create_experiment("e")).info.run_id
    child = c.create_run(c.get_experiment_by_name("e").experiment_id, tags={"mlflow.parentRunId": parent})
    runs = child_runs(uri, "e", parent)
    assert list(runs["run_id"]) == [child.info.run_id]
    assert os.environ.get("MLFLOW_TRACKING_URI") == env and mlflow.get_tracking_uri() == before
    unset = SimpleNamespace(tracking=SimpleNamespace(tracking_uri=None))  # a config that names no store
    assert default_tracking_uri(unset) == (env or f"sqlite:///{(Path('runs') / 'mlflow.db').resolve()}")


def test_a_resumed_run_logs_each_step_of_each_metric_once(tmp_path):
    """An attempt logs steps 1-5 and dies; the resumed one restarts from its step-3 checkpoint and logs 4-8.
    A redone step with the value the first attempt logged is not logged again (λ: an exact resume); one with
    another value (the loss) is logged as a newer point, so the curve holds what the finished run computed; a
    metric first logged after the resume (eval at step 6) and one the first attempt never reached are logged."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = {"tracking_uri": uri, "experiment": "e", "run_name": "r"}
    first = RunLogger.open(cfg, run_dir=tmp_path / "run")
    for step in range(1, 6):
        first.log_metrics({"train/loss": 10.0 + step, "lambda": 0.1 * step}, step=step)
    first.log_metrics({"eval/dev_w_f1": 30.0}, step=3)
    again = RunLogger.open(cfg, run_dir=tmp_path / "run")  # the id recorded in run_dir: the same MLflow run
    assert again.run_id == first.run_id and again.logged["train/loss"] == {s: {10.0 + s} for s in range(1, 6)}
    for step in range(4, 9):
        again.log_metrics({"train/loss": 20.0 + step, "lambda": 0.1 * step}, step=step)
        if step % 3 == 0:
            again.log_metrics({"eval/dev_w_f1": 40.0}, step=step)
    c = MlflowClient(uri)
    loss = [(m.step, m.value) for m in c.get_metric_history(first.run_id, "train/loss")]
    assert sorted(loss) == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (4, 24.0), (5, 15.0), (5, 25.0), (6, 26.0),
                            (7, 27.0), (8, 28.0)]
    assert sorted(m.step for m in c.get_metric_history(first.run_id, "lambda")) == list(range(1, 9))
    assert sorted((m.step, m.value) for m in c.get_metric_history(first.run_id, "eval/dev_w_f1")) == \
        [(3, 30.0), (6, 40.0)]


def test_experiments_open_on_their_runs_and_summaries_are_exact(tmp_path):
    """Experiments ermgap creates are machine-learning experiments (MLflow's UI opens their runs table); an
    existing one without a kind gets it, one whose kind a person chose keeps it; best/ values are stored in
    full (the sweep's leaderboard, selection rule and seed summaries are computed from them)."""
    from ermgap.mlflow_ui import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from ermgap.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    logger = RunLogger.open({"tracking_uri": uri, "experiment": "e", "run_name": "r"}, run_dir=tmp_path / "run")
    exp = c.get_run(logger.run_id).info.experiment_id
    assert c.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = c.create_experiment("made-elsewhere")
    chosen = c.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(c, "made-elsewhere") == old and experiment_id(c, "genai") == chosen
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert c.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    logger.log_metrics({"best/test_w_f1": 53.98765432, "best/dev_loss_gap": 0.123456789, "best/eval_round": 4,
                        "eval/dev_w_f1": 53.98765432}, step=7)
    m = c.get_run(logger.run_id).data.metrics
    assert (m["best/test_w_f1"], m["best/dev_loss_gap"], m["best/eval_round"]) == (53.98765432, 0.123456789, 4.0)
    assert m["eval/dev_w_f1"] == 53.98765432


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_the_run_is_finished_in_mlflow_before_its_final_report(reference_run):
    """In a sweep, Tune ends a trial as soon as the final result (done=True) reaches it and may stop the worker
    inside that report call: a run ended after it stayed RUNNING in MLflow (seen in a 15-trial bias-lab sweep).
    The worker ends the run first: its MLflow end time precedes the final checkpoint, which Ray names with the
    time the report call made it."""
    from datetime import datetime

    final = reference_run.final
    info = MlflowClient(final["tracking_uri"]).get_run(final["mlflow_run_id"]).info
    assert info.status == "FINISHED" and info.end_time is not None
    checkpoints = sorted(p.name for p in reference_run.root.glob("runs/**/checkpoint_*") if p.is_dir())
    assert checkpoints, sorted(str(p) for p in reference_run.root.rglob("*"))[:50]
    last = datetime.strptime(checkpoints[-1].removeprefix("checkpoint_"), "%Y-%m-%d_%H-%M-%S.%f").timestamp()
    assert info.end_time / 1000 < last, (info.end_time / 1000, checkpoints[-1])


OPEN_STORE = """
import sys
from ermgap.tracking import client
print("OPENED", len(client(sys.argv[1]).search_experiments()), flush=True)
"""


def test_processes_opening_one_new_sqlite_store_at_once_all_open_it(tmp_path):
    """Two `ermgap train` started together on a new store: MLflow migrates a new sqlite store on first open, and
    without ermgap's lock one of three processes opening it at once failed in alembic ('Online migration expected
    to match one row'; 4 of 4 tries with two processes). Each ends with the store open and its default experiment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=110) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "OPENED 1" in out, err[-2000:]
