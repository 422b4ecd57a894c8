"""`ermgap ui` serves the MLflow UI on 127.0.0.1 and shows a sweep's parent run with its child runs
(headless Chromium renders the React app; we read the rendered DOM and keep a screenshot)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from _procs import free_port, pids_with_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.server,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed "
                                               "(apt-get install -y chromium; `make setup` does it as root)"),
]


def _chromium(url: str, profile: Path, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=20000", "--window-size=1400,900", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout


def _sweep_like_runs(uri: str) -> tuple[str, str, list[str]]:
    """A parent run opened by the sweep's own code and two children tagged and named as a sweep leaves them."""
    from mlflow import MlflowClient

    from ermgap.tracking import PARENT_TAG, start_sweep_run, trial_tags

    c = MlflowClient(uri)
    parent = start_sweep_run(uri, "ermgap-demo", name="demo", spec_hash="h", description="demo sweep", params={})
    exp = c.get_run(parent).info.experiment_id
    names = ["demo/erm", "demo/minmaxgap_adaptive"]
    for i, name in enumerate(names):
        variant = name.split("/")[1]
        run = c.create_run(exp, run_name=name, tags={PARENT_TAG: parent, **trial_tags("demo", "h", f"t{i}", {"variant": variant})})
        c.log_param(run.info.run_id, "variant", variant)
        for step in (10, 20, 30):  # an evaluation curve and a training curve, as a trial leaves them
            c.log_metric(run.info.run_id, "eval/dev_w_f1", 30.0 + i + step / 10, step=step)
            c.log_metric(run.info.run_id, "train/loss", 2.0 - step / 20, step=step)
        c.log_metric(run.info.run_id, "best/dev_w_f1", 40.0 + i)
        c.log_metric(run.info.run_id, "best/test_avg_gap", 5.0 + i)
        c.set_terminated(run.info.run_id)
    c.set_terminated(parent)
    return exp, parent, names


def test_ui_shows_parent_with_children(tmp_path):
    from mlflow import MlflowClient

    from ermgap.mlflow_ui import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_QUERY

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, parent, children = _sweep_like_runs(uri)
    # The experiment says it is a machine-learning one (the UI's own experiment-type setting).
    assert MlflowClient(uri).get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    port, marker = free_port(), uuid.uuid4().hex
    env = dict(os.environ, ERMGAP_TEST_UI=marker)
    ui = subprocess.Popen([sys.executable, "-m", "ermgap.cli.main", "ui", "--port", str(port), "--tracking-uri", uri],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # the UI takes ~20 s idle, minutes on a loaded 2-core machine
        while True:
            assert ui.poll() is None, ui.stdout.read()[-2000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow UI did not come up"
            time.sleep(1)
        # `ermgap ui` announces readiness once the port answers (it polls /health itself).
        ready = ""
        while "sweep demo: " not in ready and time.monotonic() < deadline:
            ready += ui.stdout.readline()
        assert f"MLflow UI ready on {base}" in ready
        # ... and prints a link to the sweep's runs table (the UI's own shared-view state).
        view_url = ready.split("sweep demo: ", 1)[1].split()[0]
        assert view_url.startswith(f"{base}/#/experiments/{exp}/runs?viewStateShareKey=") and UI_QUERY in view_url
        profile = tmp_path / "chromium"
        # The experiment's own page, with the query ermgap's links carry, is its runs table (MLflow 3.17 shows its
        # GenAI overview there otherwise) ...
        exp_dom = _chromium(f"{base}/#/experiments/{exp}?{UI_QUERY}", profile, "--dump-dom")
        assert ">demo<" in exp_dom and f"#/experiments/{exp}/runs/{parent}" in exp_dom, "experiment page: no runs"
        assert "Token Usage" not in exp_dom, "experiment page: the GenAI overview"
        _chromium(f"{base}/#/experiments/{exp}?{UI_QUERY}", profile, f"--screenshot={tmp_path / 'experiment.png'}")
        # The experiment's runs table lists the parent (children are folded under it) ...
        runs_dom = _chromium(f"{base}/#/experiments/{exp}/runs", profile, "--dump-dom")
        assert ">demo<" in runs_dom and f"#/experiments/{exp}/runs/{parent}" in runs_dom
        # The sweep's view lists parent and children by name, with the best checkpoint's W-F1 as a column.
        view_dom = _chromium(view_url, profile, "--dump-dom")
        assert all(name in view_dom for name in children), "variant names missing from the runs table"
        assert "best/dev_w_f1" in view_dom, "no W-F1 column in the runs table"
        table_shot = tmp_path / "runs_table.png"
        _chromium(view_url, profile, f"--screenshot={table_shot}")
        assert table_shot.is_file() and table_shot.stat().st_size > 10_000
        # Chart mode of the view: the evaluation curves' section first, the best checkpoint's values last.
        charts_dom = _chromium(view_url + "&compareRunsMode=CHART", profile, "--dump-dom")
        _chromium(view_url + "&compareRunsMode=CHART", profile, f"--screenshot={tmp_path / 'charts.png'}")
        sections = [name for name in ("eval", "train", "best") if f">{name}<" in charts_dom]
        assert sections and sections[0] == "eval", sections
        assert charts_dom.index(">eval<") < charts_dom.index(">best<"), "best/ section before the eval curves"
        # ... and the parent run's page lists its child runs.
        parent_url = f"{base}/#/experiments/{exp}/runs/{parent}"
        parent_dom = _chromium(parent_url, profile, "--dump-dom")
        assert "Child runs" in parent_dom
        assert all(name in parent_dom for name in children), "child runs missing from the parent's page"
        shot = tmp_path / "parent_run.png"
        _chromium(parent_url, profile, f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            ui.kill()
        leftover = pids_with_env("ERMGAP_TEST_UI", marker)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert leftover == [], f"`ermgap ui` left processes behind: {leftover}"
