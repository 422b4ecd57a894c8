"""Submit training runs and sweeps to a Ray cluster as Ray Jobs, with token authentication.

    client = connect("http://127.0.0.1:8265", token=resolve_token())
    job_id = submit(client, "sweeps/demo.yaml")           # kind inferred: sweep spec or run config
    status = follow(client, job_id)                        # streams logs until the job ends
    sys.exit(exit_code(status))                            # 0 SUCCEEDED, 1 FAILED, 130 STOPPED

The project directory is uploaded as the job's `working_dir` (data/, runs/, models/, .venv/ and
.git/ left out: datasets and checkpoints live on the cluster's shared storage). The entrypoint runs
`python -m ermgap.cli.main ...` from that directory, so the uploaded code is what runs even when
the cluster image has an older `ermgap` installed; the image provides the pinned dependencies.

Token: Ray 2.60 clusters enable token authentication by default. The token is sent as an HTTP
`Authorization: Bearer` header of this client only (no process-wide RAY_AUTH_* state is changed)
and is never printed, logged or put into the job's runtime environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlparse

from ermgap.config import RunConfig, load_config, read_yaml
from ermgap.errors import ConfigError, ErmgapError
from ermgap.loopback import is_loopback_host
from ermgap.sweep.spec import SweepSpecModel, load_sweep_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_TOKEN_ENV = "RAY_AUTH_TOKEN"
# gitignore-style patterns relative to the project root; the leading "/" keeps `ermgap/data/` (a package).
EXCLUDES = ["/data/", "/runs/", "/models/", "/.venv/", "/.git/", "/mlruns/", "/build/", "/dist/",
            "/bench/results/", "__pycache__/", "*.egg-info/", ".pytest_cache/"]
# Environment variables that must never be forwarded into a job's runtime env (visible in the dashboard).
_CREDENTIAL_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
# What every job exit means for the CLI.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}

Kind = Literal["sweep", "train"]


class ClusterAuthError(ErmgapError):
    """The cluster refused the request: token missing or wrong."""


class JobError(ErmgapError):
    """The Jobs API could not be reached or refused a request (unknown job, bad address)."""


@dataclass(frozen=True)
class Token:
    """An auth token and where it came from; repr() never shows the value."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"Token(source={self.source!r})"

    __str__ = __repr__


# --------------------------------------------------------------------------- token


