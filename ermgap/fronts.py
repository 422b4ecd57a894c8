"""Several sweeps' trials on one trade-off, on the test split: each family's Pareto front with intervals.

    trials = sweep_trials("runs/sweeps/pareto_minmaxgap") + sweep_trials("runs/sweeps/pareto_constrained")
    refs = [reference_trial("runs/sweeps/bias_lab_quick:positive.erm@42")]
    table = fronts_table(trials, refs)          # one row per trial: W-F1 and worst-language gap with intervals
    print(format_table(table))                  # fits 100 columns
    write_fronts(table, "bench/results/pareto_fronts", meta={...}, force=False)   # .json, .md, .png

A *family* is an objective kind (`objective.kind` of the trial's run); its front is the set of its trials that no
other trial of the same family beats on both axes (`ermgap.metrics.pareto_front`); `front_all` marks the front
over every family together. Per trial: test W-F1 (all languages) and the test worst-language gap (the
registry's `worst_lang_gap`: the largest per-language AVG gender gap), each with a percentile bootstrap interval
over test utterances resampled within language (`ermgap.metrics.bootstrap_samples`: 1,000 resamples, seed 0,
95 %, the bias lab's conventions); the gap's interval is the registry's formula applied resample by resample, so
it is the interval of the *max* over languages (which language is worst may change between resamples).
Reference runs (e.g. the bias lab's ERM and oracle rows on the same corpus and seed) are drawn and tabled beside
the families but belong to no front. Every trial must have been tested on the same utterances.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ermgap.errors import ConfigError, PredictionsError
from ermgap.io import check_own_file
from ermgap.metric_registry import METRICS, direction
from ermgap.metrics import bootstrap_samples, compute_metrics, pareto_front, per_key, percentile_ci
from ermgap.objective_comparison import worst_language
from ermgap.task import Task

X, Y = "worst_lang_gap", "w_f1"         # the figure's axes: the gap (x) and the score (y), registry names
N_BOOT, BOOT_SEED, LEVEL = 1000, 0, 0.95  # the bias lab's bootstrap (ermgap.bias_lab.table)
REFERENCE = "reference"                 # the family of reference runs
OUTPUT = "ermgap fronts"                # marks the files this module writes: --force replaces only those
MD_MARK = f"<!-- {OUTPUT} -->"
PARAM_TAG = "tags.ermgap.param."        # a trial's sampled settings, as the sweep tags its MLflow run


@dataclass
class Trial:
    """One finished run: its family (objective kind, or REFERENCE), a name, its searched settings and its test
    predictions (validated against `task`)."""

    family: str
    name: str
    run_id: str
    settings: dict[str, str]
    preds: pd.DataFrame = field(repr=False)
    task: Task = field(repr=False)
    source: str = ""  # the sweep directory it came from


def _finished_sweep(path: str | os.PathLike) -> tuple[dict, pd.DataFrame]:
    """A sweep directory's state, checked (`read_state`), and its MLflow child runs that ran to the end."""
    from ermgap.sweep.paths import read_state
    from ermgap.tracking import finished_child_runs

    state = read_state(path)
    return state, finished_child_runs(state["tracking_uri"], state["experiment"], state["parent_run_id"])


def _trials(path, runs: pd.DataFrame, state: dict, family_of) -> tuple[list[Trial], list[str]]:
    from ermgap.report import run_test_predictions
    from ermgap.sweep.leaderboard import run_params

    out, skipped = [], []
    if "tags.ermgap.trial_id" in runs:
        runs = runs.sort_values("tags.ermgap.trial_id", kind="stable")
    with tempfile.TemporaryDirectory(prefix="ermgap-fronts-") as tmp:
        for _, r in runs.iterrows():
            params = run_params(r)
            got = run_test_predictions(state["tracking_uri"], r["run_id"], params, tmp)
            name = str(r.get("tags.ermgap.trial_id") or r["run_id"])
            if got is None:
                skipped.append(f"{path}: {name} logged no test predictions")
                continue
            settings = {k.removeprefix(PARAM_TAG): str(v) for k, v in r.items()
                        if k.startswith(PARAM_TAG) and isinstance(v, str)}
            out.append(Trial(family_of(params, settings), name, r["run_id"], settings, got[0], got[1], str(path)))
    return out, skipped


