"""A run's fixed cost: where the seconds of one `ermgap train` process go besides training and evaluating.

The job (the issue's comparison job): the pretrained tiny Qwen2-Audio with LoRA on its language model (encoder
frozen), the default synthetic corpus's 546 train utterances, 3 epochs of micro-batch 4 × accumulation 4 on one Ray Train
worker, dev evaluated every epoch, dev and test predictions at the end. Each variant is a real `ermgap train`
process (the CLI, starting its own local Ray cluster, MLflow on sqlite) timed from outside and from inside:

- from inside, by bench/fixed_cost_trace/sitecustomize.py on PYTHONPATH: every process of the run (driver, Ray's
  processes, the Train worker) logs its start, a few heavy imports and entry/exit of the functions that mark the
  phases: driver imports → pre-flight → ray.init → worker-group start → worker imports → model load → cache fill
  → DeepSpeed init → MLflow set-up → first optimizer step; metrics written → process exit;
- from outside: the whole process, and the peak memory of all its processes (PSS, psutil over the process tree,
  sampled every 0.5 s).

Variants: `cold` (a fresh encoder-output cache), `warm` (the same job again: the cache is full), `off`
(`data.feature_cache=off`), `zero_shot` (`optim.epochs=0`, warm cache: a sweep's zero-shot trial).
`--tree NAME=DIR` (repeated) runs the variants from other checkouts of ermgap (e.g. the commit before a change,
from `git worktree add`), interleaved, so before and after are measured side by side:

    .venv/bin/python bench/fixed_cost.py [--variants cold,warm,off,zero_shot]
    .venv/bin/python bench/fixed_cost.py --tree before=/tmp/ermgap-before --tree after=.

Needs data/synth and models/tiny-pretrained (`ermgap data synth --out data/synth`
and `ermgap model tiny --pretrain --out models/tiny-pretrained`). JSON in bench/results/fixed_cost.json
(with the machine, its load and each tree's commit); prints the breakdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "bench" / "fixed_cost_trace"
JOB = ["model.name_or_path={model}", "data.manifest={manifest}", "lora.train_audio_encoder=false",
       "optim.epochs=3", "optim.effective_batch_size=16", "optim.micro_batch_size=4", "eval.patience=0",
       "distributed.num_workers=1", "distributed.cpus_per_worker=1"]
VARIANTS = {"cold": [], "warm": [], "off": ["data.feature_cache=off"], "zero_shot": ["optim.epochs=0"]}
# The phases of the breakdown, in order: (name, start event, end event); events are matched in the process that
# emits them ("driver" or "worker"), the first occurrence after the previous phase's end unless noted.
TARGETS = {"start_to_first_step_s": 15.0, "metrics_to_exit_s": 3.0, "peak_pss_gb": 2.0, "whole_over_work": 1.5}


class PssSampler(threading.Thread):
    """Peak total PSS (bytes) of a process and all its descendants, sampled every `every` seconds, with the
    share of each kind of process at the peak (`role`)."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.peak, self.peak_rss, self.peak_procs = pid, every, 0, 0, 0
        self.peak_roles: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.root)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            pss = rss = n = 0
            roles: dict[str, float] = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    mem = p.memory_full_info()
                    name = role(p, root)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                pss, rss, n = pss + mem.pss, rss + mem.rss, n + 1
                roles[name] = roles.get(name, 0.0) + mem.pss
            if pss > self.peak:
                self.peak, self.peak_procs = pss, n
                self.peak_roles = {k: round(v / 1e9, 3) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])}
            self.peak_rss = max(self.peak_rss, rss)
            self.done.wait(self.every)


def role(p: psutil.Process, root: psutil.Process) -> str:
    """What a process of the run is: the driver, a Ray actor or worker (its title), or the program it runs."""
    if p.pid == root.pid:
        return "driver"
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    for arg in cmd[:3]:
        base = arg.rsplit("/", 1)[-1]
        if base in ("gcs_server", "raylet") or base.endswith(".py"):
            return base
        if arg.startswith("ermgap."):
            return arg
    return (cmd[0].rsplit("/", 1)[-1] if cmd else p.name())[:40]


