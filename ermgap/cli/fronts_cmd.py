"""`ermgap fronts`: several sweeps' trials on one test-split trade-off, each family's Pareto front (`ermgap.fronts`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def fronts(
    sweeps: list[Path] = typer.Argument(..., help="Sweep directories (e.g. runs/sweeps/pareto_minmaxgap): their "
                                        "trials that ran to the end; each objective kind is one family."),
    reference: list[str] = typer.Option(None, "--reference", help="A reference run drawn beside the fronts, "
                                        "DIR:VARIANT or DIR:VARIANT@SEED (repeatable), e.g. "
                                        "runs/sweeps/bias_lab_quick:positive.erm@42."),
    out: Path = typer.Option(Path("bench/results/pareto_fronts"), "--out", help="Output stem: writes <stem>.json, "
                             "<stem>.md and <stem>.png."),
    n_boot: int = typer.Option(1000, "--n-boot", min=100, help="Bootstrap resamples of the test utterances."),
    force: bool = typer.Option(False, "--force", help="Replace outputs a previous `ermgap fronts` wrote."),
) -> None:
    """Put several sweeps' trials on one trade-off (test split): test W-F1 against the test worst-language gender
    gap, each with a bootstrap 95 % interval, each objective family's Pareto front marked, optional reference
    runs; prints the table and writes JSON, Markdown and a PNG figure."""
    from rich.console import Console

    from ermgap.fronts import build_fronts, format_table

    command = "ermgap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["fronts"] else ""
    table, files, left_out = build_fronts(sweeps, reference or (), out=out, force=force, n_boot=n_boot,
                                          command=command)
    console = Console()
    console.print(format_table(table), highlight=False, soft_wrap=True)
    for line in left_out:
        console.print(f"left out: {line}", highlight=False, soft_wrap=True)
    for kind, path in files.items():
        console.print(f"{kind}: {path}", highlight=False)
