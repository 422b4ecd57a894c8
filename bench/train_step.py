"""Training-step benchmark on Ray Train + DeepSpeed (tiny model, synthetic corpus, CPU by default).

Measures, side by side in one run:
1. step time of plain ERM (mean CE, no group statistics) vs ERM-MinMaxGAP (the objective with its
   all-reduce of group sums/counts), alternating step by step in the SAME worker group (goal ≤ 1.02);
2. throughput (utterances/s) with 1 worker vs 2 workers at the same effective batch;
3. for one real `run_training` run: the share of wall time spent outside train/eval steps
   (Ray start-up, worker start, model load, DeepSpeed init, checkpointing, logging; goal < 10 %).

    .venv/bin/python bench/train_step.py [--manifest M] [--model DIR] [--steps 10]

Writes bench/results/train_step.json with the machine description; prints the ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _bench_loop(loop_config: dict) -> None:
    """Ray Train worker: the recipe's setup, then timed optimizer steps, ERM and MinMaxGAP interleaved."""
    import torch

    from ermgap.recipe import LoRARecipe

    recipe = LoRARecipe()
    recipe.setup(loop_config)
    recipe.objective.lam.value = 1.0  # a non-zero λ (MinMaxGAP): the regulariser's backward is part of the step
    steps = recipe.plan.worker_micro_batches(0, recipe.rank)
    loader = iter(recipe._loader(recipe.splits["train"].features, [mb for s in steps for mb in s]))
    batches = [[next(loader) for _ in range(recipe.accum)] for _ in steps]
    n = loop_config["bench_steps"]
    times = {"erm": [], "minmaxgap": []}
    for i in range(2 * n + 2):
        kind = "erm" if i % 2 == 0 else "minmaxgap"
        micro = batches[i % len(batches)]
        if recipe.world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        recipe.optimizer_step(micro, plain_mean=(kind == "erm"))
        if recipe.world > 1:
            torch.distributed.barrier()
        if i >= 2:  # first two steps warm up
            times[kind].append(time.perf_counter() - t0)
    if recipe.rank == 0:
        out = {"times": times, "utterances_per_step": loop_config["config"]["optim"]["effective_batch_size"],
               "setup_s": recipe.timing["setup_s"], "world": recipe.world}
        Path(loop_config["bench_out"]).write_text(json.dumps(out))
    if recipe.logger is not None:
        recipe.logger.end("FINISHED")
    recipe.cleanup()


def _step_run(cfg, workers: int, steps: int, tmp: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ermgap.preflight import resolved_config

    tree = cfg.to_dict()
    tree["distributed"]["num_workers"] = workers
    tree["optim"]["micro_batch_size"] = cfg.optim.effective_batch_size // workers
    from ermgap.config import config_from_dict

    c = resolved_config(config_from_dict(tree))
    out = tmp / f"steps_w{workers}.json"
    loop_config = {"config": c.to_dict(), "run_dir": str(tmp / f"run_w{workers}"), "bench_steps": steps,
                   "bench_out": str(out),
                   "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench",
                              "run_name": f"bench_w{workers}", "parent_run_id": None, "tags": {}}}
    t0 = time.perf_counter()
    TorchTrainer(_bench_loop, train_loop_config=loop_config, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bench_w{workers}", storage_path=str(tmp / "ray"))).fit()
    res = json.loads(out.read_text())
    res["fit_wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/tiny.yaml"))
    ap.add_argument("--manifest", default=None, help="default: the config's (generate data/synth first)")
    ap.add_argument("--model", default=None, help="default: the config's (build models/tiny first)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per objective")
    ap.add_argument("--effective-batch", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench/results/train_step.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from ermgap.config import load_config
    from ermgap.driver import run_training
    from ermgap.ray_runtime import ensure_ray

    paths = ([f"data.manifest={args.manifest}"] if args.manifest else []) + \
        ([f"model.name_or_path={args.model}"] if args.model else [])
    overrides = [f"optim.effective_batch_size={args.effective_batch}", "optim.micro_batch_size=8",
                 "distributed.num_workers=2", "lambda.mode=fixed", "lambda.init=1.0", *paths]
    cfg = load_config(args.config, overrides)

    t_ray = time.perf_counter()
    ensure_ray(num_cpus=os.cpu_count())
    ray_start_s = time.perf_counter() - t_ray
    with tempfile.TemporaryDirectory(prefix="ermgap-bench-") as tmp_s:
        tmp = Path(tmp_s)
        runs = {w: _step_run(cfg, w, args.steps, tmp) for w in (1, 2)}
        # A real, short training run for the wall-time breakdown.
        real_cfg = load_config(args.config, [
            f"optim.effective_batch_size={args.effective_batch}", "optim.micro_batch_size=4",
            "distributed.num_workers=2", "optim.epochs=2", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"tracking.storage_path={tmp}/runs", *paths])
        t0 = time.perf_counter()
        final = run_training(real_cfg, run_dir=tmp / "runs" / "real")
        wall = time.perf_counter() - t0
    timing = final["timing"]
    inside = timing["train_s"] + timing["eval_s"]

    w2 = runs[2]["times"]
    erm_med, mmg_med = statistics.median(w2["erm"]), statistics.median(w2["minmaxgap"])
    thr = {w: runs[w]["utterances_per_step"] / statistics.median(runs[w]["times"]["minmaxgap"]) for w in (1, 2)}
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
                    "processor": platform.processor()},
        "setup": {"config": args.config, "effective_batch": args.effective_batch, "timed_steps": args.steps,
                  "model": cfg.model.name_or_path, "zero_stage": cfg.distributed.zero_stage},
        "step_time_s": {"erm_median": erm_med, "minmaxgap_median": mmg_med, "erm_all": w2["erm"],
                        "minmaxgap_all": w2["minmaxgap"]},
        "throughput_utt_per_s": {"1_worker": thr[1], "2_workers": thr[2], "speedup": thr[2] / thr[1]},
        "real_run": {"wall_s": wall, "ray_start_s": ray_start_s, **timing,
                     "share_outside_train_eval": 1.0 - inside / wall, "steps": final["step"],
                     "evaluations": final["eval_round"]},
        # Medians are what the goal refers to; minima are less sensitive to other processes on a shared machine.
        "ratio_minmaxgap_over_erm_min": min(w2["minmaxgap"]) / min(w2["erm"]),
        "load_average_1min": os.getloadavg()[0],
        "ratio_minmaxgap_over_erm": mmg_med / erm_med,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"throughput: 1 worker {thr[1]:.1f} utt/s, 2 workers {thr[2]:.1f} utt/s (×{thr[2] / thr[1]:.2f})")
    print(f"real run: {wall:.1f} s wall, {inside:.1f} s in train/eval steps, "
          f"{100 * (1 - inside / wall):.0f} % outside (setup {timing['setup_s']:.1f} s, "
          f"checkpoints {timing['checkpoint_s']:.1f} s)")
    print(f"step time ERM {1000 * erm_med:.1f} ms, ERM-MinMaxGAP {1000 * mmg_med:.1f} ms (2 workers, medians); "
          f"ratio of minima {min(w2['minmaxgap']) / min(w2['erm']):.3f}; load average {os.getloadavg()[0]:.1f}")
    print(f"ratio ERM-MinMaxGAP / ERM step time: {mmg_med / erm_med:.3f}")


if __name__ == "__main__":
    main()
