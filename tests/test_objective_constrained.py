"""objective.kind=constrained: erm + Σ_s μ_s·Δ_s with one multiplier per stratum (projected dual ascent).

Oracles: numbers computed by hand (the loss, its gradient per example, the multipliers over a fixed sequence
of dev gaps with projection at 0 and at the cap); ERM-MinMaxGAP's adaptive λ (p = 1) for a one-stratum run,
which must follow the same trajectory; the loop-based oracle (tests/objective_oracle.py) on the concatenated
global batch for real gloo process groups of 2 and 3 ranks with uneven shards.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from objective_oracle import oracle_constrained
from test_objective_distributed import (
    TRAIN_COUNTS,
    _average_grads,
    _per_sample,
    global_batch,
    make_model,
    start_gloo,
    step_indices,
)

from ermgap.errors import ErmgapWarning
from ermgap.objectives import OBJECTIVES, CellGrid, ConstrainedERM, MinMaxGAP
from ermgap.objectives.constrained import ConstrainedConfig
from ermgap.objectives.minmaxgap import AdaptiveLambda, LambdaConfig


def _grid(strata=("a", "b", "c"), counts=None):
    counts = counts if counts is not None else [[2, 1], [1, 3], [1, 1]][:len(strata)]
    return CellGrid(tuple(strata), ("F", "M"), torch.tensor(counts, dtype=torch.float64))


def test_loss_and_gradient_by_hand():
    """Stratum a: F losses 1, 3 (mean 2), M 0.5 → Δ_a = 1.5; b: F 1, M 2, 2, 5 (mean 3) → Δ_b = 2; c: F 4 only
    (invalid). B = 8, sum 18.5: erm 2.3125; μ = (0.5, 2, 7): total 2.3125 + 0.75 + 4 = 7.0625.
    d total/d ℓ_i = 1/8 + μ_s·(±1/n_cell): a F 0.375, a M −0.375, b F −1.875, b M 1/8 + 2/3, c 1/8."""
    objective = ConstrainedERM(_grid(), ConstrainedConfig())
    objective.mu.values = [0.5, 2.0, 7.0]
    losses = torch.tensor([1.0, 3.0, 0.5, 1.0, 2.0, 2.0, 5.0, 4.0], dtype=torch.float64, requires_grad=True)
    stratum = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    attribute = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0])
    out = objective(losses, stratum, attribute)
    assert out.total.item() == pytest.approx(7.0625, abs=1e-12)
    assert out.erm == pytest.approx(2.3125, abs=1e-12) and out.gap == pytest.approx(2.0, abs=1e-12)
    assert out.logs == {"mu_a": 0.5, "mu_b": 2.0, "mu_c": 7.0}
    out.total.backward()
    want = [0.375, 0.375, -0.375, -1.875, 1 / 8 + 2 / 3, 1 / 8 + 2 / 3, 1 / 8 + 2 / 3, 0.125]
    assert losses.grad.tolist() == pytest.approx(want, abs=1e-12)


def _dev(**gaps):
    return {"dev_loss_gap": max(gaps.values(), default=math.nan), "dev_avg_gap": math.nan,
            **{f"dev_loss_gap_{k}": v for k, v in gaps.items()}}


def test_multipliers_over_a_fixed_sequence_of_dev_gaps():
    """η 0.5, ε 0.1, μmax 1, μ0 0.2; each row: the dev gaps of (a, b) and μ after, computed by hand.
    Round 2 hits the cap, round 3 has no dev gap for a (kept, with a warning), round 5 projects b at 0."""
    objective = ConstrainedERM(_grid(("a", "b"), [[1, 1], [1, 1]]),
                               ConstrainedConfig(init=0.2, eta=0.5, epsilon=0.1, mu_max=1.0))
    rounds = [({"a": 0.5, "b": 0.0}, [0.4, 0.15]),      # 0.2 + 0.5·0.4; 0.2 − 0.5·0.1
              ({"a": 1.5, "b": 0.0}, [1.0, 0.10]),      # 0.4 + 0.7 = 1.1 → cap 1.0
              ({"b": 0.0}, [1.0, 0.05]),                # a: no dev gap, kept
              ({"a": 0.1, "b": 0.0}, [1.0, 0.0]),       # a: at ε, unchanged
              ({"a": 0.0, "b": 0.0}, [0.95, 0.0])]      # b: 0 − 0.05 → projected to 0
    for k, (gaps, want) in enumerate(rounds, start=1):
        if "a" not in gaps:
            with pytest.warns(ErmgapWarning, match=r"evaluation 3: no dev gap \(loss_gap\) for strata \['a'\]"):
                objective.on_evaluation(_dev(**gaps), eval_round=k)
        else:
            objective.on_evaluation(_dev(**gaps), eval_round=k)
        assert objective.mu.values == pytest.approx(want, abs=1e-12), k
        assert objective.log_values() == pytest.approx({"mu_a": want[0], "mu_b": want[1]}, abs=1e-12)
    assert [r for r, _, _ in objective.mu.history] == [1, 2, 3, 4, 5]
    assert objective.mu.history[2][1] == [None, 0.0]
    assert ConstrainedERM.live_values(objective.log_values()) == {"max μ": pytest.approx(0.95)}

    # avg_metric_gap: the per-stratum AVG gap in percent, as a fraction (12 points → 0.12).
    avg = ConstrainedERM(_grid(("a", "b"), [[1, 1], [1, 1]]),
                         ConstrainedConfig(eta=1.0, epsilon=0.02, dev_gap="avg_metric_gap"))
    avg.on_evaluation({"dev_avg_gap_a": 12.0, "dev_avg_gap_b": 1.0, "dev_loss_gap_a": 9.0}, eval_round=1)
    assert avg.mu.values == pytest.approx([0.10, 0.0], abs=1e-12)


def test_state_round_trips_through_json_and_refuses_other_settings():
    settings = ConstrainedConfig(init=0.2, eta=0.5, epsilon=0.1, mu_max=1.0)
    a = ConstrainedERM(_grid(), settings)
    a.on_evaluation(_dev(a=0.9, b=0.05, c=0.3), eval_round=1)
    state = json.loads(json.dumps(a.state_dict()))
    b = ConstrainedERM(_grid(), settings)
    b.load_state_dict(state)
    assert b.mu.values == a.mu.values and b.mu.history == a.mu.history
    b.on_evaluation(_dev(a=0.2, b=0.2, c=0.2), eval_round=2)
    a.on_evaluation(_dev(a=0.2, b=0.2, c=0.2), eval_round=2)
    assert b.state_dict() == a.state_dict()
    other = ConstrainedERM(_grid(), ConstrainedConfig(init=0.2, eta=0.5, epsilon=0.2, mu_max=1.0))
    with pytest.raises(ValueError, match="epsilon: saved 0.1 vs now 0.2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="init"):
        ConstrainedConfig(init=2.0, mu_max=1.0)


def test_one_stratum_follows_minmaxgap_adaptive_lambda_with_p_1():
    """Train two copies of a toy model 12 steps, evaluating on a dev set every 3 steps: MinMaxGAP (p = 1,
    adaptive λ) and the constrained kind over ONE stratum with the same η, ε, cap and start. λ and μ must take
    the same values at every evaluation, and the two models the same parameters. The batches leave out M
    on some steps (invalid stratum: both penalties vanish)."""
    from ermgap.objectives.cells import loss_gap

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 7, (40,), generator=g)
    attr = torch.tensor([0] * 28 + [1] * 12)
    x[attr == 1] += 1.5  # a gap the penalty has to work against
    stratum = torch.zeros(40, dtype=torch.long)
    train, dev = list(range(0, 40, 2)), list(range(1, 40, 2))
    grid = CellGrid(("eng",), ("F", "M"), torch.tensor([[14.0, 6.0]], dtype=torch.float64))
    knobs = {"init": 0.1, "eta": 4.0, "epsilon": 0.05}
    ref = MinMaxGAP(grid, p=1.0, lam=AdaptiveLambda(LambdaConfig(mode="adaptive", lam_max=3.0, **knobs)))
    ours = ConstrainedERM(grid, ConstrainedConfig(mu_max=3.0, **knobs))
    models = {}
    for name, objective in (("ref", ref), ("ours", ours)):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        values = []
        for step in range(12):
            idx = [train[(step * 5 + j) % len(train)] for j in range(5)]
            opt.zero_grad()
            out = objective(_per_sample(model, x, y, idx), stratum[idx], attr[idx])
            out.total.backward()
            opt.step()
            if step % 3 == 2:
                with torch.no_grad():
                    gap, per = loss_gap(_per_sample(model, x, y, dev), stratum[dev], attr[dev], num_strata=1)
                objective.on_evaluation({"dev_loss_gap": gap, "dev_avg_gap": math.nan,
                                         "dev_loss_gap_eng": float(per[0])}, eval_round=step // 3 + 1)
                values.append(next(iter(objective.log_values().values())))
        models[name] = (model, values)
    (m_ref, lam), (m_ours, mu) = models["ref"], models["ours"]
    assert len(set(lam)) > 2 and max(lam) > knobs["init"], lam  # λ moved: the comparison means something
    assert mu == pytest.approx(lam, abs=1e-12)
    for a, b in zip(m_ref.parameters(), m_ours.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- gloo, 2 and 3 ranks
SETTINGS = {"init": 0.5, "eta": 1.0, "epsilon": 0.1, "mu_max": 1.2}
DEV = _dev(a=0.9, b=0.3, c=0.1)  # no dev gap for d: μ = (1.2 capped, 0.7, 0.5, 0.5)


def _objective():
    grid = CellGrid(tuple("abcd"), ("F", "M"), torch.tensor(TRAIN_COUNTS, dtype=torch.float64))
    return ConstrainedERM(grid, ConstrainedConfig(**SETTINGS))


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import warnings

    start_gloo(rank, world, init_file)
    try:
        x, y, stratum, attr = global_batch()
        objective, model = _objective(), make_model()
        rows = []
        for step, shards in enumerate(step_indices(world)):
            idx = shards[rank]
            if step == 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ErmgapWarning)
                    objective.on_evaluation(DEV, eval_round=1)
            model.zero_grad()
            res = objective(_per_sample(model, x, y, idx), stratum[idx], attr[idx])
            res.total.backward()
            _average_grads(model, world)
            objective.after_step(res)
            rows.append({"grads": [p.grad.detach().clone() for p in model.parameters()], "total": res.total.item(),
                         "mu": list(objective.mu.values)})
        torch.save(rows, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_with_uneven_shards_equal_one_process(world, tmp_path):
    """Shards of 2 and 3 ranks (one rank holds a whole stratum, one rank with 3 is empty), three steps (the
    second with cells absent), the multipliers moved by a dev evaluation before step 2: every rank's loss
    and averaged gradient equal the oracle's on the concatenated batch with the hand-computed μ."""
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    x, y, stratum, attr = global_batch()
    for step, shards in enumerate(step_indices(world)):
        mu = [0.5] * 4 if step == 0 else [1.2, 0.7, 0.5, 0.5]
        idx = [i for r in shards for i in r]
        model = make_model()
        total = oracle_constrained(_per_sample(model, x, y, idx), stratum[idx], attr[idx], mu=mu, num_strata=4)
        total.backward()
        for r, out in enumerate(outs):
            got = out[step]
            assert got["mu"] == pytest.approx(mu, abs=1e-12), (step, r)
            assert got["total"] == pytest.approx(total.item(), abs=1e-12), (step, r)
            for g, ref in zip(got["grads"], (p.grad for p in model.parameters())):
                assert torch.allclose(g, ref, rtol=0, atol=1e-10), (step, r, (g - ref).abs().max())


def test_registered_with_its_keys_and_description():
    from ermgap.config import load_config

    assert OBJECTIVES["constrained"] is ConstrainedERM
    cfg = load_config(None, ["objective.kind=constrained", "objective.constrained.epsilon=0.05",
                             "objective.constrained.mu_max=4"])
    assert cfg.objective.constrained.epsilon == 0.05 and cfg.objective.constrained.mu_max == 4
    assert ConstrainedERM.describe({"objective.kind": "constrained", "objective.constrained.epsilon": "0.05"}) \
        == "Constrained ERM (ε=0.05)"
