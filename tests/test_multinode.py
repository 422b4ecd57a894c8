"""A sweep across a two-node Ray cluster with object storage and an MLflow tracking server, all real
and all on 127.0.0.1: a Ray head and a second node (`ray start`), a moto S3 server, and `mlflow server`
with its artifact root in the moto bucket.

The nodes get AWS credentials but not the S3 endpoint: it reaches them inside the storage location the
driver hands to Ray. Ray's token authentication stays on (its default): the nodes and the drivers get
the token in their environment. Both nodes share this machine's disk, so "a worker cannot read it" is
not what the guard rails can test here; they refuse by the cluster's node count.

Kept small for a loaded 2-core machine: 1 CPU per node (fewer idle Ray workers), 24/12/12 utterances,
1 epoch, 2 trials one after the other. The test process never joins the cluster itself: it asks the
head's state API (HTTP, with the token) which nodes are alive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _procs import free_port, kill_pids_with_env, wait_http
from _ray_head import LocalHead, LocalNode

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.server]

BUCKET = "ermgap-mn"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MARKER_ENV = "ERMGAP_TEST_MULTINODE"


@dataclass
class Stack:
    tmp: Path
    endpoint: str
    tracking_uri: str
    head: LocalHead
    node_ids: list[str]
    marker: str

    def driver_env(self) -> dict[str, str]:
        # TUNE_GLOBAL_CHECKPOINT_S: the driver uploads Tune's experiment state every 2 s instead of every
        # 10-20 s (Tune's "auto"), so the test sees trial 1 TERMINATED in the bucket soon after it is.
        env = dict(os.environ, **CREDS, **self.ray_auth(), AWS_ENDPOINT_URL=self.endpoint,
                   RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", TUNE_GLOBAL_CHECKPOINT_S="2")
        env[MARKER_ENV] = self.marker
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
            env.pop(k, None)
        return env

    def ray_auth(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.head.token}

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in CREDS.items()
                                                                    if k != "AWS_DEFAULT_REGION"},
                            region_name=CREDS["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str = "") -> dict[str, object]:
        """{key: LastModified} of every object under prefix (listed with boto3, not through ermgap)."""
        out, token = {}, None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.s3().list_objects_v2(**kw)
            out.update({o["Key"]: o["LastModified"] for o in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


class _NodeDied(RuntimeError):
    """A `ray start` exited while its node should be coming up."""


def _alive_nodes(head: LocalHead, want: int, procs: list, logs: list[Path], timeout_s: float = 180) -> list[str]:
    """The ids of the cluster's alive nodes once there are `want`, from the head's state API (with the
    token; the test process does not join the cluster). _NodeDied as soon as one of `procs` exits."""
    req = urllib.request.Request(f"{head.address}/api/v0/nodes?limit=100",
                                 headers={"Authorization": f"Bearer {head.token}"})
    deadline = time.monotonic() + timeout_s
    ids: list[str] = []
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                rows = json.loads(r.read())["data"]["result"]["result"]
            ids = sorted(n["node_id"] for n in rows if n["state"] == "ALIVE")
        except OSError:
            pass
        if len(ids) == want:
            return ids
        tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-1200:]}" for p in logs if p.exists())
        if any(p.poll() is not None for p in procs):
            raise _NodeDied(f"a `ray start` exited with {len(ids)} node(s) up:\n{tails}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ids)} alive node(s) after {timeout_s} s, not {want}:\n{tails}")
        time.sleep(1)


def _start_cluster(node_env: dict[str, str], attempts: int = 3) -> tuple[LocalHead, LocalNode, list[str]]:
    """A head and a second node, both alive. `ray start` gives a node's raylet a fixed 30 s to register
    with the GCS and exits otherwise (ray/_private/node.py), which a loaded machine can exceed: a node
    that died that way is started again (a new head with a new token if the head died)."""
    # Trial drivers need `trial_driver`, which only the head has. 1 CPU per node: the head keeps 0.9
    # after a trial driver's 0.1, so PACK would put both workers (0.5 CPU each) on the second node;
    # they land on both only by SPREAD. Workers bind random ports (`ray start` otherwise hands out
    # 10002-19999, the same range every other `ray start` cluster on this machine uses), and a small
    # object store is plenty for this test.
    small = ["--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=200000000"]
    failures: list[str] = []
    for _ in range(attempts):
        head = LocalHead(token=uuid.uuid4().hex, num_cpus=1, extra_env=node_env,
                         extra_args=["--resources", json.dumps({"trial_driver": 1}), *small])
        head.extra_env["RAY_API_SERVER_ADDRESS"] = head.address  # Train V2's placement-group cleaner
        node = None
        try:
            head.start(timeout_s=180)
            _alive_nodes(head, 1, [head.proc], [head.log_path])
            for _ in range(attempts):
                node = LocalNode(head, num_cpus=1, extra_args=["--resources", json.dumps({"second_node": 1}), *small])
                try:
                    return head, node, _alive_nodes(head, 2, [head.proc, node.start().proc],
                                                    [node.log_path, head.log_path])
                except _NodeDied as err:
                    failures.append(str(err)[-2600:])
                    node.stop()
                    if head.proc.poll() is not None:
                        break
        except (_NodeDied, RuntimeError) as err:
            failures.append(str(err)[-1500:])
        if node is not None:
            node.stop()
        head.stop()
    raise RuntimeError(f"no 2-node cluster after {attempts} attempts:\n" + "\n".join(failures))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import boto3

    tmp = tmp_path_factory.mktemp("multinode")
    marker = uuid.uuid4().hex
    base_env = dict(os.environ, **CREDS)
    base_env[MARKER_ENV] = marker
    for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        base_env.pop(k, None)
    s3_port, mlflow_port = free_port(), free_port()
    endpoint, tracking_uri = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str], env: dict[str, str], name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp / f"{name}.log"
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp,
                                          start_new_session=True))
        return procs[-1], log

    head = node = None
    try:
        moto, log = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], base_env, "moto")
        wait_http(endpoint, moto, log)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        # The documented way to start the tracking server (`mlflow server` underneath). One worker and no
        # job runner: on a loaded machine uvicorn's supervisor kills workers slow to answer its health check.
        # It starts while the Ray nodes come up (each takes tens of seconds on a loaded machine).
        mlflow, mlflow_log = spawn([sys.executable, "-m", "ermgap.cli.main", "ui", "--serve", "--port", str(mlflow_port),
                                    "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                    "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"],
                                   dict(base_env, MLFLOW_S3_ENDPOINT_URL=endpoint,
                                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), "mlflow")
        head, node, ids = _start_cluster({**CREDS, MARKER_ENV: marker})
        wait_http(f"{tracking_uri}/health", mlflow, mlflow_log, timeout_s=420)
        yield Stack(tmp, endpoint, tracking_uri, head, ids, marker)
    finally:
        if head is not None:  # the nodes' logs outlive the cluster's temp dir, for a failure's post-mortem
            shutil.copytree(Path(head.temp_dir) / "session_latest" / "logs", tmp / "ray-logs", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True)
        if node is not None:
            node.stop()
        if head is not None:
            head.stop()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_pids_with_env(MARKER_ENV, marker)


def _spec(stack: Stack, manifest: Path, model: Path, **over) -> Path:
    spec = {
        "name": "mn",
        "base": {
            "data": {"manifest": str(manifest), "modality": "uni"},
            "model": {"name_or_path": str(model), "dtype": "fp32"},
            "optim": {"lr": 1e-3, "epochs": 1, "effective_batch_size": 16, "micro_batch_size": 4,
                      "scheduler": "constant"},
            "eval": {"patience": 0, "batch_size": 12},
            "distributed": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "max_failures": 0,
                            "placement_strategy": "SPREAD"},
        },
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0},
                     "adaptive": {"lambda.mode": "adaptive"}},
        "max_concurrent_trials": 1,
        "resources": {"trial_driver": {"trial_driver": 1}},
        "storage_path": f"s3://{BUCKET}/sweeps",
        "mlflow": {"experiment": "mn", "tracking_uri": stack.tracking_uri},
        **over,
    }
    cwd = stack.tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    path = cwd / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cli(stack: Stack, spec: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    """`ermgap sweep SPEC --address HEAD` as a new driver; its output to `log`, or a pipe."""
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 (open for the test's duration)
    return subprocess.Popen([sys.executable, "-m", "ermgap.cli.main", "sweep", str(spec),
                             "--address", stack.head.gcs_address, *args],
                            cwd=spec.parent, env=stack.driver_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def _children(stack: Stack, parent: str):
    from ermgap.tracking import child_runs

    return child_runs(stack.tracking_uri, "mn", parent)


def _tune_statuses(stack: Stack) -> dict[str, str]:
    """Trial id → status in the newest Tune experiment state in the bucket (Tune's own file)."""
    states = sorted(k for k in stack.keys("sweeps/mn/tune/") if k.rsplit("/", 1)[-1].startswith("experiment_state"))
    if not states:
        return {}
    body = json.loads(stack.s3().get_object(Bucket=BUCKET, Key=states[-1])["Body"].read())
    trials = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in body["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def test_guard_rails_refuse_node_local_storage_and_tracking_on_two_nodes(stack, small_manifest, tiny_model):
    """`ermgap sweep --address` on the 2-node cluster: refused before any trial starts and before anything
    is written, with what to use instead (exit 2, one error line, no traceback)."""
    def refused(spec: Path) -> str:
        proc = _cli(stack, spec)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
        return out

    local = stack.tmp / "local-sweeps"
    out = refused(_spec(stack, small_manifest, tiny_model, name="mn_guard", storage_path=str(local)))
    assert re.search(rf"storage_path {local}/mn_guard: a directory on this node, but the Ray cluster has 2 nodes.*"
                     r"use s3://BUCKET/PREFIX.*--allow-local-paths", out), out[-3000:]
    assert not local.exists()

    db = stack.tmp / "guard.db"
    out = refused(_spec(stack, small_manifest, tiny_model, name="mn_guard",
                        mlflow={"experiment": "g", "tracking_uri": f"sqlite:///{db}"}))
    assert re.search(rf"tracking URI sqlite:///{db}: an MLflow store on this node.*tracking_uri=http://HOST", out), \
        out[-3000:]
    assert not db.exists()
    assert not any(k.startswith("sweeps/mn_guard/") for k in stack.keys("sweeps/"))


def test_two_node_sweep_on_s3_with_tracking_server_resumes_from_the_bucket(stack, smallest_manifest, tiny_model):
    from mlflow import MlflowClient

    t0 = time.monotonic()
    spec = _spec(stack, smallest_manifest, tiny_model)
    driver_log = stack.tmp / "driver1.log"
    proc = _cli(stack, spec, log=driver_log)
    try:
        # Trial 1's run finished and Tune's experiment state in the bucket says so (the driver uploads it
        # every 2 s: driver_env): then the driver dies without cleanup, while trial 2 starts or runs.
        # A guard against a hang, not the expected time (about 4 min idle; far more on a loaded machine).
        deadline = time.monotonic() + 900
        parent = first = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if "sweeps/mn/sweep_state.json" not in stack.keys("sweeps/mn/"):
                continue
            body = stack.s3().get_object(Bucket=BUCKET, Key="sweeps/mn/sweep_state.json")["Body"].read()
            parent = json.loads(body)["parent_run_id"]
            runs = _children(stack, parent)
            done = runs[runs["status"] == "FINISHED"] if len(runs) else runs
            if len(done) == 1 and _tune_statuses(stack).get(done.iloc[0]["tags.ermgap.trial_id"]) == "TERMINATED":
                first = done
                break
        assert proc.poll() is None, driver_log.read_text()[-4000:]
        assert first is not None, f"trial 1 never finished before the deadline:\n{driver_log.read_text()[-4000:]}"
        first_trial = first.iloc[0]["tags.ermgap.trial_id"]
        first_metrics_key = f"sweeps/mn/runs/{first_trial}/metrics.json"
        first_written = stack.keys(first_metrics_key)[first_metrics_key]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        before = {r["run_id"]: r["start_time"] for _, r in _children(stack, parent).iterrows()}
        t_kill = time.monotonic() - t0

        proc = _cli(stack, spec, "--resume")
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    t_total = time.monotonic() - t0
    print(f"multinode sweep: driver killed after {t_kill:.0f} s, resumed sweep done after {t_total:.0f} s")

    # Both trials finished, as two child runs of the same parent; trial 1 was not run again. (Trial 2 may not
    # have opened its run before the kill: the driver dies as soon as Tune has trial 1 TERMINATED.)
    after = _children(stack, parent)
    assert set(before) <= set(after["run_id"]) and len(after) == 2, (before, list(after["run_id"]))
    assert (after["status"] == "FINISHED").all()
    first_id = first.iloc[0]["run_id"]
    assert after.set_index("run_id").loc[first_id, "start_time"] == before[first_id]
    assert stack.keys(first_metrics_key)[first_metrics_key] == first_written
    client = MlflowClient(stack.tracking_uri)
    assert client.get_run(parent).info.status == "FINISHED"

    # Every trial's two workers ran on the two different nodes (SPREAD; PACK would fit both on one).
    for _, row in after.iterrows():
        nodes = row["tags.ermgap.worker_nodes"].split(",")
        assert len(nodes) == 2 and sorted(nodes) == stack.node_ids, nodes

    # Checkpoints, Tune state, sweep state and run outputs are objects in the bucket.
    keys = set(stack.keys("sweeps/mn/"))
    trials = sorted(after["tags.ermgap.trial_id"])
    assert "sweeps/mn/sweep_state.json" in keys and "sweeps/mn/tune/tuner.pkl" in keys
    assert any(k.startswith("sweeps/mn/tune/experiment_state") for k in keys)
    for trial in trials:
        assert any(k.startswith(f"sweeps/mn/train/{trial}/checkpoint_") for k in keys), trial
        for name in ("metrics.json", "dev_preds.csv", "test_preds.csv", "config.yaml", "mlflow_run_id",
                     "adapter/adapter_model.safetensors"):
            assert f"sweeps/mn/runs/{trial}/{name}" in keys, (trial, name)
    assert {"sweeps/mn/artifacts/leaderboard.csv", "sweeps/mn/report/table2.md"} <= keys
    # MLflow's artifacts went through the server into the bucket.
    mlflow_keys = set(stack.keys("mlflow/"))
    for run_id in after["run_id"]:
        assert any(k.endswith(f"{run_id}/artifacts/predictions/test_preds.csv") for k in mlflow_keys), run_id
    assert any(k.endswith(f"{parent}/artifacts/leaderboard.csv") for k in mlflow_keys)
    # Nothing went to the local default paths of the driver's working directory.
    assert not {"runs", "mlruns", "mlartifacts"} & {p.name for p in spec.parent.iterdir()}
