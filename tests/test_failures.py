"""ermgap.failures without Ray: a worker's user error recorded once (first rank wins, atomically) and read
back as its ermgap.errors class; the leaderboard's failed trials. End-to-end runs: test_run_failures.py."""

from __future__ import annotations

import json
import multiprocessing

import pandas as pd

from ermgap.errors import ErmgapError, ManifestError, NoSpaceError, TrainingError
from ermgap.failures import ERROR_FILE, clear_error, read_error, record_error


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
