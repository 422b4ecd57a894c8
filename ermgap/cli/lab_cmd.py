"""`ermgap bias-lab`: the controlled corpora, every objective on each, one table (`ermgap.bias_lab`)."""

from __future__ import annotations

from pathlib import Path

import typer


def bias_lab(
    overrides: list[str] = typer.Argument(None, help="Spec overrides for every corpus, as `ermgap sweep` takes them "
                                          "(base.<config key>=V, variants.<row>.<config key>=V, ...), e.g. "
                                          "base.optim.epochs=4 variants.minmaxgap.lambda.lam_max=1."),
    quick: bool = typer.Option(False, "--quick", help="One seed (42) instead of 42, 43, 44, for iteration; its "
                               "table goes beside its sweep (runs/sweeps/bias_lab_quick/lab/), not to bench/results."),
    spec: Path = typer.Option(Path("sweeps/bias_lab.yaml"), "--spec", help="The rows: a sweep spec whose variants "
                              "are the objectives (one named 'erm', the reference; 'oracle' runs on the oracle twin)."),
    corpus: list[str] = typer.Option(None, "--corpus", help="Only these corpora (repeatable): positive, irreducible, "
                                     "negative."),
    row: list[str] = typer.Option(None, "--row", help="Only these rows of the spec (repeatable; erm is needed, "
                                  "unless --add-sweep sweeps hold its finished trials for this run's corpora and "
                                  "seeds: the new rows are then compared with those)."),
    data_root: Path = typer.Option(Path("data/bias_lab"), "--data-root", help="Where the corpora are written (a "
                                   "corpus already there with the same settings is reused)."),
    backbone: Path = typer.Option(Path("models/tiny-pretrained"), "--backbone", help="The pretrained tiny backbone "
                                  "(built with `ermgap model tiny --pretrain` defaults when missing)."),
    train_per_cell: int = typer.Option(None, "--train-per-cell", min=1, help="Train utterances per (language, "
                                       "gender, emotion) before the minority's share (default 24)."),
    dev_per_cell: int = typer.Option(None, "--dev-per-cell", min=1, help="Dev utterances per cell (default 8)."),
    test_per_cell: int = typer.Option(None, "--test-per-cell", min=1, help="Test utterances per cell (default 48: "
                                      "sized for ±3-point intervals of a 5-point gap difference over 3 seeds)."),
    corpora_only: bool = typer.Option(False, "--corpora-only", help="Build the corpora and the backbone, run nothing."),
    force: bool = typer.Option(False, "--force", help="Replace a previous lab sweep (and corpora built with other "
                               "settings)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted lab (same command otherwise)."),
    seed: list[int] = typer.Option(None, "--seed", help="This run's seeds (repeatable; default 42, 43, 44, or 42 "
                                   "with --quick); a share of the seeds runs as its own sweep "
                                   "(runs/sweeps/bias_lab_seeds_43_44/), so seeds can be run apart and pooled with "
                                   "--add-sweep."),
    add_sweep: list[Path] = typer.Option(None, "--add-sweep", help="A lab sweep (its directory, e.g. "
                                         "runs/sweeps/bias_lab_quick; finished or interrupted) whose trials that ran "
                                         "to the end join the table (repeatable; a (corpus, row, seed) may be in "
                                         "one sweep only)."),
    table_only: bool = typer.Option(False, "--table-only", help="Run nothing: the table of the --add-sweep "
                                    "sweeps' finished trials (written to bench/results/)."),
) -> None:
    """The bias lab: positive control (a cue-shifted, under-represented minority: a gap an objective can close),
    irreducible bias (neutralised prosody: it can only level down) and negative control (no bias in the audio:
    nothing to close), each with ERM, adaptive ERM-MinMaxGAP, per-language constrained ERM, Group DRO, reweighting,
    adversarial debiasing and an oracle (the minority's share restored), over seeds; prints one table with
    seed-paired bootstrap intervals against ERM and writes bench/results/bias_lab.json, .md and .png."""
    from dataclasses import replace

    from rich.console import Console

    from ermgap.bias_lab.corpora import Sizes
    from ermgap.bias_lab.run import LabSettings, run_lab
    from ermgap.quiet import quiet_console

    quiet_console(False)
    sizes = replace(Sizes(), **{k: v for k, v in (("train", train_per_cell), ("dev", dev_per_cell),
                                                  ("test", test_per_cell)) if v is not None})
    settings = LabSettings(spec=str(spec), data_root=str(data_root), backbone=str(backbone), quick=quick, sizes=sizes,
                           corpora=tuple(corpus) if corpus else None, rows=tuple(row) if row else None,
                           overrides=list(overrides or []), force=force, resume=resume,
                           seed_list=tuple(seed) if seed else None, add_sweeps=tuple(map(str, add_sweep or ())), table_only=table_only)
    console = Console()
    if corpora_only:
        from ermgap.bias_lab.run import prepare

        prepare(settings, console=console)
        return
    result = run_lab(settings, console=console)
    console.print(result.text, highlight=False, soft_wrap=True)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")
    if result.failed:
        from ermgap.errors import TrainingError

        raise TrainingError(result.failed)
