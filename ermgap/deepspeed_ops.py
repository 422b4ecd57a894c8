"""DeepSpeed's JIT-built CPU op and the lock file that can wedge it.

On CPU, every DeepSpeed process loads the shared-memory collective op (`deepspeed_shm_comm`)
through torch's JIT extension loader, which takes a lock *file* in the build directory on each
load and waits, forever and silently, while that file exists. A process killed inside that window
(a fault-injection test, a preempted worker, Ctrl-C during set-up) leaves the file behind, and from
then on every training run on the machine hangs in `deepspeed.initialize`. This module removes such
a lock when it is provably stale, and prebuilds the op once for `make setup`.

torch keeps one build per op name under ~/.cache/torch_extensions and rebuilds it whenever the compile
command changes. Two installations (two virtual environments, a CI clone beside a checkout) compile with
different include paths, so on a shared machine each load by the other one rebuilt the op (25-50 s on two
loaded cores, in whichever set-up came next). `pin_build_dir` gives each installation its own build
directory, so each builds once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"
# A cold build takes ~80 s on 2 idle cores; a lock younger than this may belong to a live build.
STALE_AFTER_S = 120.0


def pin_build_dir() -> None:
    """Point torch's extension cache (TORCH_EXTENSIONS_DIR, unless set) at a directory of this installation's
    own, named by where torch and DeepSpeed are installed (what the compile command depends on). In the
    environment, so Ray workers and subprocesses started from here use the same one."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    where = "\n".join(str(importlib.util.find_spec(m).origin) for m in ("torch", "deepspeed"))
    key = hashlib.sha256(where.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / "torch_extensions" / key)


def _build_dir(name: str = OP_NAME) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    pin_build_dir()

    return Path(_get_build_directory(name, verbose=False))


def _compiler_running() -> bool:
    """Whether a ninja or C++ compiler process runs on this machine (a build may hold the lock)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in {"ninja", "c++", "g++", "cc1plus", "gcc", "ld"}:
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def clear_stale_lock(name: str = OP_NAME, stale_after_s: float = STALE_AFTER_S, wait: bool = True) -> Path | None:
    """Remove the op's build lock once it is older than `stale_after_s` while no compiler runs.

    With `wait`, a young lock is watched until its build releases it or it turns stale, so the
    caller never enters torch's unbounded wait. Returns the removed path, or None.
    """
    lock = _build_dir(name) / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        if age >= stale_after_s and not _compiler_running():
            try:
                lock.unlink()
            except FileNotFoundError:  # another process cleared it first
                return None
            return lock
        if not wait:
            return None
        time.sleep(1.0)


def prebuild() -> None:
    """Build (or load from cache) the CPU collective op once, so no training run pays for it."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    removed = clear_stale_lock()
    if removed is not None:
        print(f"removed a stale DeepSpeed build lock left by a killed process: {removed}")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


if __name__ == "__main__":
    prebuild()
