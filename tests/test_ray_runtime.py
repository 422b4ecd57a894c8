"""The local Ray cluster a driver starts (ensure_ray) ends with that driver, however the driver ends.

The cluster's processes are found by a marker in their environment (set for the driver only, inherited by
everything it starts), so the check sees exactly this cluster, never another one on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from _procs import free_port, kill_pids_with_env, pids_with_env
from _runs import train_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parent.parent
DRIVER = """
import sys
from ermgap.ray_runtime import ensure_ray
ensure_ray(None, num_cpus=1, log_to_driver=False)
print("READY", flush=True)
sys.stdin.readline()  # then exit normally (Ray's atexit shutdown)
"""
MARKER = "ERMGAP_TEST_RAY_RUNTIME"
# For the tests where a dashboard fails to bind its port: that process logs its bind error but does not exit, so
# ray.init waits Ray's whole dashboard start-up timeout (60 s) before ermgap's retry (77 s per run, the machine 18 %
# busy). A dashboard that binds is up well within 20 s here (the whole before-ray-s-check case takes 14 s).
DASHBOARD_TIMEOUT = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "20"}


def _names(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[:80])
        except OSError:
            pass
    return out


def _descendants(pid: int) -> dict[int, float]:
    """{pid: start time} of every process under `pid` (the start time tells a later process with the same pid)."""
    import psutil

    try:
        return {p.pid: p.create_time() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _running(procs: dict[int, float]) -> list[int]:
    """The pids of `procs` still running (zombies waiting to be reaped are not)."""
    import psutil

    out = []
    for pid, started in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def _left(marker: str, procs: dict[int, float]) -> list[int]:
    """The pids still running of a cluster: those with the marker in their environment and those of `procs`."""
    return sorted(set(pids_with_env(MARKER, marker)) | set(_running(procs)))


def _kill_left(marker: str, procs: dict[int, float]) -> None:
    for pid in _left(marker, procs):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "exit"])
def test_the_local_cluster_stops_when_its_driver_ends(how, tmp_path):
    """Every process the driver's cluster started is gone soon after the driver ends, however it ends. The
    cluster's processes are found two ways: by the marker in their environment, and as the driver's
    descendants while it runs. The second is needed: Ray's agents set their process title over their
    environment's memory, so /proc/PID/environ of an agent may no longer show the marker (seen in 1 of 2 runs)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.err"
    cluster: dict[int, float] = {}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY", log.read_text()[-3000:]
        # The raylet starts its agents (the processes that outlive a killed driver) right after the cluster is
        # up: end the driver once they are there (looked for among its descendants: see the docstring). On a
        # loaded machine they may take longer than this; the check below then still covers whatever the cluster
        # has started by the time the driver ends.
        deadline = time.monotonic() + 30
        while (not {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(_names(_running(_descendants(proc.pid))))
               and time.monotonic() < deadline):
            time.sleep(0.5)
        cluster = _descendants(proc.pid)
        if how == "sigkill":
            proc.kill()
        elif how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.stdin.write("done\n")
            proc.stdin.flush()
        proc.wait(60)
        # Seconds on an idle machine; a loaded 2-core one (a full suite beside other work) needs longer.
        wait_s = 90
        deadline = time.monotonic() + wait_s
        while _left(marker, cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _names(_left(marker, cluster))
        assert left == [], f"still running {time.monotonic() - deadline + wait_s:.0f} s after the driver ended: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_left(marker, cluster)


POLL_DRIVER = """
import os, ray
from ray.train.v2._internal.constants import get_env_vars_to_propagate
from ermgap.ray_runtime import ensure_ray
ensure_ray(None, num_cpus=1, log_to_driver=False)

@ray.remote(num_cpus=0)
class Controller:  # created as Ray Train creates its TrainController: its own env_vars, from the driver's
    def interval(self):
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    def preemption_watcher(self):
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

@ray.remote(num_cpus=0)
def trial_driver():  # a sweep's trial driver builds its TorchTrainer in a Ray task
    return get_env_vars_to_propagate().get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

controller = Controller.options(runtime_env={"env_vars": {**get_env_vars_to_propagate(), "X": "1"}}).remote()
print("POLL", ray.get(controller.interval.remote()), ray.get(trial_driver.remote()), flush=True)
print("PREEMPTION", ray.get(controller.preemption_watcher.remote()), flush=True)
"""


def test_train_controllers_poll_every_half_second(tmp_path):
    """Ray Train's controller polls its workers every $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s),
    and a run ends only at the poll after its final report: a driver's cluster gives every controller 0.5 s,
    those of a sweep's trial drivers included (a value the user set is kept: ensure_ray only fills it in).
    On the local cluster, controllers also get Ray Train's preemption watcher turned off."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        env.pop(name, None)  # the suite's conftest sets them for its own runs
    try:
        out = subprocess.run([sys.executable, "-c", POLL_DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=110)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "POLL 0.5 0.5" in out.stdout, out.stdout + out.stderr[-2000:]
        assert "PREEMPTION 0" in out.stdout, out.stdout + out.stderr[-2000:]
    finally:
        kill_pids_with_env(MARKER, marker)


MONITOR_DRIVER = """
import json, threading, time
import psutil, ray, ray._private.worker
from ray._private import ray_constants
from ermgap.ray_runtime import ensure_ray, shutdown_ray
ensure_ray(None, num_cpus=1, log_to_driver=False)
procs = ray._private.worker._global_node.all_processes
watched = {"monitor": procs[ray_constants.PROCESS_TYPE_MONITOR][0].process.pid,
           "gcs": procs[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process.pid}
ended = []

def ended_yet(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

def watch():
    while len(ended) < len(watched):
        ended.extend(name for name, pid in watched.items() if name not in ended and ended_yet(pid))
        time.sleep(0.002)

thread = threading.Thread(target=watch)
thread.start()
shutdown_ray()
thread.join(30)
print("ENDED", json.dumps(ended), flush=True)
"""


def test_the_autoscaler_monitor_is_stopped_while_the_gcs_still_runs():
    """shutdown_ray on a cluster this driver started stops Ray's autoscaler monitor before the GCS. Ray's own order
    (raylet, GCS, then the rest) left the monitor's SIGTERM handler waiting on the stopped GCS until Ray SIGKILLed
    it a second later, at the end of every command that started its cluster (bench/fixed_cost.py: metrics
    written → exit). Nothing about the monitor reaches the console."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-c", MONITOR_DRIVER], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=110)
        assert out.returncode == 0, out.stderr[-3000:]
        assert 'ENDED ["monitor", "gcs"]' in out.stdout, out.stdout + out.stderr[-2000:]
        assert "autoscaler" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr[-2000:]
    finally:
        kill_pids_with_env(MARKER, marker)


@pytest.mark.parametrize(("local", "environ", "expected"), [
    (True, {}, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}),
    (False, {}, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}),  # a joined cluster may have spot nodes
    (True, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}),
    (True, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}),
])
def test_the_job_environment_keeps_what_the_user_set(local, environ, expected):
    from ermgap.ray_runtime import job_env_vars

    assert job_env_vars(local=local, environ=environ) == expected


