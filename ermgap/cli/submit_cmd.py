"""`ermgap submit` and `ermgap jobs list|status|logs|stop`: Ray Jobs on a (remote) cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import typer

from ermgap import submit as sub

_ADDRESS_HELP = "Ray Jobs API (dashboard) address, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or 127.0.0.1)."
_TOKEN_HELP = "Environment variable holding the cluster token (then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)."


def _default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or sub.DEFAULT_ADDRESS


def _connect(address: str | None, token_env: str) -> sub.Cluster:
    import logging

    import ray.job_submission  # noqa: F401  (configures Ray's loggers; adjust them after)

    # Ray logs every packaging step at INFO on the client; the job's own output is what users want.
    logging.getLogger("ray").setLevel(logging.WARNING)
    address = address or _default_address()
    return sub.connect(address, token=sub.resolve_token(token_env), token_env=token_env)


def _finish(cluster: sub.Cluster, job_id: str, *, follow: bool) -> None:
    try:
        st = sub.follow(cluster, job_id) if follow else sub.wait(cluster, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running (`ermgap jobs stop {job_id}`)", err=True)
        sys.exit(130)
    typer.echo(f"job {job_id}: {st}", err=True)
    if st == "FAILED":
        message = sub.job_info(cluster, job_id)["message"]
        if message:
            typer.echo(f"  {message.strip().splitlines()[-1]}", err=True)
    # sys.exit, not typer.Exit: main() runs typer with standalone_mode=False, which turns Exit into a return value.
    sys.exit(sub.exit_code(st))


def submit(
    spec_or_config: Path = typer.Argument(..., help="A sweep spec (sweeps/*.yaml) or a run config (configs/*.yaml)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides for the job (optim.epochs=1); after `--`, flags too (-- --dry-run)"),
    address: str = typer.Option(None, "--address", help=_ADDRESS_HELP),
    token_env: str = typer.Option(sub.DEFAULT_TOKEN_ENV, "--token-env", help=_TOKEN_HELP),
    kind: Literal["sweep", "train"] = typer.Option(None, "--kind", help="sweep | train (default: inferred from the YAML)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit with its status."),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's logs; exit with its status."),
    env: list[str] = typer.Option(None, "--env", help="Forward this client env var to the job (repeatable; not credentials)."),
    project_dir: Path = typer.Option(None, "--project-dir", help="Directory to upload (default: the project holding the file)."),
    ray_address: str = typer.Option("auto", "--ray-address", help="Address the job's `ermgap` joins inside the cluster."),
    job_id: str = typer.Option(None, "--job-id", help="Submission id to use (default: generated)."),
    no_upload: bool = typer.Option(False, "--no-upload",
                                   help="The head sees this project at the same path (local head, shared FS): run the job in it, upload nothing."),
) -> None:
    """Submit a sweep or a training run as a Ray Job; prints the job id (0 SUCCEEDED, 1 FAILED, 130 STOPPED)."""
    env_vars = sub.forwarded_env(env or [])
    cluster = _connect(address, token_env)
    jid = sub.submit(cluster, spec_or_config, kind=kind, overrides=overrides or [], project_dir=project_dir,
                     env=env_vars, ray_address=ray_address, submission_id=job_id, upload=not no_upload,
                     warn=sys.stderr)
    typer.echo(jid)
    if wait or follow:
        _finish(cluster, jid, follow=follow)


jobs_app = typer.Typer(help="Ray Jobs on a cluster: list, status, logs, stop.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(address: str = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token_env: str = typer.Option(sub.DEFAULT_TOKEN_ENV, "--token-env", help=_TOKEN_HELP)) -> None:
    """List the cluster's jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("job id", no_wrap=True)  # ids must stay copy-pasteable on narrow terminals
    table.add_column("status", no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    table.add_column("message", overflow="fold")
    for row in sub.list_jobs(_connect(address, token_env)):
        table.add_row(row["job_id"], row["status"], row["entrypoint"], row["message"][:80])
    Console().print(table)


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="Job (submission) id."),
                address: str = typer.Option(None, "--address", help=_ADDRESS_HELP),
                token_env: str = typer.Option(sub.DEFAULT_TOKEN_ENV, "--token-env", help=_TOKEN_HELP)) -> None:
    """Print the job's status (and its message when it failed)."""
    info = sub.job_info(_connect(address, token_env), job_id)
    typer.echo(info["status"])
    if info["message"]:
        typer.echo(info["message"])


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Job (submission) id."),
              follow: bool = typer.Option(False, "--follow", help="Stream until the job ends; exit with its status."),
              address: str = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token_env: str = typer.Option(sub.DEFAULT_TOKEN_ENV, "--token-env", help=_TOKEN_HELP)) -> None:
    """Print the job's logs so far (or follow them)."""
    cluster = _connect(address, token_env)
    if follow:
        _finish(cluster, job_id, follow=True)
    typer.echo(sub.logs(cluster, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Job (submission) id."),
              wait: bool = typer.Option(False, "--wait", help="Wait until it has stopped."),
              address: str = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token_env: str = typer.Option(sub.DEFAULT_TOKEN_ENV, "--token-env", help=_TOKEN_HELP)) -> None:
    """Stop a running job."""
    cluster = _connect(address, token_env)
    if not sub.stop(cluster, job_id):
        typer.echo(f"job {job_id} had already ended ({sub.status(cluster, job_id)})")
        return
    typer.echo(f"stop requested for {job_id}")
    if wait:
        typer.echo(sub.wait(cluster, job_id, timeout_s=120))
