"""Shut down the local Ray cluster a driver started once that driver is gone, even when it was SIGKILLed.

`ensure_ray` starts this as a detached process (`python -m ermgap.ray_reaper DRIVER_PID SESSION_DIR`) right
after it started a local cluster. Ray's head processes die with their driver, but the agents the raylet
starts (DashboardAgent, RuntimeEnvAgent) outlive a killed driver and ignore SIGTERM. Once they are orphaned,
nothing links them to their cluster any more, so this process keeps a record while the driver lives: the
driver's children whose command line names the cluster's session directory (gcs_server, raylet, dashboard,
monitors) and all of their descendants (agents, workers). When the driver exits, those still alive get
SIGTERM, then SIGKILL after a grace period. It also exits, doing nothing, when the cluster was shut down
while the driver lives (`ray.shutdown()`).

Only psutil is imported: this process should start in milliseconds and stay small.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import psutil

RECORD_S = 2.0   # how often the record is refreshed (the driver's exit is seen at once: _exit_waiter)
POLL_S = 0.5     # how late the driver's exit is seen where the system has no pidfd
GRACE_S = 3.0    # between SIGTERM and SIGKILL


def _in_session(p: psutil.Process, session_dir: str) -> bool:
    """Whether `p` belongs to the cluster: its command line names the session directory (gcs_server, raylet,
    dashboard, monitors) or it holds a file of it open (every Ray process logs there: agents, workers)."""
    inside = session_dir.rstrip("/") + "/"  # not a session whose name merely starts with this one's
    try:
        return (any(inside in arg + "/" for arg in p.cmdline())
                or any(f.path.startswith(inside) for f in p.open_files()))
    except psutil.Error:  # gone, or not ours to inspect
        return False


def _children_by_parent() -> dict[int, list[psutil.Process]]:
    """{ppid: [its children]} for every process on the machine, read once (psutil's children() reads every
    process again for each call)."""
    tree: dict[int, list[psutil.Process]] = defaultdict(list)
    for p in psutil.process_iter(["ppid"]):
        tree[p.info["ppid"]].append(p)
    return tree


def cluster_processes(driver: psutil.Process | None, session_dir: str) -> dict[int, psutil.Process]:
    """{pid: process} of the cluster's head processes (the driver's children naming `session_dir`) and
    their descendants; with driver None (it is gone), every process on the machine that belongs to it."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    if driver is not None:
        tree = _children_by_parent()
        candidates = tree.get(driver.pid, [])
    else:  # orphans: no parent links them to the cluster any more
        tree, candidates = {}, psutil.process_iter()
    for p in candidates:
        if p.pid == me or not _in_session(p, session_dir):
            continue
        found[p.pid] = p
        below = list(tree.get(p.pid, []))
        while below:
            child = below.pop()
            found[child.pid] = child
            below.extend(tree.get(child.pid, []))
    return found


def stop(processes: list[psutil.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace_s`. psutil checks each process's creation time,
    so a pid the system reused for another process is never signalled."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exit_waiter(driver: psutil.Process) -> Callable[[float], bool]:
    """wait(timeout) -> whether the driver has exited. On Linux a pidfd wakes this process when the driver exits
    (no polling: an idle cluster's reaper costs no CPU between records); elsewhere its liveness is polled."""
    try:
        fd = os.pidfd_open(driver.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the driver is gone already
        fd = None
    if fd is not None and not _alive(driver):  # the pid was reused between psutil's look and the pidfd
        os.close(fd)
        return lambda timeout: True
    if fd is not None:
        return lambda timeout: bool(select.select([fd], [], [], timeout)[0])

    def poll(timeout: float) -> bool:
        end = time.monotonic() + timeout
        while _alive(driver):
            if time.monotonic() >= end:
                return False
            time.sleep(POLL_S)
        return True

    return poll


def watch(driver_pid: int, session_dir: str) -> None:
    """Record the cluster while the driver lives; once it is gone, stop what is left of it. Prints one
    line when the first record is taken (`ensure_ray` waits for it)."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    record: dict[int, psutil.Process] = {}
    if driver is not None:
        exited, ready = _exit_waiter(driver), False
        while True:
            now = cluster_processes(driver, session_dir)
            if record and not now:
                return  # the driver shut its cluster down itself
            record.update(now)
            record = {pid: p for pid, p in record.items() if _alive(p)}
            if not ready:
                print("watching", flush=True)
                ready = True
            if exited(RECORD_S):
                break
    # Agents or workers started after the last record, orphaned by now, still hold the session's files open.
    record.update(cluster_processes(None, session_dir))
    stop([p for p in record.values() if _alive(p)])


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
