"""Process helpers for tests that start servers: free loopback ports, and finding the processes a test
started by a marker in their environment (so teardown kills exactly those, never another user's Ray)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with_env(key: str, value: str) -> list[int]:
    """PIDs (other than this process) whose environment holds KEY=VALUE."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_pids_with_env(key: str, value: str) -> None:
    for pid in pids_with_env(key, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
