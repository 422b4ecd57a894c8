"""An independent, loop-based ERM-MinMaxGAP for tests: plain Python over examples, no vectorised masks.

Written straight from the paper's definitions so it shares no code (and no tricks) with ermgap.objectives.
"""

from __future__ import annotations

import torch


def oracle_objective(losses, stratum, attribute, *, lam, p, num_strata, num_attrs=2):
    """Return (total tensor with autograd, erm, delta, stratum_gaps list with None for invalid)."""
    strata = [int(s) for s in stratum]
    attrs = [int(a) for a in attribute]
    erm = sum(losses[i] for i in range(len(strata))) / len(strata)
    stratum_gaps, valid_gaps = [], []
    for s in range(num_strata):
        means = []
        for a in range(num_attrs):
            members = [i for i in range(len(strata)) if strata[i] == s and attrs[i] == a]
            if members:
                means.append(sum(losses[i] for i in members) / len(members))
        if len(means) == num_attrs:
            gap = max(means, key=_val) - min(means, key=_val)
            stratum_gaps.append(_val(gap))
            valid_gaps.append(gap)
        else:
            stratum_gaps.append(None)
    delta = max(valid_gaps, key=_val) if valid_gaps else None
    reg = delta ** p if delta is not None and _val(delta) > 0 else 0.0
    total = erm + lam * reg
    return total, _val(erm), _val(delta) if delta is not None else 0.0, stratum_gaps


def _val(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


# ----------------------------------------------------------------------------- the other objective kinds
# Same rules: loops over examples, Python floats for weights, nothing shared with ermgap.objectives.


def _cells(stratum, attribute):
    return [(int(s), int(a)) for s, a in zip(stratum, attribute)]


def oracle_group_means(losses, stratum, attribute):
    """{(s, a): (mean loss tensor, count)} for the cells present in the batch."""
    cells = _cells(stratum, attribute)
    out = {}
    for c in sorted(set(cells)):
        members = [i for i in range(len(cells)) if cells[i] == c]
        out[c] = (sum(losses[i] for i in members) / len(members), len(members))
    return out


def oracle_erm(losses, stratum, attribute):
    return sum(losses[i] for i in range(len(losses))) / len(losses)


def oracle_group_dro_step(q, losses, stratum, attribute, *, eta, size_adjustment, train_counts):
    """One online Group DRO step. q: {(s, a): float} over cells with train examples (modified copy returned).

    Returns (total tensor, new q)."""
    import math

    means = oracle_group_means(losses, stratum, attribute)
    new_q = dict(q)
    for c, (mean, _) in means.items():
        adjusted = _val(mean) + size_adjustment / math.sqrt(train_counts[c[0]][c[1]])
        new_q[c] = new_q[c] * math.exp(eta * adjusted)
    z = sum(new_q.values())
    new_q = {c: v / z for c, v in new_q.items()}
    total = sum(new_q[c] * mean for c, (mean, _) in means.items())
    return total, new_q


def oracle_reweight(losses, stratum, attribute, *, train_counts):
    """Σ_i w_i ℓ_i / B with w = N / (K n_cell) from the train counts."""
    flat = [n for row in train_counts for n in row]
    big_n, k = sum(flat), sum(1 for n in flat if n > 0)
    cells = _cells(stratum, attribute)
    return sum(big_n / (k * train_counts[s][a]) * losses[i] for i, (s, a) in enumerate(cells)) / len(cells)


def oracle_constrained(losses, stratum, attribute, *, mu, num_strata, num_attrs=2):
    """erm + Σ_s μ_s·(max_a mean − min_a mean) over the strata with every attribute value in the batch."""
    means = oracle_group_means(losses, stratum, attribute)
    total = oracle_erm(losses, stratum, attribute)
    for s in range(num_strata):
        group = [means[(s, a)][0] for a in range(num_attrs) if (s, a) in means]
        if len(group) == num_attrs:
            total = total + mu[s] * (max(group, key=_val) - min(group, key=_val))
    return total
