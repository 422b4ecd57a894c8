"""A build lock left by a killed process must not wedge DeepSpeed (CI once hung 80 min on one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from ermgap import deepspeed_ops


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_clear_stale_lock_removes_only_old_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = deepspeed_ops._build_dir()
    assert build.is_relative_to(tmp_path)
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    assert deepspeed_ops.clear_stale_lock() is None  # no lock at all

    lock.touch()  # a live build's lock: young
    assert deepspeed_ops.clear_stale_lock(wait=False) is None
    assert lock.exists()

    _age(lock, deepspeed_ops.STALE_AFTER_S + 5)
    if deepspeed_ops._compiler_running():
        pytest.skip("a compiler is running on this machine; the lock is rightly kept")
    assert deepspeed_ops.clear_stale_lock() == lock
    assert not lock.exists()


def test_clear_stale_lock_waits_out_a_young_lock_that_goes_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = deepspeed_ops._build_dir()
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    lock.touch()
    if deepspeed_ops._compiler_running():
        pytest.skip("a compiler is running on this machine; the lock is rightly kept")
    t0 = time.monotonic()
    assert deepspeed_ops.clear_stale_lock(stale_after_s=2.0) == lock
    assert 1.5 <= time.monotonic() - t0 < 30
    assert not lock.exists()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_prebuild_finishes_despite_a_stale_lock(tmp_path):
    """Without the guard, torch's loader waits on the lock file forever: the subprocess times out."""
    cached = deepspeed_ops._build_dir()
    if not (cached / f"{deepspeed_ops.OP_NAME}.so").exists():
        pytest.skip("the op is not prebuilt here (make setup builds it)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    probe = "from ermgap import deepspeed_ops; print(deepspeed_ops._build_dir())"
    build = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    target = build.stdout.strip().splitlines()[-1]
    shutil.copytree(cached, target, ignore=shutil.ignore_patterns("lock"), dirs_exist_ok=True)
    lock = os.path.join(target, "lock")
    open(lock, "w").close()
    _age(lock, 3600)
    done = subprocess.run([sys.executable, "-m", "ermgap.deepspeed_ops"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed a stale DeepSpeed build lock" in done.stdout
    assert not os.path.exists(lock)
