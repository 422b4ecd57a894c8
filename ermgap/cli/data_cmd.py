"""`ermgap data validate|stats|synth|import-meld-st`: prepare and inspect manifests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ermgap.errors import ManifestError

app = typer.Typer(help="Prepare and inspect datasets (canonical manifests).", no_args_is_help=True)


def _task_spec(config: Path | None, overrides: list[str] | None):
    """The task a run config (and key=value overrides) declares; the paper's when neither is given."""
    from ermgap.config import load_config
    from ermgap.task import TaskSpec

    if config is None and not overrides:
        return TaskSpec(), None
    cfg = load_config(config, overrides or [])
    return TaskSpec.from_config(cfg), cfg


@app.command("validate")
def validate(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    overrides: list[str] = typer.Argument(None, help="key=value config overrides, e.g. data.labels=infer "
                                          "data.attribute=age_group."),
    config: Path = typer.Option(None, "--config", help="Run config YAML declaring the task (data.labels, "
                                "data.attribute, data.attribute_values, objective.stratum); default: the paper's."),
    modality: str = typer.Option(None, "--modality", help="uni | multi (multi also requires transcripts)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="Skip opening the audio files."),
    sample_rate: int = typer.Option(16000, "--sample-rate", help="Expected sample rate (Hz); 0 accepts any."),
    max_problems: int = typer.Option(200, "--max-problems", help="Print at most this many problems (0: all)."),
) -> None:
    """Check columns, values (labels, attribute values and strata of the task), unique ids, splits, every
    attribute value per (split, stratum) and every audio file.

    Lists all problems (errors and warnings) with row and column; exits 2 when there is any. A speaker
    in train and in dev/test is a notice: printed as a warning, never a failure."""
    from ermgap.data.manifest import format_problems, validate_manifest, warn_problems

    spec, cfg = _task_spec(config, overrides)
    rates: Counter = Counter()
    problems = warn_problems(validate_manifest(manifest, modality=modality or (cfg.data.modality if cfg else None),
                                 check_audio=not no_audio, expected_sample_rate=sample_rate or None,
                                 sample_rates=rates, task=spec,
                                               include_notices=True))
    if rates:
        typer.echo("sample rates: " + ", ".join(f"{r} Hz × {n}" for r, n in sorted(rates.items())))
    if problems:
        raise ManifestError(f"{manifest}: {len(problems)} problem(s):\n"
                            f"{format_problems(problems, max_problems or None)}")
    import pandas as pd

    n = len(pd.read_csv(manifest, dtype=str, keep_default_na=False))
    typer.echo(f"{manifest}: OK ({n} utterances" + ("" if no_audio else ", audio checked") + ")")


@app.command("stats")
def stats(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    overrides: list[str] = typer.Argument(None, help="key=value config overrides (as for validate)."),
    config: Path = typer.Option(None, "--config", help="Run config YAML declaring the task; default: the paper's."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Print the paper's Table 1 (stratum × attribute × split: language × gender for the paper) and the label
    distribution."""
    from ermgap.data.manifest import read_manifest
    from ermgap.data.stats import OVERALL, TOTAL, corpus_stats, emotion_distribution, language_label, table1

    spec, cfg = _task_spec(config, overrides)
    modality = cfg.data.modality if cfg else None
    df = read_manifest(manifest, require_splits=(), task=spec, modality=modality, allow_warnings=True)
    task = spec.resolve(df, file=str(manifest), modality=modality)
    if as_json:
        typer.echo(json.dumps(corpus_stats(df, task), indent=2))
        return
    console = Console()
    t1 = table1(df, task)
    paper = task.stratum == ("language",) and task.attribute == "gender"
    heads = ("Language", "Gender") if paper else (task.stratum_name, task.attribute)
    table = Table(title=f"Table 1 layout: {manifest}")
    for col in (*heads, "Train", "Dev", "Test", "Total"):
        table.add_column(col, justify="left" if col in heads else "right")
    prev = None
    for (lang, gender), row in t1.iterrows():
        name = lang if lang == OVERALL or not paper else language_label(lang)
        shown = {"F": "Female", "M": "Male"}.get(gender, gender) if paper else gender
        table.add_row(name if lang != prev else "", shown,
                      *(str(row[c]) for c in ("train", "dev", "test", "total")),
                      end_section=gender == TOTAL)
        prev = lang
    console.print(table)
    em = emotion_distribution(df, task=task)
    short = [lab[:3] if len({x[:3] for x in task.labels}) == task.num_labels else lab for lab in task.labels]
    table = Table(title=f"Labels per {heads[0].lower()} and {heads[1].lower()} (all splits)",
                  caption=", ".join(f"{s} = {lab}" for s, lab in zip(short, task.labels) if s != lab))
    for col in (heads[0][:4], heads[1], *short, "Total"):
        table.add_column(col, justify="left" if col in (heads[0][:4], heads[1]) else "right", no_wrap=True)
    for (lang, gender), row in em.iterrows():
        table.add_row(lang, gender, *(str(row[lab]) for lab in task.labels), str(row["total"]))
    console.print(table)


def _group_values(specs: list[str] | None, default: dict, parse) -> dict:
    """Repeated LANG:GENDER:VALUE options → {(lang, gender): value}; absent → the default, 'none' → {}."""
    if not specs:
        return dict(default)
    if [x.strip().lower() for x in specs] == ["none"]:
        return {}
    return dict(parse(x) for x in specs)


@app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Output folder (manifest.csv, wavs/, corpus.json)."),
    per_cell: int = typer.Option(24, "--per-cell", help="Train utterances per (language, gender, emotion)."),
    eval_per_cell: int = typer.Option(None, "--eval-per-cell",
                                      help="Dev and test utterances per cell (default: 2 * per-cell // 3)."),
    bias: list[str] = typer.Option(None, "--bias", help="LANG:GENDER:STRENGTH, repeatable: neutralise that share "
                                   "of the group's emotional prosody in every split (irreducible; default none)."),
    train_share: list[str] = typer.Option(None, "--train-share", help="LANG:GENDER:SHARE, repeatable: keep only "
                                          "SHARE of that group's train utterances, dev/test untouched "
                                          "(default: M at 0.1 in every language; 'none' for balanced)."),
    cue_shift: list[str] = typer.Option(None, "--cue-shift", help="LANG:GENDER[:STRENGTH], repeatable: that group "
                                        "expresses the emotions through its own prosodic mapping (emotion e with "
                                        "the pitch/range/rate/word-gap/amplitude centre the others use for the next "
                                        "emotion in the label order), in every split; STRENGTH 0..1 (default 1) "
                                        "interpolates from the shared mapping. Learnable (gender is audible from "
                                        "pitch) but not transferable from the other gender: combined with "
                                        "--train-share it makes a minority that needs examples of its own "
                                        "(default none; 'none' for none)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed: byte-identical corpus)."),
    lexical_cue_rate: float = typer.Option(0.0, "--lexical-cue-rate",
                                           help="Fraction of sentences that state the emotion (0..1)."),
    workers: int = typer.Option(None, "--workers", help="Processes (default: CPU count)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Generate the synthetic multilingual emotional speech corpus with espeak-ng.

    Controlled gender biases, each per (language, gender) and combinable:

    --cue-shift: a group-specific prosodic mapping (learnable, not transferable from the other gender).

    --train-share: under-representation in train (learnable).

    --bias: neutralised prosody (irreducible: the label is not in the audio).

    corpus.json records every setting."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ermgap.data.synth import (
        DEMO_BIAS,
        DEMO_CUE_SHIFT,
        DEMO_TRAIN_SHARE,
        parse_bias,
        parse_cue_shift,
        parse_train_share,
        synthesize,
    )

    biases = _group_values(bias, DEMO_BIAS, parse_bias)
    shares = _group_values(train_share, DEMO_TRAIN_SHARE, parse_train_share)
    shifts = _group_values(cue_shift, DEMO_CUE_SHIFT, parse_cue_shift)
    start = time.perf_counter()
    with Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("synth", total=None)
        manifest = synthesize(out, per_cell=per_cell, eval_per_cell=eval_per_cell, bias=biases, train_share=shares,
                              cue_shift=shifts, seed=seed, lexical_cue_rate=lexical_cue_rate, workers=workers, force=force,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    meta = json.loads((Path(out) / "corpus.json").read_text(encoding="utf-8"))
    shown = ", ".join(f"{k[0]}:{k[1]}:{v}" for k, v in biases.items()) or "none"
    shown_share = ", ".join(f"{k[0]}:{k[1]}:{v}" for k, v in shares.items()) or "none"
    shown_shift = ", ".join(f"{k[0]}:{k[1]}:{v}" for k, v in shifts.items()) or "none"
    typer.echo(f"wrote {manifest} ({meta['num_utterances']} utterances, {meta['total_duration_s'] / 60:.1f} min "
               f"of audio, bias {shown}, train share {shown_share}, cue shift {shown_shift}) in "
               f"{time.perf_counter() - start:.1f} s")


@app.command("import-meld-st")
def import_meld_st_cmd(
    root: Path = typer.Argument(..., help="MELD-ST release folder (holds ENG_JPN/ and ENG_DEU/)."),
    out: Path = typer.Option(..., "--out", help="Output folder (manifest.csv, import_summary.json)."),
    genders: Path = typer.Option(None, "--genders", help="speaker,gender CSV (default: the shipped table)."),
    audio_pattern: str = typer.Option("{pair}/{split}/{lang_name}/{id}.wav", "--audio-pattern",
                                      help="Audio path under ROOT; placeholders {pair} {split} {lang} "
                                           "{lang_name} {id} {dia_id} {utt_id} {season} {episode}."),
    require_audio: bool = typer.Option(True, "--require-audio/--no-require-audio",
                                       help="Exclude rows whose audio file is missing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Convert the MELD-ST release to a canonical manifest (valid → dev), excluding unattributable rows."""
    from ermgap.data.meld_st import DEFAULT_SPEAKERS, import_meld_st

    manifest, summary = import_meld_st(root, out, genders=genders or DEFAULT_SPEAKERS, audio_pattern=audio_pattern,
                                       require_audio=require_audio, force=force)
    typer.echo(summary.format())
    typer.echo(f"wrote {manifest}")