def leftovers(marker: str, wait_s: float = 30.0) -> dict:
    """The run's processes still alive when its `ermgap train` process has exited (by the marker in their
    environment), and how long until none is left (None: some still run after `wait_s`)."""
    needle = f"ERMGAP_FIXED_COST_RUN={marker}".encode()

    def alive() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and needle in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0"):
                    found.append(p)
            except (OSError, psutil.Error):
                continue
        return found

    t0 = time.monotonic()
    first = alive()
    names = []
    for p in first:
        try:
            names.append(" ".join(a.rsplit("/", 1)[-1] for a in p.cmdline()[:3]))
        except psutil.Error:
            continue
    left = first
    while left and time.monotonic() - t0 < wait_s:
        time.sleep(0.1)
        left = alive()
    return {"processes_left_at_exit": sorted(names),
            "processes_gone_after_s": None if left else round(time.monotonic() - t0, 2)}


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first(events: list[dict], name: str, pid: int | None = None, after: float = 0.0) -> float | None:
    ts = [e["t"] for e in events if e["ev"] == name and (pid is None or e["pid"] == pid) and e["t"] >= after]
    return min(ts) if ts else None


def _spans(events: list[dict], name: str, pid: int) -> float:
    """Total seconds inside `name` (entry/exit pairs, outermost only) in one process."""
    total, depth, since = 0.0, 0, 0.0
    for e in sorted((e for e in events if e["pid"] == pid and e["ev"] in (f"{name}:in", f"{name}:out")),
                    key=lambda e: e["t"]):
        if e["ev"].endswith(":in"):
            depth += 1
            if depth == 1:
                since = e["t"]
        elif depth:
            depth -= 1
            if depth == 0:
                total += e["t"] - since
    return total


def _ev(events: list[dict], suffix: str, pid: int | None = None) -> float | None:
    """First event whose name ends with `suffix` (the module prefix differs before/after the train.py split)."""
    ts = [e["t"] for e in events if e["ev"].endswith(suffix) and (pid is None or e["pid"] == pid)]
    return min(ts) if ts else None


def _full(events: list[dict], suffix: str) -> str | None:
    names = {e["ev"][: -len(":in")] for e in events if e["ev"].endswith(suffix + ":in")}
    return min(names) if names else None


