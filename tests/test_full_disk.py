"""A full disk is the user's to fix, not a fault: `ermgap train` with its run directory on a real 2 MB
filesystem (tmpfs, mounted by the test; skipped with the reason where mounting is not allowed) stops at the
checkpoint that does not fit with one message, exit 2, no retry and no `--resume` advice; once space is freed,
`--resume` warns about the cut-off checkpoint it skips, finishes the run, and MLflow keeps no stale error.

Calibration: one checkpoint of the tiny model's LoRA (weights, Adam moments, best adapter) is ~1.3 MB, so the
first one fits in 2 MB and the second, written beside it, is cut off (asserted below).
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume_exact import _history
from test_run_failures import _actors

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_a_full_disk_is_one_clear_error_and_resume_warns_about_the_cut_off_checkpoint(
        small_disk, tmp_path, smallest_manifest, tiny_model, ray_cluster):
    from mlflow import MlflowClient

    from ermgap.checkpointing import incomplete_reason

    run_dir = small_disk / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    overrides = [f"data.manifest={smallest_manifest}", f"model.name_or_path={tiny_model}", "model.dtype=fp32",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.storage_path={tmp_path}/runs",
                 "optim.epochs=2", "optim.effective_batch_size=8", "optim.micro_batch_size=4", "eval.every_steps=2",
                 "eval.batch_size=12", "distributed.num_workers=1", "distributed.cpus_per_worker=1",
                 "distributed.max_failures=2"]
    controllers = _actors(ray_cluster, "TrainController")
    proc = _cli("train", str(cfg), *overrides, "--run-dir", str(run_dir), "--address", ray_cluster)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {run_dir}"), out
    assert "--resume" not in out and "Traceback" not in out and "retrying" not in out, out
    assert len(_actors(ray_cluster, "TrainController") - controllers) == 1  # no retry
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not Ray's snapshot .json
    assert len(checkpoints) == 2 and incomplete_reason(checkpoints[0], 1) is None, checkpoints
    cut_off = checkpoints[1]
    assert incomplete_reason(cut_off, 1) is not None

    # Who meets the full disk first is a race: the worker copying the second checkpoint, or Ray Train's
    # controller rewriting its checkpoint list (registering the first one at its next poll), which it leaves
    # empty. Both end as above; the resume must start either way, so the list is left as the controller's
    # failed write leaves it (empty: pyarrow truncates it on open), whichever came first here.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    snapshot.write_bytes(b"")

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    proc = _cli("train", "--resume", str(run_dir), "--address", ray_cluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: skipping checkpoint")]
    assert len(warned) == 1 and str(cut_off) in warned[0] and "incomplete" in warned[0], proc.stderr
    assert f"warning: Ray Train's checkpoint list {snapshot} is empty" in proc.stderr, proc.stderr
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "ermgap.error" not in run.data.tags, run.data.tags
    assert _history(uri, run_id)["resumed_at_step"] == {2: [2.0]}
    assert (run_dir / "metrics.json").is_file()


def test_a_full_mlflow_store_leaves_the_users_error_alone(small_disk):
    """The default MLflow store (./runs/mlflow.db) shares the run's disk. When that disk is full the driver
    cannot mark the run FAILED: a warning says so, and the user's 'no space left on <path>' stays the one
    error (the old code raised MLflow's '(sqlite3.OperationalError) database or disk is full' traceback)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ermgap.errors import ErmgapWarning
    from ermgap.failures import mark_failed
    from ermgap.io import full_store_error

    uri = f"sqlite:///{small_disk}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    run_dir = small_disk / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_run_id").write_text(run_id)
    with pytest.raises(OSError) as full, open(small_disk / "filler", "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    with pytest.warns(ErmgapWarning, match=rf"MLflow run in {uri} is not marked FAILED: no space left on its store"):
        mark_failed(uri, run_dir, "no space left on the run")
    # A worker's MLflow write on that disk is the same user error, named after the store (not a fault to retry).
    with pytest.raises(MlflowException) as failed:
        client.log_metric(run_id, "train/loss", 1.0, step=1)
    assert str(full_store_error(failed.value, uri)) == f"no space left on {small_disk}/mlflow.db (the MLflow store)"
    assert full_store_error(OSError(errno.ENOSPC, "No space left on device"), uri) is None  # the run dir's: its path
    (small_disk / "filler").unlink()  # space freed: the next failure is recorded
    mark_failed(uri, run_dir, "a reason")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["ermgap.error"] == "a reason"
