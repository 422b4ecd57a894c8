"""One opener at a time for a local sqlite MLflow store.

MLflow creates a new sqlite store when it first opens it, running every schema migration (seconds). Two processes
opening the same new store at once (two `ermgap train` started together, two sweeps sharing a store) both migrate
it and one fails ("Online migration expected to match one row when updating ... in 'alembic_version'"). Holding an
exclusive lock on a file beside the database while opening serialises that; opening an existing store under it
costs a few milliseconds.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


@contextmanager
def first_open_lock(tracking_uri: str) -> Iterator[None]:
    """Hold `<database>.lock` while the body opens the store at `tracking_uri` (sqlite only; others: no lock, as
    for a database whose folder does not exist: MLflow reports that itself)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        yield
        return
    db = Path(tracking_uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0])
    if not db.parent.is_dir():
        yield
        return
    try:
        lock = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 (held across the yield)
    except OSError:  # a read-only folder (a store shared to read): only readers there, nothing to migrate
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        yield
