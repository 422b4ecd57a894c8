"""`ermgap bias-lab`: the command end to end on a miniature lab (exit code, printed table, written files), a
share of the seeds run apart and pooled (--seed, --add-sweep), and its refusals before any work.

The end-to-end cases run the shipped spec's ERM and oracle rows on the positive control (4 train before the
minority's share, 1 dev, 2 test utterances per cell, one epoch) with the session's tiny model as the backbone, on
a real local Ray cluster with MLflow (sqlite). Oracles: the corpora's own manifests (which corpus each trial
trained on, that the oracle twin holds more minority train rows and the same test utterances), the sweep's
leaderboard and the table's own interval bounds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


def _args(tmp_path, tiny_model) -> list[str]:
    """`ermgap bias-lab` on a miniature lab: the shipped spec's ERM and oracle rows on the positive control, 4 train
    / 1 dev / 2 test utterances per cell, one epoch, the session's tiny model as the backbone."""
    return ["bias-lab", "--quick", "--spec", str(REPO / "sweeps" / "bias_lab.yaml"), "--data-root", str(tmp_path / "data"),
            "--backbone", str(tiny_model), "--train-per-cell", "4", "--dev-per-cell", "1", "--test-per-cell", "2",
            "--corpus", "positive", "--row", "erm", "--row", "oracle",
            f"storage_path={tmp_path / 'sweeps'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"base.data.feature_cache={tmp_path / 'features'}", "base.optim.epochs=1",
            "base.optim.effective_batch_size=12", "base.optim.micro_batch_size=4", "base.eval.batch_size=16"]


def _lab(cwd: Path, *args) -> SimpleNamespace:
    """`ermgap <args>` in this process (typer's runner: the command's own exit code and printed output; a new
    interpreter per call would add its start to a test already near its time budget)."""
    from typer.testing import CliRunner

    from ermgap.cli.main import app

    here = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.output, stderr=repr(r.exception))


