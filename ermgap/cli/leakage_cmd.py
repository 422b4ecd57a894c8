"""`ermgap leakage`: a fresh probe of the protected attribute on finished runs' features (`ermgap.leakage`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_probe_table(results) -> str:
    """One line per run (≤ 100 columns): balanced accuracy [95 % CI], the difference from the first run
    [paired CI], the run's own head on the same split; a caption with the splits, n and chance."""
    first = results[0]
    lines = [f"{first.attribute} read by a fresh probe: logistic regression fitted on {first.fit} (n = {first.n_fit}),",
             f"balanced accuracy on {first.score} (n = {first.n_score}), chance {_pct(first.chance)} %, 95 % "
             "bootstrap intervals",
             f"{'run':<22} {'objective':<24} {'probe %':>19} {'Δ vs first':>20} {'head %':>6}"]
    for r in results:
        name = Path(r.run).name
        name = name if len(name) <= 22 else "…" + name[-21:]
        objective = r.objective if len(r.objective) <= 24 else r.objective[:23] + "…"
        probe = f"{_pct(r.balanced_acc)} [{_pct(r.ci[0])}, {_pct(r.ci[1])}]"
        if r.delta is None:
            delta = "–" if r is first else "not paired"
        else:
            delta = f"{100 * r.delta:+.1f} [{100 * r.delta_ci[0]:+.1f}, {100 * r.delta_ci[1]:+.1f}]"
        head = "–" if r.head_acc is None else _pct(r.head_acc)
        lines.append(f"{name:<22} {objective:<24} {probe:>19} {delta:>20} {head:>6}")
    if any(r.head_acc is not None for r in results):
        lines.append(f"head %: the run's own attribute head (unbalanced accuracy, `{first.score}_attr_acc`)")
    return "\n".join(lines)


def leakage(
    runs: list[Path] = typer.Argument(..., help="Finished run directories of `ermgap train` (or a sweep's "
                                      "runs/<trial>); the first is the one the others are compared with."),
    fit: str = typer.Option("dev", "--fit", help="Split the probe is fitted on."),
    score: str = typer.Option("test", "--score", help="Split the probe is scored on."),
    pool: str = typer.Option(None, "--pool", help="audio (mean over the audio positions) or answer (the state "
                             "that predicts the answer); default: the run's objective.adversarial.pool."),
    layer: int = typer.Option(None, "--layer", min=-1, help="Hidden layer (-1 the last; k the output of decoder "
                              "layer k); default: the run's objective.adversarial.layer."),
    n_boot: int = typer.Option(1000, "--n-boot", min=100, help="Bootstrap resamples of the scored utterances."),
    out: Path = typer.Option(None, "--out", help="Also write the results as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace a JSON file a previous `ermgap leakage` wrote."),
) -> None:
    """How well a fresh probe reads the protected attribute from each run's pooled hidden states (what the
    adversarial objective's head reads): logistic regression fitted on one split, balanced accuracy on another
    with a bootstrap 95 % interval, each run against the first with paired resamples."""
    from dataclasses import asdict

    from rich.console import Console

    from ermgap.errors import ConfigError
    from ermgap.formatting import json_safe
    from ermgap.io import atomic_write_text, check_own_file
    from ermgap.leakage import probe_runs

    if out is not None:  # checked before any model loads
        if out.is_dir():
            raise ConfigError(f"{out} is a directory; --out takes a JSON file path")
        check_own_file(out, force, owner="ermgap leakage", ours=_ours)
    err = Console(stderr=True)
    results = probe_runs(runs, fit=fit, score=score, pool=pool, layer=layer, n_boot=n_boot,
                         progress=lambda text: err.print(text, highlight=False, soft_wrap=True))
    Console().print(format_probe_table(results), highlight=False, soft_wrap=True)
    if out is not None:
        doc = {"output": "ermgap leakage", "probe": "logistic regression, standardised features, balanced class "
               "weights; balanced accuracy", "n_boot": n_boot,
               "runs": [{**asdict(r), "chance": r.chance} for r in results]}
        atomic_write_text(out, json.dumps(json_safe(doc), indent=1, ensure_ascii=False) + "\n", force=True)
        Console().print(f"json: {out}", highlight=False)


def _ours(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("output") == "ermgap leakage"
    except (OSError, ValueError, AttributeError):
        return False
