"""`ermgap runs list`: the MLflow runs of the project's store (sweeps and training runs), newest first."""

from __future__ import annotations

import typer

app = typer.Typer(help="Find MLflow runs: their names, ids (a unique 8-character prefix works anywhere a run id does), "
                       "status and best-checkpoint metrics.", no_args_is_help=True)


@app.command("list")
def list_cmd(
    experiment: str = typer.Option(None, "--experiment", help="Only this MLflow experiment (default: all)."),
    sweeps: bool = typer.Option(False, "--sweeps", help="Only sweeps (parent runs)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)."),
) -> None:
    """Name, id, status, start and best/ metrics of each run; a sweep's trials are indented under it."""
    from rich.table import Table

    from ermgap.config import RunConfig, default_tracking_uri
    from ermgap.formatting import fmt
    from ermgap.metric_registry import label
    from ermgap.sweep.render import console
    from ermgap.tracking import LISTED_METRICS, check_store_exists, list_runs

    uri = tracking_uri or default_tracking_uri(RunConfig())
    check_store_exists(uri)
    runs = list_runs(uri, experiment=experiment, sweeps_only=sweeps)
    from rich import box

    several = runs["experiment"].nunique() > 1
    table = Table(title=f"MLflow runs at {uri}" + (f", experiment {experiment}" if experiment else ""),
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title_justify="left")
    # Fits 100 columns: the experiment only when there are several, metrics under short wrapped headers.
    for c in (("experiment",) if several else ()) + ("name", "id", "status", "start"):
        table.add_column(c, no_wrap=c != "experiment")
    for m in LISTED_METRICS:
        table.add_column(label(m), justify="right", max_width=12)
    # Parents first with their children right below them (children start after their parent).
    ids = set(runs["run_id"])
    tops = runs[~runs["parent"].isin(ids)]
    for _, r in tops.iterrows():
        for depth, row in [(0, r), *((1, c) for _, c in runs[runs["parent"] == r["run_id"]].iloc[::-1].iterrows())]:
            table.add_row(*((row["experiment"],) if several else ()), ("└ " if depth else "") + str(row["name"]),
                          row["run_id"][:8], row["status"], row["start"][5:], *(fmt(row[m]) for m in LISTED_METRICS))
    console().print(table)
    typer.echo(f"{len(runs)} run(s); pass an id (or a unique prefix) to `ermgap report --mlflow-parent ID` or `--runs ID`")
