"""Start or join the Ray cluster a training run or sweep uses.

Local clusters bind 127.0.0.1 and keep the dashboard on: Ray 2.60's Train V2 placement-group
cleaner queries actor state through the dashboard, and without it a finished run's resources are
not released (the next worker group then times out on a small machine).

A local cluster ermgap starts ends with the process that started it: `ermgap.ray_reaper` watches that
process and stops the cluster's processes when it exits, however it exits (Ray's own agents outlive a
SIGKILLed driver).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping

import psutil
import ray
import ray._private.worker
from ray._private import ray_constants

from ermgap import ray_reaper as reaper
from ermgap.loopback import is_loopback_host
from ermgap.quiet import drop_raylet_notices

DEFAULT_DASHBOARD_PORT = 8265
# Ports a local cluster's own processes take whatever the driver asks for (the dashboard agent's HTTP server):
# ray.init refuses a dashboard port among them ("... is trying to use a port number ... used by other components").
RAY_FIXED_PORTS = frozenset({ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT})
DASHBOARD_PORT_TRIES = 3  # ray.init attempts when the dashboard's port is taken between the check and the bind
# Held by a driver from its check of the dashboard's port until its cluster is up: drivers on this machine that
# start at the same moment then start one after the other, the later one seeing the port taken, instead of both
# choosing it (the loser's dashboard cannot bind, and Ray waits up to 60 s for it before ermgap retries).
START_LOCK = "ermgap-ray-start.lock"
# Ray Train's controller polls its workers every $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s): a poll is where
# it collects each `ray.train.report` (a worker's next report waits for it: the queue holds one) and where it
# notices that training has ended, so every run ended up to 2 s after its final metrics. A poll is one small actor
# call per worker, and one slower than the interval is no failure (a worker is declared dead after a poll hangs
# for $RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). A value the user set is kept.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"
# Ray Train starts a preemption watcher per run (an actor, one more Python process beside the workers, ~1.5 s of a
# 2-core machine's start-up) that polls the cluster's nodes for a preemption notice (a spot node about to go).
# The local cluster ermgap starts is this machine alone: nothing to watch. A joined cluster keeps Ray's default
# (its GCS listens on every interface, and an autoscaler may add spot nodes later). A value the user set is kept.
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's exit hook (ray._private.worker.shutdown, atexit) sleeps this long before stopping a cluster it started.
RAY_EXIT_OUTPUT_PAUSE_S = 0.5
REAPER_START_S = 30.0  # how long ensure_ray waits for the reaper to say it watches (a loaded machine)
REAP_S = 10.0  # the longest shutdown_ray waits for a process it SIGKILLed itself to be reaped
# The reapers this process started: held so that their Popen objects are not collected (and reaped) early.
_REAPERS: list[subprocess.Popen] = []


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port on 127.0.0.1 from the OS, never one of RAY_FIXED_PORTS: one it hands out is held while it is
    asked again, so it hands out another."""
    with contextlib.ExitStack() as held:
        while True:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in RAY_FIXED_PORTS:
                return s.getsockname()[1]


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one on 127.0.0.1.

    No-op if this process is already connected. $RAY_ADDRESS is what Ray Jobs sets for a submitted
    driver: without it, `ermgap train` inside a job would start a second cluster on the head node.
    `num_cpus` caps a local cluster's CPUs (default: all cores); it is ignored when joining.
    Token authentication stays at Ray's default (on in 2.60). `log_to_driver=False` keeps worker
    output in Ray's session logs only (sweeps show their own trial lines; failed trials still
    report their errors) and also turns Ray's own INFO lines in this process off.
    """

    if ray.is_initialized():
        return
    if not log_to_driver:
        drop_raylet_notices()
    level = logging.INFO if log_to_driver else logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        env_vars = job_env_vars(local=False)
        # A head bound to 127.0.0.1 (cluster/start-local-head.sh's default) is only reachable from this
        # machine's loopback: without naming it, Ray registers this driver under the host's own IP and
        # never reaches the GCS ("Timed out while waiting for GCS to become available").
        local = {"_node_ip_address": "127.0.0.1"} if is_loopback_host(host) else {}
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level,
                 runtime_env={"env_vars": env_vars} if env_vars else None, **local)
        return
    env_vars = job_env_vars(local=True)
    with _start_lock():
        context = _start_local(num_cpus, log_to_driver, level, env_vars)
    _REAPERS.append(start_reaper(context.address_info["session_dir"]))


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """START_LOCK, shared by every user of the machine (the ports are). One that cannot be opened (another
    user's file of another mode, a link put there) leaves the race to the retry in _start_local."""
    try:
        fd = os.open(os.path.join(tempfile.gettempdir(), START_LOCK), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        logging.getLogger(__name__).debug("starting Ray without the start lock: %s", err)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _start_local(num_cpus: int | None, log_to_driver: bool, level: int, env_vars: dict[str, str]):
    port = DEFAULT_DASHBOARD_PORT if _port_free(DEFAULT_DASHBOARD_PORT) else _free_port()
    for attempt in range(DASHBOARD_PORT_TRIES):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            context = ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                _node_ip_address="127.0.0.1",
                log_to_driver=log_to_driver,
                logging_level=level,
                # Train V2's placement-group cleaner asks the dashboard whether a run's controller is alive.
                # Left to auto-detect the cluster, it fails when a second Ray instance runs on the machine
                # (another user, a test head), so a finished run's placement group is never removed and the
                # next worker group times out. Naming this cluster's dashboard avoids that.
                runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **env_vars}},
            )
            break
        except Exception as err:
            # The port was free when checked and taken before Ray's dashboard bound it (another cluster starting
            # at the same moment): Ray raises after starting the head's GCS, a ValueError from its own check of
            # the port or, if the port went after that check, a plain Exception quoting the dashboard's log.
            # Stop what this attempt started, then take another free port.
            if not _dashboard_port_taken(err) or attempt == DASHBOARD_PORT_TRIES - 1:
                raise
            reaper.stop([p for p in psutil.Process().children(recursive=True) if p.pid not in before])
            port = _free_port()
    return context


