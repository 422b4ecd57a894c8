"""Everything a sweep shows or writes for people: console tables, the plan of a dry run, and the
leaderboard / seed-summary / Pareto files logged to the parent run. One formatter
(`ermgap.formatting.fmt`) for every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from ermgap.config import flatten, validate_tree
from ermgap.formatting import fmt
from ermgap.io import atomic_write_text
from ermgap.metric_registry import label, lookup
from ermgap.plots import pareto_plot
from ermgap.sweep.leaderboard import PARETO_AXES
from ermgap.sweep.spec import SEED_KEY, TRIAL_DRIVER_CPU, SweepSpec, dump_spec_yaml

# The console shows few columns, so that every table fits a 100-column terminal or log; the CSV and Markdown
# files next to the report have them all. Metric columns are headed by their registry labels ("test Δloss").
CONSOLE_WIDTH = 100
SHOWN = {k: label(k) for k in ("dev_w_f1", "test_w_f1", "test_worst_lang_gap", "test_loss_gap")}
SEED_SHOWN = ("dev_w_f1", "test_w_f1", "test_worst_lang_gap", "test_loss_gap")
# The objectives-vs-ERM columns the console shows (the CSV/MD add the means over seeds and the per-seed Δ).
COMPARISON_SHOWN = 3


def console() -> Console:
    """The terminal as it is, or 100 columns when stdout is a pipe or a CI log."""
    c = Console()
    return c if c.is_terminal else Console(width=CONSOLE_WIDTH)


def _table(title: str) -> Table:
    """A compact table: no outer border, one space between columns (the console's tables fit 100 columns)."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title_justify="left")


def leaderboard_markdown(board: pd.DataFrame) -> str:
    cols = [c for c in board.columns if c not in ("mlflow_run_id", "trial_s")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in board.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _trial_name(spec: SweepSpec, r: pd.Series) -> str:
    """What a person calls the trial (its variant, swept values, seed), as the live view and MLflow name it."""
    from ermgap.sweep.live import trial_label

    params = {k: r[k] for k in spec.param_names() if k in r and r[k] == r[k]}
    return trial_label(spec, params)


def print_leaderboard(board: pd.DataFrame, spec: SweepSpec, out: Console) -> None:
    sel = spec.model.selection
    axes = " / ".join(f"{label(m)} {lookup(m).arrow}" for m in PARETO_AXES)
    gap = {sel.gap_metric.removeprefix("best_"): label(sel.gap_metric)}
    shown = {"dev_w_f1": SHOWN["dev_w_f1"], **gap, **{k: v for k, v in SHOWN.items() if k != "dev_w_f1"}}
    table = _table(f"sweep {spec.name}: {len(board)} trials (★ best: {sel.metric} {sel.mode} among "
                   f"{sel.gap_metric} ≤ min + {sel.tolerance:g}; ◆ Pareto: {axes}; every column: leaderboard.csv)")
    table.add_column("", no_wrap=True)
    for c in ["trial", "objective", "status"]:
        table.add_column(c, no_wrap=True)
    for c in shown.values():
        table.add_column(c, justify="right", max_width=12)
    for _, r in board.iterrows():
        mark = ("★" if r["best"] else "") + ("◆" if r["pareto"] else "")
        table.add_row(mark, _trial_name(spec, r), fmt(r.get("objective")), str(r["status"]),
                      *[fmt(r.get(k)) for k in shown])
    out.print(table)


def print_seed_summary(summary: pd.DataFrame, spec: SweepSpec, out: Console) -> None:
    keys = [p for p in spec.param_names() if p != SEED_KEY]
    table = _table(f"sweep {spec.name}: mean ± sd over seeds {spec.model.seeds} (every column: seed_summary.csv)")
    for c in keys:
        table.add_column(c, no_wrap=True)
    for c in ["seeds", *(label(m) for m in SEED_SHOWN)]:
        table.add_column(c, justify="right", max_width=13)
    for _, r in summary.iterrows():
        table.add_row(*[fmt(r[k]) for k in keys], str(r["n_seeds"]),
                      *[f"{fmt(r[f'{m}_mean'])} ± {fmt(r[f'{m}_sd'])}" for m in SEED_SHOWN])
    out.print(table)


def _interval(r: pd.Series, col: str) -> str:
    return f"{fmt(r[col])} [{fmt(r[f'{col}_lo'])}, {fmt(r[f'{col}_hi'])}]"


def comparison_rows(versus: pd.DataFrame, spec: SweepSpec) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the objectives-vs-ERM table (console and markdown alike)."""
    keys = [p for p in spec.param_names() if p != SEED_KEY]
    worst = versus["worst_language"].dropna().unique() if "worst_language" in versus else []
    where = f" ({', '.join(worst)})" if len(worst) else ""
    headers = [*keys, "objective", "seeds", "test W-F1 (mean ± sd)", "test worst-lang gap (mean ± sd)",
               "Δ W-F1, mean over seeds", "Δ gap, mean over seeds", "relative Δ gap [95 % CI]",
               "Δ test W-F1 vs ERM [95 % CI]", f"Δ test gap of ERM's worst language{where} vs ERM [95 % CI]"]
    rows = []
    for _, r in versus.iterrows():
        paired = r.get("d_test_w_f1") == r.get("d_test_w_f1")
        if r["reference"]:
            diffs = ["reference"] * 5
        elif paired:
            rel = [100 * r[c] for c in ("d_test_worst_gap_rel", "d_test_worst_gap_rel_lo", "d_test_worst_gap_rel_hi")]
            diffs = [fmt(r["d_test_w_f1_seed_mean"]), fmt(r["d_test_worst_gap_seed_mean"]),
                     f"{fmt(rel[0])} % [{fmt(rel[1])}, {fmt(rel[2])}]",
                     _interval(r, "d_test_w_f1"), _interval(r, "d_test_worst_gap")]
        else:
            diffs = ["-"] * 5
        rows.append([*[fmt(r[k]) for k in keys], fmt(r["objective"]), str(r["n_seeds"]),
                     f"{fmt(r['test_w_f1_mean'])} ± {fmt(r['test_w_f1_sd'])}",
                     f"{fmt(r['test_worst_lang_gap_mean'])} ± {fmt(r['test_worst_lang_gap_sd'])}", *diffs])
    return headers, rows


def comparison_markdown(versus: pd.DataFrame, spec: SweepSpec) -> str:
    headers, rows = comparison_rows(versus, spec)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def print_objective_comparison(versus: pd.DataFrame, spec: SweepSpec, out: Console) -> None:
    """The objective, its seeds and its three intervals against ERM (the CSV/MD have every column)."""
    headers, rows = comparison_rows(versus, spec)
    keep = [headers.index("objective"), headers.index("seeds"), *range(len(headers) - COMPARISON_SHOWN, len(headers))]
    table = _table(f"sweep {spec.name}: objectives vs ERM, paired bootstrap over the test utterances of the seeds "
                   "both finished (points; negative Δ gap: narrower than ERM; every column: objective_comparison.csv)")
    for i in keep:
        if headers[i] == "objective":
            table.add_column(headers[i], no_wrap=True)
        else:
            table.add_column(headers[i], justify="right", max_width=22)
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    out.print(table)


def ui_command(tracking_uri: str) -> str:
    return f"ermgap ui --tracking-uri '{tracking_uri}'"


def print_outcome(outcome, spec: SweepSpec, out: Console) -> None:
    """The end of a sweep: leaderboard, seed summary, where the files and the MLflow runs are."""
    print_leaderboard(outcome.leaderboard, spec, out)
    if outcome.seed_summary is not None:
        print_seed_summary(outcome.seed_summary, spec, out)
    if outcome.objective_comparison is not None:
        print_objective_comparison(outcome.objective_comparison, spec, out)
    out.print(f"best trial: {outcome.best_trial or '- (no trial finished)'}")
    for k, p in outcome.artifacts.items():
        out.print(f"{k}: {p}")
    out.print(f"MLflow: experiment '{outcome.experiment}', parent run {outcome.parent_run_id} at {outcome.tracking_uri}")
    out.print(f"open the UI: {ui_command(outcome.tracking_uri)}  (it prints a link to this sweep's runs table "
              "with W-F1 and gap columns)")


def write_artifacts(spec: SweepSpec, board: pd.DataFrame, summary: pd.DataFrame | None, art: Path,
                    versus: pd.DataFrame | None = None) -> dict[str, Path]:
    """The parent run's files: the spec as run, its search space, leaderboard, seed summary, objectives vs
    ERM, Pareto plot."""
    art.mkdir(parents=True, exist_ok=True)
    m = spec.model
    space = {"algorithm": m.algorithm, "space": {k: d.model_dump(exclude_none=True) for k, d in m.space.items()},
             "variants": m.variants, "seeds": m.seeds,
             "scheduler": None if m.scheduler is None else m.scheduler.model_dump(), "trials": spec.example_trials()}
    files = {
        "spec": atomic_write_text(art / "sweep.yaml", dump_spec_yaml(spec), force=True),
        "search_space": atomic_write_text(art / "search_space.json", json.dumps(space, indent=2, default=str) + "\n",
                                          force=True),
        "leaderboard_csv": atomic_write_text(art / "leaderboard.csv", board.to_csv(index=False), force=True),
        "leaderboard_md": atomic_write_text(art / "leaderboard.md", leaderboard_markdown(board), force=True),
    }
    if summary is not None:
        files["seed_summary_csv"] = atomic_write_text(art / "seed_summary.csv", summary.to_csv(index=False), force=True)
        files["seed_summary_md"] = atomic_write_text(art / "seed_summary.md", leaderboard_markdown(summary), force=True)
    if versus is not None:
        files["objective_comparison_csv"] = atomic_write_text(art / "objective_comparison.csv",
                                                              versus.to_csv(index=False), force=True)
        files["objective_comparison_md"] = atomic_write_text(art / "objective_comparison.md",
                                                             comparison_markdown(versus, spec), force=True)
    ok = board[board[list(PARETO_AXES)].notna().all(axis=1)].copy() if not board.empty else board
    if not ok.empty:
        ok["label"] = paper_names(ok, spec)
        files["pareto_plot"] = art / "pareto.png"
        pareto_plot(ok, files["pareto_plot"], x=PARETO_AXES[1], y=PARETO_AXES[0], label="label", split="dev",
                    title=f"sweep {spec.name}: trade-off, best checkpoint per trial")
    return files


def paper_names(board: pd.DataFrame, spec: SweepSpec) -> list[str]:
    """Each trial by the paper's name of its objective ("ERM (SFT)", "ERM-MinMaxGAP (p=2)"), with its trial name
    (variant, swept values, seed) added only where two trials share an objective name."""
    names = [str(o) if isinstance(o, str) and o else _trial_name(spec, r) for o, (_, r) in
             zip(board.get("objective", [None] * len(board)), board.iterrows())]
    counts = pd.Series(names).value_counts()
    return [f"{n} [{_trial_name(spec, r)}]" if counts[n] > 1 else n for n, (_, r) in zip(names, board.iterrows())]


def _fmt_cluster(c: dict[str, float]) -> str:
    if not c:
        return "the cluster at --address (checked when joining)"
    return f"{c.get('CPU', 0):g} CPU / {c.get('GPU', 0):g} GPU"


def print_plan(spec: SweepSpec, plan: dict[str, Any], out: Console) -> None:
    """--dry-run: the trials with their resolved hyperparameters, and the resource plan."""
    m = spec.model
    trials = spec.example_trials()
    sampled = [k for k, d in m.space.items() if d.kind != "grid"]
    title = f"sweep {spec.name}: {len(trials)} trials, algorithm {m.algorithm}"
    if sampled:
        title += f" (sampled at run time, example draws shown: {', '.join(sampled)})"
    table = Table(title=title)
    params = spec.param_names()
    for c in ["#", *params, "resolved changes vs base"]:
        table.add_column(c)
    ref = flatten(validate_tree(dict(spec.base_tree), f"{spec.source}: base").to_dict())
    for i, p in enumerate(trials):
        cfg = flatten(spec.trial_config(p).to_dict())
        changed = {k: v for k, v in cfg.items() if ref.get(k) != v}
        table.add_row(str(i), *[fmt(p.get(k)) for k in params], ", ".join(f"{k}={fmt(v)}" for k, v in changed.items()))
    out.print(table)
    inf = "unbounded" if plan["max_concurrent_trials"] is None else plan["max_concurrent_trials"]
    out.print(
        f"resources: {plan['trials']} trials × {plan['workers_per_trial']} worker(s) × "
        f"{plan['cpus_per_worker']:g} CPU / {plan['gpus_per_worker']} GPU per worker "
        f"(+{TRIAL_DRIVER_CPU:g} CPU trial driver) = {plan['cpu_per_trial']:g} CPU, {plan['gpu_per_trial']:g} GPU per trial; "
        f"max_concurrent_trials {inf}; {plan['concurrent']} at once on "
        f"{_fmt_cluster(plan['cluster'])}" + (f" → {plan['waves']} wave(s)" if plan["concurrent"] else ""))
    if plan["cluster"] and plan["concurrent"] == 0:
        out.print(f"[yellow]note:[/] one trial needs more than {_fmt_cluster(plan['cluster'])}: run this sweep "
                  "on a cluster with --address (a local run would be refused before starting)")
    if m.scheduler:
        s = m.scheduler
        out.print(f"scheduler: ASHA on {s.metric} ({s.mode}) over {s.time_attr}, grace {s.grace_period}, "
                  f"reduction {s.reduction_factor:g}, max_t {s.max_t}")
    if m.algorithm.startswith("optuna"):
        out.print(f"objectives: {', '.join(f'{k} ({v})' for k, v in m.objectives.items())}")