def test_the_suites_runs_start_no_preemption_watcher(reference_run, ray_cluster):
    """The variable turns Ray Train's watcher off in a real run: the reference run (`ermgap train`, a driver
    joining the session's cluster, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 from conftest as ermgap's own local
    clusters set it) has its controller and worker in Ray's record of every actor the cluster started (alive or
    dead), and no watcher."""
    from ray.util.state import list_actors

    started = {a.class_name for a in list_actors(address=ray_cluster, limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker"} <= started and "PreemptionWatcher" not in started, started


# What may outlive the driver by a moment: ermgap's reaper (it exits once it sees the driver gone) and the
# multiprocessing helpers of the cluster's Python processes (they exit once their parent has).
HELPERS = ("-m ermgap.ray_reaper ", "from multiprocessing.resource_tracker import main",
           "from multiprocessing.forkserver import main")


def _cmdlines(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            pass
    return [c for c in out if c]


@pytest.mark.deepspeed
def test_train_stops_the_cluster_it_started_before_it_exits(tmp_path, small_manifest, tiny_model):
    """`ermgap train` without --address starts a local cluster and stops it itself when the run is done (not in
    Ray's exit hook): when the process exits, none of the cluster's processes is left to the reaper (the
    safety net for a killed driver) and seconds later nothing of it runs. The run is complete and reported as
    before: exit 0, its table, metrics.json, the MLflow run FINISHED with its params, metrics and artifacts."""
    from mlflow import MlflowClient

    from ermgap.tracking import BEST

    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ERMGAP_VERBOSE")}
    env.update({MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"})
    run_dir = tmp_path / "run"
    # One worker, one optimizer step, one evaluation: the shortest run with every output.
    overrides = [o for o in train_overrides(small_manifest, tiny_model, tmp_path) if not o.startswith(
        ("optim.epochs=", "optim.effective_batch_size=", "optim.micro_batch_size=", "distributed.num_workers="))]
    overrides += ["optim.epochs=1", "optim.effective_batch_size=48", "optim.micro_batch_size=48",
                  "distributed.num_workers=1"]
    (tmp_path / "run.yaml").write_text("{}\n")
    # The run's processes: by the marker in their environment, and (for Ray's agents, whose process title
    # overwrites their environment: test_the_local_cluster_stops_when_its_driver_ends) as the driver's descendants.
    seen: dict[int, float] = {}
    log = tmp_path / "train.out"
    try:
        with log.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "ermgap.cli.main", "train", str(tmp_path / "run.yaml"),
                                     *overrides, "--run-dir", str(run_dir)],
                                    cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                seen.update(_descendants(proc.pid))
                time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        at_exit = _cmdlines(_left(marker, seen))
        out = log.read_text()
        assert proc.wait(30) == 0, out[-3000:]
        # Ray's own processes (GCS, raylet, dashboard and its agents, monitors, workers) are gone already; a
        # driver that exited without stopping them would leave the agents to the reaper, seconds later.
        assert [c for c in at_exit if not any(h in c for h in HELPERS)] == [], at_exit
        deadline = time.monotonic() + 30
        while _left(marker, seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _names(_left(marker, seen)) == [], at_exit
    finally:
        _kill_left(marker, seen)
    assert "ermgap train: best checkpoint" in out and "Traceback" not in out
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["done"] and final["step"] == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(final["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed.num_workers"] == "1"
    assert run.data.metrics[f"{BEST}test_w_f1"] == pytest.approx(final["test_w_f1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert {"metrics.json", "predictions/dev_preds.csv", "predictions/test_preds.csv"} <= artifacts, artifacts


RACE_DRIVER = """
import os, socket, psutil, ray
from ermgap import ray_runtime
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
# The default port is free when checked and taken before Ray's dashboard binds it (another cluster starting).
ray_runtime.DEFAULT_DASHBOARD_PORT = held.getsockname()[1]
ray_runtime._port_free = lambda port: True
if {after_ray_check}:
    # ... and taken even after Ray's own check in this process: only the dashboard's process fails to bind it.
    # Ray's check is a bind of a test socket; it binds port 0 instead, as if the port were still free then.
    import types
    import ray._private.services as services

    class _Socket(socket.socket):
        def bind(self, address):
            return super().bind((address[0], 0) if address[1] == held.getsockname()[1] else address)

    services.socket = types.SimpleNamespace(**{{**vars(socket), "socket": _Socket}})
ray_runtime.ensure_ray(None, num_cpus=1, log_to_driver=False)

@ray.remote(num_cpus=0)
def api_server():
    return os.environ.get("RAY_API_SERVER_ADDRESS")

gcs = [p for p in psutil.Process().children() if p.name() == "gcs_server"]
dashboard = ray._private.worker.get_dashboard_url()
print("RACE", held.getsockname()[1], dashboard, ray.get(api_server.remote()), len(gcs), flush=True)
"""


@pytest.mark.parametrize("after_ray_check", [False, True], ids=["before-ray-s-check", "after-ray-s-check"])
def test_a_dashboard_port_taken_after_the_check_gets_another_port(after_ray_check, tmp_path):
    """ensure_ray checks that 8265 is free, then Ray binds it: a cluster starting in between takes it, and Ray
    raises after starting the head's GCS: a ValueError from its own check of the port, or, when the port went
    after that check (two `ermgap train` started at once), the dashboard process's bind error. Either way the
    driver starts its cluster on another free port, with no GCS of the failed attempt left, and the runtime env
    names the dashboard that serves this cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if after_ray_check:
        env.update(DASHBOARD_TIMEOUT)
    driver = RACE_DRIVER.replace("{after_ray_check}", str(after_ray_check)).replace("{{", "{").replace("}}", "}")
    proc = subprocess.run([sys.executable, "-c", driver], cwd=REPO, env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
                          capture_output=True, text=True, timeout=180)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RACE ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    _, held, dashboard, api_server, gcs = line.split()
    assert dashboard.startswith("127.0.0.1:") and dashboard != f"127.0.0.1:{held}", line
    assert api_server == f"http://{dashboard}", line
    assert gcs == "1", line


PORT_PICKER = """
import socket
from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as agent
from ermgap import ray_runtime
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:  # this network namespace's only
    f.write(f"{agent} {agent + 4}")
# The OS then hands out the agent's port, or agent + 2 or + 4 (the kernel's search here skips the two held).
held = [socket.socket() for _ in range(2)]
for s, port in zip(held, (agent + 1, agent + 3)):
    s.bind(("127.0.0.1", port))
print("PORTS", agent, *(ray_runtime._free_port() for _ in range(20)), flush=True)
"""


def test_the_fallback_dashboard_port_is_never_one_ray_takes_itself():
    """The dashboard's fallback port comes from the OS, which may hand out 52365: the port of the dashboard agent's
    HTTP server, which Ray takes whatever it is asked, so ray.init refused the cluster (seen once in a full suite,
    in the dashboard-port race test). In a network namespace of its own whose ephemeral range leaves the OS that
    port and two others, the fallback never picks Ray's (the OS handed it out 8 times of 10 before)."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here ({probe.stderr.strip() if probe else 'no unshare'}); "
                    "needs root")
    proc = subprocess.run([unshare, "--net", sys.executable, "-c", PORT_PICKER], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PORTS ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    agent, *ports = (int(x) for x in line.split()[1:])
    assert len(ports) == 20 and set(ports) <= {agent + 2, agent + 4}, line


TWIN_DRIVER = """
import sys, time
from pathlib import Path
import ray
from ermgap import ray_runtime
ray_runtime.DEFAULT_DASHBOARD_PORT = int(sys.argv[1])
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # ready: imports done
while not go.exists():
    time.sleep(0.01)
ray_runtime.ensure_ray(None, num_cpus=1, log_to_driver=False)

@ray.remote(num_cpus=0)
def api_server():
    import os
    return os.environ.get("RAY_API_SERVER_ADDRESS")

print("STARTED", ray._private.worker.get_dashboard_url(), ray.get(api_server.remote()), flush=True)
sys.stdin.read()  # the cluster stays up until the test closes stdin
"""


def test_two_drivers_starting_at_once_do_not_race_for_the_dashboard_port(tmp_path):
    """Two `ermgap train` started at the same moment both find the dashboard's port free: without a lock on the
    choice, the second's dashboard fails to bind it and Ray waits for it up to its start-up timeout (60 s) before
    ermgap retries on another port, after starting a whole head for nothing. Each attempt makes a session
    directory in $RAY_TMPDIR/ray: two drivers, two sessions, no failed third."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtw", dir="/tmp"))  # Ray's socket paths must stay short
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    marker = uuid.uuid4().hex
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", **DASHBOARD_TIMEOUT, **{MARKER: marker})
    port = str(free_port())
    logs = [tmp_path / f"driver{i}.err" for i in range(2)]
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = []
    for r, log in zip(ready, logs):
        with log.open("w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", TWIN_DRIVER, port, str(go), str(r)], cwd=REPO,
                                          env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err))
    clusters: dict[int, float] = {}  # Ray's agents may not show the marker (the cluster-stop test's docstring)
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()  # both start their clusters now
        lines = [p.stdout.readline().strip() for p in procs]
        for p in procs:
            clusters.update(_descendants(p.pid))
            p.stdin.close()
            p.wait(60)
        errors = [log.read_text()[-2000:] for log in logs]
        assert all(line.startswith("STARTED 127.0.0.1:") for line in lines), (lines, errors)
        dashboards = [line.split()[1] for line in lines]
        assert len(set(dashboards)) == 2 and f"127.0.0.1:{port}" in dashboards, lines  # one on the port both wanted
        assert all(line.split()[2] == f"http://{line.split()[1]}" for line in lines), lines  # each names its own
        sessions = sorted(d.name for d in (ray_tmp / "ray").iterdir() if d.name.startswith("session_2"))
        assert len(sessions) == 2, sessions
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        _kill_left(marker, clusters)
        shutil.rmtree(ray_tmp, ignore_errors=True)
