"""The stratified batch plan (data.sampler=stratified) and the importance-weighted ERM term it needs.

Oracles: the plan's own cell labels counted per batch (every cell ≥ min_per_cell), a fresh plan for another
worker count or a resumed epoch (the same sequence), and the plain mean over every train row (what the
importance-weighted ERM term must equal over a full cycle of the cells' passes).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from ermgap.config import load_config
from ermgap.errors import ConfigError
from ermgap.objectives import ERM, CellGrid, MinMaxGAP, Reweight
from ermgap.objectives.minmaxgap import AdaptiveLambda
from ermgap.sampler import BatchCoverage, StratifiedBatchPlan, build_plan, cell_quotas

# 3 strata × 2 attribute values, one cell (stratum 1, attribute 1) tiny: like the demo's male speakers.
COUNTS = {0: 40, 1: 6, 2: 37, 3: 2, 4: 30, 5: 5}
CELLS = np.random.default_rng(1).permutation(np.repeat(list(COUNTS), list(COUNTS.values())))
LENGTHS = np.random.default_rng(2).integers(8_000, 80_000, size=len(CELLS)).tolist()


def plan(workers: int = 1, accum: int = 1, min_per_cell: int = 2, batch: int = 24) -> StratifiedBatchPlan:
    return StratifiedBatchPlan(LENGTHS, CELLS, effective_batch=batch, num_workers=workers, accum=accum, seed=5,
                               min_per_cell=min_per_cell)


@pytest.mark.parametrize("min_per_cell", [1, 2, 4])
def test_every_global_batch_holds_min_per_cell_of_every_train_cell(min_per_cell):
    p = plan(min_per_cell=min_per_cell)
    assert p.steps_per_epoch == len(CELLS) // 24
    for epoch in (0, 1, 7):
        for gb in p.global_batches(epoch):
            assert len(gb) == 24
            seen = Counter(CELLS[gb].tolist())
            assert set(seen) == set(COUNTS) and min(seen.values()) >= min_per_cell
            assert dict(seen) == p.quotas  # the same quota every step
            lengths = np.asarray(LENGTHS)[gb]
            assert (np.diff(lengths) <= 0).all()  # sorted by length, for the workers' contiguous slices


def test_small_cells_are_cycled_through_whole_passes():
    # Cell 3 has 2 rows and gets ≥ 2 slots a step: over an epoch each of its rows is drawn equally often,
    # many times; the big cells are drawn without repetition until their pass is complete.
    p = plan()
    drawn = Counter(np.concatenate(p.global_batches(0)).tolist())
    tiny = [i for i in range(len(CELLS)) if CELLS[i] == 3]
    assert len({drawn[i] for i in tiny}) == 1 and drawn[tiny[0]] == p.quotas[3] * p.steps_per_epoch // 2
    big = [i for i in range(len(CELLS)) if CELLS[i] == 0]
    assert max(drawn[i] for i in big) == 1  # 40 rows, 5 steps × 6 draws this epoch: no row twice


@pytest.mark.parametrize("epoch", [0, 3])
def test_batches_are_identical_for_1_2_and_3_workers(epoch):
    reference = [b.tolist() for b in plan().global_batches(epoch)]
    for workers, accum in ((1, 1), (1, 4), (2, 2), (3, 1), (3, 2)):
        p = plan(workers, accum)
        per_step: list[list[int]] = [[] for _ in reference]
        for rank in range(workers):
            for step, micro in enumerate(p.worker_micro_batches(epoch, rank)):
                assert len(micro) == accum and all(len(m) == p.micro for m in micro)
                per_step[step] += [i for m in micro for i in m]
        assert per_step == reference  # same rows, same order: rank r holds slice r of the global batch


def test_deterministic_by_seed_and_resumable_mid_epoch():
    a, b = plan(2, 2), plan(2, 2)
    assert [x.tolist() for x in a.global_batches(2)] == [x.tolist() for x in b.global_batches(2)]
    other = StratifiedBatchPlan(LENGTHS, CELLS, effective_batch=24, num_workers=2, accum=2, seed=6, min_per_cell=2)
    assert [x.tolist() for x in other.global_batches(2)] != [x.tolist() for x in a.global_batches(2)]
    # A resumed run builds a fresh plan and asks for the tail of the epoch it stopped in.
    for rank in (0, 1):
        assert plan(2, 2).worker_micro_batches(2, rank, start_step=3) == a.worker_micro_batches(2, rank)[3:]
    # Epochs continue the cells' streams: epoch 1 is not epoch 0 again.
    assert [x.tolist() for x in a.global_batches(1)] != [x.tolist() for x in a.global_batches(0)]


def test_quotas_share_the_free_slots_by_population_and_refuse_impossible_settings():
    # 24 − 6 × 2 = 12 free slots by population share 40:6:37:2:30:5 of 120 → 4, 0.6, 3.7, 0.2, 3, 0.5.
    assert cell_quotas(COUNTS, batch=24, min_per_cell=2) == {0: 6, 1: 3, 2: 6, 3: 2, 4: 5, 5: 2}
    assert sum(cell_quotas(COUNTS, batch=24, min_per_cell=4).values()) == 24
    with pytest.raises(ValueError, match=r"min_per_cell \(5\) × 6 cells = 30 exceeds the global batch of 24"):
        cell_quotas(COUNTS, batch=24, min_per_cell=5)


def test_importance_weighted_erm_equals_the_population_mean_over_a_full_cycle():
    # Hand-made: 2 strata × 2 attributes with 8, 2, 4, 2 rows (N = 16), batch 6, min 1 → quotas 2, 1, 2, 1
    # (free 2 slots: shares 1, .25, .5, .25 → floors 1,0,0,0 and the largest remainder to cell 2). Every
    # cell completes whole passes after 4 steps (8/2, 2/1, 4/2, 2/1 steps a pass).
    cells = np.array([0] * 8 + [1] * 2 + [2] * 4 + [3] * 2)
    losses = torch.tensor([0.3, 1.2, 0.7, 2.0, 0.1, 0.9, 1.5, 0.4, 3.0, 2.2, 0.8, 0.6, 1.1, 0.2, 2.5, 4.0],
                          dtype=torch.float64)
    p = StratifiedBatchPlan([16_000] * 16, cells, effective_batch=6, num_workers=1, accum=1, seed=0, min_per_cell=1)
    assert p.quotas == {0: 2, 1: 1, 2: 2, 3: 1}
    # w_c = (n_c / N) / (k_c / B): 0.5/(2/6), (1/8)/(1/6), 0.25/(2/6), (1/8)/(1/6)
    assert p.importance_weights() == pytest.approx({0: 1.5, 1: 0.75, 2: 0.75, 3: 0.75})
    grid = CellGrid.count(torch.tensor(cells // 2), torch.tensor(cells % 2), strata=("a", "b"), attributes=("F", "M"))
    weighted = grid.with_erm_weights(p.importance_weights())
    for make in (lambda g: ERM(g), lambda g: MinMaxGAP(g, p=2.0, lam=AdaptiveLambda(init=0.0, mode="fixed"))):
        honest, plain = make(weighted), make(grid)
        steps = [p.global_batch(t) for t in range(4)]
        per_step = [honest(losses[gb], torch.tensor(cells[gb] // 2), torch.tensor(cells[gb] % 2)) for gb in steps]
        batch_mean = [plain(losses[gb], torch.tensor(cells[gb] // 2), torch.tensor(cells[gb] % 2)) for gb in steps]
        population = float(losses.mean())
        assert np.mean([float(o.total) for o in per_step]) == pytest.approx(population, abs=1e-12)
        assert np.mean([o.erm for o in per_step]) == pytest.approx(population, abs=1e-12)
        # The unweighted stratified mean over-weights the small cells: it is not the population mean.
        assert not math.isclose(np.mean([float(o.total) for o in batch_mean]), population, abs_tol=1e-3)
        # Cell means (hence the gap) do not depend on the weights.
        for a, b in zip(per_step, batch_mean):
            assert torch.equal(a.stats.group_means, b.stats.group_means) and a.gap == b.gap
    # Reweighting targets the cell-balanced risk: with stratified batches its weights compose with w_c.
    balanced = float(np.mean([float(losses[cells == c].mean()) for c in range(4)]))
    rw = Reweight(weighted)
    out = [rw(losses[gb], torch.tensor(cells[gb] // 2), torch.tensor(cells[gb] % 2)) for gb in steps]
    assert np.mean([float(o.total) for o in out]) == pytest.approx(balanced, abs=1e-12)


def test_build_plan_follows_the_config_and_coverage_counts_valid_steps():
    cfg = load_config(None, ["data.sampler=stratified", "data.min_per_cell=2", "optim.effective_batch_size=24",
                             "optim.micro_batch_size=4", "distributed.num_workers=2"])
    p = build_plan(cfg, LENGTHS, CELLS, num_workers=2, accum=3)
    assert isinstance(p, StratifiedBatchPlan) and p.min_per_cell == 2 and p.micro == 4
    assert type(build_plan(load_config(None, []), LENGTHS, CELLS, num_workers=2, accum=8)).__name__ == "GlobalBatchPlan"
    cov = BatchCoverage()
    in_train = np.ones((2, 2), dtype=bool)
    assert cov.add([[3, 1], [2, 0]], [True, False], in_train) == {"valid_strata": 1, "min_cell_count": 0}
    assert cov.add([[3, 0], [2, 0]], [False, False], in_train) == {"valid_strata": 0, "min_cell_count": 0}
    cov.add([[3, 2], [2, 1]], [True, True], in_train)
    assert cov.summary() == {"valid_step_share": 2 / 3, "min_cell_count": 0.0}
    assert BatchCoverage(**{"steps": 3, "valid_steps": 2, "min_cell_count": 0}) == cov  # the checkpointed form


def test_impossible_min_per_cell_is_one_config_error_before_ray(tmp_path, synth_corpus, tiny_model):
    import ray

    from ermgap.driver import run_training

    # The fixture corpus has 3 languages × 2 genders = 6 train cells; 6 × 2 = 12 > a batch of 8.
    cfg = load_config(None, [f"data.manifest={synth_corpus}", f"model.name_or_path={tiny_model}",
                             f"tracking.storage_path={tmp_path}/runs", "optim.effective_batch_size=8",
                             "optim.micro_batch_size=4", "data.sampler=stratified", "data.min_per_cell=2"])
    with pytest.raises(ConfigError, match=r"data.min_per_cell: 2 rows of each of the 6 \(stratum, attribute\) cells "
                                          r".*deu_F, deu_M.* need 12 slots, but optim.effective_batch_size is 8; "
                                          r"expected data.min_per_cell ≤ 1"):
        run_training(cfg, run_dir=tmp_path / "run")
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def demo_like_manifest(synth_corpus, tmp_path_factory):
    """The demo's bias on the fixture corpus: 8 female vs 1 male train speaker rows per language (the demo
    corpus has 12× fewer male rows), 4 dev / 4 test rows per (language, gender)."""
    import pandas as pd

    df = pd.read_csv(synth_corpus, dtype=str, keep_default_na=False)
    df["audio"] = [str(synth_corpus.parent / a) for a in df["audio"]]
    keep = {("train", "F"): 8, ("train", "M"): 1}
    parts = [g.head(keep.get((split, gender), 4)) for (split, _, gender), g in df.groupby(["split", "language", "gender"])]
    out = tmp_path_factory.mktemp("demo_like") / "manifest.csv"
    pd.concat(parts).to_csv(out, index=False)
    return out


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_stratified_run_logs_a_valid_stratum_at_every_step(ray_cluster, demo_like_manifest, tiny_model, tmp_path):
    import pandas as pd
    from mlflow import MlflowClient

    from ermgap.sampler import GlobalBatchPlan
    from ermgap.driver import run_training

    overrides = [f"data.manifest={demo_like_manifest}", f"model.name_or_path={tiny_model}", "model.dtype=fp32",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.storage_path={tmp_path}/runs",
                 "optim.lr=5e-4", "optim.epochs=2", "optim.effective_batch_size=8", "optim.micro_batch_size=4",
                 "eval.every_steps=3", "eval.batch_size=12", "eval.patience=0", "distributed.num_workers=2",
                 "distributed.cpus_per_worker=1", "data.sampler=stratified", "data.min_per_cell=1"]
    # What the default plan would do on these 27 train rows (3 male): steps without any valid stratum.
    train = pd.read_csv(demo_like_manifest, dtype=str)
    train = train[train["split"] == "train"].reset_index(drop=True)
    male = (train["gender"] == "M").to_numpy()
    default = GlobalBatchPlan([1] * len(train), effective_batch=8, num_workers=2, accum=1, seed=42)
    assert any(not male[gb].any() for e in range(2) for gb in default.global_batches(e))

    final = run_training(load_config(None, overrides), run_dir=tmp_path / "run")
    client = MlflowClient(final["tracking_uri"])
    steps = len(train) // 8 * 2
    for key, want in (("train/valid_strata", 3), ("train/min_cell_count", 1)):
        logged = {m.step: m.value for m in client.get_metric_history(final["mlflow_run_id"], key)}
        assert logged == {s: want for s in range(1, steps + 1)}, key
    assert final["train_valid_step_share"] == 1.0 and final["train_min_cell_count"] == 1
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert '"train_valid_step_share": 1.0' in metrics
    run = client.get_run(final["mlflow_run_id"])
    assert run.data.metrics["train_valid_step_share"] == 1.0 and run.data.params["data.sampler"] == "stratified"