def job_env_vars(*, local: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The job's environment: every task and actor of this driver gets it (Train controllers and a sweep's trial
    drivers included; an actor's own env_vars are merged with it). `local`: the cluster is the one this process
    starts on this machine. Variables set in `environ` (the user's) are left to it."""
    wanted = {TRAIN_POLL_ENV: TRAIN_POLL_S, **({PREEMPTION_ENV: "0"} if local else {})}
    return {key: value for key, value in wanted.items() if key not in environ}


def _dashboard_port_taken(err: Exception) -> bool:
    """Whether ray.init failed because the dashboard's port was taken (Ray's two ways of saying so)."""
    text = str(err)
    return (isinstance(err, ValueError) and "already occupied" in text) or (
        "Failed to find a valid port for dashboard" in text and "address already in use" in text)


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Start `ermgap.ray_reaper` for the local cluster of `session_dir`, which this process started: it stops
    that cluster's processes when this process exits, however it exits (a SIGKILL included)."""
    proc = subprocess.Popen([sys.executable, "-m", "ermgap.ray_reaper", str(os.getpid()), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            # Its own session: a Ctrl-C or a hang-up that ends the driver must not end it first.
                            start_new_session=True, close_fds=True)
    # Return once it watches: a driver killed right after this call still has its cluster stopped.
    if select.select([proc.stdout], [], [], REAPER_START_S)[0]:
        proc.stdout.readline()
    proc.stdout.close()
    return proc


def shutdown_ray(*, wait_for_output: bool = False) -> None:
    """Shut down the Ray connection this process holds (stops a local cluster it started, as Ray's exit hook would).

    A command calls this once it is done rather than leaving it to that hook, which first pauses
    (`RAY_EXIT_OUTPUT_PAUSE_S`) so that worker output still on its way reaches the console: output a quiet run
    does not show (ensure_ray's `log_to_driver=False`). `wait_for_output` keeps the pause (--verbose)."""

    if ray.is_initialized():
        if wait_for_output:
            time.sleep(RAY_EXIT_OUTPUT_PAUSE_S)
        _stop_autoscaler_monitor()
        ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """SIGKILL the autoscaler monitor of the local cluster this process started, while the cluster's GCS still runs.

    ray.shutdown stops the raylet and the GCS first and the monitor after them; the monitor's SIGTERM handler
    reports its "failure" to the GCS, waits on the stopped GCS, and Ray SIGKILLs it after its 1-s grace: a
    second at the end of every command that started its cluster. The monitor holds nothing to save (it only
    publishes the autoscaler's status into the GCS the cluster is about to lose). A joined cluster's processes
    are not this process's: nothing is stopped."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        return
    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, ()):
        if info.process.poll() is None:
            info.process.kill()
            # A process that outlives SIGKILL (stuck in the kernel) is left to ray.shutdown's own kill and reap.
            with contextlib.suppress(subprocess.TimeoutExpired):
                info.process.wait(REAP_S)
