"""Process helpers for tests that start servers: free loopback ports, `ermgap serve` as a subprocess, and finding
the processes a test started by a marker in their environment (so teardown kills exactly those, never another user's Ray)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Wait until `url` answers (any 2xx/3xx); fail with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


class ServerProcess:
    """`python -m ermgap.cli.main serve ...` on a free loopback port; start() waits for /health."""

    def __init__(self, model: Path, log: Path, *, token: str, served: str | None = None, adapter: Path | None = None,
                 max_request_mb: float = 1.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.args = [sys.executable, "-m", "ermgap.cli.main", "serve", str(model), "--port", str(self.port),
                     *(["--served-model-name", served] if served else []),  # default: the model directory's name
                     "--max-request-mb", str(max_request_mb), "--device", "cpu",
                     *(["--adapter", str(adapter)] if adapter else [])]
        self.log = log
        self.token = token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        env = {**os.environ, "ERMGAP_SERVE_TOKEN": self.token}
        self.proc = subprocess.Popen(self.args, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ermgap serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"ermgap serve did not come up in {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