def sweep_trials(path: str | os.PathLike) -> tuple[list[Trial], list[str]]:
    """(the finished trials of a sweep directory, each in the family of its `objective.kind`; the trials left out,
    in words). ConfigError if the directory is no sweep or none of its trials finished."""
    from ermgap.objectives import OBJECTIVES

    state, runs = _finished_sweep(path)
    if runs.empty:
        raise ConfigError(f"{path}: sweep {state.get('name', '?')} has no trial that ran to the end yet")

    def family(params: dict, _settings: dict) -> str:
        kind = params.get("objective.kind", "?")
        return OBJECTIVES[kind].label if kind in OBJECTIVES else kind

    return _trials(path, runs, state, family)


def reference_trial(text: str) -> Trial:
    """`DIR:VARIANT[@SEED]` → that variant's finished run in the sweep at DIR (its seed with @SEED; required when
    the variant ran with several), in the REFERENCE family, named `VARIANT seed SEED`."""
    where, sep, what = text.rpartition(":")
    variant, at, seed = what.partition("@")
    if not sep or not where or not variant or (at and not seed.isdigit()):
        raise ConfigError(f"--reference {text!r}: expected DIR:VARIANT or DIR:VARIANT@SEED, e.g. "
                          f"runs/sweeps/bias_lab_quick:positive.erm@42")
    state, runs = _finished_sweep(where)
    variants = runs.get(f"{PARAM_TAG}variant", pd.Series(dtype=str))
    seeds = runs.get("params.optim.seed", pd.Series(dtype=str))
    pick = runs[(variants == variant) & ((seeds == seed) if at else True)]
    if pick.empty:
        have = sorted({f"{v}@{s}" for v, s in zip(variants, seeds) if isinstance(v, str)})
        raise ConfigError(f"--reference {text!r}: no finished run of variant {variant!r}"
                          f"{f' with seed {seed}' if at else ''} in {where}; it has: {', '.join(have) or 'none'}")
    if len(pick) > 1:
        raise ConfigError(f"--reference {text!r}: {len(pick)} finished runs (seeds "
                          f"{', '.join(sorted(map(str, pick['params.optim.seed'])))}); name one with @SEED")
    got, skipped = _trials(where, pick, state, lambda _p, _s: REFERENCE)
    if not got:
        raise ConfigError(f"--reference {text!r}: {skipped[0]}")
    trial = got[0]
    trial.name = f"{variant} seed {pick['params.optim.seed'].iloc[0]}"
    return trial


# ----------------------------------------------------------------------------------------------- the numbers


def trial_point(preds: pd.DataFrame, task: Task, *, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                level: float = LEVEL) -> dict:
    """Test W-F1 and the worst-language gap of one run's predictions, with percentile bootstrap intervals.

    Returns w_f1, w_f1_lo, w_f1_hi, worst_lang_gap (+ _lo, _hi), worst_language, n (utterances); percent.
    """
    per = compute_metrics(preds, task)
    gap = METRICS[X]
    samples, present = bootstrap_samples(preds, n_boot=n_boot, seed=seed, task=task)
    names = [task.stratum_values[si] for si in present]
    gap_samples = np.array([gap.formula({s: {"avg_gap": samples["avg_gap"][b, si]} for s, si in zip(names, present)})
                            for b in range(n_boot)], dtype=float)
    out = {Y: per["overall"][Y], X: gap.formula(per[per_key(task)]), "worst_language": worst_language(preds, task),
           "n": per["overall"]["n"]}
    (out[f"{Y}_lo"], out[f"{Y}_hi"]), (out[f"{X}_lo"], out[f"{X}_hi"]) = (
        percentile_ci(samples[Y][:, -1], level), percentile_ci(gap_samples, level))
    return out


def _fronts(values: pd.DataFrame) -> list[bool]:
    """pareto_front on (Y, X) oriented by the registry's directions (pareto_front wants score ↑, gap ↓)."""
    sy, sx = (1.0 if direction(m) == "max" else -1.0 for m in (Y, X))
    return pareto_front([(sy * y, -sx * x) for y, x in zip(values[Y], values[X])])


COLUMNS = ["family", "trial", "settings", Y, f"{Y}_lo", f"{Y}_hi", X, f"{X}_lo", f"{X}_hi", "worst_language", "n",
           "front", "front_all", "run_id", "source"]


