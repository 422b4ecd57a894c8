"""A real single-node Ray head for tests, started with cluster/start-local-head.sh and stopped safely.

`ray stop` would stop every Ray process on the machine (other engineers' and CI jobs' clusters too),
so it is never used here. Instead the head runs as `ray start --head --block` in its own session:
SIGTERM to that one process drains the node and shuts down the processes it started. As a safety
net, every process that carries this head's unique marker in its environment (all of the head's
descendants inherit it: GCS, raylet, dashboard, workers, job drivers) is killed by pid afterwards.
Nothing that lacks the marker is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from _procs import free_port, pids_with_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "start-local-head.sh"
VENV_BIN = ROOT / ".venv" / "bin"


class LocalHead:
    """`with LocalHead(token="...") as head:` → head.address (http://127.0.0.1:PORT) on a fresh cluster."""

    def __init__(self, *, token: str | None, num_cpus: int = 2, num_gpus: int | None = None,
                 extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.token = token
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus  # Ray accepts a declared GPU on a machine without one
        self.extra_env = extra_env or {}
        self.extra_args = extra_args or []
        self.marker = uuid.uuid4().hex
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_port = str(free_port())
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"  # what `ray start --address` and ray.init join
        self.temp_dir = tempfile.mkdtemp(prefix="egr-", dir="/tmp")  # short: Unix socket paths are limited
        self.log_path = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        env.update(self.extra_env)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # like an activated venv / the image
        env["ERMGAP_TEST_HEAD"] = self.marker
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "2"  # a test head has nothing worth draining for 30 s
        env["DASHBOARD_PORT"] = str(self.dashboard_port)
        env["GCS_PORT"] = self.gcs_port
        if self.token is None:
            env["RAY_AUTH_MODE"] = "disabled"
        else:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN"] = self.token  # the head uses it; nothing is written to ~/.ray
        return env

    def start(self, timeout_s: float = 90) -> LocalHead:
        from ray.job_submission import JobSubmissionClient

        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(SCRIPT), "--block", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}",
                 # Ray's fixed defaults (agent 52365, client server 10001) would collide with another
                 # cluster on this machine: its job agent then never comes up ("No available agent").
                 f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                 *([f"--num-gpus={self.num_gpus}"] if self.num_gpus is not None else []), *self.extra_args],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                JobSubmissionClient(self.address, headers=headers).list_jobs()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray head not ready after {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        _stop_blocking(self.proc)
        for _ in range(20):
            left = pids_with_env("ERMGAP_TEST_HEAD", self.marker)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.25)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        return pids_with_env("ERMGAP_TEST_HEAD", self.marker)

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalNode:
    """A second Ray node on this machine joined to `head` (`ray start --block --address`): same marker,
    so `head.stop()` also catches what is left of it. Stop it (SIGTERM to its `ray start`) first."""

    def __init__(self, head: LocalHead, *, num_cpus: int = 2, extra_args: list[str] | None = None):
        self.head = head
        self.num_cpus = num_cpus
        self.extra_args = extra_args or []
        self.log_path = Path(head.temp_dir) / f"node-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalNode:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--address", self.head.gcs_address,
                 "--node-ip-address", "127.0.0.1", f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={free_port()}", *self.extra_args],
                env=self.head.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        _stop_blocking(self.proc)


def _stop_blocking(proc: subprocess.Popen | None) -> None:
    """SIGTERM to a `ray start --block` drains its node; its session is killed if it does not exit."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
