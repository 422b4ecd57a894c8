"""`ermgap metrics PREDS.csv`: the paper's metrics (W-F1, ACC, attribute gaps) for one predictions file, any task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ermgap.errors import ErmgapError
from ermgap.formatting import fmt, json_safe


def _split_list(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _fmt_ci(ci: list[float]) -> str:
    return f"{ci[0]:.1f}–{ci[1]:.1f}" if all(map(math.isfinite, ci)) else "–"


def metrics(
    preds: Path = typer.Argument(..., help="Predictions CSV (utt_id, language, gender, gold, pred[, valid, modality])."),
    by: str = typer.Option(None, "--by", help="Also show one row per value of this stratum: a column of the file, or "
                           "columns joined by '+' (language+modality). Default: language (JSON always has it)."),
    labels: str = typer.Option("infer", "--labels", help="Comma-separated labels in class order; 'infer' (default): the "
                               "file's score_<label> columns, else MELD's seven if they cover gold and pred, else "
                               "the gold and predicted labels sorted."),
    attribute: str = typer.Option("gender", "--attribute", help="Protected attribute column."),
    attribute_values: str = typer.Option(None, "--attribute-values", help="Comma-separated attribute values "
                                         "(default: the file's, sorted)."),
    ci: bool = typer.Option(False, "--ci", help="Add percentile bootstrap 95% CIs (resampling within the stratum)."),
    n_boot: int = typer.Option(1000, "--n-boot", min=10, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
) -> None:
    """Print W-F1, ACC and the attribute gaps (TPR, FPR, W-F1, ACC, AVG) in percent, as in the paper's tables.

    With k > 2 attribute values each gap is max − min over the values."""
    from ermgap.metric_registry import METRICS
    from ermgap.metrics import (
        METRIC_KEYS,
        bootstrap_ci,
        by_key,
        compute_metrics,
        per_key,
        read_predictions_csv,
        validate_predictions,
    )
    from ermgap.task import stratum_columns, task_for_predictions

    raw = read_predictions_csv(preds)
    stratum = by or "language"
    missing = [c for c in stratum_columns(stratum) if c not in raw.columns]
    if missing:
        raise ErmgapError(f"--by {stratum!r}: {preds} has no column {', '.join(map(repr, missing))}; "
                          f"columns: {', '.join(map(str, raw.columns))}")
    task = task_for_predictions(raw, labels=labels if labels == "infer" else _split_list(labels), attribute=attribute,
                                attribute_values=_split_list(attribute_values), by=stratum, file=str(preds))
    df = validate_predictions(raw, source=str(preds), task=task)
    result = compute_metrics(df, task)
    per = per_key(task)
    if ci:
        cis = bootstrap_ci(df, n_boot=n_boot, seed=seed, task=task)
        result["overall"]["ci"] = cis["overall"]
        for name, block in result[per].items():
            block["ci"] = cis[per][name]
    if as_json:
        keys = (*METRIC_KEYS, "n", "invalid_rate", "tpr_classes", "fpr_classes", by_key(task), "ci")

        def pick(block: dict) -> dict:
            return {k: block[k] for k in keys if k in block}

        out = {"overall": pick(result["overall"]), per: {name: pick(b) for name, b in result[per].items()}}
        typer.echo(json.dumps(json_safe(out), indent=2))
        return

    table = Table(title=f"{preds} — metrics [%]", title_justify="left", pad_edge=False)
    table.add_column("Subset")
    for key in METRIC_KEYS:
        table.add_column(METRICS[key].column, justify="right")
    table.add_column("n", justify="right")
    table.add_column("invalid", justify="right")
    rows = [("Multilingual" if task.stratum == ("language",) else "Overall", result["overall"])]
    if by:
        rows += [(name.upper() if task.stratum == ("language",) else name, block) for name, block in result[per].items()]
    for name, block in rows:
        table.add_row(name, *(fmt(block[k]) for k in METRIC_KEYS), str(block["n"]),
                      f"{100 * block['invalid_rate']:.1f}%")
        if "ci" in block:
            table.add_row("  95% CI", *(_fmt_ci(block["ci"][k]) for k in METRIC_KEYS), "", "", style="dim")
    # Never squeeze the numbers into "…": a pipe or a narrow terminal gets the full-width table.
    console = Console()
    console.width = max(console.width, 132)
    console.print(table)
    k = task.num_labels
    notes = [f"{name}: TPR gap over {len(b['tpr_classes'])}/{k} classes, FPR gap over {len(b['fpr_classes'])}/{k}"
             for name, b in rows if len(b["tpr_classes"]) < k or len(b["fpr_classes"]) < k]
    for note in notes:
        console.print(f"[dim]note: {note} (classes with a rate defined in fewer than two {task.attribute} groups "
                      "are left out)[/]")
    if len(task.attribute_values) > 2:
        console.print(f"[dim]{task.attribute} has {len(task.attribute_values)} values "
                      f"({', '.join(task.attribute_values)}): each gap is max − min over them[/]")
