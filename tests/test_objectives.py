"""The objective interface (ermgap.objectives), single process: each kind against a loop oracle (values and
gradients w.r.t. the per-sample losses), Group DRO's q trajectory by hand, state round trips, config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from objective_oracle import oracle_erm, oracle_group_dro_step, oracle_objective, oracle_reweight

from ermgap.config import OBJECTIVE_KINDS, load_config
from ermgap.errors import ConfigError, TrainingError
from ermgap.objectives.minmaxgap import AdaptiveLambda, erm_minmaxgap_loss
from ermgap.objectives import OBJECTIVES, ERM, CellGrid, GroupDRO, MinMaxGAP, Reweight, build_objective

STRATA, ATTRS = ("a", "b", "c"), ("F", "M")
# Train counts: unbalanced, and cell c_M has no train examples at all.
TRAIN = [[12, 3], [5, 9], [6, 0]]


def _grid(train=TRAIN):
    return CellGrid(STRATA, ATTRS, torch.tensor(train, dtype=torch.float64))


def _batch(seed, n=30):
    g = torch.Generator().manual_seed(seed)
    stratum = torch.randint(0, 3, (n,), generator=g)
    attr = torch.randint(0, 2, (n,), generator=g)
    attr[stratum == 2] = 0  # never c_M (no train data)
    losses = (torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    return losses, stratum, attr


def _grad(total, losses):
    (g,) = torch.autograd.grad(total, losses, retain_graph=True)
    return g


def test_registry_matches_config_kinds_and_builds_each():
    assert set(OBJECTIVES) == set(OBJECTIVE_KINDS)
    for kind in OBJECTIVE_KINDS:
        obj = build_objective(load_config(None, [f"objective.kind={kind}"]), _grid())
        assert type(obj) is OBJECTIVES[kind] and obj.kind == kind
    assert load_config(None).objective.kind == "minmaxgap"  # the paper's objective stays the default


def test_erm_matches_oracle_and_fixed_zero_lambda():
    erm = ERM(_grid())
    fixed0 = build_objective(load_config(None, ["lambda.mode=fixed", "lambda.init=0"]), _grid())
    for seed in range(3):
        losses, stratum, attr = _batch(seed)
        out = erm(losses, stratum, attr)
        ref = oracle_erm(losses, stratum, attr)
        assert out.total.item() == pytest.approx(ref.item(), abs=1e-12)
        assert torch.allclose(_grad(out.total, losses), _grad(ref, losses), atol=1e-14)
        # `lambda.mode=fixed lambda.init=0` still means ERM: the same loss and gradient.
        out0 = fixed0(losses, stratum, attr)
        assert out0.total.item() == pytest.approx(out.total.item(), abs=1e-14)
        assert torch.allclose(_grad(out0.total, losses), _grad(out.total, losses), atol=1e-14)


def test_minmaxgap_keeps_todays_numbers_and_lambda_trajectory():
    cfg = load_config(None, ["objective.p=2", "lambda.init=0.7", "lambda.eta=0.5"])
    obj = build_objective(cfg, _grid())
    lam = AdaptiveLambda.from_config(cfg.lam)
    for seed, dev in zip(range(3), (0.3, 0.01, 0.5)):
        losses, stratum, attr = _batch(seed)
        out = obj(losses, stratum, attr)
        direct = erm_minmaxgap_loss(losses, stratum, attr, lam=lam.value, p=2.0, num_strata=3)
        assert torch.equal(out.total, direct.total) and out.gap == direct.gap and out.erm == direct.erm
        assert torch.equal(_grad(out.total, losses), _grad(direct.total, losses))
        total, erm, delta, _ = oracle_objective(losses, stratum, attr, lam=lam.value, p=2.0, num_strata=3)
        assert out.total.item() == pytest.approx(total.item(), abs=1e-12)
        assert out.logs == {"lambda": lam.value}
        obj.after_step(out)
        obj.after_eval(dev)
        lam.update(dev)
        assert obj.log_values() == {"lambda": lam.value}
    assert obj.lam.history == lam.history


def test_reweight_matches_oracle_and_has_mean_one_over_train():
    obj = Reweight(_grid())
    n = torch.tensor(TRAIN, dtype=torch.float64)
    # Mean weight over the train split is 1; each cell with data carries the same total weight N/K.
    assert float((obj.weights * n).sum() / n.sum()) == pytest.approx(1.0)
    assert (obj.weights * n)[n > 0].tolist() == pytest.approx([35 / 5] * 5)
    assert obj.weights[2, 1] == 0
    for seed in range(3):
        losses, stratum, attr = _batch(seed)
        out = obj(losses, stratum, attr)
        ref = oracle_reweight(losses, stratum, attr, train_counts=TRAIN)
        assert out.total.item() == pytest.approx(ref.item(), abs=1e-12)
        assert torch.allclose(_grad(out.total, losses), _grad(ref, losses), atol=1e-14)
        assert out.erm == pytest.approx(oracle_erm(losses, stratum, attr).item())  # logged like every kind


def test_group_dro_matches_oracle_over_steps():
    obj = GroupDRO(_grid(), eta=0.3, size_adjustment=2.0)
    q = {(s, a): 1 / 5 for s in range(3) for a in range(2) if TRAIN[s][a]}
    for seed in range(4):
        losses, stratum, attr = _batch(seed, n=12)  # small batches: some cells absent in some steps
        out = obj(losses, stratum, attr)
        ref, q = oracle_group_dro_step(q, losses, stratum, attr, eta=0.3, size_adjustment=2.0, train_counts=TRAIN)
        assert out.total.item() == pytest.approx(ref.item(), abs=1e-12)
        assert torch.allclose(_grad(out.total, losses), _grad(ref, losses), atol=1e-14)
        obj.after_step(out)
        assert obj.q.flatten().tolist() == pytest.approx([q.get((s, a), 0.0) for s in range(3) for a in range(2)],
                                                         abs=1e-14)
    assert obj.steps == 4


def test_group_dro_q_trajectory_by_hand():
    # 2 strata × F/M; cell b_M has no train data (q stays 0). η = 0.5, C = 1, train n = [[4, 1], [2, 0]].
    obj = GroupDRO(CellGrid(("a", "b"), ATTRS, torch.tensor([[4.0, 1.0], [2.0, 0.0]])), eta=0.5, size_adjustment=1.0)
    e = math.exp
    steps = [
        # batch 1: a_F {1, 3} mean 2 (+1/√4), a_M {0.5} (+1/√1); b_F absent -> factor 1.
        ([1.0, 3.0, 0.5], [0, 0, 0], [0, 0, 1]),
        # batch 2: b_F {2, 4} mean 3 (+1/√2) only.
        ([2.0, 4.0], [1, 1], [0, 0]),
        # batch 3: a_M {1} (+1), b_F {0} (+1/√2).
        ([1.0, 0.0], [0, 1], [1, 0]),
    ]
    u1 = [e(0.5 * 2.5) / 3, e(0.5 * 1.5) / 3, 1 / 3]
    q1 = [v / sum(u1) for v in u1]
    u2 = [q1[0], q1[1], q1[2] * e(0.5 * (3 + 1 / math.sqrt(2)))]
    q2 = [v / sum(u2) for v in u2]
    u3 = [q2[0], q2[1] * e(0.5 * 2.0), q2[2] * e(0.5 * (1 / math.sqrt(2)))]
    q3 = [v / sum(u3) for v in u3]
    expected_q = [q1, q2, q3]
    expected_total = [q1[0] * 2 + q1[1] * 0.5, q2[2] * 3, q3[1] * 1 + q3[2] * 0]
    # d total / d ℓ_i = q_cell / n_cell-in-batch (the updated q of that step).
    expected_grad = [[q1[0] / 2, q1[0] / 2, q1[1]], [q2[2] / 2, q2[2] / 2], [q3[1], q3[2]]]
    for (ls, st, at), q, total, grad in zip(steps, expected_q, expected_total, expected_grad):
        losses = torch.tensor(ls, dtype=torch.float64, requires_grad=True)
        out = obj(losses, torch.tensor(st), torch.tensor(at))
        assert out.total.item() == pytest.approx(total, abs=1e-12)
        assert _grad(out.total, losses).tolist() == pytest.approx(grad, abs=1e-12)
        obj.after_step(out)
        assert obj.q.flatten().tolist() == pytest.approx([q[0], q[1], q[2], 0.0], abs=1e-12)
        assert out.logs == pytest.approx({"q_a_F": q[0], "q_a_M": q[1], "q_b_F": q[2], "q_b_M": 0.0}, abs=1e-12)


def test_group_dro_call_is_pure_until_after_step():
    obj = GroupDRO(_grid(), eta=1.0)
    before = obj.q.clone()
    losses, stratum, attr = _batch(0)
    a, b = obj(losses, stratum, attr), obj(losses, stratum, attr)
    assert torch.equal(obj.q, before) and a.total.item() == b.total.item()


def test_group_dro_resume_continues_the_same_q_trajectory():
    batches = [_batch(s, n=10) for s in range(6)]
    straight = GroupDRO(_grid(), eta=0.2, size_adjustment=0.5)
    for b in batches:
        straight.after_step(straight(*b))

    first = GroupDRO(_grid(), eta=0.2, size_adjustment=0.5)
    for b in batches[:3]:
        first.after_step(first(*b))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = GroupDRO(_grid(), eta=0.2, size_adjustment=0.5)
    resumed.load_state_dict(state)
    for b in batches[3:]:
        resumed.after_step(resumed(*b))
    assert torch.equal(resumed.q, straight.q) and resumed.steps == straight.steps == 6

    with pytest.raises(ValueError, match="eta: saved 0.2 vs now 0.3"):
        GroupDRO(_grid(), eta=0.3, size_adjustment=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by kind 'group_dro', this run is 'reweight'"):
        Reweight(_grid()).load_state_dict(state)
    with pytest.raises(ValueError, match="other train cell counts"):
        GroupDRO(_grid([[1, 1], [1, 1], [1, 0]]), eta=0.2, size_adjustment=0.5).load_state_dict(state)


def test_minmaxgap_state_round_trip_through_interface():
    cfg = load_config(None, ["lambda.init=0.2"])
    obj = build_objective(cfg, _grid())
    for g in (0.4, 0.1):
        obj.after_eval(g)
    resumed = build_objective(cfg, _grid())
    resumed.load_state_dict(json.loads(json.dumps(obj.state_dict())))
    assert resumed.lam.value == obj.lam.value and resumed.lam.history == obj.lam.history
    with pytest.raises(ValueError, match="p: saved 2.0 vs now 1.0"):
        build_objective(load_config(None, ["lambda.init=0.2", "objective.p=1"]), _grid()).load_state_dict(
            obj.state_dict())


@pytest.mark.parametrize("kind", OBJECTIVE_KINDS)
def test_every_kind_refuses_non_finite_losses(kind):
    obj = build_objective(load_config(None, [f"objective.kind={kind}"]), _grid())
    losses = torch.tensor([1.0, math.nan, 2.0])
    obj.module(4)  # a kind with its own head (hidden width 4) reads hidden states of the forward pass
    inputs = {name: torch.randn(3, 4) for name in obj.forward_inputs}
    with pytest.raises(TrainingError, match="1 of 3 per-sample losses"):
        obj(losses, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), inputs=inputs)


@pytest.mark.parametrize("cls", [GroupDRO, Reweight])
def test_cells_without_train_data_are_refused(cls):
    obj = cls(_grid(), eta=0.1) if cls is GroupDRO else cls(_grid())
    with pytest.raises(ValueError, match=r"cells \['c_M'\], which have no train examples"):
        obj(torch.ones(2), torch.tensor([2, 2]), torch.tensor([0, 1]))


def test_cell_grid_counts_and_validation():
    grid = CellGrid.count(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 0, 0, 0]),
                          strata=STRATA, attributes=ATTRS)
    assert grid.train_counts.tolist() == [[1, 1], [0, 1], [3, 0]]
    assert grid.cell_names() == ["a_F", "a_M", "b_F", "b_M", "c_F", "c_M"]
    with pytest.raises(ValueError, match="expected \\[3 strata, 2 attributes\\]"):
        CellGrid(STRATA, ATTRS, torch.ones(2, 2))
    with pytest.raises(ValueError, match="all 0"):
        CellGrid(STRATA, ATTRS, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        GroupDRO(grid, eta=0.0)


def test_config_keys_and_errors():
    cfg = load_config(None, ["objective.kind=group_dro", "objective.group_dro.eta=0.05",
                             "objective.group_dro.size_adjustment=2"])
    assert (cfg.objective.kind, cfg.objective.group_dro.eta, cfg.objective.group_dro.size_adjustment) == \
        ("group_dro", 0.05, 2.0)
    with pytest.raises(ConfigError, match="objective.kind: Input should be 'erm', 'minmaxgap', 'group_dro', .* or"):
        load_config(None, ["objective.kind=dro"])
    with pytest.raises(ConfigError, match="objective.group_dro.size_adjustment"):
        load_config(None, ["objective.group_dro.size_adjustment=-1"])
    with pytest.raises(ConfigError, match="objective.group_dro.step: unknown key"):
        load_config(None, ["objective.group_dro.step=1"])
