"""`ermgap report`: the paper's Tables 2/3 and fairness plots from prediction files or MLflow runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from ermgap.errors import ConfigError


def report(
    out: Path = typer.Option(..., "--out", help="Report folder to create (replaced only with --force)."),
    preds: list[str] = typer.Option(None, "--preds", help="NAME:MODALITY:PATH of a PREDS.csv (repeatable)."),
    systems: Path = typer.Option(None, "--systems", help="YAML listing systems (name, modality, preds, group, lambda)."),
    mlflow_parent: str = typer.Option(None, "--mlflow-parent", help="A sweep's parent run id (or a unique prefix): report its child runs."),
    runs: list[str] = typer.Option(None, "--runs", help="MLflow run id or unique prefix to report (repeatable)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)."),
    log_to: str = typer.Option(None, "--log-to", help="MLflow run to log the report to (default: --mlflow-parent)."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not log the report to MLflow."),
    ci: bool = typer.Option(False, "--ci", help="Bootstrap CIs in the CSVs and paired.csv (uni→multi, vs baseline)."),
    n_boot: int = typer.Option(1000, "--n-boot", min=10, help="Bootstrap resamples (with --ci)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    baseline: str = typer.Option(None, "--baseline", help="System name to compare every other system with (--ci)."),
    attribute: str = typer.Option("gender", "--attribute", help="Protected attribute column of --preds/--systems files."),
    by: str = typer.Option("language", "--by", help="Stratum column(s) of --preds/--systems files ('a+b' for several)."),
    labels: str = typer.Option(None, "--labels", help="Labels of --preds/--systems files in class order (comma-separated, "
                               "or 'infer'); default: their score_<label> columns, else MELD's seven."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
) -> None:
    """Write table2/table3 (.md/.csv/.tex), metrics.json and PNG plots for the given systems."""
    from ermgap import report as R

    console = Console(soft_wrap=True)
    chosen: list = []
    label_set = labels if labels in (None, "infer") else [x.strip() for x in labels.split(",") if x.strip()]
    for spec in preds or []:
        chosen.append(R.parse_preds_spec(spec, attribute=attribute, by=by, labels=label_set))
    if systems:
        chosen += R.load_systems_yaml(systems, attribute=attribute, by=by, labels=label_set)
    uri = None
    if mlflow_parent or runs or log_to:
        from ermgap.config import RunConfig, default_tracking_uri
        from ermgap.tracking import check_store_exists, resolve_run_id

        uri = tracking_uri or default_tracking_uri(RunConfig())
        check_store_exists(uri)
        # Unique prefixes (the 8 characters `ermgap runs list` shows) stand for the full ids.
        mlflow_parent = mlflow_parent and resolve_run_id(uri, mlflow_parent, what="--mlflow-parent")
        runs = [resolve_run_id(uri, r, what="--runs") for r in runs or []]
        log_to = log_to and resolve_run_id(uri, log_to, what="--log-to")
    if mlflow_parent or runs:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the CLI output
        with tempfile.TemporaryDirectory(prefix="ermgap-report-") as tmp:
            found, skipped = R.systems_from_mlflow(uri, parent_run_id=mlflow_parent, run_ids=runs or [],
                                                   download_dir=tmp)
        for note in skipped:
            console.print(f"[yellow]skipped[/] {note}")
        if not found:
            raise ConfigError("no MLflow run has a predictions/test_preds.csv artifact")
        chosen += found
    if not chosen:
        raise ConfigError("nothing to report: give --preds, --systems, --mlflow-parent or --runs")
    paths = R.build_report(chosen, out, force=force, n_boot=n_boot if ci else 0, seed=seed, baseline=baseline)
    target = log_to or mlflow_parent
    if target and not no_log:
        from ermgap.tracking import log_artifacts

        log_artifacts(uri, target, out, "report")
        console.print(f"logged the report to MLflow run {target} (artifacts/report)")
    typer.echo(paths["table2_md"].read_text(), nl=False)
    if "paired_md" in paths:
        typer.echo("\n" + paths["paired_md"].read_text(), nl=False)
    console.print(f"wrote {len(paths)} files to {out}")
