"""Cost of the ERM-MinMaxGAP objective vs plain mean cross-entropy, measured side by side (CPU).

A small transformer classifier step (batch 64, 3 language strata × 2 genders): forward, per-sample CE,
loss (mean vs ERM-MinMaxGAP with p = 2), backward. Repetitions are interleaved (A/B order alternating);
timed in process CPU time with one torch thread (robust on a shared machine; wall-clock medians are
reported too) and the ratio is the median of per-pair ratios. Also the isolated objective overhead (loss + backward on a [64] loss vector)
in microseconds, without and with a 1-rank gloo group (the all-reduce seam's call overhead; multi-rank
network latency is not measured here). Prints the step-time ratio LAST; JSON goes to
bench/results/objective.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ermgap.io import atomic_write_text
from ermgap.objectives.minmaxgap import erm_minmaxgap_loss

BATCH, NUM_STRATA, NUM_CLASSES = 64, 3, 7


class TinyClassifier(torch.nn.Module):
    """Token ids [B, T] -> logits [B, 7]: embedding, 2 transformer layers, mean pool, linear head."""

    def __init__(self, vocab=1000, d=128, layers=2, heads=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(d, NUM_CLASSES)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(dim=1))


def _timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def side_by_side(a, b, reps: int, warmup: int = 5, clock=time.process_time) -> tuple[list[float], list[float]]:
    """Interleave a and b (alternating which goes first) to share drift and background load fairly.

    Default clock: this process's CPU time. With one torch thread it ignores time spent preempted by
    other processes, which dominates wall time on a shared 2-core machine.
    """
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(reps):
        if i % 2:
            tb.append(_timed(b, clock))
            ta.append(_timed(a, clock))
        else:
            ta.append(_timed(a, clock))
            tb.append(_timed(b, clock))
    return ta, tb


def paired_ratio(ta: list[float], tb: list[float]) -> float:
    """Median over repetitions of b/a from the same (adjacent) pair: robust to slow drift in load."""
    return statistics.median(b / a for a, b in zip(ta, tb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--reps", type=int, default=100, help="interleaved repetitions of the model step")
    ap.add_argument("--iso-reps", type=int, default=1000, help="repetitions of the isolated objective")
    ap.add_argument("--seq", type=int, default=32, help="tokens per example")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "objective.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    stratum = torch.randint(0, NUM_STRATA, (BATCH,), generator=g)
    attribute = torch.randint(0, 2, (BATCH,), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    ids = torch.randint(0, 1000, (BATCH, args.seq), generator=g)

    # Isolated objective: loss + backward on a leaf loss vector (what the objective adds per step).
    leaf = (torch.rand(BATCH, generator=g) * 2).requires_grad_(True)

    def iso_mean():
        leaf.mean().backward()

    def iso_objective():
        erm_minmaxgap_loss(leaf, stratum, attribute, lam=1.0, p=2.0, num_strata=NUM_STRATA).total.backward()

    def iso_overhead_us() -> dict:
        t_mean, t_obj = side_by_side(iso_mean, iso_objective, args.iso_reps, warmup=50)
        m, o = statistics.median(t_mean), statistics.median(t_obj)
        return {"mean_loss_us": m * 1e6, "objective_us": o * 1e6, "overhead_us": (o - m) * 1e6}

    iso_local = iso_overhead_us()

    # From here on a 1-rank gloo group is up, so the objective takes its all-reduce path like in training.
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            iso_gloo = iso_overhead_us()
            model = TinyClassifier()

            def step(objective: bool):
                model.zero_grad(set_to_none=True)
                losses = F.cross_entropy(model(ids), labels, reduction="none")
                if objective:
                    loss = erm_minmaxgap_loss(losses, stratum, attribute, lam=1.0, p=2.0,
                                              num_strata=NUM_STRATA).total
                else:
                    loss = losses.mean()
                loss.backward()

            t_ce, t_obj = side_by_side(lambda: step(False), lambda: step(True), args.reps)
            w_ce, w_obj = side_by_side(lambda: step(False), lambda: step(True), args.reps // 2,
                                       clock=time.perf_counter)
        finally:
            dist.destroy_process_group()

    ce_ms, obj_ms = statistics.median(t_ce) * 1e3, statistics.median(t_obj) * 1e3
    wall_ce_ms, wall_obj_ms = statistics.median(w_ce) * 1e3, statistics.median(w_obj) * 1e3
    ratio = paired_ratio(t_ce, t_obj)
    # What the isolated overhead predicts for this step (a cross-check of the noisy paired ratio).
    predicted = (ce_ms + iso_gloo["overhead_us"] / 1e3) / ce_ms
    result = {
        "benchmark": "objective",
        "setup": {"batch": BATCH, "num_strata": NUM_STRATA, "num_attrs": 2, "seq": args.seq, "p": 2.0,
                  "model": "TinyClassifier(d=128, 2 layers, 4 heads)",
                  "params": sum(p.numel() for p in model.parameters()), "reps": args.reps,
                  "iso_reps": args.iso_reps, "torch_threads": torch.get_num_threads()},
        "clock": "process CPU time (1 torch thread) unless marked wall",
        "step_ms": {"mean_ce": ce_ms, "erm_minmaxgap": obj_ms},
        "step_wall_ms": {"mean_ce": wall_ce_ms, "erm_minmaxgap": wall_obj_ms, "reps": args.reps // 2},
        "ratio_step_wall_medians": wall_obj_ms / wall_ce_ms,
        "ratio_step_predicted_from_isolated_overhead": predicted,
        "isolated_no_dist": iso_local,
        "isolated_gloo_1rank": iso_gloo,
        "ratio_step_erm_minmaxgap_over_mean_ce": ratio,  # median of paired CPU-time ratios
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "loadavg_1m": os.getloadavg()[0]},
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n", force=True)

    print(f"model step (batch {BATCH}, CPU-time median of {args.reps}): mean CE {ce_ms:.2f} ms, "
          f"ERM-MinMaxGAP {obj_ms:.2f} ms")
    print(f"model step wall-clock medians: mean CE {wall_ce_ms:.2f} ms, ERM-MinMaxGAP {wall_obj_ms:.2f} ms "
          f"(ratio {wall_obj_ms / wall_ce_ms:.3f}; load avg {os.getloadavg()[0]:.1f})")
    for name, iso in (("no dist", iso_local), ("gloo 1 rank", iso_gloo)):
        print(f"isolated objective ({name}): {iso['objective_us']:.0f} us vs mean {iso['mean_loss_us']:.0f} us "
              f"-> overhead {iso['overhead_us']:.0f} us")
    print(f"wrote {args.out}")
    print(f"predicted step ratio from isolated overhead: {predicted:.4f}")
    print(f"ratio ERM-MinMaxGAP / mean-CE step time (median paired, CPU time): {ratio:.3f}")


if __name__ == "__main__":
    main()
