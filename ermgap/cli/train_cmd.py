"""`ermgap train CONFIG.yaml [key=value ...]`: one training run on Ray Train + DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ermgap.cli.sweep_cmd import ALLOW_LOCAL_HELP
from ermgap.formatting import fmt


def final_table(final: dict) -> Table:
    """The best checkpoint's dev and test value of every reported metric (ermgap.metric_registry)."""
    from ermgap.metric_registry import split_metrics

    table = Table(title="ermgap train: best checkpoint", show_lines=False)
    table.add_column("metric")
    table.add_column("dev", justify="right")
    table.add_column("test", justify="right")
    for key in split_metrics():
        table.add_row(key, fmt(final.get(f"dev_{key}"), 3), fmt(final.get(f"test_{key}"), 3))
    return table


def train(
    config: Path = typer.Argument(None, help="Run config YAML (see configs/tiny.yaml); omit with --resume."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. objective.p=1 lambda.eta=0.25."),
    address: str = typer.Option(None, "--address", help="Join this Ray cluster (default: start one on 127.0.0.1)."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in this directory (or s3:// / gs:// prefix) "
                               "from its last checkpoint."),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory or s3:// / gs:// prefix "
                                "(default: <tracking.storage_path>/<time>-<name>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
    allow_local_paths: bool = typer.Option(False, "--allow-local-paths", help=ALLOW_LOCAL_HELP),
    verbose: bool = typer.Option(False, "--verbose", envvar="ERMGAP_VERBOSE",
                                 help="Show Ray, DeepSpeed, transformers and worker output (hidden by default)."),
) -> None:
    """Fine-tune with the objective `objective.kind` names (default: the paper's ERM-MinMaxGAP): dev evaluation,
    the objective's own updates, early stopping, checkpoints, MLflow logging, and dev/test predictions of the
    best checkpoint."""
    from ermgap.quiet import quiet_console

    quiet_console(verbose)  # before the imports below: they load transformers and Ray
    from ermgap.config import load_config
    from ermgap.errors import ConfigError

    if resume is None and config is None:
        raise ConfigError("give a CONFIG.yaml, or --resume RUN_DIR to continue a run")
    if resume is not None and (config is not None or overrides):
        # The run's own config.yaml is authoritative: a resumed run must continue the same experiment.
        raise ConfigError("--resume uses the run's saved config.yaml; do not pass a config or overrides")
    cfg = load_config(config, overrides or []) if resume is None else None
    # Only now: a config error is reported in a second, without the seconds of torch, Ray and MLflow imports.
    from ermgap.driver import run_training
    from ermgap.ray_runtime import shutdown_ray

    console = Console()
    try:
        final = run_training(cfg, address=address, resume_dir=resume, run_dir=run_dir, force=force, console=console,
                             verbose=verbose, allow_local_paths=allow_local_paths)
        console.print(final_table(final))
        shown = "".join(f"{name} final {value:.4f} · " for name, value in final["objective_shown"].items())
        console.print(f"objective {final['objective_name']} · {shown}steps {final['step']} · evaluations "
                      f"{final['eval_round']} · best round {final.get('best_eval_round')}"
                      + (" · stopped early" if final.get("stopped_early") else ""))
        console.print(f"run directory: {final['run_dir']}  (predictions: dev_preds.csv, test_preds.csv; adapter/)")
        console.print(f"MLflow run {final['mlflow_run_id']} in {final['tracking_uri']}  (open with `ermgap ui`)")
    finally:
        # Here rather than in Ray's exit hook, which pauses for worker output first (shown only with --verbose).
        shutdown_ray(wait_for_output=verbose)
