"""How a training run fails, at one seam for `ermgap train` and every sweep trial.

    worker:  except ErmgapError → record_error(run_dir, err, rank); raise    (train_loop_per_worker)
    driver:  fit_run(make_trainer, ...)                                     (run_training, sweep's run_trial)

A user error raised inside a Ray Train worker (`ermgap.errors`: an audio file that stopped decoding after
the pre-flight, a NaN loss, a full disk) is recorded in RUN_DIR/error.json by the first rank that hits it,
then re-raised so that Ray Train stops the whole worker group (a rank that returned instead would leave
the others waiting in a collective). `fit_run` reads the record: a user error ends the run at once with
its own message and exit code; anything else (a lost worker or node, a network fault) is a fault and is
retried from the latest checkpoint, up to `distributed.max_failures` times.

Ray Train's own retry (FailureConfig.max_failures) cannot tell the two apart and would retry a user error
(the same bad file, the same NaN), so the trainer is built with max_failures=0 and the retries are made
here: a new `fit()` with the same storage path and name continues from the latest checkpoint, as
`ermgap train --resume` does (Ray Train V2 restores the run's checkpoint manager from storage).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from ermgap import errors
from ermgap.errors import ErmgapError, ErmgapWarning, NoSpaceError, OutputExistsError
from ermgap.io import store_full
from ermgap.storage import Location
from ermgap.tracking import mark_run

ERROR_FILE = "error.json"

log = logging.getLogger(__name__)


class RunFault(Exception):
    """A run that kept failing for a reason that is not a user error, after every retry."""

    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(f"{type(cause).__name__} after {attempts} attempt(s): {cause}")
        self.cause, self.attempts = cause, attempts

    def __reduce__(self):
        # Ray pickles a failed trial's exception to the sweep driver; the default rebuilds it from the message
        # alone, and a RunFault cannot be built from that (the trial's reason became a TypeError).
        return type(self), (self.cause, self.attempts)


def record_error(run_dir: str | os.PathLike | Location, err: ErmgapError, rank: int) -> bool:
    """Record a worker's user error for the driver; only the first rank's record is kept (the others
    usually fail the same way, or only because the first one stopped). Returns whether this one was kept.
    `run_dir` may be an object-store prefix (ermgap.storage), as on a multi-node cluster."""
    loc = Location.of(run_dir)
    body = json.dumps({"type": type(err).__name__, "message": str(err), "rank": rank}) + "\n"
    if loc.is_remote:
        # No exclusive create on an object store: a second rank racing the first may replace its record,
        # which is as good (both are user errors of this run, and both end it).
        try:
            (loc / ERROR_FILE).write_text(body)
            return True
        except OutputExistsError:
            return False
    target = loc.local / ERROR_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{ERROR_FILE}.")
    except OSError:  # a full disk cannot take the record: the driver finds the error in Ray's (user_error_in)
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.link(tmp, target)  # atomic and exclusive: fails if another rank's record is already there
        return True
    except FileExistsError:
        return False
    except OSError:
        return False
    finally:
        os.unlink(tmp)


def read_error(run_dir: str | os.PathLike | Location) -> ErmgapError | None:
    """The user error a worker of the run in `run_dir` recorded, as its ermgap.errors class; None if none."""
    path = Location.of(run_dir) / ERROR_FILE
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    cls = getattr(errors, record.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, ErmgapError)):
        cls = ErmgapError
    return cls(record["message"])


def user_error_in(err: BaseException, run_dir: str | os.PathLike | Location) -> ErmgapError | None:
    """The user error behind a failed fit() that no worker could record (a full disk takes no error.json
    either): a worker's ermgap error, or a write that failed with ENOSPC/EDQUOT, in Ray's per-rank failures
    or in its controller's (a ControllerError: the controller writes the run's checkpoint list,
    checkpoint_manager_snapshot.json, into the run directory, and may be the first to meet the full disk)."""
    failures = [f for _, f in sorted((getattr(err, "worker_failures", None) or {}).items())]
    for failure in [*failures, getattr(err, "controller_failure", None)]:
        seen: set[int] = set()
        stack = [failure]
        while stack:
            e = stack.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, ErmgapError):
                return e
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                return NoSpaceError(f"no space left on {run_dir} ({os.strerror(e.errno)})")
            stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def set_aside_cut_off_snapshot(run_dir: str | os.PathLike | Location) -> None:
    """Move Ray Train's checkpoint list of the run in local `run_dir` aside when it is unreadable, with a
    warning, so that a resume can start: Ray rewrites checkpoint_manager_snapshot.json in place after every
    registered checkpoint, a full disk leaves it empty or cut off, and a new controller refuses to start on
    it (CheckpointManagerInitializationError: JSONDecodeError). Without it Ray starts a fresh list and the
    workers resume from the newest complete checkpoint on disk (ermgap.worker.checkpoint_to_resume); an
    object store writes whole objects, so only a local (or NFS) run directory can hold a cut-off one."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    loc = Location.of(run_dir)
    path = None if loc.is_remote else loc.local / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if path is None or not path.is_file():
        return
    try:
        json.loads(path.read_bytes())
        return
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        reason = "empty" if path.stat().st_size == 0 else f"cut off ({err})"
    aside = path.with_name(path.name + ".unreadable")
    os.replace(path, aside)
    warnings.warn(f"Ray Train's checkpoint list {path} is {reason}, as a full disk leaves it; moved aside to "
                  f"{aside.name}: resuming from the newest complete checkpoint in {loc.local}",
                  ErmgapWarning, stacklevel=2)