def breakdown(events: list[dict], driver_pid: int, exit_t: float, metrics_t: float | None) -> dict:
    """Seconds of each phase, from the trace of one run (see the module docstring)."""
    start = next(e["t_start"] for e in events if e["ev"] == "process_start" and e["pid"] == driver_pid)
    rt_in = _ev(events, ".run_training:in", driver_pid)
    # ray/__init__ re-exports ray._private.worker.init: the trace names it after whichever module wrapped it first.
    ray_in = _ev(events, "ray.init:in", driver_pid) or _ev(events, "ray._private.worker.init:in", driver_pid)
    ray_out = _ev(events, "ray.init:out", driver_pid) or _ev(events, "ray._private.worker.init:out", driver_pid)
    fit_in = _ev(events, "DataParallelTrainer.fit:in", driver_pid)
    rt_out = max((e["t"] for e in events if e["pid"] == driver_pid and e["ev"].endswith(".run_training:out")),
                 default=None)
    loop = [e for e in events if e["ev"].endswith(".train_loop_per_worker:in")]
    out = {"process_start_to_run_training_s": _d(start, rt_in), "pre_flight_s": _d(rt_in, ray_in),
           "ray_init_s": _d(ray_in, ray_out)}
    if not loop:  # nothing ran in a Train worker (a run that needs none)
        out.update({"workers": 0, "metrics_to_exit_s": _d(metrics_t, exit_t), "whole_process_s": exit_t - start,
                    "driver_after_ray_init_s": _d(ray_out, metrics_t)})
        return out
    wpid = min(loop, key=lambda e: e["t"])["pid"]
    w_start = next((e["t_start"] for e in events if e["ev"] == "process_start" and e["pid"] == wpid), None)
    imp = [(e["t"], e["ev"]) for e in events if e["pid"] == wpid and e["ev"].startswith("import ermgap.")]
    imp_in = min((t for t, ev in imp if ev.endswith(":in")), default=None)
    imp_out = max((t for t, ev in imp if ev.endswith(":out")), default=None)
    loop_in = _ev(events, ".train_loop_per_worker:in", wpid)
    setup_in, setup_out = _ev(events, "LoRARecipe.setup:in", wpid), _ev(events, "LoRARecipe.setup:out", wpid)
    first_step = _first(events, "deepspeed.runtime.engine.DeepSpeedEngine.step:out", wpid)
    fit_or_ray = fit_in or ray_out
    phases = {
        "driver_after_ray_init_s": _d(ray_out, fit_in),
        "worker_group_start_s": _d(fit_or_ray, imp_in or loop_in),
        "worker_imports_s": _d(imp_in, imp_out) if imp_in else 0.0,
        "worker_to_setup_s": _d(imp_out or loop_in, setup_in),
        "model_load_s": sum(_spans(events, n, wpid) for n in ("ermgap.model.load_backbone", "ermgap.model.apply_lora")),
        "cache_fill_s": _spans(events, "ermgap.feature_cache.EncodedDataset.fill", wpid),
        "deepspeed_import_s": _spans(events, "import deepspeed", wpid),
        "deepspeed_init_s": _spans(events, "deepspeed.initialize", wpid),
        "mlflow_setup_s": _spans(events, _full(events, "LoRARecipe._setup_tracking") or "-", wpid),
        "setup_s": _d(setup_in, setup_out),
        "setup_to_first_step_s": _d(setup_out, first_step),
    }
    phases["setup_other_s"] = phases["setup_s"] - sum(phases[k] for k in (
        "model_load_s", "cache_fill_s", "deepspeed_import_s", "deepspeed_init_s", "mlflow_setup_s"))
    write_out = _ev(events, "LoRARecipe._write_outputs:out", wpid) or _ev(events, "run_outputs.write_outputs:out", wpid)
    finish_out = _ev(events, "LoRARecipe.finish:out", wpid)
    loop_out = _ev(events, ".train_loop_per_worker:out", wpid)
    out.update(phases)
    out.update({
        "workers": len({e["pid"] for e in loop}),
        "worker_process_started_s": _d(start, w_start),
        "start_to_first_step_s": _d(start, first_step),
        "metrics_to_exit_s": _d(metrics_t, exit_t),
        "after_metrics": {"outputs_to_finish_s": _d(write_out, finish_out), "finish_to_loop_exit_s": _d(finish_out, loop_out),
                          "loop_exit_to_run_training_exit_s": _d(loop_out, rt_out), "run_training_exit_to_exit_s": _d(rt_out, exit_t),
                          **_driver_exit(events, driver_pid, rt_out, exit_t)},
        "train_teardown": _train_teardown(events, driver_pid, loop_out),
        "whole_process_s": exit_t - start,
    })
    return out


def _train_teardown(events: list[dict], driver_pid: int, loop_out: float | None) -> dict:
    """Where Ray Train's seconds go between the train function's return and fit()'s: until the controller's next
    poll notices it, the worker group's shutdown, the rest of the controller's shutdown (its callbacks: the
    placement-group cleaner's stop) and back to the driver."""
    ctl = [e for e in events if e["ev"].endswith("TrainController._shutdown:in")]
    if not ctl:
        return {}
    cpid = ctl[0]["pid"]
    shut_in, shut_out = _ev(events, "TrainController._shutdown:in", cpid), _ev(events, "TrainController._shutdown:out", cpid)
    wg = _spans(events, _full(events, "WorkerGroup.shutdown") or "-", cpid)
    fit_out = _ev(events, "DataParallelTrainer.fit:out", driver_pid)
    return {"loop_exit_to_controller_shutdown_s": _d(loop_out, shut_in), "worker_group_shutdown_s": round(wg, 3),
            "controller_shutdown_other_s": None if shut_out is None else round(shut_out - shut_in - wg, 3),
            "controller_shutdown_to_fit_exit_s": _d(shut_out, fit_out)}


