"""Finding runs: `ermgap runs list` and unique run-id prefixes wherever a run id is taken (real MLflow, sqlite)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from metrics_oracle import random_preds
from mlflow import MlflowClient

from ermgap.errors import ConfigError
from ermgap.tracking import PARENT_TAG, TAG_ROLE, resolve_run_id


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def store(tmp_path):
    """A sweep-like parent with one child that has test predictions, and 17 other runs: by the pigeonhole
    principle two of the 19 ids share their first hex digit."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp, run_name="demo", tags={TAG_ROLE: "sweep"}).info.run_id
    child = c.create_run(exp, run_name="demo/erm", tags={PARENT_TAG: parent}).info.run_id
    for k, v in {"data.modality": "uni", "lambda.mode": "fixed", "lambda.init": "0.0"}.items():
        c.log_param(child, k, v)
    c.log_metric(child, "best/dev_w_f1", 41.5)
    csv = tmp_path / "test_preds.csv"
    random_preds(120, 3).to_csv(csv, index=False)
    c.log_artifact(child, str(csv), "predictions")
    others = [c.create_run(exp, run_name=f"r{i}").info.run_id for i in range(17)]
    return uri, parent, child, [parent, child, *others]


def test_unique_prefix_resolves_and_ambiguous_prefix_is_refused(store):
    uri, parent, _, ids = store
    assert resolve_run_id(uri, parent[:8]) == parent
    assert resolve_run_id(uri, parent.upper()) == parent
    first, n = Counter(i[0] for i in ids).most_common(1)[0]
    assert n >= 2
    with pytest.raises(ConfigError, match=f"run id {first} is ambiguous: {n} runs start with it"):
        resolve_run_id(uri, first)
    with pytest.raises(ConfigError, match="no run id .* starts with it"):
        resolve_run_id(uri, next(p for p in ("0" * 8, "f" * 8) if not any(i.startswith(p) for i in ids)))
    with pytest.raises(ConfigError, match="expected an MLflow run id"):
        resolve_run_id(uri, "xyz")


def test_report_takes_an_8_character_parent_prefix_and_refuses_an_ambiguous_one(store, tmp_path):
    uri, parent, _, ids = store
    res = _cli("report", "--mlflow-parent", parent[:8], "--tracking-uri", uri, "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "rep" / "table3.md").is_file() and "ERM (SFT)" in (tmp_path / "rep" / "table2.md").read_text()
    assert f"logged the report to MLflow run {parent}" in res.stdout  # the full id, resolved
    first = Counter(i[0] for i in ids).most_common(1)[0][0]
    res = _cli("report", "--mlflow-parent", first, "--tracking-uri", uri, "--out", str(tmp_path / "rep2"))
    assert res.returncode == 2 and "is ambiguous" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "rep2").exists()


def test_runs_list_shows_sweeps_with_children_and_best_metrics(store):
    uri, parent, child, ids = store
    res = _cli("runs", "list", "--tracking-uri", uri)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    row_parent = next(i for i, ln in enumerate(lines) if parent[:8] in ln)
    assert child[:8] in lines[row_parent + 1] and "└ demo/erm" in lines[row_parent + 1] and "41.50" in lines[row_parent + 1]
    assert f"{len(ids)} run(s)" in res.stdout
    res = _cli("runs", "list", "--sweeps", "--tracking-uri", uri)
    assert res.returncode == 0 and parent[:8] in res.stdout and child[:8] not in res.stdout and "1 run(s)" in res.stdout
    res = _cli("runs", "list", "--experiment", "nope", "--tracking-uri", uri)
    assert res.returncode == 2 and "no such MLflow experiment" in res.stderr
