"""An independent, loop-based ERM-MinMaxGAP for tests: plain Python over examples, no vectorised masks.

Written straight from the paper's definitions so it shares no code (and no tricks) with ermgap.objective.
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
