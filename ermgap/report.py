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
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ermgap import metrics as M
from ermgap import plots
from ermgap.errors import ConfigError, PredictionsError
from ermgap.formatting import fmt, json_safe
from ermgap.io import atomic_dir
from ermgap.labels import MODALITIES
from ermgap.metric_registry import METRICS
from ermgap.task import Task, task_for_predictions
from ermgap.tracking import ZERO_SHOT, describe_objective, is_zero_shot, objective_kind

OVERALL = "multilingual"  # the pooled subset's key (the paper's "Multilingual" rows)
MODALITY_TITLES = {"uni": "Unimodal (Speech only)", "multi": "Multimodal (Speech + Transcription)"}
DEFAULT_GROUP = "Systems"
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
    its λ metric history and a name: the sweep variant tag `ermgap.param.variant` or a description of the
    objective params (param `objective.kind`), plus the sweep params that differ between runs. MinMaxGAP runs
    with fixed λ go to the Table 3 section "Lambda effect", adaptive ones to "Main components", the other
    objective kinds (ERM, Group DRO, reweighting) to "Other objectives". Returns (systems, skipped) where skipped says which runs
    had no predictions (e.g. trials stopped early by ASHA).
    """

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if parent_run_id:
            parent = client.get_run(parent_run_id)
            runs = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=10_000)
            if not runs:
                raise ConfigError(f"MLflow run {parent_run_id} at {tracking_uri} has no child runs")
        else:
            runs = [client.get_run(r) for r in run_ids]
    except MlflowException as err:
        raise ConfigError(f"MLflow ({tracking_uri}): {err.message}") from None
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
        history = [(float(m.step), float(m.value)) for m in client.get_metric_history(rid, "lambda")]
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
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDS_ARTIFACT,
                                                    dst_path=str(Path(download_dir) / run_id), tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        return None
    raw = M.read_predictions_csv(local)
    labels = params.get("task.labels")
    task = task_for_predictions(raw, labels=labels.split(",") if labels else None,
                                attribute=params.get("task.attribute", "gender"),
                                by=params.get("task.stratum", "language"), file=f"mlflow:{run_id}")
    return M.validate_predictions(raw, source=f"mlflow:{run_id}/{PREDS_ARTIFACT}", task=task), task


def _kind(params: dict) -> str:
    # Runs logged before `objective.kind` existed all trained ERM-MinMaxGAP (ERM was fixed λ = 0).
    return params.get("objective.kind", "minmaxgap")


MAIN, LAMBDA, PENALTY, OTHER = "Main components", "Lambda effect", "Penalty power effect", "Other objectives"
PAPER_P = 2.0  # the paper's penalty power: the adaptive run it calls "Ours"


def table3_layout(systems: Sequence[System]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The paper's Table 3 from what the systems are: [(section, [(system name, row label)])].

    Main components: systems given with that group (zero-shot) and runs that trained nothing (`optim.epochs` 0:
    "<backbone> (zero-shot)"), "+ ERM (SFT)", "ERM-MinMaxGAP (Ours)"
    (adaptive λ with p = 2, else the only adaptive run); Lambda effect: "λ = 0 (SFT)", "λ = 1", …,
    "λ = adaptive (Ours)"; Penalty power effect: "p = 1", "p = 2 (Ours)"; other objectives and other
    explicit groups after. A run can sit in several sections, as in the paper. Lambda and penalty
    sections need two rows to compare (or hold a run shown nowhere else). Systems without training params (prediction files) keep their group.
    """
    first = {}
    for s in systems:
        first.setdefault(s.name, s)
    adaptive = {n: float(s.params.get("objective.p", PAPER_P)) for n, s in first.items()
                if s.params and objective_kind(s.params) == "minmaxgap" and s.params.get("lambda.mode") == "adaptive"
                and not is_zero_shot(s.params)}  # a zero-shot trial keeps its sweep's λ settings but trained nothing
    ours = next((n for n, p in adaptive.items() if p == PAPER_P), next(iter(adaptive), None))
    sections: dict[str, list[tuple[str, str, float]]] = {}

    def add(section: str, name: str, label: str, order: float = 0.0) -> None:
        s = first[name]
        described = describe_objective(s.params) if s.params else name
        suffix = name[len(described):] if name.startswith(described) else f" ({name})"
        sections.setdefault(section, []).append((name, label + suffix if s.params else name, order))

    for name, s in first.items():
        if not s.params:
            add(s.group or DEFAULT_GROUP, name, name, -1.0)
            continue
        if is_zero_shot(s.params):
            backbone = Path(str(s.params.get("model.name_or_path", "backbone")).rstrip("/")).name
            add(MAIN, name, f"{backbone} ({ZERO_SHOT})", -1.0)
            continue
        kind, mode = objective_kind(s.params), s.params.get("lambda.mode")
        lam = float(s.params.get("lambda.init", 0.0)) if kind == "minmaxgap" and mode == "fixed" else None
        if kind == "erm" or lam == 0.0:
            add(MAIN, name, "+ ERM (SFT)")
            add(LAMBDA, name, "λ = 0 (SFT)", 0.0)
        elif lam is not None:
            add(LAMBDA, name, f"λ = {lam:g}", lam)
        elif name in adaptive:
            if name == ours:
                add(MAIN, name, "ERM-MinMaxGAP (Ours)", 1.0)
                add(LAMBDA, name, "λ = adaptive (Ours)", float("inf"))
            add(PENALTY, name, f"p = {adaptive[name]:g}" + (" (Ours)" if name == ours else ""), adaptive[name])
        else:
            add(OTHER, name, describe_objective(s.params))
    known = [MAIN, LAMBDA, PENALTY, OTHER]
    order = [k for k in known if k in sections] + [k for k in sections if k not in known]
    elsewhere = {n for t in order for n, _, _ in sections[t] if t not in (LAMBDA, PENALTY) or len(sections[t]) > 1}
    layout = []
    for title in order:
        rows = sorted(sections[title], key=lambda r: r[2])
        # A one-row comparison says nothing, unless it is the only place the run appears.
        if title in (LAMBDA, PENALTY) and len(rows) < 2 and all(n in elsewhere for n, _, _ in rows):
            continue
        layout.append((title, [(n, label) for n, label, _ in rows]))
    return layout


