"""`run_lab`: the controlled corpora → the pretrained backbone → one sweep over corpus × row × seed → the table.

    result = run_lab(LabSettings(quick=True))     # what `ermgap bias-lab --quick` does
    print(result.text)

The rows (objectives, their settings, the training recipe) are the variants of one sweep spec
(`sweeps/bias_lab.yaml`); the corpora are `ermgap.bias_lab.corpora.CONTROLS`. The driver expands the spec into one
sweep whose variants are `<corpus>.<row>`: every row on every corpus, the `oracle` row on the corpus's oracle twin.
Then it reads each finished trial's test predictions from MLflow and builds the table (`ermgap.bias_lab.table`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from ermgap.bias_lab.corpora import CONTROLS, ORACLE_SUFFIX, Sizes, build_corpus, lab_corpora
from ermgap.bias_lab.table import REFERENCE, format_table, lab_table, markdown_table, verdicts
from ermgap.errors import ConfigError, TrainingError
from ermgap.io import atomic_write_text

ORACLE = "oracle"  # the spec's row trained on the corpus's oracle twin (minority share restored)
SEP = "."  # variant names of the expanded sweep: <corpus>.<row>
SEEDS, QUICK_SEEDS = (42, 43, 44), (42,)


@dataclass
class LabSettings:
    """Where the lab reads and writes, and what it runs (paths relative to the working directory)."""

    spec: str = "sweeps/bias_lab.yaml"
    data_root: str = "data/bias_lab"
    backbone: str = "models/tiny-pretrained"
    results: str = "bench/results/bias_lab.json"  # the full lab's; --quick writes beside its sweep instead
    figure: str = "bench/results/bias_lab.png"
    sizes: Sizes = field(default_factory=Sizes)
    quick: bool = False
    corpora: tuple[str, ...] | None = None  # all CONTROLS when None
    rows: tuple[str, ...] | None = None     # all the spec's variants when None
    overrides: list[str] = field(default_factory=list)  # spec overrides, as `ermgap sweep` takes them
    force: bool = False
    resume: bool = False  # continue an interrupted lab sweep (same settings)
    workers: int | None = None
    seed_list: tuple[int, ...] | None = None  # this sweep's seeds (default SEEDS, QUICK_SEEDS with quick)
    add_sweeps: tuple[str, ...] = ()  # lab sweeps (directories) whose finished trials join the table
    table_only: bool = False  # run nothing: the table of add_sweeps' finished trials

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.seed_list or (QUICK_SEEDS if self.quick else SEEDS)

    @property
    def name(self) -> str:
        if self.seed_list:  # a share of the seeds: its own sweep, so it never replaces the default one
            return f"bias_lab{'_quick' if self.quick else ''}_seeds_{'_'.join(map(str, self.seeds))}"
        return "bias_lab_quick" if self.quick else "bias_lab"


@dataclass
class LabResult:
    table: pd.DataFrame
    text: str
    verdicts: dict
    timing: dict[str, float]
    files: dict[str, str]
    failed: str | None = None


def lab_spec(settings: LabSettings, manifests: dict[str, tuple[Path, Path]]):
    """The expanded SweepSpec: the spec file (with `settings.overrides`) with a `<corpus>.<row>` variant for every
    corpus and row. manifests: {corpus: (manifest, oracle twin's manifest)}."""
    from ermgap.sweep.spec import load_sweep_spec

    overrides = [f"base.model.name_or_path={settings.backbone}", *settings.overrides]
    spec = load_sweep_spec(settings.spec, overrides)
    tree = spec.raw  # the spec with its own edits applied; the base.* edits are re-applied below
    rows = tree.get("variants") or {}
    chosen = settings.rows or tuple(rows)
    unknown = [r for r in chosen if r not in rows]
    if unknown or (REFERENCE not in chosen and not settings.add_sweeps):
        raise ConfigError(f"{settings.spec}: rows {', '.join(map(repr, unknown or chosen))}: the lab needs an 'erm' row "
                          f"(the reference; or --add-sweep sweeps that hold its trials) and knows {', '.join(rows)}")
    tree["variants"] = {f"{c}{SEP}{r}": {**rows[r], "data.manifest": str(m[1] if r == ORACLE else m[0])}
                        for c, m in manifests.items() for r in chosen}
    tree["seeds"] = list(settings.seeds)
    tree["name"] = settings.name
    # The base corpus is the first one's (the sweep's parent run logs it as its dataset; every variant sets its own).
    first = str(next(iter(manifests.values()))[0])
    return load_sweep_spec(tree, [o for o in overrides if o.startswith("base.")] + [f"base.data.manifest={first}"],
                           base_dir=Path(settings.spec).parent)


def collect_predictions(outcome) -> dict[str, dict[str, dict[int, pd.DataFrame]]]:
    """{corpus: {row: {seed: test predictions}}} of the sweep's trials that ran to the end."""
    return _predictions(outcome.leaderboard, outcome.tracking_uri, outcome.experiment, outcome.parent_run_id)


def finished_sweep(path: str | os.PathLike) -> dict:
    """A lab sweep's state (parent run, tracking URI, experiment), checked before any work. The sweep may have
    been interrupted: its trials that ran to the end are in MLflow (`sweep_trials`)."""
    from ermgap.sweep.paths import read_state

    try:
        return read_state(path)
    except ConfigError as err:
        raise ConfigError(f"--add-sweep {path}: not a lab sweep ({err})") from None


def sweep_trials(state: dict) -> pd.DataFrame:
    """The sweep's trials that ran to the end (MLflow child runs FINISHED with test metrics), as leaderboard
    rows: variant, optim.seed, mlflow_run_id, test_w_f1, digest (of the data it trained on)."""
    from ermgap.tracking import client, finished_child_runs

    done = finished_child_runs(state["tracking_uri"], state["experiment"], state["parent_run_id"])
    cols = ["variant", "optim.seed", "mlflow_run_id", "test_w_f1", "digest"]
    if done.empty:
        return pd.DataFrame(columns=cols)
    bad = [v for v in done["tags.ermgap.param.variant"].astype(str) if SEP not in v]
    if bad:
        raise ConfigError(f"sweep {state.get('name')}: variant {bad[0]!r} is not a lab trial (<corpus>{SEP}<row>)")
    mlflow = client(state["tracking_uri"])
    digests = []
    for run_id in done["run_id"]:  # the digest of the data each trial trained on (log_manifest_input)
        inputs = mlflow.get_run(run_id).inputs.dataset_inputs
        digests.append(next((d.dataset.digest for d in inputs if any(t.value == "training" for t in d.tags)), None))
    return pd.DataFrame({"variant": done["tags.ermgap.param.variant"], "optim.seed": done["params.optim.seed"],
                         "mlflow_run_id": done["run_id"], "test_w_f1": done["metrics.best/test_w_f1"],
                         "digest": digests})[cols]


def corpus_digests(settings: LabSettings) -> dict[str, str]:
    """{corpus directory (a control or its oracle twin): the digest MLflow records for its manifest as a trial
    reads it}, for the lab's corpora on disk under `settings.data_root`."""
    from mlflow.data.digest_utils import compute_pandas_digest  # what a trial's dataset input records

    from ermgap.config import set_dotted, validate_tree
    from ermgap.preflight import run_manifest

    manifests = _manifests(settings.data_root, lab_corpora())
    spec = lab_spec(replace(settings, corpora=None, rows=("erm",)), manifests)
    out = {}
    for corpus, paths in manifests.items():
        tree = spec.trial_tree({"variant": f"{corpus}{SEP}erm"})
        for manifest in paths:  # the corpus and its oracle twin
            if manifest.is_file():
                set_dotted(tree, "data.manifest", str(manifest))
                out[manifest.parent.name] = compute_pandas_digest(run_manifest(validate_tree(tree, str(manifest))))
    return out


def _manifests(data_root: str | os.PathLike, controls) -> dict[str, tuple[Path, Path]]:
    """{corpus: (its manifest, its oracle twin's)} under data_root."""
    root = Path(data_root)
    return {c.name: (root / c.name / "manifest.csv", root / c.oracle().name / "manifest.csv") for c in controls}


def current_trials(trials: pd.DataFrame, digests: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """(the trials that trained on the corpus the lab builds now, the variants of the others): a sweep run before a
    corpus's definition changed must not join its table. A corpus not on disk, or a trial that logged no dataset,
    cannot be checked and is kept."""
    def corpus_dir(variant: str) -> str:
        corpus, row = variant.split(SEP, 1)
        return corpus + ORACLE_SUFFIX if row == ORACLE else corpus

    stale = pd.Series([isinstance(d, str) and digests.get(corpus_dir(v), d) != d
                       for v, d in zip(trials["variant"], trials["digest"])], index=trials.index, dtype=bool)
    gone = trials[stale]
    return trials[~stale], [f"{v} seed {s}" for v, s in zip(gone["variant"], gone["optim.seed"])]


def merge_predictions(into: dict, more: dict, source: str) -> dict:
    """Add another sweep's {corpus: {row: {seed: frame}}}; a (corpus, row, seed) in both is refused (which to
    keep would be a guess)."""
    for corpus, rows in more.items():
        for row, seeds in rows.items():
            have = into.setdefault(corpus, {}).setdefault(row, {})
            twice = sorted(set(have) & set(seeds))
            if twice:
                raise ConfigError(f"{source}: {corpus}{SEP}{row} seed {twice[0]} is already in the lab's table (each "
                                  "corpus, row and seed comes from one sweep; if one of them trained on a corpus "
                                  "rebuilt since, pass --data-root so the lab can see the corpus it builds now and "
                                  "leave that sweep's trials out)")
            have.update(seeds)
    return into


def _predictions(board: pd.DataFrame, tracking_uri: str, experiment: str, parent_run_id: str):
    from ermgap.report import run_test_predictions
    from ermgap.sweep.leaderboard import run_params
    from ermgap.tracking import child_runs

    done = board[board["test_w_f1"].notna() & board["mlflow_run_id"].notna()] if len(board) else board
    runs = child_runs(tracking_uri, experiment, parent_run_id)
    params = {r["run_id"]: run_params(r) for _, r in runs.iterrows()}
    out: dict[str, dict[str, dict[int, pd.DataFrame]]] = {}
    with tempfile.TemporaryDirectory(prefix="ermgap-lab-") as tmp:
        for _, r in done.iterrows():
            got = run_test_predictions(tracking_uri, r["mlflow_run_id"], params.get(r["mlflow_run_id"], {}), tmp)
            if got is not None:
                corpus, row = r["variant"].split(SEP, 1)
                out.setdefault(corpus, {}).setdefault(row, {})[int(r["optim.seed"])] = got[0]
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def prepare(settings: LabSettings, *, console=None, progress=None):
    """Validate the spec (every trial config, before any work), then build or reuse the corpora and the backbone.
    Returns (the expanded SweepSpec, {"corpora_s", "backbone_s"})."""
    from rich.console import Console

    console = console or Console()
    controls = lab_corpora(settings.corpora)
    spec = lab_spec(settings, _manifests(settings.data_root, controls))
    for path in settings.add_sweeps:
        finished_sweep(path)
    corpora_s = _build_corpora(settings, controls, console, progress)
    if REFERENCE not in (settings.rows or (REFERENCE,)):
        _check_added_reference(settings, [c.name for c in controls])
    backbone_s = _ensure_backbone(settings, console)
    return spec, {"corpora_s": round(corpora_s, 1), "backbone_s": round(backbone_s, 1)}


def _check_added_reference(settings: LabSettings, corpora: list[str]) -> None:
    """Rows run without 'erm' are compared with the added sweeps' ERM trials: every corpus and seed of this run
    must have one there (trained on the corpus now on disk), or the table could not pair them. Checked before the
    sweep starts."""
    digests = corpus_digests(settings)
    have = set()
    for path in settings.add_sweeps:
        trials, _ = current_trials(sweep_trials(finished_sweep(path)), digests)
        have |= {(v.split(SEP, 1)[0], int(s)) for v, s in zip(trials["variant"], trials["optim.seed"])
                 if v.split(SEP, 1)[1] == REFERENCE}
    missing = [f"{c}{SEP}{REFERENCE} seed {s}" for c in corpora for s in settings.seeds if (c, s) not in have]
    if missing:
        raise ConfigError(f"no --row {REFERENCE}: the added sweeps must hold the reference's finished trials on the "
                          f"corpora under {settings.data_root}; missing {', '.join(missing)}")


def run_lab(settings: LabSettings, *, console=None, progress=None) -> LabResult:
    """Build (or reuse) the corpora and the backbone, run the sweep, write the table. Returns the result; a sweep
    whose trials partly failed still gives the table of the rest, with `failed` saying which."""
    from rich.console import Console

    console = console or Console()
    t0 = time.perf_counter()
    load_start = machine()["load_avg"]
    failed, spec, outcome, preds, timing = None, None, None, {}, {}
    if settings.table_only:
        if not settings.add_sweeps:
            raise ConfigError("--table-only builds the table of --add-sweep's sweeps: name at least one")
        for path in settings.add_sweeps:
            finished_sweep(path)
    else:
        spec, timing = prepare(settings, console=console, progress=progress)
        # Ray Tune and the training stack (seconds of imports) once the lab's arguments have passed their checks.
        from ermgap.sweep.run import SweepInterrupted, TrialsFailed, run_sweep

        t1 = time.perf_counter()
        try:
            outcome = run_sweep(spec, force=settings.force and not settings.resume, resume=settings.resume,
                                console=console)
        except TrialsFailed as err:
            outcome, failed = err.outcome, str(err)
        except SweepInterrupted as err:
            raise SweepInterrupted(f"bias lab interrupted ({err}); continue it with the same command and "
                                   f"--resume, or build the table of its finished trials with --table-only "
                                   f"--add-sweep") from None
        timing["sweep_s"] = round(time.perf_counter() - t1, 1)
        preds = collect_predictions(outcome)
    digests = corpus_digests(settings) if settings.add_sweeps else {}
    left_out: list[str] = []
    for path in settings.add_sweeps:
        state = finished_sweep(path)
        trials, stale = current_trials(sweep_trials(state), digests)
        if stale:
            console.print(f"--add-sweep {path}: left out {len(stale)} trial(s) that trained on another version of "
                          f"their corpus than {settings.data_root} holds now: {', '.join(stale)}")
            left_out += [f"{path}: {v}" for v in stale]
        merge_predictions(preds, _predictions(trials, state["tracking_uri"], state["experiment"],
                                              state["parent_run_id"]), f"--add-sweep {path}")
    if not preds:
        raise TrainingError(f"bias lab: no trial finished{f': {failed}' if failed else ''}")
    table = lab_table(_in_lab_order(preds, settings))
    titles = {c.name: c.title for c in CONTROLS}
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    checks = verdicts(table)
    seeds = sorted({s for rows in preds.values() for runs in rows.values() for s in runs})
    text = _report(table, titles, checks, timing, settings, load_start, seeds)
    files = _write(settings, table, titles, checks, timing, spec, outcome, load_start, seeds, left_out)
    return LabResult(table=table, text=text, verdicts=checks, timing=timing, files=files, failed=failed)


def _in_lab_order(preds: dict, settings: LabSettings) -> dict:
    """Corpora in CONTROLS' order, rows in the spec's, seeds ascending (pooled sweeps arrive in MLflow's order)."""
    from ermgap.sweep.spec import load_sweep_spec

    rows = list(load_sweep_spec(settings.spec).raw.get("variants") or {})
    rank = {r: i for i, r in enumerate(rows)}
    corpora = [c.name for c in CONTROLS if c.name in preds] + sorted(set(preds) - {c.name for c in CONTROLS})
    return {c: {r: dict(sorted(preds[c][r].items())) for r in sorted(preds[c], key=lambda r: (rank.get(r, len(rank)), r))}
            for c in corpora}


def _build_corpora(settings: LabSettings, controls, console, progress) -> float:
    t = time.perf_counter()
    cache = Path(settings.data_root) / ".renders"  # the corpora share most utterances: each is rendered once
    for corpus in [x for c in controls for x in (c, c.oracle())]:
        t1 = time.perf_counter()
        manifest, built = build_corpus(settings.data_root, corpus, settings.sizes, force=settings.force,
                                       workers=settings.workers, progress=progress, render_cache=cache)
        n = json.loads((manifest.parent / "corpus.json").read_text(encoding="utf-8"))["num_utterances"]
        what = f"synthesised in {time.perf_counter() - t1:.0f} s" if built else "reused"
        console.print(f"corpus {corpus.name}: {n:,} utterances, {what} ({manifest.parent})")
    return time.perf_counter() - t


def _ensure_backbone(settings: LabSettings, console) -> float:
    """The backbone directory; when missing, the pretrained tiny one (`ermgap model tiny --pretrain`, default
    settings) is built there."""
    t = time.perf_counter()
    path = Path(settings.backbone)
    if (path / "config.json").is_file():
        console.print(f"backbone: reused {path}")
        return 0.0
    from ermgap.pretrain import pretrain_tiny

    console.print(f"backbone: pretraining {path} (ermgap model tiny --pretrain)")
    pretrain_tiny(path, force=settings.force)
    return time.perf_counter() - t


def _report(table, titles, checks, timing, settings, load_start, seeds) -> str:
    lines = [format_table(table, titles), ""]
    for name, v in checks.items():
        lines.append(f"target, {name} control: {'MET' if v['met'] else 'NOT met'} — {v['why']}")
    ran = (f"wall time {timing['total_s'] / 60:.1f} min (corpora {timing['corpora_s']:.0f} s, backbone "
           f"{timing['backbone_s']:.0f} s, sweep {timing['sweep_s'] / 60:.1f} min, seeds "
           f"{', '.join(map(str, settings.seeds))}); " if "sweep_s" in timing else "no sweep run; ")
    lines.append(f"{ran}table's seeds {', '.join(map(str, seeds))}; load average at start {load_start[0]:.1f}, at end "
                 f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return "\n".join(lines)


def _write(settings, table, titles, checks, timing, spec, outcome, load_start, seeds, left_out) -> dict[str, str]:
    """bench/results/bias_lab.json (+ .md and the figure) for the full lab; the quick lab's beside its sweep."""
    from ermgap.bias_lab.figure import plot_lab

    beside = settings.quick and outcome is not None  # a quick lab's table goes beside its sweep
    root = Path(str(outcome.root)) / "lab" if beside else Path(settings.results).parent
    stem = "bias_lab_quick" if beside else Path(settings.results).stem
    result = {
        "machine": {**machine(), "load_avg_at_start": load_start},
        "command": " ".join(["ermgap bias-lab", *(["--quick"] if settings.quick else []),
                             *(f"--seed {s}" for s in settings.seed_list or ()),
                             *(["--table-only"] if settings.table_only else []),
                             *(f"--add-sweep {p}" for p in settings.add_sweeps)]),
        "seeds": seeds, "sweep_seeds": list(settings.seeds), "sizes": asdict(settings.sizes), "timing": timing,
        "corpora": {c.name: {"title": c.title, "cue_shift": _groups(c.cue_shift), "bias": _groups(c.bias),
                             "train_share": _groups(c.train_share)} for c in lab_corpora(settings.corpora)},
        "rows": {k: v for k, v in (spec.raw.get("variants") or {}).items()} if spec else None,
        "sweep": {"name": spec.name, "parent_run_id": outcome.parent_run_id, "tracking_uri": outcome.tracking_uri}
        if spec else None,
        "added_sweeps": [{"path": str(Path(p).resolve()), **{k: finished_sweep(p)[k] for k in
                                                              ("name", "parent_run_id", "tracking_uri")}}
                         for p in settings.add_sweeps],
        "left_out": left_out,  # added sweeps' trials of a corpus since redefined (current_trials)
        "verdicts": checks, "table": json.loads(table.to_json(orient="records")),
    }
    files = {"json": str(atomic_write_text(root / f"{stem}.json", json.dumps(result, indent=1, ensure_ascii=False)
                                           + "\n", force=True)),
             "markdown": str(atomic_write_text(root / f"{stem}.md", markdown_table(table, titles) + "\n", force=True))}
    files["figure"] = str(plot_lab(table, root / f"{stem}.png", titles=titles))
    return files


def _groups(groups: dict) -> list[dict]:
    return [{"language": k[0], "gender": k[1], "value": v} for k, v in sorted(groups.items())]