def resolve_token(token_env: str = DEFAULT_TOKEN_ENV, *, environ: dict[str, str] | None = None) -> Token | None:
    """The cluster token from `$token_env`, else the file `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.

    Returns None when none is set (a cluster with token auth disabled needs none). An empty or
    unreadable configured source is an error rather than a silent fall-through.
    """
    env = os.environ if environ is None else environ
    if token_env in env:
        value = env[token_env].strip()
        if not value:
            raise ClusterAuthError(f"${token_env} is set but empty; put the cluster's token in it "
                                   "(on the head: `ray get-auth-token`)")
        return Token(value, f"${token_env}")
    path_env = env.get("RAY_AUTH_TOKEN_PATH")
    candidates = [(Path(path_env).expanduser(), "$RAY_AUTH_TOKEN_PATH")] if path_env else []
    candidates.append((Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token", "~/.ray/auth_token"))
    for path, label in candidates:
        if path.is_file():
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ClusterAuthError(f"cannot read the token file {path} ({label}): {err.strerror}") from None
            if not value:
                raise ClusterAuthError(f"the token file {path} ({label}) is empty")
            return Token(value, label)
        if label == "$RAY_AUTH_TOKEN_PATH":
            raise ClusterAuthError(f"$RAY_AUTH_TOKEN_PATH points to {path}, which is not a file")
    return None


def _is_loopback(address: str) -> bool:
    return is_loopback_host(urlparse(address if "://" in address else f"http://{address}").hostname or "")


# --------------------------------------------------------------------------- client


def _auth_message(address: str, token: Token | None, text: str, token_env: str) -> str:
    where = f"the Ray cluster at {address}"
    if token is None:
        return (f"{where} requires a token (token authentication is on) and none was found. Set ${token_env} "
                "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token; on the head node "
                "`ray get-auth-token` prints it.")
    if "invalid or incorrect" in text or "403" in text or "Forbidden" in text:
        return (f"{where} rejected the token from {token.source} (token authentication is on and the token "
                "is wrong). Use the token of this cluster (`ray get-auth-token` on its head node).")
    return f"{where} refused the request: {text.splitlines()[0] if text else 'authentication failed'}"


def _translate(err: Exception, address: str, token: Token | None, token_env: str) -> ErmgapError | None:
    """Ray's auth, connection and HTTP errors as one-line ErmgapErrors (None: not one of ours)."""
    # Ray is imported where a cluster is talked to: every `ermgap` command imports this module through the CLI,
    # and importing Ray costs ~1 s that most commands never use.
    from ray.exceptions import AuthenticationError

    text = str(err)
    if token is not None:
        text = text.replace(token.value, "***")
    if isinstance(err, AuthenticationError) or "Token authentication is enabled but" in text:
        return ClusterAuthError(_auth_message(address, token, text, token_env))
    if isinstance(err, ConnectionError) or type(err).__name__ in ("ConnectionError", "ConnectTimeout"):
        return JobError(f"cannot reach the Ray Jobs API at {address}: is the head running and is its "
                        "dashboard on (`ray start --head --dashboard-host 127.0.0.1`)?")
    if isinstance(err, RuntimeError) and "Request failed with status code" in text:
        return JobError(f"{address}: {text.strip()}")
    return None


@dataclass
class Cluster:
    """A connected Jobs client plus what is needed to phrase its errors."""

    client: Any  # ray.job_submission.JobSubmissionClient (holds the auth header; never print it)
    address: str
    token: Token | None
    token_env: str = DEFAULT_TOKEN_ENV

    def call(self, method: str, *args, **kwargs):
        """Call a JobSubmissionClient method, turning Ray's errors into ErmgapErrors."""
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            translated = _translate(err, self.address, self.token, self.token_env)
            if translated is None:
                raise
            raise translated from None


def connect(address: str = DEFAULT_ADDRESS, *, token: Token | None = None,
            token_env: str = DEFAULT_TOKEN_ENV, warn: TextIO | None = sys.stderr) -> Cluster:
    """Open a Jobs client to `address` (http://HEAD:8265); checks reachability and authentication."""

    if "://" not in address:
        address = f"http://{address}"
    if token is None and not _is_loopback(address) and warn is not None:
        print(f"warning: no Ray auth token for {address}; anyone who can reach a cluster without token "
              "authentication can run code on it (see cluster/README.md)", file=warn)
    from ray.job_submission import JobSubmissionClient  # imported here: see _translate

    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        client = JobSubmissionClient(address, headers=headers)
    except Exception as err:
        translated = _translate(err, address, token, token_env)
        if translated is None:
            raise
        raise translated from None
    return Cluster(client, address, token, token_env)


# --------------------------------------------------------------------------- what to run


def infer_kind(path: str | os.PathLike) -> Kind:
    """`sweep` for a sweep spec (has `base`/`space`/...), `train` for a run config (sections data/model/...)."""

    tree = read_yaml(path)
    run_keys = {f.alias or n for n, f in RunConfig.model_fields.items()}
    sweep_keys = set(SweepSpecModel.model_fields) - run_keys
    if "base" in tree or (set(tree) & sweep_keys and not set(tree) & run_keys):
        return "sweep"
    return "train"


def find_project_root(start: str | os.PathLike) -> Path:
    """The nearest ancestor holding pyproject.toml and the ermgap package (what gets uploaded)."""
    here = Path(start).resolve()
    for d in [here, *here.parents] if here.is_dir() else list(here.parents):
        if (d / "pyproject.toml").is_file() and (d / "ermgap" / "__init__.py").is_file():
            return d
    raise ConfigError(f"{start}: not inside an ermgap project (no pyproject.toml + ermgap/ above it); "
                      "run from the project or pass --project-dir")


def validate_local(path: Path, kind: Kind, overrides: list[str]) -> dict[str, str]:
    """Validate the spec/config (and every trial config of a sweep) before anything is uploaded.

    Returns the storage locations the job will write to ({dotted key: path or URI}).
    """
    if kind == "sweep":

        spec = load_sweep_spec(path, overrides)
        base = spec.trial_config(spec.example_trials()[0])
        return {"storage_path": spec.model.storage_path, "base.tracking.storage_path": base.tracking.storage_path}

    return {"tracking.storage_path": load_config(path, overrides).tracking.storage_path}


def _is_relative_path(location: str) -> bool:
    return "://" not in location and not Path(location).is_absolute()


def build_entrypoint(kind: Kind, rel_path: str, overrides: list[str], *, ray_address: str = "auto",
                     cwd: str | None = None) -> str:
    """The shell command the job runs: in the uploaded project directory, or `cd cwd` first."""
    argv = ["python", "-m", "ermgap.cli.main", kind, rel_path, "--address", ray_address, *overrides]
    command = " ".join(shlex.quote(a) for a in argv)
    return f"cd {shlex.quote(cwd)} && {command}" if cwd else command


def forwarded_env(names: list[str], *, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Values of the named client env vars for the job (credentials refused: provision them on the cluster)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name in names:
        if any(w in name.upper() for w in _CREDENTIAL_WORDS):
            raise ConfigError(f"--env {name}: refusing to forward a credential into the job's runtime env "
                              "(it is visible in the dashboard); set it on the cluster (Secret / node env)")
        if name not in env:
            raise ConfigError(f"--env {name}: not set in this shell")
        out[name] = env[name]
    return out


def runtime_env(project_dir: str | os.PathLike, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime env: the project as working_dir (big/local folders excluded) plus `env`."""
    out: dict[str, Any] = {"working_dir": str(Path(project_dir).resolve()), "excludes": list(EXCLUDES)}
    if env:
        out["env_vars"] = dict(env)
    return out


def submit(cluster: Cluster, spec_or_config: str | os.PathLike, *, kind: Kind | None = None,
           overrides: list[str] | None = None, project_dir: str | os.PathLike | None = None,
           env: dict[str, str] | None = None, ray_address: str = "auto",
           submission_id: str | None = None, upload: bool = True, warn: TextIO | None = None) -> str:
    """Validate locally, upload the project and start `ermgap sweep|train` as a Ray Job; returns the job id.

    upload=False: the head sees this project at the same path (a local head, or a project on a shared
    file system), so nothing is uploaded and the job runs in it — relative data/model/runs paths and the
    default sqlite MLflow store then mean exactly what they mean for a local `ermgap sweep`.
    """
    path = Path(spec_or_config)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    root = Path(project_dir).resolve() if project_dir else find_project_root(path)
    resolved = path.resolve()
    try:
        rel = resolved.relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(f"{path}: must be inside the uploaded project directory {root} "
                          "(the job reads it from there)") from None
    top = rel.split("/", 1)[0]
    if upload and f"/{top}/" in EXCLUDES:
        raise ConfigError(f"{path}: {top}/ is not uploaded with the job; put the file in configs/ or sweeps/")
    overrides = list(overrides or [])
    kind = kind or infer_kind(resolved)
    # Arguments starting with "-" are flags for the job's command (e.g. --dry-run), the rest key=value overrides.
    storage = validate_local(resolved, kind, [o for o in overrides if not o.startswith("-")])
    relative = {k: v for k, v in storage.items() if _is_relative_path(v)}
    if upload and relative and warn is not None:
        shown = ", ".join(f"{k}={v}" for k, v in relative.items())
        print(f"warning: {shown} is relative: with an uploaded working dir it lands in the job's temporary copy "
              "on the head; override it with a shared path/URI (e.g. storage_path=s3://bucket/ermgap), "
              "or use --no-upload when the head shares this directory", file=warn)
    entrypoint = build_entrypoint(kind, rel, overrides, ray_address=ray_address, cwd=None if upload else str(root))
    renv = runtime_env(root, env) if upload else ({"env_vars": dict(env)} if env else None)
    return submit_entrypoint(cluster, entrypoint, runtime_env=renv, submission_id=submission_id,
                             metadata={"ermgap_kind": kind, "ermgap_file": rel})


def submit_entrypoint(cluster: Cluster, entrypoint: str, *, runtime_env: dict[str, Any] | None = None,
                      submission_id: str | None = None, metadata: dict[str, str] | None = None,
                      agent_wait_s: float = 60.0) -> str:
    """Submit a raw shell entrypoint; retries while a just-started head's job agent is not up yet."""

    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return cluster.call("submit_job", entrypoint=entrypoint, runtime_env=runtime_env,
                                submission_id=submission_id, metadata=metadata)
        except JobError as err:
            # Ray answers 500 "No available agent to submit job" for a few seconds after `ray start`.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


# --------------------------------------------------------------------------- following jobs


def status(cluster: Cluster, job_id: str) -> str:
    """The job's status name: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(cluster.call("get_job_status", job_id).value)


def wait(cluster: Cluster, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Block until the job reaches a terminal status; returns it."""

    start = time.monotonic()
    while True:
        st = status(cluster, job_id)
        if st in EXIT_CODES:
            return st
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise JobError(f"job {job_id} still {st} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(cluster: Cluster, job_id: str, *, out: TextIO | None = None) -> str:
    """Stream the job's logs to `out` until it ends; returns its terminal status."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as err:
        translated = _translate(err, cluster.address, cluster.token, cluster.token_env)
        if translated is None:
            raise
        raise translated from None
    # The log stream closes when the job ends; the status can lag it by a moment.
    return wait(cluster, job_id, poll_s=0.5, timeout_s=60)


def exit_code(job_status: str) -> int:
    """0 SUCCEEDED, 1 FAILED, 130 STOPPED (like Ctrl-C); 1 for anything else."""
    return EXIT_CODES.get(job_status, 1)


def list_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    """One dict per job (newest first): submission_id, status, entrypoint, start/end time, message."""
    rows = []
    for j in cluster.call("list_jobs"):
        rows.append({"job_id": j.submission_id or j.job_id, "status": str(j.status.value),
                     "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time,
                     "message": j.message or ""})
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def job_info(cluster: Cluster, job_id: str) -> dict[str, Any]:
    j = cluster.call("get_job_info", job_id)
    return {"job_id": j.submission_id or job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
            "message": j.message or "", "start_time": j.start_time, "end_time": j.end_time,
            "metadata": dict(j.metadata or {})}


def logs(cluster: Cluster, job_id: str) -> str:
    return cluster.call("get_job_logs", job_id)


def stop(cluster: Cluster, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    return bool(cluster.call("stop_job", job_id))