@pytest.fixture(scope="module")
def first_lab(tmp_path_factory, tiny_model):
    """The miniature lab run once (seed 42); the module's two end-to-end tests read it."""
    tmp_path = tmp_path_factory.mktemp("lab")
    return tmp_path, _lab(tmp_path, *_args(tmp_path, tiny_model))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_the_lab_command_end_to_end(first_lab):
    from ermgap.bias_lab.corpora import MINORITY_SHARE

    tmp_path, r = first_lab
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # the printed table: the corpus's block, its two rows, the oracle's interval against ERM; then the files
    assert "positive control" in out and "mean ± sd over 1 seed(s)" in out, out
    erm_line = next(ln for ln in out.splitlines() if ln.startswith("ERM "))
    oracle_line = next(ln for ln in out.splitlines() if ln.startswith("Oracle "))
    assert "reference" in erm_line and re.search(r"\[[+-]?\d+\.\d, [+-]?\d+\.\d\]", oracle_line), out
    assert max(len(ln) for ln in out.splitlines() if ln.startswith(("ERM ", "Oracle ", "objective"))) <= 100
    assert "table's seeds 42" in " ".join(out.split()), out
    written = json.loads((tmp_path / "sweeps" / "bias_lab_quick" / "lab" / "bias_lab_quick.json").read_text())
    assert str(tmp_path / "sweeps" / "bias_lab_quick" / "lab" / "bias_lab_quick.json") in out.replace("\n", "")
    assert [row["objective"] for row in written["table"]] == ["erm", "oracle"] and written["seeds"] == [42]
    oracle = written["table"][1]
    assert oracle["d_gap_lo"] <= oracle["d_gap"] <= oracle["d_gap_hi"]
    assert (tmp_path / "sweeps" / "bias_lab_quick" / "lab" / "bias_lab_quick.png").stat().st_size > 10_000
    # the oracle trained on the twin: more male train rows, the same test utterances
    data = tmp_path / "data"
    base, twin = (pd.read_csv(data / n / "manifest.csv") for n in ("positive", "positive_oracle"))
    male_train = lambda df: int(((df["split"] == "train") & (df["gender"] == "M")).sum())  # noqa: E731
    kept = max(1, int(MINORITY_SHARE * 4 + 0.5))  # per cell, rounded half up
    assert (male_train(twin), male_train(base)) == (4 * 7 * 3, kept * 7 * 3)
    assert set(base.loc[base["split"] == "test", "utt_id"]) == set(twin.loc[twin["split"] == "test", "utt_id"])
    board = pd.read_csv(tmp_path / "sweeps" / "bias_lab_quick" / "artifacts" / "leaderboard.csv")
    assert sorted(board["variant"]) == ["positive.erm", "positive.oracle"] and (board["status"] == "done").all()
    assert written["rows"]["positive.oracle"]["data.manifest"] == str(data / "positive_oracle" / "manifest.csv")
    assert written["rows"]["positive.erm"]["data.manifest"] == str(data / "positive" / "manifest.csv")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_another_seed_runs_apart_and_joins_the_table(first_lab, tiny_model):
    """Seed 43 of ERM as its own sweep, pooled with the first lab's: ERM's row has two seeds, the oracle's one;
    the corpora are reused (nothing synthesised); the first sweep's table is left as it was."""
    tmp_path, r = first_lab
    assert r.returncode == 0
    first = tmp_path / "sweeps" / "bias_lab_quick"
    written = json.loads((first / "lab" / "bias_lab_quick.json").read_text())
    args = _args(tmp_path, tiny_model)
    args[args.index("oracle") - 1: args.index("oracle") + 1] = []
    r2 = _lab(tmp_path, *args, "--seed", "43", "--add-sweep", str(first))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "synthesised" not in r2.stdout and "table's seeds 42, 43" in " ".join(r2.stdout.split()), r2.stdout
    pooled = json.loads((tmp_path / "sweeps" / "bias_lab_quick_seeds_43" / "lab" / "bias_lab_quick.json").read_text())
    assert {row["objective"]: row["seeds"] for row in pooled["table"]} == {"erm": 2, "oracle": 1}
    assert pooled["seeds"] == [42, 43] and pooled["sweep_seeds"] == [43]
    assert pooled["added_sweeps"][0]["parent_run_id"] == written["sweep"]["parent_run_id"]
    assert pooled["left_out"] == []  # the first sweep's corpora are the ones on disk (same MLflow dataset digests)
    assert json.loads((first / "lab" / "bias_lab_quick.json").read_text()) == written
    # The same table from the two sweeps' MLflow runs alone, running nothing (bench/results under the cwd).
    second = tmp_path / "sweeps" / "bias_lab_quick_seeds_43"
    r3 = _lab(tmp_path, "bias-lab", "--table-only", "--spec", str(REPO / "sweeps" / "bias_lab.yaml"),
              "--add-sweep", str(second), "--add-sweep", str(first))
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    again = json.loads((tmp_path / "bench" / "results" / "bias_lab.json").read_text())
    assert again["table"] == pooled["table"] and again["seeds"] == [42, 43] and again["sweep"] is None


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_rows_without_erm_take_the_reference_from_added_sweeps(first_lab, tiny_model):
    """Rows run without `erm` are paired with an added sweep's ERM trials: accepted when the added sweep holds ERM
    on this run's corpus and seed (checked on MLflow, nothing run here), refused before any sweep starts when it
    does not, naming what is missing."""
    from ermgap.bias_lab.run import LabSettings, _check_added_reference

    tmp_path, r = first_lab
    assert r.returncode == 0
    first = tmp_path / "sweeps" / "bias_lab_quick"
    data = str(tmp_path / "data")
    sizes = replace_sizes(train=4, dev=1, test=2)
    _check_added_reference(LabSettings(data_root=data, sizes=sizes, seed_list=(42,), rows=("oracle",),
                                       add_sweeps=(str(first),)), ["positive"])
    args = _args(tmp_path, tiny_model)
    args[args.index("erm") - 1: args.index("erm") + 1] = []
    r2 = _lab(tmp_path, *args, "--seed", "44", "--add-sweep", str(first))  # main() turns it into exit 2
    assert r2.stderr.startswith("ConfigError(") and "missing positive.erm seed 44" in r2.stderr, r2.stderr
    assert not (tmp_path / "sweeps" / "bias_lab_quick_seeds_44").exists()


