"""The objectives other than MinMaxGAP end to end: real Ray on 127.0.0.1, real DeepSpeed, the tiny model on
the small corpus slice of tests/test_train_distributed.py (same fixtures, same 12-step schedule).

Oracles: a 1-worker run for the 2-worker Group DRO run (q is updated from all-reduced cell means, so it
must not depend on the worker count); the train split's cell counts (pandas) for the reweighting weights.
A Group DRO run that loses a worker or is resumed: tests/test_resume_exact.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from _faults import KillAfterStep
from _runs import assert_same_outputs as _assert_same_outputs
from _runs import history as _history
from test_train_distributed import _train, base  # noqa: F401  (a module fixture)

from ermgap.labels import GENDERS, LANGUAGES

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

# η_q large enough that 12 steps move q visibly away from uniform (the default 0.01 barely moves it).
GROUP_DRO = ["objective.kind=group_dro", "objective.group_dro.eta=0.5", "objective.group_dro.size_adjustment=0.5"]
CELLS = [f"{lg}_{g}" for lg in LANGUAGES for g in GENDERS]  # the row-major order of the q table


def _q_trajectory(final) -> list[list[float]]:
    return json.loads((Path(final["run_dir"]) / "metrics.json").read_text())["objective"]["history"]


def _assert_same_group_dro_run(a, b, *, tol=1e-5):
    """Same per-step losses and q (metrics.json and MLflow), dev/test metrics and best adapter."""
    qa, qb = _q_trajectory(a), _q_trajectory(b)
    assert len(qa) == len(qb) == 12
    for step, (ra, rb) in enumerate(zip(qa, qb), start=1):
        assert ra == pytest.approx(rb, abs=tol), f"q differs after step {step}"
    for key in ("train/loss", "q_deu_F", "q_jpn_M"):
        ha, hb = dict(_history(a, key)), dict(_history(b, key))  # last value per step (redone steps overwrite)
        assert sorted(ha) == sorted(hb) == list(range(1, 13)), key
        for step in ha:
            assert ha[step] == pytest.approx(hb[step], abs=tol, rel=tol), f"{key} differs at step {step}"
    assert a["test_worst_lang_gap"] == pytest.approx(b["test_worst_lang_gap"], abs=1e-4)
    _assert_same_outputs(a, b)


@pytest.fixture(scope="module")
def group_dro_reference(ray_cluster, base):  # noqa: F811
    """The uninterrupted 2-worker Group DRO run (12 optimizer steps, evaluation every 3 steps)."""
    return _train(base, "group_dro", GROUP_DRO)


def test_group_dro_run_records_its_q_trajectory(group_dro_reference):
    from mlflow import MlflowClient

    final = group_dro_reference
    q = _q_trajectory(final)
    for row in q:
        assert len(row) == 6 and sum(row) == pytest.approx(1.0, abs=1e-12) and min(row) > 0
    assert max(abs(v - 1 / 6) for v in q[-1]) > 0.01, q[-1]  # q moved: the update ran every step
    # MLflow's per-step q_<cell> is the same trajectory; the final report carries the last q.
    for i, cell in enumerate(CELLS):
        logged = dict(_history(final, f"q_{cell}"))
        assert [logged[s] for s in range(1, 13)] == pytest.approx([row[i] for row in q], abs=1e-12), cell
        assert final[f"q_{cell}"] == pytest.approx(q[-1][i], abs=1e-12)
    assert "lambda" not in final and "lambda_history" not in final
    run = MlflowClient(final["tracking_uri"]).get_run(final["mlflow_run_id"])
    assert run.data.params["objective.kind"] == "group_dro"


def test_group_dro_two_workers_equal_one_worker(group_dro_reference, base):  # noqa: F811
    one = _train(base, "group_dro_one_worker", [*GROUP_DRO, "distributed.num_workers=1"])
    _assert_same_group_dro_run(group_dro_reference, one)


def test_reweight_trains_on_two_workers(ray_cluster, base, small_manifest, tmp_path):  # noqa: F811
    """Male train speakers halved (8 F, 4 M per language): the logged weights are N / (K·n_cell) from the
    train counts, and the weighted loss differs from the plain mean the run also logs."""
    from mlflow import MlflowClient

    from ermgap.metrics import compute_metrics, read_predictions

    df = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    drop = df[(df["split"] == "train") & (df["gender"] == "M")].groupby("language").head(4).index
    manifest = tmp_path / "manifest.csv"
    df.drop(index=drop).to_csv(manifest, index=False)
    train = df.drop(index=drop).query("split == 'train'")
    counts = train.groupby(["language", "gender"]).size()
    assert sorted(counts.tolist()) == [4, 4, 4, 8, 8, 8]
    final = _train(base, "reweight", ["objective.kind=reweight", f"data.manifest={manifest}"])
    assert final["done"] is True
    for (lg, g), n in counts.items():
        want = len(train) / (len(counts) * n)
        logged = [v for _, v in _history(final, f"weight_{lg}_{g}")]
        assert logged and logged == pytest.approx([want] * len(logged)), (lg, g)
    loss, erm = dict(_history(final, "train/loss")), dict(_history(final, "train/erm"))
    assert max(abs(loss[s] - erm[s]) for s in loss) > 1e-4
    test = read_predictions(Path(final["run_dir"]) / "test_preds.csv")
    assert final["test_w_f1"] == pytest.approx(compute_metrics(test)["overall"]["w_f1"])
    run = MlflowClient(final["tracking_uri"]).get_run(final["mlflow_run_id"])
    assert run.data.params["objective.kind"] == "reweight" and run.info.status == "FINISHED"


# objective.kind=constrained: η large enough that 4 evaluations move the multipliers visibly.
CONSTRAINED = ["objective.kind=constrained", "objective.constrained.eta=20", "objective.constrained.epsilon=0.02"]


def _mu_history(final) -> list:
    return json.loads((Path(final["run_dir"]) / "metrics.json").read_text())["objective"]["multipliers"]["history"]


def test_constrained_two_workers_with_a_fault_equal_one_worker(ray_cluster, base):  # noqa: F811
    """Two workers, rank 1 killed after step 5 (resumed from the step-3 checkpoint, whose objective state holds
    μ after evaluation 1), against one uninterrupted worker: the same μ trajectory, per-step losses and μ in
    MLflow, outputs and adapter. μ follows the dual update on the dev gaps the run itself reported."""
    one = _train(base, "constrained_one_worker", [*CONSTRAINED, "distributed.num_workers=1"])
    two = _train(base, "constrained_fault", CONSTRAINED, step_hook=KillAfterStep(5))
    assert (Path(two["run_dir"]) / ".fault_fired").is_file()
    assert len([s for s, _ in _history(two, "resumed_at_step")]) == 1
    ha, hb = _mu_history(one), _mu_history(two)
    assert [r for r, _, _ in ha] == [r for r, _, _ in hb] == [1, 2, 3, 4]
    mu = [0.0] * len(LANGUAGES)
    for (_, gaps, values), (_, gaps_b, values_b) in zip(ha, hb):
        assert gaps_b == pytest.approx(gaps, abs=1e-5) and values_b == pytest.approx(values, abs=1e-4)
        mu = [min(max(m + 20 * (g - 0.02), 0.0), 10.0) if g is not None else m for m, g in zip(mu, gaps)]
        assert values == pytest.approx(mu, abs=1e-9)
    assert max(ha[-1][2]) > 0, ha  # the multipliers moved
    for lg in LANGUAGES:
        a, b = dict(_history(one, f"mu_{lg}")), dict(_history(two, f"mu_{lg}"))
        assert sorted(a) == sorted(b) and len(a) >= 12, lg
        assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], abs=1e-4), lg
        assert one[f"mu_{lg}"] == pytest.approx(ha[-1][2][LANGUAGES.index(lg)], abs=1e-12)
    la, lb = dict(_history(one, "train/loss")), dict(_history(two, "train/loss"))
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert all(lb[s] == pytest.approx(la[s], abs=1e-5, rel=1e-5) for s in la)
    _assert_same_outputs(one, two)


# The head standardises its input by the global batch (one more all-reduce) and trains at 10× the adapter's lr
# (its own parameter group): the defaults (none, 1×) go through the CLI in test_objective_kinds's every-kind tests.
ADVERSARIAL = ["objective.kind=adversarial", "objective.adversarial.strength=1.0",
               "objective.adversarial.warmup_steps=4", "objective.adversarial.head_size=16",
               "objective.adversarial.input_norm=batch", "objective.adversarial.head_lr_scale=10"]


def test_adversarial_two_workers_equal_one_worker_and_save_the_head(ray_cluster, base):  # noqa: F811
    """The head's loss is the global batch's mean through the objective's all-reduce and the head trains under
    DeepSpeed like the adapter: 2 workers give the 1-worker run's per-step losses, head accuracy, dev attribute
    accuracy and adapter. The head is saved beside the adapter, not in it (peft's file has LoRA keys only)."""
    from safetensors.torch import load_file

    two = _train(base, "adversarial", ADVERSARIAL)
    one = _train(base, "adversarial_one_worker", [*ADVERSARIAL, "distributed.num_workers=1"])
    for key in ("train/loss", "adversary_loss", "adversary_acc", "adversary_strength"):
        a, b = dict(_history(one, key)), dict(_history(two, key))
        assert sorted(a) == sorted(b) and set(range(1, 13)) <= set(a), key
        assert all(b[s] == pytest.approx(a[s], abs=1e-5, rel=1e-5) for s in a), key
    strength = dict(_history(two, "adversary_strength"))
    assert [strength[s] for s in (1, 2, 3, 4, 12)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # the warm-up
    dev_acc = dict(_history(two, "eval/dev_attr_acc"))
    assert len(dev_acc) == 4 and all(0 <= v <= 1 for v in dev_acc.values())
    assert dev_acc == pytest.approx(dict(_history(one, "eval/dev_attr_acc")), abs=1e-9)
    assert 0 <= two["test_attr_acc"] <= 1 and two["test_attr_acc"] == pytest.approx(one["test_attr_acc"], abs=1e-9)
    adapter = Path(two["run_dir"]) / "adapter"
    head = load_file(str(adapter / "objective_module.safetensors"))
    assert head and all(k.startswith("objective_module.") for k in head)
    assert {"objective_module.running_mean", "objective_module.running_var"} <= set(head)  # input_norm's averages
    assert not [k for k in load_file(str(adapter / "adapter_model.safetensors")) if "objective_module" in k]
    _assert_same_outputs(one, two)
