"""The paper's result tables (Table 2: models × {uni, multi} × {multilingual, one block per stratum value found in
the data: DEU, ENG, JPN for the paper}; Table 3: ablations) and fairness plots, from prediction files or MLflow runs.

Each system's task (labels, attribute, stratum) comes from its predictions (`ermgap.task.task_for_predictions`:
the score columns' label order, the attribute's values) or from an MLflow run's `task.*` params; all systems of
one report must share the attribute and the stratum.

A *system* is one model's test predictions in one modality. Systems sharing a name are one table row with a
unimodal and a multimodal block; the last column is the uni→multi change of the AVG gap (↓ = smaller gap
with the transcript). `build_report` writes everything into one folder atomically:

    table2.{md,csv,tex}  table3.{md,csv,tex}  metrics.json  [paired.csv]
    fairness_accuracy.png  gender_gaps.png  [lambda_trajectory.png]  confusion/<model>_<modality>.png
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from ermgap import metrics as M
from ermgap import plots, tracking
from ermgap.errors import ConfigError, PredictionsError
from ermgap.formatting import json_safe
from ermgap.io import atomic_dir
from ermgap.labels import MODALITIES
from ermgap.objectives import describe_objective, trajectory_metric
from ermgap.report_tables import (
    DEFAULT_GROUP,
    OVERALL,
    caption,
    paired_lines,
    subset_order,
    subset_title,
    table2,
    table3,
    table3_layout,
)
from ermgap.task import Task, task_for_predictions

PREDS_ARTIFACT = "predictions/test_preds.csv"


@dataclass
class System:
    """One model's predictions in one modality. `group` is its Table 3 section; `lambda_history` is
    [(step, λ)] over training when known."""

    name: str
    modality: str
    preds: pd.DataFrame
    group: str | None = None
    source: str = ""
    lambda_history: list[tuple[float, float]] | None = None
    params: dict = field(default_factory=dict)
    task: Task | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = task_for_predictions(self.preds, file=self.source or self.name)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.modality})"


# ----------------------------------------------------------------------------------------------- inputs


def load_system(name: str, modality: str, path: str | os.PathLike, *, group: str | None = None,
                lambda_path: str | os.PathLike | None = None, attribute: str = "gender",
                by: str = "language", labels: Sequence[str] | str | None = None) -> System:
    """A System from a PREDS.csv (validated against its own task, see task_for_predictions) and optionally a
    λ history file (see read_lambda_history)."""
    if modality not in MODALITIES:
        raise ConfigError(f"system {name!r}: modality {modality!r}; allowed: {', '.join(MODALITIES)}")
    raw = M.read_predictions_csv(path)
    task = task_for_predictions(raw, labels=labels, attribute=attribute, by=by, file=str(path))
    preds = M.validate_predictions(raw, source=str(path), task=task)
    recorded = set(preds["modality"]) - {""} if "modality" in preds.columns else set()
    if recorded - {modality}:
        found = sorted(recorded)
        raise PredictionsError(f"{path}: column 'modality' holds {found} but the system is declared {modality!r}")
    lam = read_lambda_history(lambda_path) if lambda_path else None
    return System(name=name, modality=modality, preds=preds, group=group, source=str(path), lambda_history=lam,
                  task=task)


def parse_preds_spec(text: str, *, attribute: str = "gender", by: str = "language",
                     labels: Sequence[str] | str | None = None) -> System:
    """`NAME:MODALITY:PATH` (the CLI's --preds) → System."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ConfigError(f"--preds {text!r}: expected NAME:MODALITY:PATH, e.g. 'Qwen2-Audio:uni:preds/zs_uni.csv'")
    return load_system(parts[0], parts[1], parts[2], attribute=attribute, by=by, labels=labels)


def load_systems_yaml(path: str | os.PathLike, *, attribute: str = "gender", by: str = "language",
                      labels: Sequence[str] | str | None = None) -> list[System]:
    """Systems from YAML; paths are relative to the file::

        systems:
          - {name: Qwen2-Audio, modality: uni, preds: zs_uni.csv, group: Main components}
          - {name: ERM-MinMaxGAP, modality: uni, preds: ours_uni.csv, lambda: runs/ours/metrics.json}
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read systems YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("systems"), list) or not doc["systems"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list 'systems'")
    allowed = {"name", "modality", "preds", "group", "lambda"}
    out = []
    for i, entry in enumerate(doc["systems"]):
        key = f"{path}:systems[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: expected a mapping with name, modality, preds")
        unknown = set(entry) - allowed
        missing = {"name", "modality", "preds"} - set(entry)
        if unknown or missing:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)} / missing {sorted(missing)}; "
                              f"allowed: {', '.join(sorted(allowed))}")

        def rel(p):
            return p if p is None or Path(p).is_absolute() else path.parent / p

        out.append(load_system(str(entry["name"]), str(entry["modality"]), rel(entry["preds"]),
                               group=entry.get("group"), lambda_path=rel(entry.get("lambda")),
                               attribute=attribute, by=by, labels=labels))
    return out


def read_lambda_history(path: str | os.PathLike) -> list[tuple[float, float]]:
    """[(step, λ)] from a CSV with columns step, lambda, or a training run's metrics.json
    (its `lambda_history` of [eval_round, dev_gap, λ] rows; the step is then the evaluation round)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: λ history file not found")
    if path.suffix == ".json":
        hist = json.loads(path.read_text()).get("lambda_history")
        if not isinstance(hist, list):
            raise ConfigError(f"{path}: no 'lambda_history' list")
        return [(float(h[0]), float(h[-1])) for h in hist]
    frame = pd.read_csv(path)
    if not {"step", "lambda"} <= set(frame.columns):
        raise ConfigError(f"{path}: expected columns step, lambda; found {', '.join(frame.columns)}")
    return list(zip(frame["step"].astype(float), frame["lambda"].astype(float)))


def systems_from_mlflow(tracking_uri: str, *, parent_run_id: str | None = None, run_ids: Sequence[str] = (),
                        download_dir: str | os.PathLike) -> tuple[list[System], list[str]]:
    """Systems from MLflow training runs (the children of a sweep's parent run, or explicit run ids).

    Each run contributes its `predictions/test_preds.csv` artifact, its modality (param `data.modality`),
    the history of its objective's `trajectory` metric (if its kind has one) and a name: the sweep variant tag
    `ermgap.param.variant` or its objective's description (`objectives.describe_objective`), plus the sweep
    params that differ between runs; its Table 3 rows are its objective's (`report_tables.table3_layout`).
    Returns (systems, skipped) where skipped says which runs had no predictions (e.g. trials stopped early by
    ASHA).
    """
    runs = tracking.training_runs(tracking_uri, parent_run_id=parent_run_id, run_ids=run_ids)
    if not runs:
        raise ConfigError("no MLflow runs given (use a parent run id or run ids)")

    sweep_keys = sorted({k[len("ermgap.param."):] for r in runs for k in r.data.tags if k.startswith("ermgap.param.")}
                        - {"variant", "data.modality"})
    varying = [k for k in sweep_keys if len({r.data.tags.get(f"ermgap.param.{k}") for r in runs}) > 1]
    systems, skipped = [], []
    for run in runs:
        rid, params, tags = run.info.run_id, run.data.params, run.data.tags
        got = run_test_predictions(tracking_uri, rid, params, download_dir)
        if got is None:
            skipped.append(f"{run.info.run_name or rid} ({rid}): no {PREDS_ARTIFACT} artifact")
            continue
        preds, task = got
        recorded = sorted(set(preds["modality"]) - {""}) if "modality" in preds.columns else []
        modality = params.get("data.modality") or (recorded[0] if recorded else "uni")
        name = tags.get("ermgap.param.variant") or describe_objective(params)
        extras = [f"{k}={tags.get(f'ermgap.param.{k}')}" for k in varying]
        if extras:
            name = f"{name} [{', '.join(extras)}]"
        key = trajectory_metric(params)  # the objective's logged state over training, if it has one
        history = tracking.metric_history(tracking_uri, rid, key) if key else []
        systems.append(System(name=name, modality=modality, preds=preds, group=None, source=f"mlflow:{rid}",
                              lambda_history=history or None, params=dict(params), task=task))
    seen: dict[tuple[str, str], int] = {}
    for s in systems:  # same description twice (e.g. seeds not tagged): keep both rows apart
        key = (s.name, s.modality)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            s.name = f"{s.name} #{seen[key]}"
    return systems, skipped


def run_test_predictions(tracking_uri: str, run_id: str, params: dict[str, str],
                         download_dir: str | os.PathLike) -> tuple[pd.DataFrame, Task] | None:
    """A training run's test predictions (its `predictions/test_preds.csv` artifact, downloaded under
    `download_dir/<run_id>`), validated against the task its `task.*` params name, and that task; None
    when the run logged none (e.g. stopped before the end)."""
    local = tracking.download_artifact(tracking_uri, run_id, PREDS_ARTIFACT, Path(download_dir) / run_id)
    if local is None:
        return None
    raw = M.read_predictions_csv(local)
    labels = params.get("task.labels")
    task = task_for_predictions(raw, labels=labels.split(",") if labels else None,
                                attribute=params.get("task.attribute", "gender"),
                                by=params.get("task.stratum", "language"), file=f"mlflow:{run_id}")
    return M.validate_predictions(raw, source=f"mlflow:{run_id}/{PREDS_ARTIFACT}", task=task), task


def evaluate_systems(systems: Sequence[System], *, n_boot: int = 0, seed: int = 0) -> pd.DataFrame:
    """Long results: one row per (model, modality, subset) with the 7 metrics (percent), n, invalid_rate,
    and `<metric>_lo` / `<metric>_hi` bootstrap bounds when n_boot > 0."""
    keys = [(s.name, s.modality) for s in systems]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ConfigError(f"systems given twice (name, modality): {sorted(dup)}")
    shared_task(systems)
    rows = []
    for s in systems:
        res = M.compute_metrics(s.preds, s.task)
        cis = M.bootstrap_ci(s.preds, n_boot=n_boot, seed=seed, task=s.task) if n_boot else None
        per = M.per_key(s.task)
        blocks = {OVERALL: (res["overall"], cis and cis["overall"])}
        blocks.update({name: (b, cis and cis[per][name]) for name, b in res[per].items()})
        for subset, (block, ci) in blocks.items():
            row = {"model": s.name, "modality": s.modality, "group": s.group or DEFAULT_GROUP, "subset": subset,
                   **{k: block[k] for k in M.METRIC_KEYS}, "n": block["n"], "invalid_rate": block["invalid_rate"]}
            if ci:
                for k in M.METRIC_KEYS:
                    row[f"{k}_lo"], row[f"{k}_hi"] = ci[k]
            rows.append(row)
    return pd.DataFrame(rows)


def shared_task(systems: Sequence[System]) -> Task:
    """The first system's task, after checking every system measures the same attribute within the same strata
    (their rows would not be comparable otherwise)."""
    first = systems[0].task
    for s in systems[1:]:
        if (s.task.attribute, s.task.stratum) != (first.attribute, first.stratum):
            raise ConfigError(f"system {s.label} measures {s.task.attribute} gaps per {s.task.stratum_name}, but "
                              f"{systems[0].label} {first.attribute} gaps per {first.stratum_name}; one report "
                              "compares one attribute within one stratum")
    return first


def paired_comparisons(systems: Sequence[System], *, n_boot: int, seed: int = 0,
                       baseline: str | None = None) -> pd.DataFrame:
    """Paired bootstrap rows (comparison, model, modality, subset, metric, diff, lo, hi, p_value) for
    uni→multi of each model with both, and each system vs `baseline` in the same modality. Pairs whose
    utterance sets differ are skipped (they cannot be paired)."""
    by_key = {(s.name, s.modality): s for s in systems}
    pairs = [(f"{name}: uni→multi", name, "multi", by_key[(name, "uni")], s)
             for (name, mod), s in by_key.items() if mod == "multi" and (name, "uni") in by_key]
    if baseline:
        pairs += [(f"{baseline}→{s.name}", s.name, s.modality, by_key[(baseline, s.modality)], s)
                  for s in systems if s.name != baseline and (baseline, s.modality) in by_key]
    rows = []
    for comparison, model, modality, a, b in pairs:
        if set(a.preds["utt_id"]) != set(b.preds["utt_id"]):
            continue
        res = M.paired_bootstrap(a.preds, b.preds, n_boot=n_boot, seed=seed, task=b.task)
        blocks = {OVERALL: res["overall"], **res[M.per_key(b.task)]}
        for subset, block in blocks.items():
            for k, e in block.items():
                rows.append({"comparison": comparison, "model": model, "modality": modality, "subset": subset,
                             "metric": k, "diff": e["diff"], "lo": e["ci"][0], "hi": e["ci"][1],
                             "p_value": e["p_value"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- report


MODALITY_WORDS = {"uni": "speech", "multi": "speech + transcript"}


def plot_names(systems: Sequence[System]) -> dict[tuple[str, str], str]:
    """What a plot's legend calls each (name, modality): a trained run by its objective's description (its own
    name added where two share one), anything else by its name; the modality in words only when the report
    holds both."""
    described = {s.name: describe_objective(s.params) if s.params else s.name for s in systems}
    shared = {d for d in described.values() if list(described.values()).count(d) > 1}
    mixed = len({s.modality for s in systems}) > 1
    out = {}
    for s in systems:
        d = described[s.name]
        name = s.name if d == s.name else (f"{d} ({s.name})" if d in shared else d)
        out[(s.name, s.modality)] = f"{name}, {MODALITY_WORDS.get(s.modality, s.modality)}" if mixed else name
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "system"


def build_report(systems: Sequence[System], out_dir: str | os.PathLike, *, force: bool = False, n_boot: int = 0,
                 seed: int = 0, baseline: str | None = None) -> dict[str, Path]:
    """Compute every system's metrics and write tables, metrics.json and plots into `out_dir` (atomically:
    all or nothing; an existing folder is replaced only with force=True). Returns {artifact name: path}.

    n_boot > 0 adds bootstrap CI columns to the CSVs and metrics.json, and paired.csv (uni→multi and
    vs `baseline`)."""
    if not systems:
        raise ConfigError("no systems to report")
    out_dir = Path(out_dir)
    if baseline and baseline not in {s.name for s in systems}:
        raise ConfigError(f"--baseline {baseline!r} is not one of the systems: {sorted({s.name for s in systems})}")
    results = evaluate_systems(systems, n_boot=n_boot, seed=seed)
    task = shared_task(systems)
    wide2, md2, tex2 = table2(results, task)
    wide3, md3, tex3 = table3(results, table3_layout(systems))
    paired = paired_comparisons(systems, n_boot=n_boot, seed=seed, baseline=baseline) if n_boot else None
    names: dict[str, str] = {}
    with atomic_dir(out_dir, kind="report", force=force) as tmp:
        def put(key: str, rel: str, text: str) -> None:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
            names[key] = rel

        delta = "delta_avg" in wide2.columns
        put("table2_md", "table2.md", caption(2, systems, delta=delta, intervals=n_boot > 0) + md2)
        put("table2_tex", "table2.tex", tex2 + caption(2, systems, latex=True, delta=delta, intervals=n_boot > 0))
        put("table2_csv", "table2.csv", wide2.to_csv(index=False))
        delta = "delta_avg" in wide3.columns
        put("table3_md", "table3.md", caption(3, systems, delta=delta, intervals=n_boot > 0) + md3)
        put("table3_tex", "table3.tex", tex3 + caption(3, systems, latex=True, delta=delta, intervals=n_boot > 0))
        put("table3_csv", "table3.csv", wide3.to_csv(index=False))
        put("results_csv", "results.csv", results.to_csv(index=False))
        if paired is not None and len(paired):
            put("paired_csv", "paired.csv", paired.to_csv(index=False))
            put("paired_md", "paired.md", "**Paired bootstrap** (test, multilingual; difference b − a with its 95 % "
                "interval, % points; ΔAVG < 0: smaller gap)\n\n" + "".join(f"- {ln}\n" for ln in paired_lines(paired)))
        put("metrics_json", "metrics.json", json.dumps(_metrics_doc(systems, results), indent=1, allow_nan=False)
            + "\n")

        multi = results[results["subset"] == OVERALL]
        legend = plot_names(systems)
        labels = [legend[(m, mod)] for m, mod in zip(multi["model"], multi["modality"])]
        ci = n_boot > 0  # bootstrap 95 % intervals as error bars
        pooled, per_stratum = group_sizes(systems[0])
        plots.fairness_accuracy_scatter(
            list(zip(multi["w_f1"], multi["avg_gap"])), labels, tmp / "fairness_accuracy.png",
            xlabel=f"AVG {task.attribute} gap [%] ↓", split="test", note=pooled,
            title=f"Performance–fairness trade-off, all {task.stratum_name} values pooled",
            errors=list(zip(zip(multi["w_f1_lo"], multi["w_f1_hi"]), zip(multi["avg_gap_lo"], multi["avg_gap_hi"])))
            if ci else None)
        names["fairness_accuracy_png"] = "fairness_accuracy.png"
        order = {s: i for i, s in enumerate(subset_order(results))}
        grouped = list(results.groupby(["model", "modality"], sort=False))
        gaps = {legend[(m, mod)]: {subset_title(s, task): v for s, v in sorted(zip(g["subset"], g["avg_gap"]),
                                                                           key=lambda sv: order[sv[0]])}
                for (m, mod), g in grouped}
        errors = {legend[(m, mod)]: {subset_title(s, task): (lo, hi)
                                   for s, lo, hi in zip(g["subset"], g["avg_gap_lo"], g["avg_gap_hi"])}
                  for (m, mod), g in grouped} if ci else None
        plots.gender_gap_bars(gaps, tmp / "gender_gaps.png", metric=f"AVG {task.attribute} gap [%]",
                              stratum=task.stratum_name, split="test", errors=errors, note=per_stratum)
        names["gender_gaps_png"] = "gender_gaps.png"
        series = {legend[(s.name, s.modality)]: s.lambda_history for s in systems if s.lambda_history}
        if series:
            plots.lambda_trajectories(series, tmp / "lambda_trajectory.png")
            names["lambda_trajectory_png"] = "lambda_trajectory.png"
        (tmp / "confusion").mkdir()
        for s in systems:
            rel = f"confusion/{_slug(s.name)}_{s.modality}.png"
            plots.confusion_matrices(M.confusion_by_attribute(s.preds, s.task), tmp / rel, title=s.label,
                                     labels=s.task.labels)
            names[f"confusion_{_slug(s.name)}_{s.modality}"] = rel
    return {k: out_dir / rel for k, rel in names.items()}


def group_sizes(system: System) -> tuple[str, str]:
    """The plots' n notes from a system's test predictions: per attribute value pooled over strata
    ("n = 672: F 336, M 336"), and the range per (stratum, attribute value) ("n per (language, gender): 112")."""
    preds, task = system.preds, system.task
    values = preds[task.attribute].astype(str)
    pooled = f"n = {len(preds)}: " + ", ".join(f"{g} {n}" for g, n in values.value_counts().sort_index().items())
    cells = pd.Series(list(zip(task.stratum_keys(preds, system.modality), values))).value_counts()
    lo, hi = int(cells.min()), int(cells.max())
    return pooled, f"n per ({task.stratum_name}, {task.attribute}): {lo}" + (f"–{hi}" if hi != lo else "")


def _metrics_doc(systems: Sequence[System], results: pd.DataFrame) -> dict:
    doc = {"systems": []}
    per = M.per_key(systems[0].task)
    for s in systems:
        rows = results[(results["model"] == s.name) & (results["modality"] == s.modality)]
        subsets = {r["subset"]: {k: json_safe(v) for k, v in r.items() if k not in ("model", "modality", "group", "subset")}
                   for r in rows.to_dict("records")}
        doc["systems"].append({"name": s.name, "modality": s.modality, "group": s.group, "source": s.source,
                               "overall": subsets.pop(OVERALL), per: subsets})
    return doc


def report_from_mlflow(tracking_uri: str, out_dir: str | os.PathLike, *, parent_run_id: str | None = None,
                       run_ids: Sequence[str] = (), force: bool = False, n_boot: int = 0, seed: int = 0,
                       log_to: str | None = None) -> tuple[dict[str, Path], list[str]]:
    """systems_from_mlflow → build_report → (optionally) log the folder to `log_to` (e.g. the sweep's parent
    run) under artifacts/report. Returns ({artifact name: path}, skipped-run notes)."""

    with tempfile.TemporaryDirectory(prefix="ermgap-report-") as tmp:
        systems, skipped = systems_from_mlflow(tracking_uri, parent_run_id=parent_run_id, run_ids=run_ids,
                                               download_dir=tmp)
    if not systems:
        raise ConfigError(f"no MLflow run has a {PREDS_ARTIFACT} artifact: " + "; ".join(skipped))
    paths = build_report(systems, out_dir, force=force, n_boot=n_boot, seed=seed)
    if log_to:
        tracking.log_artifacts(tracking_uri, log_to, out_dir, "report")  # tables and PNGs
    return paths, skipped
