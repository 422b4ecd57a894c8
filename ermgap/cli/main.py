"""Entry point: assembles the command groups. Each group lives in its own module under ermgap/cli/."""

from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.text import Text

from ermgap.errors import ErmgapError, ErmgapWarning
from ermgap.quiet import quiet_console

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
    ("ermgap.cli.features_cmd", "app", "features"),
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
    ("ermgap.cli.lab_cmd", "bias_lab", "bias-lab"),
    ("ermgap.cli.fronts_cmd", "fronts", "fronts"),
    ("ermgap.cli.leakage_cmd", "leakage", "leakage"),
    ("ermgap.cli.submit_cmd", "submit", "submit"),
]

for module, attr, name in _GROUPS:
    app.add_typer(getattr(importlib.import_module(module), attr), name=name)
for module, attr, name in _COMMANDS:
    app.command(name=name)(getattr(importlib.import_module(module), attr))


def main() -> None:
    """Run the CLI; user errors are printed as one clear message with a non-zero exit.

    Typer runs in standalone mode so that it handles its own usage errors (missing argument, unknown
    option or command, out-of-range value) the usual way: usage line, message, exit 2. Its bundled click
    raises exceptions that are not `click.ClickException`, so catching them here would need private names.
    """
    warnings.showwarning = _show_warning
    # Every command is quiet unless asked (train and sweep also take --verbose themselves): the libraries
    # some commands import (DeepSpeed, transformers) print on import, before a command's body runs.
    quiet_console("--verbose" in sys.argv[1:] or os.environ.get("ERMGAP_VERBOSE", "").lower() in ("1", "true", "yes"))
    try:
        app()
    except SystemExit as done:
        if done.code:  # standalone typer also exits on success; then main() returns, as a library call would
            raise
    except ErmgapError as err:
        # Text, not markup: messages quote user values such as "[q_proj]" that rich would eat.
        Console(stderr=True).print(Text("error: ", style="bold red") + Text(str(err)), highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    finally:
        # The command is done; what follows is the interpreter's exit, whose garbage collections walk every object
        # torch, transformers, Ray and MLflow allocated: seconds after `ermgap train` printed its results (19 s
        # at load 36 for a process that only imported them, 0.9 s frozen; bench/fixed_cost.py measures a run).
        # Frozen objects are skipped. Exit handlers still run (Ray's
        # shutdown of the cluster this process started, MLflow's end of an active run, logging, temporary files);
        # only objects in reference cycles are not finalised at exit, which Python never promises anyway.
        gc.freeze()


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ermgap's own warnings as one `warning: ...` line (no source location); others as Python shows them."""
    if issubclass(category, ErmgapWarning):
        Console(stderr=True).print(Text("warning: ", style="bold yellow") + Text(str(message)), highlight=False,
                                   soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    main()