def fronts_table(trials: Sequence[Trial], references: Sequence[Trial] = (), *, n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED, level: float = LEVEL) -> pd.DataFrame:
    """One row per trial (families in order of appearance, then the references): COLUMNS. `front`: on its family's
    Pareto front; `front_all`: on the front of all families together (references: False for both).
    PredictionsError if two runs were tested on different utterances or tasks."""
    every = [*trials, *references]
    if not trials:
        raise PredictionsError("no finished trial to draw a front from")
    first = every[0]
    ids = set(first.preds["utt_id"])
    for t in every[1:]:
        if t.task != first.task or set(t.preds["utt_id"]) != ids:
            what = "task (labels, attribute or strata)" if t.task != first.task else \
                f"test utterances ({len(set(t.preds['utt_id']) ^ ids)} differ)"
            raise PredictionsError(f"{t.source} {t.name} was tested with another {what} than {first.source} "
                                   f"{first.name}: a front compares runs on one test split")
    rows = [{"family": t.family, "trial": t.name, "settings": settings_text(t.settings), "run_id": t.run_id,
             "source": t.source, **trial_point(t.preds, t.task, n_boot=n_boot, seed=seed, level=level)}
            for t in every]
    table = pd.DataFrame(rows)
    table["front"] = table["front_all"] = False
    ours = table["family"] != REFERENCE
    for _, part in table[ours].groupby("family", sort=False):
        table.loc[part.index, "front"] = _fronts(part)
    table.loc[ours, "front_all"] = _fronts(table[ours])
    return table[COLUMNS]


def settings_text(settings: Mapping[str, str]) -> str:
    """`objective.adversarial.strength=0.2288` → `strength 0.229`: each searched key's last part (sorted), 3 digits."""
    def short(v: str) -> str:
        try:
            return f"{float(v):.3g}"
        except ValueError:
            return v
    return " ".join(f"{k.rsplit('.', 1)[-1]} {short(v)}" for k, v in sorted(settings.items()) if k != "optim.seed")


# ----------------------------------------------------------------------------------------------- display


def _ci(r: pd.Series, m: str) -> str:
    if not math.isfinite(r[m]):
        return "–"
    return f"{r[m]:.1f} [{r[f'{m}_lo']:.1f}, {r[f'{m}_hi']:.1f}]"


def _cells(r: pd.Series) -> list[str]:
    return [r["family"], r["trial"], _ci(r, Y), _ci(r, X), r["worst_language"],
            "★" if r["front"] else ("" if r["family"] != REFERENCE else "ref")]


def _caption(table: pd.DataFrame) -> str:
    return (f"test split, n = {int(table['n'].iloc[0]):,} utterances; W-F1 and worst-language AVG gender gap (%)\n"
            f"with bootstrap 95 % intervals; ★ on its family's Pareto front")


