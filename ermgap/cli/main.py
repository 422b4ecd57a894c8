"""Entry point: assembles the command groups. Each group lives in its own module under ermgap/cli/."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.text import Text

from ermgap.errors import ErmgapError

app = typer.Typer(
    name="ermgap",
    help="Fairness-aware (ERM-MinMaxGAP) fine-tuning and evaluation of speech LLMs for emotion recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, attribute, name): a Typer sub-app registered as a group, or a function registered as a command.
_GROUPS: list[tuple[str, str, str]] = [
    ("ermgap.cli.data_cmd", "app", "data"),
    ("ermgap.cli.model_cmd", "app", "model"),
    ("ermgap.cli.config_cmd", "app", "config"),
    ("ermgap.cli.submit_cmd", "jobs_app", "jobs"),
    ("ermgap.cli.runs_cmd", "app", "runs"),
]
# In the order of the workflow: train → evaluate → metrics/report/benchmark → serve → sweep → ui → submit.
_COMMANDS: list[tuple[str, str, str]] = [
    ("ermgap.cli.train_cmd", "train", "train"),
    ("ermgap.cli.evaluate_cmd", "evaluate", "evaluate"),
    ("ermgap.cli.metrics_cmd", "metrics", "metrics"),
    ("ermgap.cli.report_cmd", "report", "report"),
    ("ermgap.cli.benchmark_cmd", "benchmark", "benchmark"),
    ("ermgap.cli.serve_cmd", "serve", "serve"),
    ("ermgap.cli.sweep_cmd", "sweep", "sweep"),
    ("ermgap.cli.sweep_cmd", "ui", "ui"),
    ("ermgap.cli.submit_cmd", "submit", "submit"),
]

for module, attr, name in _GROUPS:
    app.add_typer(getattr(importlib.import_module(module), attr), name=name)
for module, attr, name in _COMMANDS:
    app.command(name=name)(getattr(importlib.import_module(module), attr))


def main() -> None:
    """Run the CLI; user errors are printed as one clear message with a non-zero exit."""
    try:
        # standalone_mode=False returns typer.Exit codes instead of exiting: pass them on.
        rc = app(standalone_mode=False)
    except ErmgapError as err:
        # Text, not markup: messages quote user values such as "[q_proj]" that rich would eat.
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(err)), highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