# ----------------------------------------------------------------------------------------------- tables


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


def subset_order(results: pd.DataFrame) -> list[str]:
    """The pooled subset first, then every stratum value found in the results, sorted."""
    return [OVERALL] + sorted(set(results["subset"]) - {OVERALL})


def subset_title(subset: str, task: Task) -> str:
    """`Multilingual`, `DEU` for the paper's language strata; `Overall` and the value itself otherwise."""
    language = task.stratum == ("language",)
    if subset == OVERALL:
        return "Multilingual" if language else "Overall"
    return subset.upper() if language else subset


def wide_table(results: pd.DataFrame, subsets: Iterable[str]) -> pd.DataFrame:
    """Paper layout: one row per (subset, model); columns `<modality>_<metric>` for the modalities present,
    and `delta_avg` = multi AVG − uni AVG when both are."""
    mods = [m for m in MODALITIES if (results["modality"] == m).any()]
    value_cols = [c for c in results.columns if c not in ("model", "modality", "group", "subset")]
    rows = []
    models = list(dict.fromkeys(results["model"]))
    for subset in subsets:
        for model in models:
            row = {"subset": subset, "model": model,
                   "group": results.loc[results["model"] == model, "group"].iloc[0]}
            found = False
            for mod in mods:
                hit = results[(results["model"] == model) & (results["modality"] == mod) & (results["subset"] == subset)]
                for c in value_cols:
                    row[f"{mod}_{c}"] = float(hit[c].iloc[0]) if len(hit) else math.nan
                found |= len(hit) > 0
            if len(mods) == 2:
                row["delta_avg"] = row["multi_avg_gap"] - row["uni_avg_gap"]
            if found:
                rows.append(row)
    return pd.DataFrame(rows)


def _delta(v: float, latex: bool) -> str:
    if not math.isfinite(v):
        return "–"
    arrow = "↓" if v < 0 else "↑" if v > 0 else "="
    if latex:
        arrow = {"↓": r"$\downarrow$", "↑": r"$\uparrow$", "=": "="}[arrow]
    return f"{arrow}{abs(v):.2f}"


def _marks(block: pd.DataFrame, col: str, higher: bool) -> dict[int, str]:
    """Top two of a column within a block (the paper's bold / underline)."""
    vals = block[col].dropna()
    ranked = vals.sort_values(ascending=not higher).index.tolist()
    return {i: ("best", "second")[r] for r, i in enumerate(ranked[:2])} if len(vals) > 2 else {}


