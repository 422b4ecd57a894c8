"""A small comparison sweep as a benchmark: where a sweep's wall time goes, and ASHA vs the full grid.

Runs sweeps/synth_lm.yaml twice on a local Ray cluster, side by side in one process: the full grid,
then the same grid with ASHA on dev W-F1. Reports
- the share of the sweep's CPU-slot time spent inside train/eval steps (goal ≥ 90 %), from each
  finished run's own timing (metrics.json: train_s, eval_s);
- Ray start-up (s) and the per-trial overhead (s): slot time not spent in train/eval steps, per trial;
- ASHA vs full grid: trial-seconds used (Tune's time_total_s summed over trials) and the best dev
  W-F1 reached (goal: same best with ≤ 40 % compute);
- how many evaluations an ASHA-stopped trial still logged after Tune's stop decision.
JSON in bench/results/sweep.json; the ASHA/full compute ratio is printed last.

    .venv/bin/python bench/sweep.py [--epochs N] [--grace 2]
(needs data/synth and models/tiny-pretrained: `ermgap data synth --out data/synth` and
`ermgap model tiny --pretrain --out models/tiny-pretrained`.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ermgap.sweep import run_sweep  # noqa: E402
from ermgap.sweep.spec import load_sweep_spec  # noqa: E402


def _timing(out) -> dict:
    board = out.leaderboard
    useful, per_trial = 0.0, []
    for _, row in board.iterrows():
        f = out.root / "runs" / row["trial"] / "metrics.json"
        if f.is_file():
            t = json.loads(f.read_text())["timing"]
            useful += t["train_s"] + t["eval_s"]
            per_trial.append({"trial": row["trial"], **t})
    return {"useful_s": useful, "per_trial": per_trial}


def _evals_after_stop(out) -> list[int]:
    """For each stopped trial: dev evaluations its run logged beyond the round Tune saw last."""
    from mlflow import MlflowClient

    client = MlflowClient(out.tracking_uri)
    extra = []
    for _, row in out.leaderboard[out.leaderboard["status"] == "stopped"].iterrows():
        logged = len(client.get_metric_history(row["mlflow_run_id"], "eval/dev_w_f1")) if row["mlflow_run_id"] else 0
        extra.append(int(logged - (row["eval_rounds"] or 0)))
    return extra


def run(label: str, overrides: list[str], store: Path) -> dict:
    spec = load_sweep_spec(ROOT / "sweeps" / "synth_lm.yaml",
                           [f"name=bench_{label}", f"storage_path={store / 'sweeps'}",
                            f"mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}", *overrides])
    slots = spec.model.max_concurrent_trials or 1
    t0 = time.perf_counter()
    out = run_sweep(spec, force=True)
    wall = time.perf_counter() - t0
    timing = _timing(out)
    board = out.leaderboard
    n = len(board)
    slot_s = (wall - out.ray_start_s) * slots
    # Only finished runs write their step timing (metrics.json); a sweep with stopped trials would
    # count their steps as overhead, so its share is not reported.
    complete = len(timing["per_trial"]) == n
    return {
        "label": label, "overrides": overrides, "trials": n, "concurrency": slots, "wall_s": wall,
        "ray_start_s": out.ray_start_s, "train_eval_s": timing["useful_s"],
        "share_in_train_eval": timing["useful_s"] / slot_s if slot_s and complete else None,
        "overhead_per_trial_s": (slot_s - timing["useful_s"]) / n if n and complete else None,
        "trial_seconds": float(board["trial_s"].fillna(0).sum()),
        "best_dev_w_f1": float(board["dev_w_f1"].max()),
        "stopped": int((board["status"] == "stopped").sum()),
        "evals_after_stop": _evals_after_stop(out),
        "per_trial": timing["per_trial"],
        "leaderboard": board.drop(columns=["mlflow_run_id"]).to_dict(orient="records"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="Override the spec's epochs (default: the spec's).")
    ap.add_argument("--grace", type=int, default=2, help="ASHA grace period in evaluations.")
    args = ap.parse_args()
    import torch

    common = [f"base.optim.epochs={args.epochs}"] if args.epochs else []
    epochs = args.epochs or load_sweep_spec(ROOT / "sweeps" / "synth_lm.yaml").trial_config({"variant": "erm"}).optim.epochs
    asha = (f"scheduler={{type: asha, metric: dev_w_f1, mode: max, grace_period: {args.grace}, "
            f"reduction_factor: 2, max_t: {epochs}}}")
    with tempfile.TemporaryDirectory(prefix="ermgap-bench-sweep-") as tmp:
        full = run("full", common, Path(tmp))
        with_asha = run("asha", [*common, asha], Path(tmp))
    ratio = with_asha["trial_seconds"] / full["trial_seconds"]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "full": full, "asha": with_asha, "asha_over_full_compute": ratio,
        "same_best": abs(with_asha["best_dev_w_f1"] - full["best_dev_w_f1"]) < 1e-9,
    }
    out = ROOT / "bench" / "results" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp_out, out)
    for r in (full, with_asha):
        share = "n/a (stopped trials record no step timing)" if r["share_in_train_eval"] is None else \
            f"{100 * r['share_in_train_eval']:.0f} % of slot time, overhead/trial {r['overhead_per_trial_s']:.0f} s"
        print(f"{r['label']:>5}: {r['trials']} trials, wall {r['wall_s']:.0f} s, Ray start {r['ray_start_s']:.1f} s, "
              f"in train/eval steps {share}, trial-seconds {r['trial_seconds']:.0f}, best dev W-F1 "
              f"{r['best_dev_w_f1']:.2f}, stopped {r['stopped']} (evals after stop: {r['evals_after_stop']})")
    print(f"ASHA/full compute ratio: {ratio:.2f} (best dev W-F1 {with_asha['best_dev_w_f1']:.2f} vs "
          f"{full['best_dev_w_f1']:.2f})")


if __name__ == "__main__":
    main()
