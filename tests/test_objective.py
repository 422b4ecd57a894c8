"""ERM-MinMaxGAP objective, single process: hand-computed cases, a loop-based oracle, edge cases, λ."""

from __future__ import annotations

import json
import math

import pytest
import torch
from objective_oracle import oracle_objective

from ermgap.errors import TrainingError
from ermgap.objectives.cells import group_stats
from ermgap.objectives.cells import loss_gap as dev_gap
from ermgap.objectives.minmaxgap import (
    AdaptiveLambda,
    LambdaConfig,
    avg_metric_gap,
    erm_minmaxgap_loss,
    sample_weights,
)

# 2 languages × 2 genders, order shuffled on purpose.
#   lang 0: F {1.0, 2.0} -> 1.5,  M {4.0} -> 4.0          gap 2.5  (the argmax stratum)
#   lang 1: F {0.5} -> 0.5,       M {1.5, 2.5, 3.5} -> 2.5 gap 2.0
HAND_LOSSES = [2.5, 1.0, 4.0, 0.5, 2.0, 3.5, 1.5]
HAND_STRATUM = [1, 0, 0, 1, 0, 1, 1]
HAND_ATTR = [1, 0, 1, 0, 0, 1, 1]


def _hand():
    losses = torch.tensor(HAND_LOSSES, dtype=torch.float64, requires_grad=True)
    return losses, torch.tensor(HAND_STRATUM), torch.tensor(HAND_ATTR)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_hand_computed_values_and_gradients(p):
    losses, stratum, attr = _hand()
    lam = 0.5
    res = erm_minmaxgap_loss(losses, stratum, attr, lam=lam, p=p, num_strata=2)
    B, delta = 7, 2.5
    assert res.erm == pytest.approx(15.0 / 7)
    assert res.gap == pytest.approx(delta)
    assert res.stratum_gaps.tolist() == pytest.approx([2.5, 2.0])
    assert res.valid.tolist() == [True, True]
    assert res.total.item() == pytest.approx(15.0 / 7 + lam * delta ** p)
    res.total.backward()
    slope = lam * p * delta ** (p - 1)  # d(λΔ^p)/dΔ
    # Only lang 0 members move with the regulariser: F (n=2) pulled down, M (n=1) pushed up.
    expected = [1 / B, 1 / B - slope / 2, 1 / B + slope / 1, 1 / B, 1 / B - slope / 2, 1 / B, 1 / B]
    assert losses.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_group_stats_sums_and_counts():
    losses, stratum, attr = _hand()
    sums, counts = group_stats(losses, stratum, attr, num_strata=3, num_attrs=2)
    assert sums.flatten().tolist() == pytest.approx([3.0, 4.0, 0.5, 7.5, 0.0, 0.0])
    assert counts.tolist() == [[2, 1], [1, 3], [0, 0]]


def _random_case(seed, n, num_strata, num_attrs):
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(n, generator=g, dtype=torch.float64) * 3
    stratum = torch.randint(0, num_strata - 1, (n,), generator=g)  # last stratum: built below
    attr = torch.randint(0, num_attrs, (n,), generator=g)
    # The last stratum has one attribute value only -> invalid.
    stratum[:2] = num_strata - 1
    attr[:2] = 0
    return losses.requires_grad_(True), stratum, attr


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("num_attrs", [2, 3])
def test_matches_loop_oracle_values_and_gradients(p, num_attrs):
    for seed in range(3):
        losses, stratum, attr = _random_case(seed, 40, num_strata=4, num_attrs=num_attrs)
        res = erm_minmaxgap_loss(losses, stratum, attr, lam=1.7, p=p, num_strata=4, num_attrs=num_attrs)
        (grad,) = torch.autograd.grad(res.total, losses)
        ref = losses.detach().clone().requires_grad_(True)
        total, erm, delta, gaps = oracle_objective(ref, stratum, attr, lam=1.7, p=p, num_strata=4,
                                                   num_attrs=num_attrs)
        (ref_grad,) = torch.autograd.grad(total, ref)
        assert res.total.item() == pytest.approx(float(total.detach()), abs=1e-12)
        assert res.erm == pytest.approx(erm) and res.gap == pytest.approx(delta)
        assert [None if math.isnan(v) else pytest.approx(v) for v in res.stratum_gaps.tolist()] == gaps
        assert torch.allclose(grad, ref_grad, atol=1e-12)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_zero_gap_has_finite_subgradient(p):
    # Single valid stratum with identical F/M means: Δ = 0; |x| and x^p (p < 1) must not give inf/NaN.
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    res = erm_minmaxgap_loss(losses, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1]), lam=3.0, p=p,
                             num_strata=1)
    res.total.backward()
    assert res.gap == 0.0
    assert losses.grad.tolist() == pytest.approx([0.25] * 4)


