"""ermgap.failures without Ray: a worker's user error recorded once (first rank wins, atomically) and read
back as its ermgap.errors class; the leaderboard's failed trials. End-to-end runs: test_run_failures.py."""

from __future__ import annotations

import errno
import json
import multiprocessing
import pickle

import pandas as pd
import pyarrow.fs
import pytest

from ermgap.errors import ErmgapError, ErmgapWarning, ManifestError, NoSpaceError, TrainingError
from ermgap.failures import (ERROR_FILE, RunFault, clear_error, read_error, record_error,
                             set_aside_cut_off_snapshot, user_error_in)


def _record(args) -> bool:
    run_dir, rank = args
    return record_error(run_dir, TrainingError(f"rank {rank} failed"), rank)


def test_the_first_rank_s_error_is_kept_and_read_back_as_its_class(tmp_path):
    run = tmp_path / "run"
    assert read_error(run) is None
    assert record_error(run, ManifestError("audio file a.wav cannot be decoded (garbage)"), rank=1)
    assert not record_error(run, TrainingError("later"), rank=0)  # the first record stays
    err = read_error(run)
    assert type(err) is ManifestError and str(err) == "audio file a.wav cannot be decoded (garbage)"
    assert err.exit_code == 2
    assert json.loads((run / ERROR_FILE).read_text())["rank"] == 1
    assert sorted(p.name for p in run.iterdir()) == [ERROR_FILE]  # no temporary files left
    clear_error(run)
    assert read_error(run) is None
    record_error(run, NoSpaceError("no space left on /x"), rank=0)
    assert type(read_error(run)) is NoSpaceError
    # An error class the reader does not know (a record from another version) is still a user error.
    (run / ERROR_FILE).write_text(json.dumps({"type": "GoneError", "message": "m", "rank": 0}))
    assert type(read_error(run)) is ErmgapError and str(read_error(run)) == "m"


