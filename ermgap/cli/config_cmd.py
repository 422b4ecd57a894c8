"""`ermgap config show|defaults`: print the resolved config."""

from __future__ import annotations

from pathlib import Path

import typer

from ermgap.config import dump_yaml, load_config

app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)


@app.command("show")
def show(
    file: Path = typer.Argument(..., help="Config YAML."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. objective.p=1"),
) -> None:
    """Print the fully resolved config (defaults + FILE + overrides), as it will be logged."""
    typer.echo(dump_yaml(load_config(file, overrides or [])), nl=False)


@app.command("defaults")
def defaults() -> None:
    """Print the default config (the paper's hyperparameters)."""
    typer.echo(dump_yaml(load_config(None)), nl=False)


@app.command("reference")
def reference() -> None:
    """Print every config key with its default and description, as Markdown."""
    from ermgap.config import reference_markdown

    typer.echo(reference_markdown())
