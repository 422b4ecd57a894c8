"""Atomic output: write to a temporary file beside the target, then rename.

A crash or a bad input never leaves a half-written result, and results are never
overwritten unless the caller says `force=True`. A write that fails because the filesystem
is full raises NoSpaceError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ermgap.errors import ConfigError, ErmgapError, NoSpaceError, OutputExistsError

# Below this much free space a failed write is put down to a full disk (see out_of_space).
MIN_FREE_BYTES = 1 << 20


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Raise OutputExistsError if `path` exists and `force` is false."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"{p} already exists; pass --force to overwrite it")
    return p


def check_own_file(path: str | os.PathLike, force: bool, *, owner: str, ours) -> Path:
    """Before writing an output file of `owner` (e.g. "ermgap fronts"): OutputExistsError if it exists without
    `force`, ConfigError if it exists and `ours(path)` is false (--force replaces only the owner's own files)."""
    p = check_writable(path, force)
    if p.exists() and not ours(p):
        raise ConfigError(f"{p} was not written by {owner}; --force only replaces its own outputs: choose "
                          f"another --out or remove {p} yourself")
    return p


def out_of_space(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether `err`, raised while writing under `path`, means that path's filesystem is full.

    ENOSPC says so directly; torch.save (and so DeepSpeed's save_checkpoint) raises a bare RuntimeError
    ("unexpected pos ...") instead, so any error with less than MIN_FREE_BYTES left there counts too.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < MIN_FREE_BYTES
    except OSError:
        return False


def store_full(err: BaseException, *, sqlite_only: bool = False) -> bool:
    """Whether `err` (or an error it was raised from) says a disk is full: SQLITE_FULL from a sqlite store
    (MLflow's, raised as an MlflowException with no errno), or (unless `sqlite_only`) ENOSPC/EDQUOT."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) and not sqlite_only:
            return True
        if isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        err = err.__cause__ or err.__context__
    return False


def full_store_error(err: BaseException, tracking_uri: str) -> NoSpaceError | None:
    """NoSpaceError naming the MLflow store when `err` is its sqlite database failing on a full disk."""
    if not store_full(err, sqlite_only=True):
        return None
    return NoSpaceError(f"no space left on {tracking_uri.removeprefix('sqlite:///')} (the MLflow store)")


@contextlib.contextmanager
def no_space_reported(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write failure inside the block that is due to a full filesystem into NoSpaceError."""
    try:
        yield
    except ErmgapError:
        raise
    except Exception as err:
        if out_of_space(err, path):
            raise NoSpaceError(f"no space left on {path} (writing it failed: {_short(err)})") from err
        raise


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed onto `path`, on error removed."""
    target = check_writable(path, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with no_space_reported(target):
            yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, kind: str, force: bool = False, name: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on error it is removed.

    The output is marked as ermgap's of `kind` (claim_dir, optionally `name`d). An existing `path` is replaced
    only with `force` and only when it is an output of the same kind (check_writable_dir)."""
    target = check_writable_dir(path, kind, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with no_space_reported(target):
            yield tmp
            claim_dir(tmp, kind, name)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- outputs ermgap owns

# Written into every output directory ermgap creates: its first line names the kind of output, and --force
# replaces a directory only with an output of the same kind.
OWNER_MARKER = ".ermgap-output"
OUTPUT_KINDS = {"run": "training run", "sweep": "sweep", "report": "report", "corpus": "corpus", "model": "model",
                "predictions": "predictions file"}
# Markers written before the kind line existed.
_LEGACY = (("a training run", "run"), ("sweep ", "sweep"))


def marker_text(kind: str, name: str | None = None) -> str:
    """The OWNER_MARKER content of an output of `kind` (one of OUTPUT_KINDS), optionally named."""
    what = OUTPUT_KINDS[kind] + (f" {name}" if name else "")
    return f"kind: {kind}\n{what} written by ermgap; `--force` may replace it with another {OUTPUT_KINDS[kind]}\n"


def parse_marker(text: str) -> tuple[str | None, str]:
    """(kind, description) of an OWNER_MARKER's text; kind None when it names none ermgap knows."""
    lines = text.strip().splitlines() or [""]
    if lines[0].startswith("kind: "):
        kind = lines[0].removeprefix("kind: ").strip()
        return (kind if kind in OUTPUT_KINDS else None), (lines[1] if len(lines) > 1 else lines[0]).split(";")[0]
    for prefix, kind in _LEGACY:
        if lines[0].startswith(prefix):
            return kind, lines[0].split(";")[0]
    return None, lines[0].split(";")[0]


def refuse_other_kind(path, kind: str, marker: str | None, *, thing: str = "directory") -> None:
    """Raise ConfigError unless `marker` (an OWNER_MARKER's text; None: there is none) says `path` is an output
    of `kind`: --force replaces an output only with one of the same kind, and never what ermgap did not write."""
    want = OUTPUT_KINDS[kind]
    if marker is None:
        raise ConfigError(f"{path} is not a {want} ermgap created (no {OWNER_MARKER} marker in it); --force only "
                          f"replaces ermgap's own outputs: choose another {thing} or remove {path} yourself")
    found, described = parse_marker(marker)
    if found != kind:
        raise ConfigError(f"{path} holds a {OUTPUT_KINDS.get(found, 'different output')} ({described}), not a "
                          f"{want}: --force only replaces a {want} with a {want}; choose another {thing} or remove "
                          f"{path} yourself")


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """For --force: `path` is absent, an empty directory, or an output of `kind` ermgap wrote; else ConfigError."""
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return
    marker = p / OWNER_MARKER
    if not p.is_dir():
        raise ConfigError(f"{p} is a file, not a {OUTPUT_KINDS[kind]} ermgap created; --force only replaces "
                          f"ermgap's own outputs: choose another directory or remove {p} yourself")
    refuse_other_kind(p, kind, marker.read_text(encoding="utf-8") if marker.is_file() else None)


def check_writable_dir(path: str | os.PathLike, kind: str, force: bool) -> Path:
    """Before writing an output directory of `kind`: OutputExistsError if it exists without `force`, ConfigError if
    `force` would replace something else (check_replaceable)."""
    p = check_writable(path, force)
    if force:
        check_replaceable(p, kind)
    return p


def claim_dir(path: str | os.PathLike, kind: str, name: str | None = None) -> Path:
    """Create `path` (if needed) and mark it as ermgap's output of `kind`, so a later --force may replace it
    with another output of that kind."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    marker = p / OWNER_MARKER
    if not marker.is_file():
        marker.write_text(marker_text(kind, name), encoding="utf-8")
    return p


def set_aside(path: str | os.PathLike, kind: str) -> Path | None:
    """For --force: move an existing, non-empty `path` to a hidden sibling and return where it went.

    Refuses (ConfigError) anything but an output of `kind` ermgap wrote (check_replaceable). The caller deletes
    the returned directory once the new output has started (`discard_aside`) or moves it back when the new
    one fails before that (`restore_aside`). None: nothing to set aside.
    """
    p = Path(path)
    check_replaceable(p, kind)
    if not p.exists() or not any(p.iterdir()):
        return None
    aside = p.with_name(f".{p.name}.replaced-{os.getpid()}-{os.urandom(3).hex()}")
    os.replace(p, aside)
    return aside


def restore_aside(aside: Path | None, path: str | os.PathLike) -> None:
    """Undo set_aside: what was written at `path` since (ermgap's, incomplete) goes, the old directory returns."""
    if aside is None or not aside.exists():
        return
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    os.replace(aside, p)


def discard_aside(aside: Path | None) -> None:
    """Delete what set_aside moved away (the new output has started)."""
    if aside is not None and aside.exists():
        shutil.rmtree(aside)
