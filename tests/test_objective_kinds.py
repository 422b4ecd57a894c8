"""Every registered objective kind through the user-facing paths: `ermgap train` and `ermgap sweep` on the real CLI
(real Ray on 127.0.0.1, DeepSpeed, MLflow sqlite), and a kind defined and registered inside a test trained
through the recipe and named by its own description in the leaderboard: proof that a new kind is one class.

Cheap on purpose: 24 train utterances = one optimizer step per epoch, one epoch, one worker, the session's Ray
cluster (the CLI joins it with --address), two train runs at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ermgap.objectives import OBJECTIVES

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parent.parent
KINDS = tuple(OBJECTIVES)  # every kind the registry ships, read at collection (before the toy registers)
# The sweep test's two sweeps: every kind in one of them. One sweep of all six trials at once took 139 s in the suite
# (its trials' start-ups competing for 2 cores); one test must stay under 120 s.
SWEEP_KINDS = (KINDS[: (len(KINDS) + 1) // 2], KINDS[(len(KINDS) + 1) // 2:])


def _worker_cpus(trials: int) -> float:
    """The largest tenth of a CPU per worker (at most 0.4) with which every trial (its worker + 0.1 for its
    driver) runs at once on the module's 2-CPU cluster."""
    return min(0.4, (2.0 - 0.1 * trials) // (0.1 * trials) / 10)
# What a person reads for each shipped kind under configs/tiny.yaml (p = 2, adaptive λ; Group DRO's default η).
DESCRIPTIONS = {"erm": "ERM (SFT)", "minmaxgap": "ERM-MinMaxGAP (p=2)", "group_dro": "Group DRO (η=0.01)",
                "reweight": "Reweighting", "constrained": "Constrained ERM (ε=0.02)",
                "adversarial": "Adversarial (α=1)"}
# What the final line shows of each kind's state (nothing when it has none to show).
SHOWN = {"erm": "", "minmaxgap": r"λ final \d+\.\d{4} · ", "group_dro": r"max q final \d+\.\d{4} · ", "reweight": "",
         "constrained": r"max μ final \d+\.\d{4} · ", "adversarial": r"adv acc final \d+\.\d{4} · "}


def test_the_sweep_test_covers_every_kind_once():
    assert sorted(k for half in SWEEP_KINDS for k in half) == sorted(KINDS) and all(SWEEP_KINDS)


RAW_HEAD = {"objective.adversarial.input_norm": "none", "objective.adversarial.head_lr_scale": 1.0}


def _overrides(manifest: Path, model: Path, root: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"model.name_or_path={model}", "optim.epochs=1",
            "optim.effective_batch_size=24", "optim.micro_batch_size=24", "distributed.num_workers=1",
            "distributed.cpus_per_worker=1", "eval.batch_size=12", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            f"tracking.storage_path={root}/runs"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ERMGAP_VERBOSE")}
    env["COLUMNS"] = "200"  # one line per message: the assertions read whole lines
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=cwd)


class TrainRuns:
    """`ermgap train` of each kind, two at a time on the session's 2-CPU cluster (a worker of 1 CPU each): a run
    alone leaves a core idle through most of its start-up. Asking for a kind starts it beside the next selected
    kind not started yet, and waits for it; each kind's run has a store and folder of its own."""

    def __init__(self, selected: list[str], manifest: Path, tiny_model: Path, tmp: Callable[[str], Path],
                 address: str) -> None:
        self.selected, self.manifest, self.tiny_model = selected, manifest, tiny_model
        self.tmp, self.address = tmp, address
        self.started: dict[str, tuple[subprocess.Popen, Path]] = {}

    def _start(self, kind: str) -> None:
        root = self.tmp(f"kind_{kind}")
        with open(root / "output.txt", "w") as out:  # a file, not a pipe: two runs print at once
            proc = subprocess.Popen(
                [sys.executable, "-m", "ermgap.cli.main", "train", str(REPO / "configs" / "tiny.yaml"),
                 f"objective.kind={kind}", *_overrides(self.manifest, self.tiny_model, root), "--run-dir",
                 str(root / "run"), "--address", self.address],
                env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=root)
        self.started[kind] = (proc, root)

    def result(self, kind: str) -> tuple[int, str, Path]:
        """(exit code, what the CLI printed, the run's root: root/run, root/mlflow.db) of `kind`'s run."""
        if kind not in self.started:
            self._start(kind)
            later = [k for k in self.selected if k not in self.started]
            if later:
                self._start(later[0])
        proc, root = self.started[kind]
        proc.wait(timeout=300)
        return proc.returncode, (root / "output.txt").read_text(), root

    def close(self) -> None:
        for proc, _ in self.started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def train_runs(request, smallest_manifest, tiny_model, tmp_path_factory, ray_cluster):
    selected = [item.callspec.params["kind"] for item in request.session.items
                if item.originalname == "test_train_cli_every_kind_prints_its_table_and_names_its_objective"]
    runs = TrainRuns(selected, smallest_manifest, tiny_model, tmp_path_factory.mktemp, ray_cluster)
    yield runs
    runs.close()


@pytest.mark.parametrize("kind", KINDS)
def test_train_cli_every_kind_prints_its_table_and_names_its_objective(kind, train_runs):
    from mlflow import MlflowClient

    code, out, root = train_runs.result(kind)
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    described = DESCRIPTIONS.get(kind, OBJECTIVES[kind].label)
    assert "ermgap train: best checkpoint" in out and "w_f1" in out and "loss_gap" in out
    assert re.search(rf"objective {re.escape(described)} · {SHOWN.get(kind, '')}steps 1 · evaluations 1 ", out), \
        out[-2000:]
    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run((root / "run" / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == f"run · {described}"
    assert run.data.params["objective.kind"] == kind and run.data.params["objective"] == described


@pytest.mark.parametrize("kinds", SWEEP_KINDS, ids="-".join)
def test_sweep_cli_names_each_kind_in_its_trial_line(kinds, smallest_manifest, tiny_model, tmp_path, ray_cluster):
    """One trial per registered kind (half of them in each of two sweeps): each trial's line names the kind's
    own description, and so does the leaderboard's objective column."""
    base = {k: v for k, v in (o.split("=", 1) for o in _overrides(smallest_manifest, tiny_model, tmp_path))}
    spec = tmp_path / "kinds.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "kinds", "base": str(REPO / "configs" / "tiny.yaml"),
        # A worker's CPU share + 0.1 per trial driver: every trial at once on the module's 2-CPU cluster (each is
        # one optimizer step; most of a trial's time is start-up; two waves took 173 s).
        "overrides": {**{k: yaml.safe_load(v) for k, v in base.items() if not k.startswith("tracking.")},
                      "distributed.cpus_per_worker": _worker_cpus(len(kinds))},
        # The adversary's non-default head (raw input, the adapter's lr) goes through the CLI here; the train-CLI
        # test above runs the defaults.
        "variants": {kind: {"objective.kind": kind, **(RAW_HEAD if kind == "adversarial" else {})} for kind in kinds},
        "max_concurrent_trials": len(kinds), "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"experiment": "kinds", "tracking_uri": base["tracking.tracking_uri"]},
    }, sort_keys=False))
    res = _cli("sweep", str(spec), "--address", ray_cluster, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    if "adversarial" in kinds:  # its trial ran with the raw head
        configs = [yaml.safe_load(p.read_text())["objective"] for p in (tmp_path / "sweeps").rglob("config.yaml")]
        (head,) = [c["adversarial"] for c in configs if c["kind"] == "adversarial"]
        assert (head["input_norm"], head["head_lr_scale"]) == ("none", 1.0), head
    for kind in kinds:
        described = DESCRIPTIONS.get(kind, OBJECTIVES[kind].label)
        assert any(line.startswith(f"trial {kind} (") and f" · {described} finished in " in line
                   for line in out.splitlines()), (kind, out[-3000:])
    (written,) = (tmp_path / "sweeps").rglob("leaderboard.csv")
    board = pd.read_csv(written).set_index("variant")
    assert {k: board.loc[k, "objective"] for k in board.index} == {k: DESCRIPTIONS.get(k, OBJECTIVES[k].label)
                                                                     for k in kinds}


def test_a_kind_defined_in_a_test_trains_and_is_named_in_the_leaderboard(smallest_manifest, tiny_model, tmp_path,
                                                                         ray_cluster):
    """A toy kind (half the ERM loss), one class registered here and nowhere else: the recipe trains with it
    (its loss is what the run logs: train/loss = erm / 2 at every step) and the leaderboard names it by its
    own description."""
    from mlflow import MlflowClient

    from ermgap.objectives import Objective, ObjectiveOutput, register_objective
    from ermgap.objectives.cells import cell_stats, erm_mean
    from ermgap.sweep import run_sweep

    class HalfERM(Objective):
        kind = "half_erm"
        label = "Half ERM"
        summary = "half the global-batch mean"

        @classmethod
        def from_config(cls, cfg, grid):
            return cls(grid)

        @classmethod
        def describe(cls, params):
            return f"{cls.label} (toy)"

        def from_cells(self, sums, counts):
            return ObjectiveOutput(total=0.5 * erm_mean(sums, counts, self.grid.erm_weights),
                                   stats=cell_stats(sums, counts, self.grid.erm_weights))

    register_objective(HalfERM)
    try:
        base = {k: v for k, v in (o.split("=", 1) for o in _overrides(smallest_manifest, tiny_model, tmp_path))}
        uri = base.pop("tracking.tracking_uri")
        spec = tmp_path / "toy.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "toy", "base": str(REPO / "configs" / "tiny.yaml"),
            "overrides": {**{k: yaml.safe_load(v) for k, v in base.items() if not k.startswith("tracking.")},
                          "optim.effective_batch_size": 12, "optim.micro_batch_size": 12},
            "variants": {"toy": {"objective.kind": "half_erm"}},
            "storage_path": str(tmp_path / "sweeps"), "mlflow": {"experiment": "toy", "tracking_uri": uri},
        }, sort_keys=False))
        outcome = run_sweep(spec, address=ray_cluster)
    finally:
        OBJECTIVES.pop("half_erm", None)
    row = outcome.leaderboard.set_index("variant").loc["toy"]
    assert row["status"] == "done" and row["objective"] == "Half ERM (toy)"
    client = MlflowClient(uri)
    assert client.get_run(row["mlflow_run_id"]).data.params["objective.kind"] == "half_erm"
    loss = {m.step: m.value for m in client.get_metric_history(row["mlflow_run_id"], "train/loss")}
    erm = {m.step: m.value for m in client.get_metric_history(row["mlflow_run_id"], "train/erm")}
    assert sorted(loss) == sorted(erm) == [1, 2]  # 24 train rows in steps of 12
    assert all(loss[s] == pytest.approx(erm[s] / 2, rel=1e-9) for s in loss)
