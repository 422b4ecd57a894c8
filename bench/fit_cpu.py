"""Where the CPU of one training run goes, process by process, on a Ray cluster that is already running.

The test suite is made of short end-to-end runs on its session cluster; on 2 cores their CPU, not their waits,
sets the suite's length (bench/suite_cpu.py). This bench starts a local cluster as the suite does (ensure_ray,
2 CPUs), lets it settle, then runs `run_training` on the suite's smallest slice (4 train / 2 dev / 2 test rows
per language × gender: tests/_runs.py's schedule, 2 epochs of 3 steps) `--runs` times,
sampling every process on the machine with psutil every 0.2 s. For each run: its wall time and the CPU-seconds
each kind of process spent in it (Ray's actors by their class, the driver, Ray's daemons). The first run also
pays the cluster's one-off actors; the later ones are what a test pays.

    .venv/bin/python bench/fit_cpu.py [--workers 1] [--runs 2]

Needs data/synth and models/tiny-pretrained (`ermgap data synth --out data/synth`, `ermgap model tiny --pretrain
--out models/tiny-pretrained`). JSON in bench/results/fit_cpu.json (with the machine and its load).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
from fixed_cost import role  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
# What `role` calls a worker process before an actor takes it and retitles it ("ray::<Class>.<method>").
UNTAKEN = frozenset({"setup_worker.py", "default_worker.py", "ray::IDLE"})


def kind(proc: psutil.Process) -> str:
    """A process's kind as bench/fixed_cost.py names it (`role`), an actor by its class: the title of an actor's
    process names the method it runs now ("ray::TrainController.run")."""
    name = role(proc, psutil.Process())
    return name.split(".")[0] if name.startswith("ray::") else name


class Sampler(threading.Thread):
    """The last seen CPU-seconds of every process ((pid, start time) → [role, cpu])."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every, self.seen, self.stop = every, {}, threading.Event()

    def snapshot(self) -> dict:
        return {k: v[1] for k, v in list(self.seen.items())}

    def run(self) -> None:
        while not self.stop.is_set():
            for p in psutil.process_iter():
                try:
                    key, t = (p.pid, p.create_time()), p.cpu_times()
                    entry = self.seen.setdefault(key, [None, 0.0])
                    entry[1] = t.user + t.system
                    if entry[0] is None or entry[0] in UNTAKEN:
                        entry[0] = kind(p)
                except psutil.Error:
                    continue
            time.sleep(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--manifest", type=Path, default=ROOT / "data" / "synth" / "manifest.csv")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-pretrained")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fit_cpu.json")
    args = ap.parse_args()
    # The suite's environment (tests/conftest.py): one BLAS thread, Ray Train's half-second poll.
    for key, value in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT / "tests"))
    from _runs import small_slice, train_overrides
    from rich.console import Console

    from ermgap.config import load_config
    from ermgap.driver import run_training
    from ermgap.ray_runtime import ensure_ray, shutdown_ray

    load_before = os.getloadavg()
    sampler = Sampler()
    sampler.start()
    ensure_ray(None, num_cpus=2, log_to_driver=False)
    time.sleep(5)  # the cluster's start-up work (dashboard modules, idle workers) is not a run's
    runs = []
    with tempfile.TemporaryDirectory(prefix="fit_cpu_") as tmp:
        root = Path(tmp)
        manifest = small_slice(args.manifest.resolve(), root / "manifest.csv", train=4, held_out=2)
        overrides = train_overrides(manifest, args.model.resolve(), root)
        overrides += [f"distributed.num_workers={args.workers}"]
        for i in range(args.runs):
            before, t0 = sampler.snapshot(), time.monotonic()
            run_training(load_config(None, overrides), run_dir=root / "runs" / f"run{i}",
                         console=Console(file=io.StringIO()))
            time.sleep(1.0)  # the worker group's processes end after fit() returns
            wall = time.monotonic() - t0
            by_role: dict[str, float] = defaultdict(float)
            processes: dict[str, int] = defaultdict(int)
            for key, (kind, cpu) in list(sampler.seen.items()):
                spent = cpu - before.get(key, 0.0)
                if spent > 0.02:
                    by_role[kind] += spent
                    processes[kind] += key not in before
            rows = sorted(by_role.items(), key=lambda kv: -kv[1])
            runs.append({"run": i + 1, "wall_s": round(wall, 2), "cpu_s": round(sum(by_role.values()), 2),
                         "by_process": {k: {"cpu_s": round(v, 2), "new_processes": processes[k]} for k, v in rows}})
    sampler.stop.set()
    shutdown_ray()
    result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                          "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
              "job": {"workers": args.workers, "steps": 6, "manifest_rows": "24 / 12 / 12"}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"run {r['run']}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s")
        for kind, row in r["by_process"].items():
            print(f"  {row['cpu_s']:6.2f}  {kind} ({row['new_processes']} new)")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