def _render(wide: pd.DataFrame, sections: list[tuple[str, pd.DataFrame]], latex: bool) -> str:
    mods = [m for m in MODALITIES if f"{m}_w_f1" in wide.columns]
    delta = "delta_avg" in wide.columns
    metric_cols = [f"{m}_{k}" for m in mods for k in M.METRIC_KEYS]
    ncols = 1 + len(metric_cols) + delta
    if latex:
        esc = _latex_escape
        arrows = {"↑": r"$\uparrow$", "↓": r"$\downarrow$"}
        heads = [re.sub("[↑↓]", lambda m: arrows[m.group()], _head(c)) for c in metric_cols]
        lines = [r"\begin{tabular}{l" + "r" * (ncols - 1) + "}", r"\toprule",
                 " & ".join(["", *(rf"\multicolumn{{7}}{{c}}{{{MODALITY_TITLES[m]}}}" for m in mods)]
                            + ([r"$\Delta$AVG"] if delta else [])) + r" \\",
                 " & ".join(["Model", *heads] + ([r"uni$\to$multi"] if delta else [])) + r" \\", r"\midrule"]
    else:
        esc = _md_escape
        head = ["Model", *(f"{c.split('_', 1)[0].capitalize()} {_head(c)}" for c in metric_cols)]
        head += ["Δ AVG (uni→multi)"] if delta else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for title, block in sections:
        lines.append(rf"\multicolumn{{{ncols}}}{{l}}{{\textit{{{esc(title)}}}}} \\" if latex
                     else "| *" + esc(title) + "* |" + " |" * (ncols - 1))
        marks = {c: _marks(block, c, METRICS[c.split("_", 1)[1]].direction == "max") for c in metric_cols}
        for idx, row in block.iterrows():
            cells = [esc(row["model"])]
            for c in metric_cols:
                text, mark = fmt(row[c]), marks[c].get(idx)
                if mark == "best":
                    text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
                elif mark == "second":
                    # Markdown has no underline and MLflow's preview shows raw HTML: italic there.
                    text = rf"\underline{{{text}}}" if latex else f"_{text}_"
                cells.append(text)
            if delta:
                cells.append(_delta(row["delta_avg"], latex))
            lines.append(" & ".join(cells) + r" \\" if latex else "| " + " | ".join(cells) + " |")
    if latex:
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _head(col: str) -> str:
    """'uni_tpr_gap' → 'TPR gap↓' (the metric's own label: a gap column says so)."""
    m = METRICS[col.split("_", 1)[1]]
    return m.label + m.arrow


def _md_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("λ", r"$\lambda$")


def table2(results: pd.DataFrame, task: Task | None = None) -> tuple[pd.DataFrame, str, str]:
    """(wide frame, Markdown, LaTeX) of Table 2: every model, blocks Multilingual then one per stratum value
    (DEU, ENG, JPN in the paper)."""
    task = task or Task()
    order = subset_order(results)
    wide = wide_table(results, order)
    sections = [(subset_title(s, task), wide[wide["subset"] == s]) for s in order if (wide["subset"] == s).any()]
    return wide, _render(wide, sections, latex=False), _render(wide, sections, latex=True)


def table3(results: pd.DataFrame, layout: list[tuple[str, list[tuple[str, str]]]] | None = None
           ) -> tuple[pd.DataFrame, str, str]:
    """(wide frame, Markdown, LaTeX) of Table 3: multilingual rows in the sections of `layout`
    (`table3_layout`; default: one section per system group). The frame has one row per table row:
    `group` its section, `model` its label, `system` the system it shows."""
    base = wide_table(results, [OVERALL])
    if layout is None:
        layout = [(g, [(n, n) for n in base.loc[base["group"] == g, "model"]]) for g in dict.fromkeys(base["group"])]
    by_model = base.set_index("model")
    rows = [{**by_model.loc[name].to_dict(), "group": title, "model": label, "system": name}
            for title, members in layout for name, label in members if name in by_model.index]
    wide = pd.DataFrame(rows, columns=[*base.columns, "system"])
    sections = [(title, wide[wide["group"] == title]) for title, _ in layout if (wide["group"] == title).any()]
    return wide, _render(wide, sections, latex=False), _render(wide, sections, latex=True)


def caption(number: int, systems: Sequence[System], *, latex: bool = False) -> str:
    """What a table shows, in words: split, n per attribute value (and stratum), seeds, units, directions
    and what bold and the second mark mean."""
    preds, task = systems[0].preds, systems[0].task
    same = all(set(s.preds["utt_id"]) == set(preds["utt_id"]) for s in systems)
    groups = preds[task.attribute].astype(str).value_counts()
    strata = pd.Series(task.stratum_keys(preds, systems[0].modality)).value_counts()
    seeds = sorted({str(s.params["optim.seed"]) for s in systems if s.params.get("optim.seed")})
    second, best = ("underlined", "bold") if latex else ("_italic_", "**bold**")
    values = task.attribute_values
    words = {"F": "female", "M": "male"} if task.attribute == "gender" else {}
    gap = (f"|{words.get(values[0], values[0])} − {words.get(values[1], values[1])}|" if len(values) == 2
           else f"max − min over the {len(values)} {task.attribute} values")
    parts = [
        f"Table {number}. " + ("Ablations, " + ("multilingual, " if task.stratum == ("language",) else "")
                               if number == 3 else "") + "test split: "
        f"n = {len(preds)} utterances ({', '.join(f'{g} {n}' for g, n in groups.sort_index().items())}"
        + ("" if number == 3 else "; " + ", ".join(f"{k.upper()} {n}" for k, n in strata.sort_index().items()))
        + ")" + ("" if same else " for the first system (the systems' utterance sets differ)") + ".",
        "Seeds: " + (", ".join(seeds) if seeds else "not recorded (prediction files)") + ".",
        f"W-F1 and ACC in % (↑ better); TPR, FPR, W-F1 and ACC gaps are {gap} in % points "
        f"({task.attribute}, within each {task.stratum_name}), AVG gap their mean (↓ better).",
        f"{best}: best, {second}: second best within a block of three or more rows.",
        "Δ AVG (uni→multi): multimodal minus unimodal AVG gap (↓: the transcript narrows the gap).",
    ]
    if number == 3:
        parts.append("Sections as in the paper: main components, λ fixed vs adaptive, penalty power p.")
    text = " ".join(parts)
    if latex:
        return "% " + text + "\n"  # after the tabular, so the file can still be \input
    return text.replace(f"Table {number}.", f"**Table {number}.**", 1) + "\n\n"


