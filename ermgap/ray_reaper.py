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
import sys
import time

import psutil

POLL_S = 0.5     # how often the record is refreshed (and how late the reaper may notice the driver's exit)
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


def cluster_processes(driver: psutil.Process | None, session_dir: str) -> dict[int, psutil.Process]:
    """{pid: process} of the cluster's head processes (the driver's children naming `session_dir`) and
    their descendants; with driver None (it is gone), every process on the machine that belongs to it."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    candidates = driver.children() if driver is not None else psutil.process_iter()
    for p in candidates:
        if p.pid == me or not _in_session(p, session_dir):
            continue
        found[p.pid] = p
        if driver is not None:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                continue
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


def watch(driver_pid: int, session_dir: str) -> None:
    """Record the cluster while the driver lives; once it is gone, stop what is left of it. Prints one
    line when the first record is taken (`ensure_ray` waits for it)."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    record: dict[int, psutil.Process] = {}
    ready = False
    while driver is not None and _alive(driver):
        now = cluster_processes(driver, session_dir)
        if record and not now:
            return  # the driver shut its cluster down itself
        record.update(now)
        record = {pid: p for pid, p in record.items() if _alive(p)}
        if not ready:
            print("watching", flush=True)
            ready = True
        time.sleep(POLL_S)
    # Agents or workers started after the last record, orphaned by now, still hold the session's files open.
    record.update(cluster_processes(None, session_dir))
    stop([p for p in record.values() if _alive(p)])


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