def replace_sizes(**sizes):
    from dataclasses import replace

    from ermgap.bias_lab.corpora import Sizes

    return replace(Sizes(), **sizes)


def test_the_new_rows_settings_and_the_constrained_cap():
    """The constrained and adversarial rows expand on every corpus into the configs their comments state (oracle:
    config.load_config of the tiny recipe with the overrides written out by hand), and the constrained row's cap
    is what its comment claims: on the lab's group-balanced, importance-weighted batches, the majority cell's ERM
    weight is its train share, 168 / 630 by hand, so at μ = μmax the better-served group's loss still descends
    (∂total/∂mean ≥ 0), while 0.05 more would push it up."""
    import torch

    from ermgap.bias_lab.corpora import CONTROLS, MINORITY_SHARE, Sizes
    from ermgap.bias_lab.run import LabSettings, lab_spec
    from ermgap.config import load_config
    from ermgap.objectives.constrained import constrained_from_cells
    from ermgap.sampler import StratifiedBatchPlan

    root = Path("lab-data")
    spec = lab_spec(LabSettings(), {c.name: (root / c.name / "manifest.csv", root / c.oracle().name / "manifest.csv")
                                    for c in CONTROLS})
    recipe = ["model.name_or_path=models/tiny-pretrained", "lora.train_audio_encoder=false", "optim.epochs=12",
              "optim.lr=1e-3", "optim.scheduler=cosine", "optim.effective_batch_size=24", "optim.micro_batch_size=8",
              "eval.patience=0", "eval.batch_size=32", "distributed.num_workers=1", "distributed.cpus_per_worker=0.9",
              "distributed.use_gpu=false", "optim.seed=43"]
    rows = {"constrained": ["objective.kind=constrained", "objective.constrained.init=0", "objective.constrained.eta=0.5",
                            "objective.constrained.epsilon=0.02", "objective.constrained.mu_max=0.25",
                            "data.sampler=stratified", "data.min_per_cell=4"],
            "adversarial": ["objective.kind=adversarial", "objective.adversarial.strength=1",
                            "objective.adversarial.warmup_steps=20", "objective.adversarial.pool=audio",
                            "objective.adversarial.layer=-1", "objective.adversarial.balanced=false",
                            "objective.adversarial.input_norm=none", "objective.adversarial.head_lr_scale=1.0"]}
    for corpus in CONTROLS:
        for row, extra in rows.items():
            got = spec.trial_config({"variant": f"{corpus.name}.{row}", "optim.seed": 43}).to_dict()
            want = load_config(REPO / "configs" / "tiny.yaml",
                               [f"data.manifest={root / corpus.name / 'manifest.csv'}", *recipe, *extra]).to_dict()
            got.pop("tracking"), want.pop("tracking")
            assert got == want, (corpus.name, row)
    # the lab's train split per language: 24 female utterances per emotion, 6 (the minority's share) male
    n_f, n_m = Sizes().train * 7, round(Sizes().train * MINORITY_SHARE) * 7
    cells = [2 * lang + g for lang in range(3) for g, n in ((0, n_f), (1, n_m)) for _ in range(n)]
    plan = StratifiedBatchPlan([1] * len(cells), cells, effective_batch=24, num_workers=1, accum=3, seed=0,
                               min_per_cell=4)
    weights = torch.tensor([plan.importance_weights()[c] for c in range(6)], dtype=torch.float64).view(3, 2)
    counts = torch.full((3, 2), 4.0, dtype=torch.float64)
    assert weights[0, 0] * 4 / 24 == pytest.approx(168 / 630)  # the ERM weight of a female cell's mean loss

    def better_cells_slope(mu: float) -> float:
        means = torch.tensor([[0.5, 1.5]] * 3, dtype=torch.float64, requires_grad=True)  # women better served
        total, _ = constrained_from_cells(means * counts, counts, torch.full((3,), mu, dtype=torch.float64),
                                          erm_weights=weights)
        total.backward()
        return float(means.grad[0, 0])

    mu_max = spec.trial_config({"variant": "positive.constrained", "optim.seed": 42}).objective.constrained.mu_max
    assert better_cells_slope(mu_max) >= 0 > better_cells_slope(mu_max + 0.05)
    assert better_cells_slope(mu_max) == pytest.approx(168 / 630 - mu_max)


