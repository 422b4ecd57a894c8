"""MLflow bookkeeping against a real sqlite store: runs left RUNNING by a driver that died are closed."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from ermgap.errors import ErmgapWarning
from ermgap.tracking import DRIVER_TAG, RunLogger, close_orphaned_runs, driver_tag


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
    assert close_orphaned_runs(uri, "e") == [] and close_orphaned_runs(uri, "no-such-experiment") == []
