"""`ermgap benchmark`: the paper's zero-shot Table 2 for every reachable system of a systems file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def benchmark(
    systems: Path = typer.Argument(..., help="Systems YAML (e.g. sweeps/paper_zero_shot.yaml)."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Output folder: preds/ (resumable), skipped.json, report/."),
    split: str = typer.Option("test", "--split", help="train | dev | test."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N rows of the split."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Utterances per forward / parallel requests."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] (local systems)."),
    ci: bool = typer.Option(False, "--ci", help="Bootstrap CIs in the report CSVs and paired.csv."),
    n_boot: int = typer.Option(1000, "--n-boot", min=10, help="Bootstrap resamples (with --ci)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report/ (predictions are kept and reused)."),
) -> None:
    """Run every reachable system (skipping the others with the reason) and write Table 2."""
    import torch

    from ermgap.benchmark import load_systems_file, run_benchmark
    from ermgap.errors import ConfigError

    if split not in ("train", "dev", "test"):
        raise ConfigError(f"--split {split!r}: allowed: train, dev, test")
    specs = load_systems_file(systems)
    console = Console(soft_wrap=True, highlight=False)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    outcome = run_benchmark(specs, manifest, out, split=split, limit=limit, batch_size=batch_size, device=dev,
                            force=force, n_boot=n_boot if ci else 0, seed=seed, log=console.print)
    typer.echo(outcome.report["table2_md"].read_text(), nl=False)
    for name, reason in outcome.skipped.items():
        console.print(f"[yellow]not in the table[/] {name}: {reason}")
    console.print(f"wrote {out / 'report'} ({len({n for n, _ in outcome.ran})} systems, {len(outcome.skipped)} skipped)")
