"""`ermgap metrics PREDS.csv`: the paper's metrics (W-F1, ACC, gender gaps) for one predictions file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ermgap.errors import ErmgapError
from ermgap.formatting import fmt, json_safe
from ermgap.labels import LANGUAGES


def _fmt_ci(ci: list[float]) -> str:
    return f"{ci[0]:.1f}–{ci[1]:.1f}" if all(map(math.isfinite, ci)) else "–"


def metrics(
    preds: Path = typer.Argument(..., help="Predictions CSV (utt_id, language, gender, gold, pred[, valid, modality])."),
    by: str = typer.Option(None, "--by", help="Also show one row per value of this column (only: language)."),
    ci: bool = typer.Option(False, "--ci", help="Add percentile bootstrap 95% CIs (resampling within language)."),
    n_boot: int = typer.Option(1000, "--n-boot", min=10, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
) -> None:
    """Print W-F1, ACC and the gender gaps (TPR, FPR, W-F1, ACC, AVG) in percent, as in the paper's tables."""
    from ermgap.metric_registry import METRICS
    from ermgap.metrics import METRIC_KEYS, bootstrap_ci, compute_metrics, read_predictions

    if by not in (None, "language"):
        raise ErmgapError(f"--by {by!r}: allowed: language")
    df = read_predictions(preds)
    result = compute_metrics(df)
    if ci:
        cis = bootstrap_ci(df, n_boot=n_boot, seed=seed)
        result["overall"]["ci"] = cis["overall"]
        for lang, block in result["per_language"].items():
            block["ci"] = cis["per_language"][lang]
    if as_json:
        keys = (*METRIC_KEYS, "n", "invalid_rate", "tpr_classes", "fpr_classes", "by_gender", "ci")

        def pick(block: dict) -> dict:
            return {k: block[k] for k in keys if k in block}

        out = {"overall": pick(result["overall"]),
               "per_language": {lang: pick(b) for lang, b in result["per_language"].items()}}
        typer.echo(json.dumps(json_safe(out), indent=2))
        return

    table = Table(title=f"{preds} — metrics [%]", title_justify="left", pad_edge=False)
    table.add_column("Subset")
    for key in METRIC_KEYS:
        table.add_column(METRICS[key].column, justify="right")
    table.add_column("n", justify="right")
    table.add_column("invalid", justify="right")
    rows = [("Multilingual", result["overall"])]
    if by == "language":
        rows += [(lang.upper(), result["per_language"][lang]) for lang in LANGUAGES if lang in result["per_language"]]
    for name, block in rows:
        table.add_row(name, *(fmt(block[k]) for k in METRIC_KEYS), str(block["n"]),
                      f"{100 * block['invalid_rate']:.1f}%")
        if "ci" in block:
            table.add_row("  95% CI", *(_fmt_ci(block["ci"][k]) for k in METRIC_KEYS), "", "", style="dim")
    # Never squeeze the numbers into "…": a pipe or a narrow terminal gets the full-width table.
    console = Console()
    console.width = max(console.width, 132)
    console.print(table)
    notes = [f"{name}: TPR gap over {len(b['tpr_classes'])}/7 classes, FPR gap over {len(b['fpr_classes'])}/7"
             for name, b in rows if len(b["tpr_classes"]) < 7 or len(b["fpr_classes"]) < 7]
    for note in notes:
        console.print(f"[dim]note: {note} (classes with an undefined rate in one gender are left out)[/]")
