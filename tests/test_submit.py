"""`ermgap submit` / `ermgap jobs` against real Ray heads on 127.0.0.1 (token auth on, and off).

The heads are started by cluster/start-local-head.sh and stopped without `ray stop` (see _ray_head.py).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _ray_head import ROOT, LocalHead, free_port

from ermgap import submit as sub
from ermgap.errors import ConfigError

PAPER_SPEC = ROOT / "sweeps" / "paper_main.yaml"


# --------------------------------------------------------------------------- pure parts (no cluster)


def test_token_sources_in_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "tok"
    path_file.write_text("  from-path \n")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path_file), "MY_TOKEN": "from-env"}
    assert sub.resolve_token("MY_TOKEN", environ=env).value == "from-env"
    assert sub.resolve_token("OTHER", environ=env).value == "from-path"
    del env["RAY_AUTH_TOKEN_PATH"]
    assert sub.resolve_token("OTHER", environ=env).value == "from-home"
    (home / ".ray" / "auth_token").unlink()
    assert sub.resolve_token("OTHER", environ=env) is None


def test_token_misconfiguration_is_an_error_and_never_shown(tmp_path):
    with pytest.raises(sub.ClusterAuthError, match=r"\$MY_TOKEN is set but empty"):
        sub.resolve_token("MY_TOKEN", environ={"MY_TOKEN": " ", "HOME": str(tmp_path)})
    with pytest.raises(sub.ClusterAuthError, match="not a file"):
        sub.resolve_token("X", environ={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope"), "HOME": str(tmp_path)})
    tok = sub.resolve_token("T", environ={"T": "s3cr3t-value", "HOME": str(tmp_path)})
    assert "s3cr3t" not in repr(tok) and "s3cr3t" not in str(tok) and "s3cr3t" not in repr([tok])


def test_kind_is_inferred_from_the_yaml(tmp_path):
    assert sub.infer_kind(PAPER_SPEC) == "sweep"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim: {epochs: 1}\ndata: {modality: multi}\n")
    assert sub.infer_kind(cfg) == "train"


def test_entrypoint_is_quoted_and_runs_the_uploaded_package():
    ep = sub.build_entrypoint("train", "configs/my run.yaml", ["optim.lr=1e-4", "prompt.instruction=a b"])
    assert ep == ("python -m ermgap.cli.main train 'configs/my run.yaml' --address auto "
                  "optim.lr=1e-4 'prompt.instruction=a b'")
    assert sub.build_entrypoint("sweep", "s.yaml", [], cwd="/my project") == (
        "cd '/my project' && python -m ermgap.cli.main sweep s.yaml --address auto")


def test_credentials_are_not_forwarded_into_the_job():
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "x", "RAY_AUTH_TOKEN": "y"}
    assert sub.forwarded_env(["MLFLOW_TRACKING_URI"], environ=env) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    for name in ("AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
        with pytest.raises(ConfigError, match="refusing to forward a credential"):
            sub.forwarded_env([name], environ=env)
    with pytest.raises(ConfigError, match="not set"):
        sub.forwarded_env(["NOT_THERE"], environ=env)


def test_files_outside_the_upload_are_refused(tmp_path):
    outside = tmp_path / "spec.yaml"
    outside.write_text(PAPER_SPEC.read_text())
    with pytest.raises(ConfigError, match="must be inside the uploaded project"):
        sub.submit(None, outside, project_dir=ROOT)
    # A project whose spec lies in data/ (not uploaded): found as the project root, then refused.
    proj = tmp_path / "proj"
    (proj / "ermgap").mkdir(parents=True)
    (proj / "ermgap" / "__init__.py").write_text("")
    (proj / "pyproject.toml").write_text("[project]\nname='ermgap'\n")
    (proj / "data").mkdir()
    spec = proj / "data" / "spec.yaml"
    spec.write_text(PAPER_SPEC.read_text())
    assert sub.find_project_root(spec) == proj.resolve()
    with pytest.raises(ConfigError, match="data/ is not uploaded"):
        sub.submit(None, spec)


def test_bad_spec_is_refused_before_upload(tmp_path):
    # Validation happens locally: no cluster is contacted (cluster=None would fail if it were).
    with pytest.raises(ConfigError, match="lambda.epsilon"):
        sub.submit(None, PAPER_SPEC, overrides=["base.lambda.epsilon=-1"], project_dir=ROOT)


# --------------------------------------------------------------------------- real clusters


def _cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _non_loopback_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def _client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean client environment: no token anywhere unless given (HOME without ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def token_head():
    token = secrets.token_hex(20)
    with LocalHead(token=token) as head:
        yield head
    assert not head.leftover_pids()


@pytest.mark.ray
@pytest.mark.slow
def test_token_cluster_end_to_end(token_head, tmp_path):
    head, token = token_head, token_head.token
    env = _client_env(tmp_path, RAY_AUTH_TOKEN=token)
    outputs: list[str] = []

    # 1. The real CLI path: upload the project, run `ermgap sweep ... --dry-run` as a job, follow it.
    r = _cli("submit", str(PAPER_SPEC), "--address", head.address, "--follow", "--", "--dry-run", env=env)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep paper_main: 6 trials" in r.stdout
    assert "storage_path=runs/sweeps" in r.stderr and "is relative" in r.stderr  # Tune state would be lost
    assert "SUCCEEDED" in r.stderr
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")

    # 2. The uploaded working dir holds the package (ermgap/data/ too) but not data/, .venv/, .git/,
    #    and the job imports the uploaded copy, not the tree the head was started from.
    cluster = sub.connect(head.address, token=sub.resolve_token(environ=env), warn=None)
    probe = ("import os, ermgap.submit as s; "
             "print('PKG', os.path.isdir('ermgap/data'), os.path.exists('.venv'), os.path.exists('.git'), "
             "os.path.exists('data'), os.path.dirname(os.path.abspath(s.__file__)))")
    jid = sub.submit_entrypoint(cluster, f'python -c "{probe}"', runtime_env=sub.runtime_env(ROOT))
    assert sub.wait(cluster, jid, timeout_s=120) == "SUCCEEDED"
    line = next(ln for ln in sub.logs(cluster, jid).splitlines() if ln.startswith("PKG"))
    _, has_pkg_data, has_venv, has_git, has_data, pkg_dir = line.split(" ", 5)
    assert (has_pkg_data, has_venv, has_git, has_data) == ("True", "False", "False", "False"), line
    assert Path(pkg_dir) != ROOT / "ermgap"

    # 3. A failing job: non-zero exit, its error surfaced.
    fail = sub.submit_entrypoint(cluster, "python -c \"import sys; sys.exit('boom: marker 4711')\"")
    r = _cli("jobs", "logs", fail, "--follow", "--address", head.address, env=env)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "boom: marker 4711" in r.stdout and "FAILED" in r.stderr

    # 4. Stop a running job.
    slow = sub.submit_entrypoint(cluster, "python -c \"import time; print('sleeping', flush=True); time.sleep(300)\"")
    deadline = time.monotonic() + 60
    while sub.status(cluster, slow) != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    r = _cli("jobs", "stop", slow, "--wait", "--address", head.address, env=env)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout + r.stderr
    assert sub.exit_code(sub.status(cluster, slow)) == 130

    r = _cli("jobs", "list", "--address", head.address, env=env)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0 and job_id in r.stdout and slow in r.stdout

    # The dashboard / Jobs API listens on loopback only: this machine's other address refuses it.
    ip = _non_loopback_ip()
    if ip is not None:
        port = int(head.address.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()

    # 5. No token / wrong token: a clear refusal, no traceback, nothing submitted.
    n_jobs = len(sub.list_jobs(cluster))
    r = _cli("submit", str(PAPER_SPEC), "--address", head.address, env=_client_env(tmp_path))
    assert r.returncode == 2 and "requires a token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("jobs", "list", "--address", head.address, env=_client_env(tmp_path, RAY_AUTH_TOKEN="wrong-" + token[:6]))
    assert r.returncode == 2 and "rejected the token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(sub.list_jobs(cluster)) == n_jobs

    # The token itself never appears in anything the CLI printed.
    assert all(token not in out for out in outputs)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.deepspeed
def test_tiny_training_job_logs_to_mlflow(token_head, small_manifest, tiny_model, tmp_path):
    """`ermgap submit configs/tiny.yaml --follow`: a real `ermgap train` job on the head, its MLflow run checked."""
    head = token_head
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _client_env(tmp_path, RAY_AUTH_TOKEN=head.token, MLFLOW_TRACKING_URI=store)
    small = [f"data.manifest={small_manifest}", f"model.name_or_path={tiny_model}",
             f"tracking.storage_path={tmp_path / 'runs'}", "tracking.experiment=submit-test",
             "optim.epochs=1", "distributed.num_workers=1", "optim.micro_batch_size=4",
             "optim.effective_batch_size=8", "eval.batch_size=32",
             "data.languages=[eng]"]  # the small slice, one language: 16 / 8 / 8 utterances
    r = _cli("submit", str(ROOT / "configs" / "tiny.yaml"), "--address", head.address, "--follow",
             "--env", "MLFLOW_TRACKING_URI", "--", *small, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "SUCCEEDED" in r.stderr and head.token not in r.stdout + r.stderr
    assert "is relative" not in r.stderr  # storage_path was absolute
    runs = _mlflow_runs(store, "submit-test")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # Metric names are namespaced: per evaluation under eval/, the best checkpoint's under best/.
    assert {"eval/dev_w_f1", "best/dev_w_f1"} <= set(runs[0].data.metrics)

    # The same config with a manifest that does not exist on the cluster: validates locally (paths are
    # the cluster's business), fails in the job; the CLI exits 1 and shows the job's error. --no-upload:
    # the job runs in this very project directory (it loads configs/tiny.yaml from there).
    r = _cli("submit", "configs/tiny.yaml", "--no-upload", "--address", head.address, "--follow", "--",
             *small, "data.manifest=/nonexistent/manifest.csv", env=env, timeout=240)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "/nonexistent/manifest.csv does not exist" in r.stdout and "FAILED" in r.stderr


def _mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client.search_runs([exp.experiment_id])


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_without_token_auth(tmp_path):
    with LocalHead(token=None) as head:
        env = _client_env(tmp_path)  # no token anywhere
        cluster = sub.connect(head.address, token=None, warn=None)
        jid = sub.submit_entrypoint(cluster, "python -c \"print('hello from', 'the job')\"",
                                    runtime_env=sub.runtime_env(ROOT))
        r = _cli("jobs", "logs", jid, "--follow", "--address", head.address, env=env)
        assert r.returncode == 0 and "hello from the job" in r.stdout, r.stdout + r.stderr
        r = _cli("jobs", "status", jid, "--address", head.address, env=env)
        assert r.stdout.splitlines()[0] == "SUCCEEDED", r.stdout
    assert not head.leftover_pids()
    assert not Path(head.temp_dir).exists()


def test_cli_refuses_unreachable_cluster(tmp_path):
    r = _cli("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env=_client_env(tmp_path), timeout=60)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "warning" not in r.stderr  # loopback without a token: nothing exposed


def test_cli_warns_before_talking_to_a_remote_cluster_without_token(tmp_path):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    r = _cli("jobs", "list", "--address", f"http://{ip}:{free_port()}", env=_client_env(tmp_path), timeout=60)
    assert "warning: no Ray auth token" in r.stderr and r.returncode == 2, r.stderr