def test_invalid_strata_are_ignored_and_all_invalid_gives_zero_regulariser():
    # stratum 0 valid (gap 1), stratum 1 only F (huge loss), stratum 2 empty.
    losses = torch.tensor([1.0, 2.0, 50.0, 60.0], dtype=torch.float64, requires_grad=True)
    stratum, attr = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 0])
    res = erm_minmaxgap_loss(losses, stratum, attr, lam=1.0, p=2, num_strata=3)
    assert res.gap == pytest.approx(1.0)
    assert res.valid.tolist() == [True, False, False]
    assert res.stratum_gaps[0] == pytest.approx(1.0) and res.stratum_gaps[1:].isnan().all()
    assert res.group_means[2].isnan().all() and res.counts[1].tolist() == [2, 0]

    # No valid stratum at all: regulariser 0 with zero gradient; ERM gradient only.
    only_f = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    res = erm_minmaxgap_loss(only_f, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), lam=10.0, p=0.5,
                             num_strata=3)
    res.total.backward()
    assert res.gap == 0.0 and res.regularizer == 0.0 and not res.valid.any()
    assert res.total.item() == pytest.approx(8.0 / 3)
    assert only_f.grad.tolist() == pytest.approx([1 / 3] * 3)
    assert not torch.isnan(res.total.detach())


def test_nan_and_inf_losses_raise_with_count():
    losses = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.5])
    with pytest.raises(TrainingError, match=r"2 of 5 per-sample losses.*NaN or inf.*\[1, 3\]"):
        erm_minmaxgap_loss(losses, torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 0, 1, 0]),
                           lam=1.0, p=2, num_strata=1)
    with pytest.raises(TrainingError, match="1 of 5"):
        dev_gap(torch.tensor([1.0, 1, 1, 1, -math.inf]), torch.zeros(5, dtype=torch.long),
                torch.tensor([0, 1, 0, 1, 0]), num_strata=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(losses=torch.ones(3), stratum=torch.zeros(2, dtype=torch.long)), "stratum has 2 entries but losses has 3"),
    (dict(losses=torch.ones(3, 1)), "losses must be a 1-D floating tensor"),
    (dict(losses=torch.ones(3, dtype=torch.long)), "losses must be a 1-D floating tensor"),
    (dict(stratum=torch.zeros(3)), "stratum must be a 1-D integer tensor"),
    (dict(attribute=torch.tensor([0, 1, 2])), r"attribute has 1 value\(s\) outside \[0, 1\]: \[2\]"),
    (dict(stratum=torch.tensor([0, -1, 5])), r"stratum has 2 value\(s\) outside \[0, 2\]: \[-1, 5\]"),
    (dict(num_attrs=1), "num_attrs must be an int >= 2"),
    (dict(lam=-1.0), "lam must be a finite number >= 0"),
    (dict(p=0.0), "p must be a finite number > 0"),
    (dict(losses=torch.ones(0), stratum=torch.zeros(0, dtype=torch.long),
          attribute=torch.zeros(0, dtype=torch.long)), "global batch is empty"),
])
def test_programming_errors_are_clear(kwargs, message):
    args = dict(losses=torch.ones(3), stratum=torch.tensor([0, 1, 2]), attribute=torch.tensor([0, 1, 0]),
                lam=1.0, p=2.0, num_strata=3, num_attrs=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        erm_minmaxgap_loss(args.pop("losses"), args.pop("stratum"), args.pop("attribute"), **args)


def test_low_precision_losses_keep_exact_counts():
    # bf16 cannot count past 256 exactly; group math must run in ≥ fp32.
    n = 301
    losses = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    attr = (torch.arange(n) % 2)
    res = erm_minmaxgap_loss(losses, torch.zeros(n, dtype=torch.long), attr, lam=1.0, p=2, num_strata=1)
    assert res.counts.tolist() == [[151, 150]] and res.erm == pytest.approx(1.0)
    res.total.backward()
    assert losses.grad.dtype == torch.bfloat16


def test_dev_gap_and_avg_metric_gap():
    losses, stratum, attr = _hand()
    gap, gaps = dev_gap(losses, stratum, attr, num_strata=3)
    assert gap == pytest.approx(2.5) and gaps[:2].tolist() == pytest.approx([2.5, 2.0]) and gaps[2].isnan()
    gap, gaps = dev_gap(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.tensor([0, 1]), num_strata=2)
    assert gap == 0.0 and gaps.isnan().all()
    assert avg_metric_gap(3.5) == pytest.approx(0.035)
    with pytest.raises(TrainingError, match=r"percentage in \[0, 100\]"):
        avg_metric_gap(float("nan"))


def test_sample_weights_give_exact_effective_batch_gradient_in_two_passes():
    # Micro-batch accumulation: pass 1 (no grad) -> weights from the whole effective batch; pass 2 per
    # micro-batch backward of weights·losses. Oracle: the loop objective on the concatenated batch.
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 7, (24,))
    stratum, attr = torch.randint(0, 3, (24,)), torch.randint(0, 2, (24,))
    chunks = [slice(0, 5), slice(5, 16), slice(16, 24)]

    def per_sample(sl):
        return torch.nn.functional.cross_entropy(model(x[sl]), y[sl], reduction="none")

    with torch.no_grad():
        flat = torch.cat([per_sample(sl) for sl in chunks])
    weights, res = sample_weights(flat, stratum, attr, lam=2.0, p=2, num_strata=3)
    for sl in chunks:
        (weights[sl] * per_sample(sl)).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total, erm, delta, _ = oracle_objective(per_sample(slice(None)), stratum, attr, lam=2.0, p=2, num_strata=3)
    total.backward()
    assert res.erm == pytest.approx(erm) and res.gap == pytest.approx(delta)
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12)