def paired_lines(paired: pd.DataFrame, subset: str = OVERALL) -> list[str]:
    """'ERM (SFT)→Ours (uni): ΔW-F1 +3.88 [1.02, 6.50] · ΔAVG −1.48 [−5.10, 1.87]' per comparison
    (paired bootstrap, 95 % percentile interval; a negative gap difference means a smaller gap)."""
    out = []
    rows = paired[paired["subset"] == subset]
    for (comparison, modality), grp in rows.groupby(["comparison", "modality"], sort=False):
        by = grp.set_index("metric")
        cells = []
        for key, name in (("w_f1", "ΔW-F1"), ("avg_gap", "ΔAVG")):
            if key in by.index:
                r = by.loc[key]
                cells.append(f"{name} {_signed(r['diff'])} [{_signed(r['lo'], plus=False)}, {_signed(r['hi'], plus=False)}]")
        out.append(f"{comparison} ({modality}): " + " · ".join(cells))
    return out


def _signed(v: float, plus: bool = True) -> str:
    """2 decimals with a true minus sign (and + for a positive point estimate)."""
    text = f"{abs(v):.2f}"
    return ("−" if v < 0 else "+" if plus and v > 0 else "") + text


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

        put("table2_md", "table2.md", caption(2, systems) + md2)
        put("table2_tex", "table2.tex", tex2 + caption(2, systems, latex=True))
        put("table2_csv", "table2.csv", wide2.to_csv(index=False))
        put("table3_md", "table3.md", caption(3, systems) + md3)
        put("table3_tex", "table3.tex", tex3 + caption(3, systems, latex=True))
        put("table3_csv", "table3.csv", wide3.to_csv(index=False))
        put("results_csv", "results.csv", results.to_csv(index=False))
        if paired is not None and len(paired):
            put("paired_csv", "paired.csv", paired.to_csv(index=False))
            put("paired_md", "paired.md", "**Paired bootstrap** (test, multilingual; difference b − a with its 95 % "
                "interval, % points; ΔAVG < 0: smaller gap)\n\n" + "".join(f"- {ln}\n" for ln in paired_lines(paired)))
        put("metrics_json", "metrics.json", json.dumps(_metrics_doc(systems, results), indent=1, allow_nan=False)
            + "\n")

        multi = results[results["subset"] == OVERALL]
        labels = [f"{m} ({mod})" for m, mod in zip(multi["model"], multi["modality"])]
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
        gaps = {f"{m} ({mod})": {subset_title(s, task): v for s, v in sorted(zip(g["subset"], g["avg_gap"]),
                                                                           key=lambda sv: order[sv[0]])}
                for (m, mod), g in grouped}
        errors = {f"{m} ({mod})": {subset_title(s, task): (lo, hi)
                                   for s, lo, hi in zip(g["subset"], g["avg_gap_lo"], g["avg_gap_hi"])}
                  for (m, mod), g in grouped} if ci else None
        plots.gender_gap_bars(gaps, tmp / "gender_gaps.png", metric=f"AVG {task.attribute} gap [%]",
                              stratum=task.stratum_name, split="test", errors=errors, note=per_stratum)
        names["gender_gaps_png"] = "gender_gaps.png"
        series = {s.label: s.lambda_history for s in systems if s.lambda_history}
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


def log_report_to_mlflow(out_dir: str | os.PathLike, *, tracking_uri: str, run_id: str,
                         artifact_path: str = "report") -> None:
    """Log the whole report folder (tables and PNGs) as artifacts of `run_id` under `artifact_path`."""

    MlflowClient(tracking_uri=tracking_uri).log_artifacts(run_id, str(out_dir), artifact_path)


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
        log_report_to_mlflow(out_dir, tracking_uri=tracking_uri, run_id=log_to)
    return paths, skipped
