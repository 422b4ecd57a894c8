"""How often the gap term has something to measure: group coverage of the global batches, length vs stratified.

For a run config (default configs/tiny.yaml on the demo corpus) builds both batch plans exactly as the
recipe does (`ermgap.sampler.build_plan` over the train split's audio lengths and cells) and counts, over
all steps of the run, each global batch's (stratum, attribute) cells: the share of steps with at least one
valid stratum (every attribute value present), the share of (stratum, step) pairs that are valid, and the
fewest examples of a train cell per step. No model is run: the plans are pure functions of the manifest.
JSON goes to bench/results/batch_coverage.json.

    .venv/bin/python bench/batch_coverage.py [--config configs/tiny.yaml] [--epochs 8] [--min-per-cell 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ermgap.config import load_config  # noqa: E402
from ermgap.data.dataset import UtteranceDataset  # noqa: E402
from ermgap.io import atomic_write_text  # noqa: E402
from ermgap.preflight import resolve_task, run_manifest  # noqa: E402
from ermgap.sampler import build_plan  # noqa: E402


def coverage(cfg, epochs: int) -> dict:
    df = run_manifest(cfg)
    task = resolve_task(cfg, df)
    train = df[df["split"] == "train"].reset_index(drop=True)
    cells = task.cell_codes(train, cfg.data.modality)
    # The recipe's lengths (max_audio_s stays the feature extractor's window there: none here).
    lengths = UtteranceDataset(train, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s).lengths
    workers = cfg.distributed.num_workers
    plan = build_plan(cfg, lengths, cells, num_workers=workers, accum=cfg.grad_accum_steps)
    s, a = len(task.stratum_values), len(task.attribute_values)
    in_train = np.bincount(cells, minlength=s * a).reshape(s, a) > 0
    any_valid, valid, least = [], [], []
    for epoch in range(epochs):
        for gb in plan.global_batches(epoch):
            counts = np.bincount(cells[gb], minlength=s * a).reshape(s, a)
            ok = (counts > 0).all(axis=1)
            any_valid.append(bool(ok.any()))
            valid.append(float(ok.mean()))
            least.append(int(counts[in_train].min()))
    out = {"steps": len(least), "valid_step_share": float(np.mean(any_valid)),
           "valid_stratum_step_share": float(np.mean(valid)), "min_cell_count_mean": float(np.mean(least)),
           "steps_with_a_cell_of_at_most_1": float(np.mean(np.array(least) <= 1))}
    if hasattr(plan, "quotas"):
        names = [f"{x}_{y}" for x in task.stratum_values for y in task.attribute_values]
        out["quotas"] = {names[c]: k for c, k in plan.quotas.items()}
        out["erm_weights"] = {names[c]: round(w, 4) for c, w in plan.importance_weights().items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--min-per-cell", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_coverage.json"))
    args = ap.parse_args()
    result = {"config": args.config, "epochs": args.epochs}
    for sampler in ("length", "stratified"):
        cfg = load_config(args.config, [f"data.sampler={sampler}", f"data.min_per_cell={args.min_per_cell}"])
        result[sampler] = c = coverage(cfg, args.epochs)
        print(f"{sampler:>10}: {c['steps']} steps, with a valid stratum {100 * c['valid_step_share']:.1f} %, "
              f"valid (stratum, step) pairs {100 * c['valid_stratum_step_share']:.1f} %, fewest examples of a "
              f"cell per step {c['min_cell_count_mean']:.2f} on average")
        if "quotas" in c:
            print(f"{'':>10}  quotas per global batch {c['quotas']}; ERM weights {c['erm_weights']}")
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "python": platform.python_version()}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n", force=True)


if __name__ == "__main__":
    main()