# --------------------------------------------------------------------------- AdaptiveLambda


def test_adaptive_lambda_trajectory_and_clipping():
    lam = AdaptiveLambda(init=1.0, eta=0.5, epsilon=0.02, lam_max=2.0)
    gaps = [0.1, 0.5, 3.0, 0.0, 0.0]
    # Hand: 1 + .5(.08) = 1.04; + .5(.48) = 1.28; + .5(2.98) = 2.77 -> clip 2.0; 2 - .01 = 1.99; 1.98.
    expected = [1.04, 1.28, 2.0, 1.99, 1.98]
    assert [lam.update(g) for g in gaps] == pytest.approx(expected)
    assert lam.value == pytest.approx(1.98)
    assert [h[0] for h in lam.history] == [1, 2, 3, 4, 5]
    assert [h[1] for h in lam.history] == gaps and [h[2] for h in lam.history] == pytest.approx(expected)

    low = AdaptiveLambda(init=0.0, eta=0.5, epsilon=0.02, lam_max=10.0)
    assert low.update(0.0) == 0.0 and low.update(0.01) == 0.0  # below ε from 0: clipped at 0
    assert low.update(0.06) == pytest.approx(0.02)


def test_fixed_mode_never_changes():
    lam = AdaptiveLambda(init=5.0, mode="fixed", lam_max=1.0)  # fixed mode ignores lam_max
    for g in (0.0, 10.0, 0.5):
        assert lam.update(g) == 5.0
    assert [h[2] for h in lam.history] == [5.0, 5.0, 5.0]


def test_state_round_trip_continues_the_same_trajectory():
    gaps = [0.3, 0.01, 0.2, 0.05, 0.4, 0.0]
    straight = AdaptiveLambda(init=0.1, eta=0.7, epsilon=0.03, lam_max=0.5)
    for g in gaps:
        straight.update(g)

    first = AdaptiveLambda(init=0.1, eta=0.7, epsilon=0.03, lam_max=0.5)
    for g in gaps[:3]:
        first.update(g)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = AdaptiveLambda(init=0.1, eta=0.7, epsilon=0.03, lam_max=0.5)
    resumed.load_state_dict(state)
    for g in gaps[3:]:
        resumed.update(g)
    assert resumed.value == straight.value and resumed.history == straight.history

    with pytest.raises(ValueError, match="eta: saved 0.7 vs now 0.5"):
        AdaptiveLambda(init=0.1, eta=0.5, epsilon=0.03, lam_max=0.5).load_state_dict(state)


def test_adaptive_lambda_validation_and_config():
    with pytest.raises(ValueError, match="init .* must not exceed lam_max"):
        AdaptiveLambda(init=2.0, lam_max=1.0)
    with pytest.raises(ValueError, match="eta\n  Input should be greater than or equal to 0"):
        AdaptiveLambda(eta=-0.1)
    with pytest.raises(ValueError, match="mode\n  Input should be 'adaptive' or 'fixed'"):
        AdaptiveLambda(mode="sometimes")
    with pytest.raises(TrainingError, match="dev gap is nan"):
        AdaptiveLambda().update(float("nan"))
    lam = AdaptiveLambda.from_config(LambdaConfig(mode="fixed", init=1.0, eta=0.25))
    assert (lam.mode, lam.value, lam.eta) == ("fixed", 1.0, 0.25)