def _ray_shutdown(events: list[dict], pid: int) -> dict:
    """ray.shutdown in the driver: seconds before it stops the cluster's processes (disconnect; the exit hook's
    own pause) and the seconds each kind of process took to stop (Ray stops them one after another)."""
    shut = [e for e in events if e["pid"] == pid and e["ev"] in (
        "ray.shutdown:in", "ray._private.worker.shutdown:in", "atexit ray._private.worker.shutdown:in")]
    kill_in = _ev(events, "Node.kill_all_processes:in", pid)
    stops: dict[str, float] = {}
    since, what = None, None
    for e in sorted((e for e in events if e["pid"] == pid and "Node._kill_process_type" in e["ev"]), key=lambda e: e["t"]):
        if e["ev"].endswith(":in"):
            since, what = e["t"], e.get("what", "?")
        elif since is not None:
            stops[what] = round(stops.get(what, 0.0) + e["t"] - since, 3)
            since = None
    return {"ray_shutdown_to_kill_s": _d(min((e["t"] for e in shut), default=None), kill_in),
            "ray_process_stop_s": stops}


def _driver_exit(events: list[dict], pid: int, rt_out: float | None, exit_t: float) -> dict:
    """Where the driver's seconds after run_training go: to its atexit handlers, inside them (ray.shutdown, traced
    wherever it is called from), and from the last handler to the process's exit (interpreter teardown)."""
    handlers = sorted((e for e in events if e["pid"] == pid and e["ev"].startswith("atexit ")), key=lambda e: e["t"])
    done = _ev(events, "atexit_done", pid)
    first = handlers[0]["t"] if handlers else done
    labels = dict.fromkeys(e["ev"][:-len(":in")] for e in handlers if e["ev"].endswith(":in"))
    spans = {label[len("atexit "):]: round(_spans(events, label, pid), 3) for label in labels}
    shutdown = sum(_spans(events, n, pid) for n in ("ray.shutdown", "ray._private.worker.shutdown"))
    return {"run_training_exit_to_atexit_s": _d(rt_out, first), "atexit_s": _d(first, done),
            "ray_shutdown_s": round(shutdown, 3), **_ray_shutdown(events, pid), "atexit_handlers_s": spans, "atexit_done_to_exit_s": _d(done, exit_t)}


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