def clear_error(run_dir: str | os.PathLike | Location) -> None:
    (Location.of(run_dir) / ERROR_FILE).delete()


def mark_failed(tracking_uri: str, run_dir: str | os.PathLike | Location, reason: str) -> None:
    """Mark the run's MLflow run FAILED with `reason`. A store on a full disk (the default one lives under
    ./runs, beside the run) cannot take it: a warning says so and the caller's error stays the one the user
    sees, instead of MLflow's traceback."""
    try:
        mark_run(tracking_uri, run_dir, "FAILED", reason=reason)
    except Exception as err:
        if not store_full(err):
            raise
        warnings.warn(f"the MLflow run in {tracking_uri} is not marked FAILED: no space left on its store",
                      ErmgapWarning, stacklevel=2)


def fit_run(make_trainer: Callable[[], Any], *, run_dir: str | os.PathLike | Location, tracking_uri: str,
            max_failures: int, finished: Callable[[], bool] = lambda: False) -> Any:
    """Fit the trainer `make_trainer()` builds (a Ray Train TorchTrainer with FailureConfig(max_failures=0))
    and return its Result; after a fault, fit a new one (it continues from the latest checkpoint), at most
    `max_failures` times (-1: no limit).

    Raises the worker's user error (an ermgap.errors class, with its message) at the first failure that
    recorded one or that Ray reports (a full disk takes no record: `user_error_in`), or RunFault once the
    retries are spent. Either way the run's MLflow run is marked FAILED
    with the reason (tag ermgap.error): a worker may die before it can say so itself.

    `finished()` says whether the run has written its final metrics: a fault after that (Tune ends a sweep's
    trial at its final report and removes its workers and controller with it) is no failure of the run, which
    is complete and has ended its MLflow run FINISHED; fit_run then returns None.
    """
    failures = 0
    while True:
        clear_error(run_dir)
        try:
            return make_trainer().fit()
        except ErmgapError:  # raised here on the driver (building the trainer): nothing to retry
            raise
        except Exception as err:  # Ray Train's TrainingFailedError (WorkerGroupError, ControllerError)
            user = read_error(run_dir) or user_error_in(err, run_dir)
            if user is not None:
                mark_failed(tracking_uri, run_dir, str(user))
                raise user from None
            if finished():
                log.info("training run %s: %s after its final metrics; the run is complete", run_dir,
                         type(err).__name__)
                return None
            failures += 1
            if max_failures != -1 and failures > max_failures:
                fault = RunFault(err, failures)
                mark_failed(tracking_uri, run_dir, str(fault))
                raise fault from err
            log.warning("training run %s: attempt %d failed (%s); retrying from its latest checkpoint",
                        run_dir, failures, type(err).__name__)