@pytest.mark.parametrize("args,message", [
    (["--corpus", "nope"], "unknown corpus 'nope'"),
    (["--row", "reweight"], "the lab needs an 'erm' row"),
    (["--row", "constrained", "--row", "adversarial"], "or --add-sweep sweeps that hold its trials"),
    (["--row", "erm", "--row", "bogus"], "rows 'bogus'"),
    (["base.optim.epochz=3"], "epochz"),
    (["--add-sweep", "nowhere"], "--add-sweep nowhere: not a lab sweep"),
    (["--table-only"], "--table-only builds the table of --add-sweep's sweeps"),
])
def test_bad_lab_arguments_are_refused_before_any_work(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "bias-lab", "--data-root", str(tmp_path / "d"), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_corpus_with_other_settings_is_not_replaced_without_force(tmp_path):
    from ermgap.bias_lab.corpora import CONTROLS, MINORITY_SHARE, Sizes, build_corpus
    from ermgap.errors import OutputExistsError

    small = Sizes(train=1, dev=1, test=1)
    manifest, built = build_corpus(tmp_path, CONTROLS[2], small, workers=2)
    assert built and build_corpus(tmp_path, CONTROLS[2], small, workers=2) == (manifest, False)
    with pytest.raises(OutputExistsError, match=r"eval_per_cell 1 \(want 2\)"):
        build_corpus(tmp_path, CONTROLS[2], Sizes(train=1, dev=1, test=2), workers=2)
    meta = json.loads((manifest.parent / "corpus.json").read_text())
    assert meta["train_share"] == [{"language": lang, "gender": "M", "share": MINORITY_SHARE}
                                   for lang in ("deu", "eng", "jpn")]


def test_pooled_sweeps_add_seeds_and_refuse_a_seed_twice():
    from ermgap.bias_lab.run import merge_predictions
    from ermgap.errors import ConfigError

    a, b, c = (pd.DataFrame({"x": [i]}) for i in range(3))
    into = merge_predictions({"positive": {"erm": {42: a}}}, {"positive": {"erm": {43: b}, "oracle": {42: c}}}, "s")
    assert {row: sorted(seeds) for row, seeds in into["positive"].items()} == {"erm": [42, 43], "oracle": [42]}
    assert into["positive"]["erm"][43] is b
    with pytest.raises(ConfigError, match=r"--add-sweep x: positive\.erm seed 42 is already in the lab's table "
                       r"\(.*pass --data-root so the lab can see the corpus it builds now"):
        merge_predictions(into, {"positive": {"erm": {42: c}}}, "--add-sweep x")


def test_trials_of_a_corpus_since_redefined_are_left_out_of_the_table():
    """An added sweep's trial joins only if the data it trained on (its MLflow dataset digest) is the corpus the lab
    holds now; a corpus not on disk cannot be checked and is kept; the oracle row trained on the oracle twin."""
    from ermgap.bias_lab.run import current_trials

    trials = pd.DataFrame({"variant": ["negative.erm", "negative.oracle", "positive.erm", "irreducible.erm",
                                       "positive.reweight"],
                           "optim.seed": ["43", "43", "43", "43", "44"], "mlflow_run_id": list("abcde"),
                           "test_w_f1": [0.5] * 5, "digest": ["old1", "old2", "p1", "i1", None]})
    kept, left = current_trials(trials, {"negative": "new1", "negative_oracle": "old2", "positive": "p1"})
    assert list(kept["mlflow_run_id"]) == ["b", "c", "d", "e"] and left == ["negative.erm seed 43"]
    kept, left = current_trials(trials.iloc[:0], {"negative": "new1"})
    assert kept.empty and left == []