def run_variant(name: str, tree: Path, workdir: Path, manifest: Path, model: Path, cache: Path) -> dict:
    """One `ermgap train` process of the job, traced; returns its breakdown, memory and metrics."""
    run_dir, trace = workdir / f"run-{name}", workdir / f"trace-{name}.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)
    trace.unlink(missing_ok=True)
    overrides = [o.format(model=model, manifest=manifest) for o in JOB] + [
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", f"tracking.storage_path={workdir / 'runs'}",
        f"data.feature_cache={cache}", *VARIANTS[name]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ERMGAP_VERBOSE")}
    marker = uuid.uuid4().hex  # every process of the run inherits it: what is left of the run after its exit
    env.update(ERMGAP_FIXED_COST_RUN=marker, ERMGAP_TRACE=str(trace), PYTHONPATH=os.pathsep.join([str(TRACE), str(tree)]),
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "ermgap.cli.main", "train", str(tree / "configs" / "tiny.yaml"), *overrides,
           "--run-dir", str(run_dir)]
    log = workdir / f"log-{name}.txt"
    load = os.getloadavg()[0]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = PssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        exit_t = time.time()
        sampler.done.set()
        left = leftovers(marker)
        sampler.join()
    if rc != 0:
        raise RunFailed(f"{name}: ermgap train exited {rc}:\n{log.read_text()[-3000:]}")
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    timing = metrics.get("timing") or {}
    out = breakdown(read_trace(trace), proc.pid, exit_t, metrics_file.stat().st_mtime)
    out.update({
        "peak_pss_gb": round(sampler.peak / 1e9, 3), "peak_rss_sum_gb": round(sampler.peak_rss / 1e9, 3),
        "processes_at_peak": sampler.peak_procs, "peak_pss_by_process_gb": sampler.peak_roles, "load_avg_1m_at_start": load,
        "train_s": timing.get("train_s"), "eval_s": timing.get("eval_s"), "timing": timing,
        "steps": metrics.get("step"),
        "metrics": {k: metrics.get(k) for k in ("dev_w_f1", "test_w_f1", "dev_loss", "test_loss", "test_avg_gap")},
        "feature_cache": metrics.get("feature_cache"),
        **left,
    })
    work = (out["train_s"] or 0.0) + (out["eval_s"] or 0.0)
    out["whole_over_work"] = round(out["whole_process_s"] / work, 3) if work else None
    return out


def commit_of(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"


ROWS = ("process_start_to_run_training_s", "pre_flight_s", "ray_init_s", "driver_after_ray_init_s",
        "worker_group_start_s", "worker_imports_s", "worker_to_setup_s", "model_load_s", "cache_fill_s",
        "deepspeed_import_s", "deepspeed_init_s", "mlflow_setup_s", "setup_other_s", "setup_to_first_step_s",
        "start_to_first_step_s", "train_s", "eval_s", "metrics_to_exit_s", "whole_process_s", "whole_over_work",
        "peak_pss_gb")


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| phase | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in ROWS:
        cells = []
        for n in names:
            v = results[n].get(row)
            cells.append("–" if v is None else f"{v:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, default=ROOT / "data" / "synth" / "manifest.csv")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-pretrained")
    ap.add_argument("--variants", default="cold,warm,off,zero_shot")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="run the variants from this checkout of ermgap (repeat to compare checkouts, interleaved; "
                         "default: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fixed_cost.json")
    args = ap.parse_args()
    for need in (args.manifest, args.model / "config.json"):
        if not need.is_file():
            raise SystemExit(f"{need} is missing: `ermgap data synth --out data/synth` and `ermgap model tiny --pretrain --out models/tiny-pretrained` build it")
    trees = {t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in args.tree} or {"this": ROOT}
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ermgap-fixed-cost-") as tmp:
        caches = {t: Path(tmp) / f"cache-{t}" for t in trees}
        for v in variants:
            for t, tree in trees.items():  # interleaved: each variant from every tree before the next variant
                key = v if len(trees) == 1 else f"{t}:{v}"
                workdir = Path(tmp) / t
                workdir.mkdir(exist_ok=True)
                print(f"== {key}", flush=True)
                try:
                    results[key] = run_variant(v, tree, workdir, args.manifest.resolve(), args.model.resolve(),
                                               caches[t])
                except RunFailed as err:  # recorded, and the other variants still run
                    results[key] = {"error": str(err)[-2000:]}
                    print(f"   failed: {str(err)[-500:]}", flush=True)
                    continue
                finally:
                    write(args.out, trees, load_before, results)
                r = results[key]
                print(f"   start→first step {r.get('start_to_first_step_s')} s, metrics→exit {r['metrics_to_exit_s']} s, "
                      f"whole {r['whole_process_s']:.1f} s (×{r['whole_over_work']} of train+eval), "
                      f"peak PSS {r['peak_pss_gb']} GB", flush=True)
    print(table(results))
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; JSON: {args.out}")
    if any("error" in r for r in results.values()):
        raise SystemExit(1)


class RunFailed(RuntimeError):
    """An `ermgap train` process of the benchmark exited non-zero."""


def write(out: Path, trees: dict[str, Path], load_before, results: dict[str, dict]) -> None:
    """The JSON document, rewritten after every variant (a failed or interrupted benchmark keeps what ran)."""
    doc = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg()},
        "job": {"overrides": JOB, "config": "configs/tiny.yaml"},
        "trees": {t: {"path": str(p), "commit": commit_of(p)} for t, p in trees.items()},
        "targets": TARGETS,
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