def test_concurrent_ranks_leave_exactly_one_record(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        kept = pool.map(_record, [(tmp_path, r) for r in range(8)])
    assert sum(kept) == 1
    record = json.loads((tmp_path / ERROR_FILE).read_text())
    assert record["message"] == f"rank {record['rank']} failed" and kept[record["rank"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ERROR_FILE]


def test_failed_trials_are_listed_with_their_reason(tmp_path):
    from ermgap.sweep.leaderboard import FAILED, TrialRecord, build_leaderboard, failure_reason
    from ermgap.sweep.run import failure_message
    from ermgap.sweep.spec import load_sweep_spec
    from test_sweep_spec import _spec

    spec = load_sweep_spec(_spec(tmp_path, space={}))
    nan = "non-finite training loss at optimizer step 2 (epoch 0); utterances with NaN/inf loss: u7"
    trials = {"t1": TrialRecord(params={"variant": "erm"}, status="done", last_round=2),
              "t2": TrialRecord(params={"variant": "adaptive"}, status=FAILED, reason=nan)}
    board = build_leaderboard(spec, pd.DataFrame(), trials).set_index("trial")
    assert board.loc["t2", "status"] == "failed" and board.loc["t2", "reason"] == nan
    assert pd.isna(board.loc["t1", "reason"])
    assert failure_message("s", board.reset_index()) == f"sweep s: 1 of 2 trial(s) failed (status 'failed' in the " \
                                                        f"leaderboard):\n  t2: {nan}"
    assert failure_message("s", board.reset_index().iloc[:1]) is None
    assert failure_message("s", pd.DataFrame()) == "sweep s: no trial ran"

    class Wrapped(Exception):  # what Tune hands back: a traceback text, the original error as .cause
        cause = TrainingError(nan)

    assert failure_reason(Wrapped("Traceback (most recent call last): ...")) == nan
    assert failure_reason(TrainingError(nan)) == nan


def _pyarrow_enospc() -> OSError:
    """The error Ray Train's controller meets writing its checkpoint list on a full disk: pyarrow's, real."""
    with pytest.raises(OSError) as full, pyarrow.fs.LocalFileSystem().open_output_stream("/dev/full") as f:
        f.write(b"{}")
    assert full.value.errno == errno.ENOSPC
    return full.value


def test_a_run_fault_reaches_the_sweep_driver_with_its_reason():
    """Ray pickles a failed trial's exception to the driver: a RunFault must survive it (it became a TypeError,
    "missing 1 required positional argument: 'attempts'", in place of the trial's reason)."""
    fault = pickle.loads(pickle.dumps(RunFault(OSError(28, "No space left on device"), 3)))
    assert str(fault) == "OSError after 3 attempt(s): [Errno 28] No space left on device"
    assert fault.attempts == 3 and isinstance(fault.cause, OSError) and fault.cause.errno == 28


def test_a_full_disk_met_by_ray_train_s_controller_is_the_user_s_error_not_a_fault(tmp_path):
    """The controller writes checkpoint_manager_snapshot.json into the run directory after each registered
    checkpoint; when it, not a worker, meets the full disk, fit() raises a ControllerError with no worker
    failures. The old code looked at worker failures only and retried it as a fault (then ended with
    `--resume` advice)."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    run = tmp_path / "run"
    # As the driver receives it: pickled by the controller actor (the errno survives).
    err = pickle.loads(pickle.dumps(ControllerError(_pyarrow_enospc())))
    user = user_error_in(err, run)
    assert type(user) is NoSpaceError and str(user) == f"no space left on {run} (No space left on device)"
    # Anything else from the controller stays a fault (retried by fit_run), the cut-off list's refusal included.
    refused = CheckpointManagerInitializationError(json.JSONDecodeError("Expecting value", "", 0))
    assert user_error_in(pickle.loads(pickle.dumps(ControllerError(refused))), run) is None
    # A worker's own user error is named before the controller's full disk.
    both = WorkerGroupError("failed", {0: ManifestError("a.wav cannot be decoded")})
    both.controller_failure = _pyarrow_enospc()
    assert type(user_error_in(both, run)) is ManifestError


@pytest.mark.parametrize("cut_off", [b"", b'{"checkpoint_results": [{"checkpoint_dir_'])
def test_ray_s_cut_off_checkpoint_list_is_moved_aside_so_its_controller_can_start(tmp_path, cut_off):
    """Ray Train's own checkpoint manager (what a resumed run's controller builds first) refuses the run
    directory with an empty or cut-off checkpoint_manager_snapshot.json, and starts on it once the list is
    set aside; a readable list is left alone."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    run = tmp_path / "run"
    run.mkdir()

    def ray_manager() -> CheckpointManager:
        storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="run",
                                 storage_filesystem=pyarrow.fs.LocalFileSystem())
        return CheckpointManager(checkpoint_config=CheckpointConfig(), storage_context=storage)

    ray_manager()._write_state_to_storage()  # Ray's own readable list (no checkpoints yet)
    snapshot = run / "checkpoint_manager_snapshot.json"
    readable = snapshot.read_bytes()
    set_aside_cut_off_snapshot(run)
    assert snapshot.read_bytes() == readable

    snapshot.write_bytes(cut_off)
    with pytest.raises(CheckpointManagerInitializationError):
        ray_manager()
    reason = "empty" if not cut_off else "cut off"
    with pytest.warns(ErmgapWarning, match=rf"checkpoint list {snapshot} is {reason}.*moved aside to "
                      rf"checkpoint_manager_snapshot.json.unreadable: resuming from the newest complete checkpoint"):
        set_aside_cut_off_snapshot(run)
    assert not snapshot.exists() and (run / "checkpoint_manager_snapshot.json.unreadable").read_bytes() == cut_off
    assert ray_manager().latest_checkpoint_result is None  # starts: the workers pick the newest checkpoint on disk