def format_table(table: pd.DataFrame) -> str:
    """The table as plain text (≤ 100 columns), then each trial's searched settings."""
    head = ["family", "trial", "test W-F1 [95 % CI]", "worst-lang gap [95 % CI]", "lang", "front"]
    cells = [head] + [_cells(r) for _, r in table.iterrows()]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [_caption(table)]
    for i, c in enumerate(cells):
        lines.append("  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1]),
                                *(x.rjust(w) for x, w in zip(c[2:], widths[2:]))]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "settings:"] + [f"  {r['trial']}: {r['settings']}" for _, r in table.iterrows() if r["settings"]]
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame) -> str:
    head = ["family", "trial", "settings", "test W-F1 [95 % CI]", "worst-language gap [95 % CI]", "language",
            "front"]
    lines = [MD_MARK, "", _caption(table).replace("\n", " "), "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * 2 + ["---"] * 2) + "|"]
    for _, r in table.iterrows():
        c = _cells(r)
        lines.append("| " + " | ".join([c[0], c[1], r["settings"], *c[2:]]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figure + files

MARKERS = ["o", "s", "^", "D", "v", "P"]


def fronts_figure(table: pd.DataFrame):
    """Test worst-language gap (x) against test W-F1 (y), a colour per family, error bars on both axes (the
    percentile intervals, which for a gap need not contain the point), each family's front as a step line in its
    colour (filled markers: on it), references as black stars. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    from ermgap.metric_registry import label

    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    families = [f for f in dict.fromkeys(table["family"]) if f != REFERENCE]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, fam in enumerate([*families, REFERENCE]):
        part = table[table["family"] == fam]
        ref = fam == REFERENCE
        colour = "black" if ref else colours[i % len(colours)]
        for _, r in part.iterrows():
            x, y = r[X], r[Y]
            ax.errorbar(x, y, xerr=[[max(0.0, x - r[f"{X}_lo"])], [max(0.0, r[f"{X}_hi"] - x)]],
                        yerr=[[max(0.0, y - r[f"{Y}_lo"])], [max(0.0, r[f"{Y}_hi"] - y)]], fmt="none",
                        ecolor=colour, alpha=0.35, capsize=2, zorder=2)
            ax.scatter(x, y, marker="*" if ref else MARKERS[i % len(MARKERS)], s=140 if ref else 46, zorder=3,
                       color=colour if (ref or r["front"]) else "white", edgecolors=colour, linewidths=1.4)
            if ref:
                ax.annotate(r["trial"], (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
        on = part[part["front"]].sort_values(X)
        if len(on) >= 2:
            ax.step(on[X], on[Y], where="post", color=colour, alpha=0.7, zorder=1)
        ax.plot([], [], marker="*" if ref else MARKERS[i % len(MARKERS)], color=colour, linestyle="" if ref else "-",
                label="reference runs" if ref else f"{fam} ({len(part)} trials; filled: its front)")
    ax.set_xlabel(f"{label('test_' + X)} [{METRICS[X].unit}] {METRICS[X].arrow}")
    ax.set_ylabel(f"{label('test_' + Y)} [{METRICS[Y].unit}] {METRICS[Y].arrow}")
    ax.set_title(f"Trade-off per objective family: {_caption(table).split(';')[0]}\n"
                 "bootstrap 95 % intervals over test utterances (resampled within language)", fontsize=10)
    ax.set_xlim(left=0.0)  # a gap's natural origin: a 1-point difference is not drawn as a chasm
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _ours(path: Path) -> bool:
    """Whether an existing output file was written by this module (what --force may replace)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8")).get("output") == OUTPUT
        if path.suffix == ".md":
            return path.read_text(encoding="utf-8").startswith(MD_MARK)
        from PIL import Image

        with Image.open(path) as img:
            return getattr(img, "text", {}).get("Software") == OUTPUT
    except (OSError, ValueError, AttributeError):
        return False


def output_paths(stem: str | os.PathLike, *, force: bool) -> dict[str, Path]:
    """{json, markdown, figure} paths of an output stem, checked before any work: each absent, or (with `force`)
    written by `ermgap fronts`. OutputExistsError / ConfigError naming the path otherwise."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".md", ".png") else stem
    paths = {"json": Path(f"{stem}.json"), "markdown": Path(f"{stem}.md"), "figure": Path(f"{stem}.png")}
    for p in paths.values():
        if p.is_dir():
            raise ConfigError(f"{p} is a directory; --out takes a file stem (writes .json, .md and .png)")
        check_own_file(p, force, owner=OUTPUT, ours=_ours)
    return paths


def write_fronts(table: pd.DataFrame, stem: str | os.PathLike, *, meta: Mapping | None = None,
                 force: bool = False) -> dict[str, Path]:
    """The table as JSON (with `meta`: command, sweeps, bootstrap settings), Markdown and the figure, each written
    atomically; returns their paths."""
    import matplotlib.pyplot as plt

    from ermgap.formatting import json_safe
    from ermgap.io import atomic_path, atomic_write_text

    paths = output_paths(stem, force=force)
    doc = {"output": OUTPUT, "split": "test", "axes": {"x": X, "y": Y}, **dict(meta or {}),
           "trials": json.loads(table.to_json(orient="records"))}
    fig = fronts_figure(table)
    try:
        with atomic_path(paths["figure"], force=True) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": OUTPUT})
    finally:
        plt.close(fig)
    atomic_write_text(paths["json"], json.dumps(json_safe(doc), indent=1, ensure_ascii=False) + "\n", force=True)
    atomic_write_text(paths["markdown"], markdown_table(table), force=True)
    return paths


def build_fronts(sweeps: Sequence[str | os.PathLike], references: Sequence[str] = (), *,
                 out: str | os.PathLike = "bench/results/pareto_fronts", force: bool = False, n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED, level: float = LEVEL, command: str = "") -> tuple[pd.DataFrame, dict, list[str]]:
    """`ermgap fronts`: read the sweeps' finished trials and the reference runs, build the table, write it.
    Returns (table, {kind: path}, the trials left out in words). Every input and the outputs are checked before
    anything is computed or written."""
    from ermgap.sweep.paths import read_state

    output_paths(out, force=force)
    states = {str(p): read_state(p) for p in sweeps}
    trials, skipped = [], []
    for p in sweeps:
        got, left = sweep_trials(p)
        trials += got
        skipped += left
    refs = [reference_trial(r) for r in references]
    table = fronts_table(trials, refs, n_boot=n_boot, seed=seed, level=level)
    meta = {"command": command, "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level},
            "sweeps": [{"path": p, **{k: s.get(k) for k in ("name", "parent_run_id", "tracking_uri")}}
                       for p, s in states.items()],
            "references": list(references), "left_out": skipped}
    return table, write_fronts(table, out, meta=meta, force=force), skipped
