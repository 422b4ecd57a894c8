"""Phase timestamps of an `ermgap train` process tree, for bench/fixed_cost.py (inert unless $ERMGAP_TRACE is set).

bench/fixed_cost.py puts this folder first on PYTHONPATH, so every Python process of the run imports it at start:
the driver, Ray's processes and the Ray Train workers (they inherit the driver's environment). Each appends JSON
lines {"pid", "ev", "t" (wall clock, s)} to $ERMGAP_TRACE: its own start, the import of a few heavy modules, and
entry/exit of the functions that mark the phases of a run. Functions are named by where they live; where the
code moved (ermgap/train.py was split into recipe/driver), every location is listed and the ones that exist are
wrapped, so the same tracer times the code before and after.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys
import time

_PATH = os.environ.get("ERMGAP_TRACE")

# module → attributes ("Class.method" or "function") whose calls are events (entry "<name>:in", exit "<name>:out").
_CALLS = {
    "ermgap.train": ("run_training", "train_loop_per_worker", "LoRARecipe.setup", "LoRARecipe._setup_tracking",
                     "LoRARecipe.finish", "LoRARecipe._write_outputs"),
    "ermgap.driver": ("run_training",),
    "ermgap.recipe": ("train_loop_per_worker", "LoRARecipe.setup", "LoRARecipe._setup_tracking",
                      "LoRARecipe.finish", "LoRARecipe._write_outputs"),
    "ermgap.run_outputs": ("open_run_logger", "write_outputs"),
    "ermgap.model": ("load_backbone", "apply_lora"),
    "ermgap.feature_cache": ("EncodedDataset.fill",),
    "ermgap.tracking": ("RunLogger.open", "RunLogger.end"),
    "ray": ("init", "shutdown"),
    "ray._private.worker": ("init", "shutdown"),
    "ray.train.v2.api.data_parallel_trainer": ("DataParallelTrainer.fit",),
    "deepspeed": ("initialize",),
    "deepspeed.runtime.engine": ("DeepSpeedEngine.step",),
    # After the train function returns: the controller notices, shuts the worker group down and returns.
    "ray.train.v2._internal.execution.controller.controller": ("TrainController.run", "TrainController._shutdown",
                                                              "TrainController.get_result"),
    "ray.train.v2._internal.execution.worker_group.worker_group": ("WorkerGroup.shutdown",),
    "ray.train.v2._internal.execution.worker_group.state": ("WorkerGroupState.shutdown", "_shutdown_workers"),
    "ray.train.v2._internal.execution.worker_group.worker": ("RayTrainWorker.shutdown",),
    "ray._private.node": ("Node.kill_all_processes", "Node._kill_process_type"),
    "ermgap.progress": ("TrainProgress.__exit__",),
    "ermgap.ray_runtime": ("shutdown_ray",),
}
# Modules whose first import is timed (begin/end) in each process.
_IMPORTS = {"ermgap.cli.main", "ermgap.train", "ermgap.driver", "ermgap.recipe", "torch", "transformers", "ray.train",
            "deepspeed", "mlflow", "peft"}


def _emit(ev: str, **kw) -> None:
    line = json.dumps({"pid": os.getpid(), "ev": ev, "t": time.time(), **kw}) + "\n"
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _process_start() -> float:
    """This process's start (exec) time from /proc: boot time + start ticks."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _detail(label: str, args: tuple) -> dict:
    """Which of Ray's processes Node._kill_process_type stops (its first argument after self)."""
    if label.endswith("_kill_process_type") and len(args) > 1:
        return {"what": str(args[1])}
    return {}


def _wrap(owner, attr: str, label: str) -> None:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_traced", False):
        return

    if inspect.iscoroutinefunction(fn):  # the controller's methods: timed while awaited, not while created
        @functools.wraps(fn)
        async def traced(*args, **kwargs):
            _emit(f"{label}:in")
            try:
                return await fn(*args, **kwargs)
            finally:
                _emit(f"{label}:out")
    else:
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            _emit(f"{label}:in", **_detail(label, args))
            try:
                return fn(*args, **kwargs)
            finally:
                _emit(f"{label}:out")

    traced._traced = True
    setattr(owner, attr, traced)


def _patch(module) -> None:
    for name in _CALLS.get(module.__name__, ()):
        owner, _, attr = name.rpartition(".")
        target = module
        for part in filter(None, owner.split(".")):
            target = getattr(target, part, None)
            if target is None:
                break
        if target is not None:
            _wrap(target, attr, f"{module.__name__}.{name}")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name: str) -> None:
        self.inner, self.name = inner, name

    def __getattr__(self, name):  # get_code, get_source, ... (runpy's `python -m` asks the loader for them)
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        timed = self.name in _IMPORTS
        if timed:
            _emit(f"import {self.name}:in")
        try:
            self.inner.exec_module(module)
        finally:
            if timed:
                _emit(f"import {self.name}:out")
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _CALLS and name not in _IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def _traced_atexit(register):
    """atexit.register whose handlers emit "atexit <module>.<name>:in/out" (Ray's ray.shutdown is one: it is
    registered while ray._private.worker executes, before _patch can wrap it)."""

    @functools.wraps(register)
    def traced(fn, *args, **kwargs):
        label = f"atexit {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

        @functools.wraps(fn)
        def handler(*a, **kw):
            _emit(f"{label}:in")
            try:
                return fn(*a, **kw)
            finally:
                _emit(f"{label}:out")

        register(handler, *args, **kwargs)
        return fn

    return traced


if _PATH:
    import atexit

    atexit.register(lambda: _emit("atexit_done"))  # registered first: runs last
    atexit.register = _traced_atexit(atexit.register)
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = [a.decode(errors="replace") for a in _f.read().split(b"\0") if a]
    _emit("process_start", t_start=_process_start(), ppid=os.getppid(), argv=_argv[:6])
    sys.meta_path.insert(0, _Finder())
