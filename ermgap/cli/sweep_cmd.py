"""`ermgap sweep SPEC.yaml` (Ray Tune sweep, MLflow parent/child runs) and `ermgap ui` (MLflow UI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from ermgap.errors import ConfigError

_OVERRIDES_HELP = (
    "Spec overrides: base.<config key>=V edits the base training config (e.g. base.optim.epochs=2); "
    "space.<config key>=\\[a, b] replaces a search dimension (a list is a grid; or a mapping like {choice: \\[a, b]}); "
    "variants.<name>.<config key>=V edits one variant; any other dotted spec key sets it "
    "(e.g. max_concurrent_trials=1, scheduler.grace_period=2, seeds=\\[1,2]).")
ALLOW_LOCAL_HELP = ("On a multi-node Ray cluster, accept a directory storage_path and a sqlite/file tracking URI "
                    "(only for an NFS mount at the same path on every node).")


def sweep(
    spec: Path = typer.Argument(..., help="Sweep spec YAML (see sweeps/)."),
    overrides: list[str] = typer.Argument(None, help=_OVERRIDES_HELP),
    address: str = typer.Option(None, "--address", help="Join this Ray cluster (default: start a local one on 127.0.0.1)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep after its driver died; finished trials are kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trials and the resource plan; start nothing."),
    force: bool = typer.Option(False, "--force", help="Delete a previous sweep of the same name and start over."),
    allow_local_paths: bool = typer.Option(False, "--allow-local-paths", help=ALLOW_LOCAL_HELP),
    verbose: bool = typer.Option(False, "--verbose", envvar="ERMGAP_VERBOSE",
                                 help="Show Tune's status tables and the trials' Ray/DeepSpeed output (hidden by default)."),
) -> None:
    """Run a hyperparameter sweep: one Ray Train run per trial, a leaderboard and Pareto front at the end."""
    from ermgap.quiet import quiet_console
    from ermgap.sweep.spec import load_sweep_spec

    quiet_console(verbose)  # before importing the sweep: it loads Ray Tune and transformers
    # The spec and every trial config it makes are checked first: a refused key is reported in about a second,
    # not after the sweep's imports (Ray Tune, MLflow, torch: seconds).
    loaded = load_sweep_spec(spec, overrides or [])
    from ermgap.sweep import run_sweep

    run_sweep(loaded, address=address, resume=resume, dry_run=dry_run, force=force,
              allow_local_paths=allow_local_paths, verbose=verbose)


def ui(
    port: int = typer.Option(5000, "--port", help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; anything else exposes the UI)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="Backend store (default: $MLFLOW_TRACKING_URI, then sqlite:///runs/mlflow.db)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server worker processes (one is plenty for one user)."),
    serve: bool = typer.Option(False, "--serve", help="Start a tracking server for a multi-node cluster (`mlflow server`: "
                               "workers log to http://HOST:PORT, artifacts go through it to --artifacts-destination)."),
    artifacts_destination: str = typer.Option(None, "--artifacts-destination",
                                              help="With --serve: artifact store, e.g. s3://bucket/mlflow (S3-compatible: "
                                                   "set MLFLOW_S3_ENDPOINT_URL). Default: beside a sqlite store."),
) -> None:
    """Start the MLflow UI on the project's run store, or with --serve a tracking server that the nodes
    of a cluster log to (Ctrl-C stops it)."""
    from ermgap.config import RunConfig, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(RunConfig())
    if not serve:
        from ermgap.tracking import check_store_exists

        check_store_exists(uri)
    if artifacts_destination and not serve:
        raise ConfigError("--artifacts-destination needs --serve (the UI reads artifacts where the runs put them)")
    if serve and uri.startswith(("http://", "https://")):
        raise ConfigError(f"--tracking-uri {uri}: --serve needs a backend store (sqlite:///…, postgresql://…), "
                          "not another server")
    from ermgap.loopback import is_loopback_host

    what = "MLflow tracking server" if serve else "MLflow UI"
    if not is_loopback_host(host):
        typer.secho(f"warning: binding {host} exposes the {what} (no authentication) to the network; "
                    "use the default 127.0.0.1 and an SSH tunnel unless you trust that network", err=True, fg="yellow")
    from ermgap.tracking import artifact_root

    cmd = [sys.executable, "-m", "mlflow", "server" if serve else "ui", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    root = artifact_root(uri, "ui")
    beside = root.rsplit("/", 1)[0] if root else None  # experiments' artifacts beside a sqlite store
    if serve and (artifacts_destination or beside):
        # Clients upload through the server (mlflow's --serve-artifacts), so no node needs the store's path.
        cmd += ["--artifacts-destination", artifacts_destination or beside]
    elif beside:
        cmd += ["--default-artifact-root", beside]
    typer.echo(f"starting the {what} (store {uri}) ...")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    def views() -> list[str]:
        from ermgap.tracking import shared_runs_views

        return [f"  sweep {sweep}: {base}{fragment}" for sweep, fragment in shared_runs_views(uri)]

    raise typer.Exit(_run_group(cmd, ready_url=base, on_ready=views, what=what))


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300.0) -> bool:
    """Poll `url`/health until the server answers (it takes a while to start on a small machine)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _run_group(cmd: list[str], ready_url: str | None = None, on_ready=None, what: str = "MLflow UI") -> int:
    """Run `cmd` in its own process group and take the whole group down with us: `mlflow ui` starts
    uvicorn workers and job consumers that would otherwise outlive a SIGTERM to this process.
    With `ready_url`, say when the server answers there, then print the lines `on_ready()` returns."""
    proc = subprocess.Popen(cmd, env=dict(os.environ), start_new_session=True)

    def _stop(signum, frame):  # SIGTERM behaves like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if ready_url is not None and _wait_ready(proc, ready_url):
            typer.echo(f"{what} ready on {ready_url}  (Ctrl-C stops it)")
            lines = on_ready() if on_ready is not None else []
            if lines:
                typer.echo("runs tables with W-F1 and gap columns, best dev W-F1 first:")
                for line in lines:
                    typer.echo(line)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        _reap_group(proc.pid)


def _reap_group(pgid: int) -> None:
    """Kill what is left of the group (children exit a moment after the server)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
