"""The paper's tables from evaluated systems: Table 2 (models × {uni, multi} × {multilingual, one block per
stratum value}) and Table 3 (ablations, its sections from what each run's objective is: `table3_layout`), as
frames and as Markdown / LaTeX with their captions, and the paired-bootstrap lines. Pure pandas: the systems are
evaluated by `ermgap.report.evaluate_systems` (long results, one row per model, modality and subset); a
system is an `ermgap.report.System`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ermgap import metrics as M
from ermgap.formatting import fmt
from ermgap.labels import MODALITIES
from ermgap.metric_registry import METRICS
from ermgap.objectives import (
    OBJECTIVES,
    TABLE3_MAIN,
    TABLE3_OTHER,
    ZERO_SHOT,
    Table3Row,
    describe_objective,
    is_zero_shot,
)
from ermgap.task import Task

OVERALL = "multilingual"  # the pooled subset's key (the paper's "Multilingual" rows)
MODALITY_TITLES = {"uni": "Unimodal (Speech only)", "multi": "Multimodal (Speech + Transcription)"}
DEFAULT_GROUP = "Systems"


def table3_layout(systems: Sequence[Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The paper's Table 3 from what the systems are: [(section, [(system name, row label)])].

    Main components: systems given with that group (zero-shot) and runs that trained nothing (`optim.epochs` 0:
    "<backbone> (zero-shot)"); then the rows each objective kind places (`Objective.table3_rows`: "+ ERM (SFT)",
    its own "(Ours)" row and comparison sections, e.g. MinMaxGAP's ablations); runs no kind places go to
    "Other objectives" under their description; explicit groups after. A run can sit in several sections, as
    in the paper. A kind's comparison sections need two rows to compare (or hold a run shown nowhere else).
    Systems without training params (prediction files) keep their group.
    """
    first = {}
    for s in systems:
        first.setdefault(s.name, s)
    position = {name: i for i, name in enumerate(first)}
    rows: list[Table3Row] = []
    for name, s in first.items():
        if not s.params:
            rows.append(Table3Row(name, s.group or DEFAULT_GROUP, name, -1.0))
        elif is_zero_shot(s.params):
            backbone = Path(str(s.params.get("model.name_or_path", "backbone")).rstrip("/")).name
            rows.append(Table3Row(name, TABLE3_MAIN, f"{backbone} ({ZERO_SHOT})", -1.0))
    trained = {n: s.params for n, s in first.items() if s.params and not is_zero_shot(s.params)}
    for cls in OBJECTIVES.values():
        rows += [r for r in cls.table3_rows(trained) if r.name in trained]
    placed = {r.name for r in rows}
    rows += [Table3Row(n, TABLE3_OTHER, describe_objective(p)) for n, p in trained.items() if n not in placed]
    rows.sort(key=lambda r: position[r.name])  # stable: each section lists its runs in the systems' order

    sections: dict[str, list[tuple[str, str, float]]] = {}
    for r in rows:
        s = first[r.name]
        described = describe_objective(s.params) if s.params else r.name
        # The run's own name only where it adds something ("zero_shot" repeats "zero-shot").
        same = _plain(r.name) == _plain(described)
        suffix = r.name[len(described):] if r.name.startswith(described) else "" if same else f" ({r.name})"
        sections.setdefault(r.section, []).append((r.name, r.label + suffix if s.params else r.name, r.order))
    comparisons = [t for cls in OBJECTIVES.values() for t in cls.table3_sections]
    known = [TABLE3_MAIN, *comparisons, TABLE3_OTHER]
    order = [k for k in known if k in sections] + [k for k in sections if k not in known]
    elsewhere = {n for t in order for n, _, _ in sections[t] if t not in comparisons or len(sections[t]) > 1}
    layout = []
    for title in order:
        ranked = sorted(sections[title], key=lambda r: r[2])
        # A one-row comparison says nothing, unless it is the only place the run appears.
        if title in comparisons and len(ranked) < 2 and all(n in elsewhere for n, _, _ in ranked):
            continue
        layout.append((title, [(n, label) for n, label, _ in ranked]))
    return layout


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


def _plain(text: str) -> str:
    """Letters and digits only, lower case: 'zero_shot' and 'zero-shot' are the same name."""
    return re.sub(r"[\W_]+", "", text.lower())


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


def caption(number: int, systems: Sequence[Any], *, latex: bool = False, delta: bool = True,
            intervals: bool = False) -> str:
    """What a table shows, in words: split, n per attribute value (and stratum), seeds, units, directions,
    what bold and the second mark mean (point estimates), and the Δ AVG column when the table has one
    (`delta`); `intervals`: the report computed bootstrap intervals (where to read them)."""
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
        f"{best}: best, {second}: second best within a block of three or more rows, by point estimate; "
        + ("marked rows may differ by less than their 95 % bootstrap intervals (the _lo/_hi columns of "
           f"table{number}.csv; paired differences in paired.csv)." if intervals else
           "no intervals were computed (--ci adds them), so a mark does not say the difference is "
           "beyond noise."),
    ]
    if delta:
        parts.append("Δ AVG (uni→multi): multimodal minus unimodal AVG gap (↓: the transcript narrows the gap).")
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
