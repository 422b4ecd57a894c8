"""`ermgap bias-lab`: the driver end to end on a miniature lab, and its refusals before any work.

The end-to-end case runs the shipped spec's ERM and oracle rows on the positive control (2 train, 1 dev, 2 test
utterances per cell, one epoch, one seed) with the session's tiny model as the backbone, on a real local Ray
cluster with MLflow (sqlite). Oracles: the corpora's own manifests (which corpus each trial trained on, that the
oracle twin holds more minority train rows and the same test utterances) and the trials' own prediction files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


def _settings(tmp_path, tiny_model, **changes):
    from ermgap.bias_lab.corpora import Sizes
    from ermgap.bias_lab.run import LabSettings

    overrides = [f"storage_path={tmp_path / 'sweeps'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"base.data.feature_cache={tmp_path / 'features'}", "base.optim.epochs=1",
                 "base.optim.effective_batch_size=12", "base.optim.micro_batch_size=4", "base.eval.batch_size=16"]
    return LabSettings(spec=str(REPO / "sweeps" / "bias_lab.yaml"), data_root=str(tmp_path / "data"),
                       backbone=str(tiny_model), sizes=Sizes(train=4, dev=1, test=2), quick=True,
                       corpora=("positive",), rows=("erm", "oracle"), overrides=overrides, **changes)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_a_miniature_lab_end_to_end(tmp_path, tiny_model):
    from rich.console import Console

    from ermgap.bias_lab.corpora import MINORITY_SHARE
    from ermgap.bias_lab.run import prepare, run_lab

    settings = _settings(tmp_path, tiny_model)
    result = run_lab(settings, console=Console(file=open(tmp_path / "console.txt", "w")))
    table = result.table
    assert list(table["objective"]) == ["erm", "oracle"] and set(table["corpus"]) == {"positive"}
    assert table["seeds"].tolist() == [1, 1] and result.failed is None
    # the oracle trained on the twin: more male train rows, the same test utterances
    data = Path(settings.data_root)
    base, twin = (pd.read_csv(data / n / "manifest.csv") for n in ("positive", "positive_oracle"))
    male_train = lambda df: int(((df["split"] == "train") & (df["gender"] == "M")).sum())  # noqa: E731
    kept = max(1, int(MINORITY_SHARE * 4 + 0.5))  # per cell, rounded half up
    assert (male_train(twin), male_train(base)) == (4 * 7 * 3, kept * 7 * 3)
    assert set(base.loc[base["split"] == "test", "utt_id"]) == set(twin.loc[twin["split"] == "test", "utt_id"])
    board = pd.read_csv(tmp_path / "sweeps" / "bias_lab_quick" / "artifacts" / "leaderboard.csv")
    assert sorted(board["variant"]) == ["positive.erm", "positive.oracle"] and (board["status"] == "done").all()
    written = json.loads(Path(result.files["json"]).read_text())
    assert [r["objective"] for r in written["table"]] == ["erm", "oracle"]
    assert written["rows"]["positive.oracle"]["data.manifest"] == str((data / "positive_oracle" / "manifest.csv"))
    assert written["rows"]["positive.erm"]["data.manifest"] == str((data / "positive" / "manifest.csv"))
    oracle = table[table["objective"] == "oracle"].iloc[0]
    assert oracle["d_gap_lo"] <= oracle["d_gap"] <= oracle["d_gap_hi"]
    assert Path(result.files["figure"]).stat().st_size > 10_000 and "target" not in result.text.split("\n")[0]
    # a second look reuses the corpora (nothing synthesised) and validates the same spec
    spec, timing = prepare(settings, console=Console(file=open(tmp_path / "console2.txt", "w")))
    assert "synthesised" not in (tmp_path / "console2.txt").read_text() and spec.num_trials() == 2


@pytest.mark.parametrize("args,message", [
    (["--corpus", "nope"], "unknown corpus 'nope'"),
    (["--row", "reweight"], "the lab needs an 'erm' row"),
    (["--row", "erm", "--row", "bogus"], "rows 'bogus'"),
    (["base.optim.epochz=3"], "epochz"),
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
