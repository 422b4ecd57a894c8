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
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (a directory), on error it is removed."""
    target = Path(path)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with no_space_reported(target):
            yield tmp
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


# ----------------------------------------------------------------------------- directories ermgap owns

# Written into every run and sweep directory ermgap creates; --force replaces only directories that have it.
OWNER_MARKER = ".ermgap-output"


def claim_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` (if needed) and mark it as ermgap's, so a later --force may replace it."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    marker = p / OWNER_MARKER
    if not marker.is_file():
        marker.write_text(f"{what} written by ermgap; `--force` may replace this directory\n", encoding="utf-8")
    return p


def set_aside(path: str | os.PathLike, what: str) -> Path | None:
    """For --force: move an existing, non-empty `path` to a hidden sibling and return where it went.

    Refuses (ConfigError) a directory without OWNER_MARKER: --force replaces ermgap's own outputs, never a
    folder it did not create. The caller deletes the returned directory once the new output has started
    (`discard_aside`) or moves it back when the new one fails before that (`restore_aside`). None: nothing
    to set aside.
    """
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return None
    if not p.is_dir() or not (p / OWNER_MARKER).is_file():
        raise ConfigError(f"{p} is not a {what} ermgap created (no {OWNER_MARKER} marker in it); --force only "
                          f"replaces ermgap's own outputs: choose another directory or remove {p} yourself")
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
