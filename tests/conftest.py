"""Shared, session-scoped fixtures: what the suite starts or builds once per test run and every test reuses.

- `synth_corpus`: a small biased synthetic corpus (manifest path; espeak-ng audio). `small_manifest`: its
  8 train / 4 dev / 4 test rows per language × gender (48 / 24 / 24 utterances), the end-to-end slice;
  `smallest_manifest` half of it (24 / 12 / 12), for tests of the machinery around a run (resume, storage).
- `tiny_model`: a tiny randomly initialised Qwen2-Audio in the standard layout (directory path).
- `ray_cluster`: ONE local Ray cluster for every in-process test that needs one (127.0.0.1, 2 CPUs, dashboard on:
  Train V2 needs it), started as `ermgap train` starts one (`ensure_ray`, with its reaper). Returns its GCS
  address, for `--address` in subprocesses. Tests are isolated by their own run names, storage paths and MLflow
  stores (tmp_path), not by restarting Ray: never `ray.shutdown()` it, never start another Ray in this process.
  Each test that uses it must leave it idle (all CPUs free within 60 s after the test, checked in teardown).
  Tests that use it run after all others (collection order), so tests that check that nothing started Ray in
  this process (errors caught before Ray starts) still see no Ray.
- `reference_run`: THE trained tiny run, produced once per test run by the real CLI (`ermgap train ...
  --address <ray_cluster>`, stdout a pipe) on `small_manifest` with the 12-step schedule of
  `_runs.train_overrides` (2 workers, DeepSpeed ZeRO-2, evaluation every 3 steps, adaptive λ, MLflow sqlite).
  A `_runs.FinishedRun`: `.final` (metrics.json + run_dir + tracking_uri, what `run_training` returns),
  `.output` (what the CLI printed), `.overrides`, `.root` (its store: `root/mlflow.db`, `root/runs/...`).
  Tests that only read a finished run (metrics, predictions, MLflow, report, serve, progress output) read this
  one; tests that need another run compare against it (`_runs.assert_same_run`). Read-only: copy to modify.

Expensive module fixtures stay in their modules; anything two modules need belongs here. Markers: a test that
uses `ray_cluster` or `reference_run` is `ray` (and `deepspeed`, `slow` for the run) like the runs it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Keep Ray, tokenizers and BLAS from oversubscribing the 2 cores CI has. Set before anything imports torch: torch
# reads OMP_NUM_THREADS once, at import, and the suite's own process (its pure tests) ran with a thread per core
# when _runs imported it first (a second thread on tiny tensors only waits: one toy training 34 s -> 2 s).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
from _procs import free_port  # noqa: E402, F401  (re-exported for tests that import it from conftest)
from _runs import FinishedRun, finished_run, small_slice, train_overrides  # noqa: E402

from ermgap import deepspeed_ops  # noqa: E402

# DeepSpeed's CPU op built once for this checkout's installation, not rebuilt whenever another checkout on the
# machine loaded it (ermgap.deepspeed_ops); in the environment, so every Ray cluster and subprocess uses it too.
deepspeed_ops.pin_build_dir()
# Ray Train's controller collects reports and notices a finished or dead worker group once per poll (default 2 s):
# a tiny run's last reports and its end then waited 2-4 s for nothing, in every Train run of the suite.
# Propagated by Ray to every controller (drivers in subprocesses inherit it); a missed poll only waits longer.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The session's cluster is a local one, as `ermgap train` starts for itself: its runs do without Ray Train's
# preemption watcher as those do (ermgap.ray_runtime.PREEMPTION_ENV), though their drivers join it by address.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

REPO = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 60.0


# What makes a test heavy: it starts Ray, a training, DeepSpeed, a server or a browser (its markers), or it uses
# the session's Ray cluster or reference run (its fixtures).
HEAVY_MARKERS = frozenset({"ray", "slow", "deepspeed", "server", "chromium", "gpu"})
HEAVY_FIXTURES = frozenset({"ray_cluster", "reference_run"})


def is_heavy(item) -> bool:
    return bool({m.name for m in item.iter_markers()} & HEAVY_MARKERS
                or set(getattr(item, "fixturenames", ())) & HEAVY_FIXTURES)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups (a worker registers it late)
def pytest_collection_modifyitems(config, items) -> None:
    """Tests on the session's Ray cluster run last (stable: otherwise in their usual order). Under pytest-xdist
    (`make test`: -n 2 --dist loadgroup), every heavy test is in one group, run one after another by one worker
    in this order, as without xdist (two trainings at once starved each other on 2 cores); the other tests
    (pure math, parsing, the CLI's refusals, MLflow on sqlite, the tiny model's forward passes) run on the
    other worker meanwhile, in the cores the heavy ones leave idle."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))
    for item in items:
        if is_heavy(item):
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A small biased synthetic corpus (manifest path); deu-F prosody partly neutralised."""
    from ermgap.data.synth import synthesize

    out = tmp_path_factory.mktemp("corpus") / "synth"
    return synthesize(out, per_cell=4, bias={("deu", "F"): 0.7}, train_share={}, seed=0, lexical_cue_rate=0.0,
                      workers=2)


@pytest.fixture(scope="session")
def small_manifest(synth_corpus, tmp_path_factory) -> Path:
    """8 train / 4 dev / 4 test rows per (language, gender): 48 / 24 / 24 utterances."""
    return small_slice(synth_corpus, tmp_path_factory.mktemp("small") / "manifest.csv")


@pytest.fixture(scope="session")
def smallest_manifest(synth_corpus, tmp_path_factory) -> Path:
    """4 train / 2 dev / 2 test rows per (language, gender): 24 / 12 / 12 utterances, every cell still in each
    split. For end-to-end tests whose assertions are about the machinery (resume, storage, nodes), not learning."""
    return small_slice(synth_corpus, tmp_path_factory.mktemp("smallest") / "manifest.csv", train=4, held_out=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised Qwen2-Audio saved in the standard layout (directory path)."""
    from ermgap.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """The session's local Ray cluster (module docstring); yields its GCS address."""
    import ray

    from ermgap.ray_runtime import ensure_ray, shutdown_ray

    assert not ray.is_initialized(), "a test started Ray in this process without the ray_cluster fixture"
    saved = os.environ.pop("RAY_ADDRESS", None)  # a local cluster of its own, never one $RAY_ADDRESS names
    try:
        ensure_ray(None, num_cpus=2, log_to_driver=False)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    yield ray.get_runtime_context().gcs_address
    shutdown_ray()


@pytest.fixture(autouse=True)
def _ray_cluster_left_idle(request):
    """After a test on the session's cluster: every CPU is free again (a leaked worker group or placement
    group would starve the next test, which would then fail far from the cause)."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while (free := ray.available_resources().get("CPU", 0.0)) < total:
        if time.monotonic() > deadline:
            pytest.fail(f"{request.node.nodeid} left the session's Ray cluster busy: {free:g} of {total:g} CPUs "
                        f"free {IDLE_TIMEOUT_S:g} s after it ended")
        time.sleep(0.25)


@pytest.fixture(scope="session")
def reference_run(ray_cluster, small_manifest, tiny_model, tmp_path_factory) -> FinishedRun:
    """THE trained tiny run (module docstring): `ermgap train` on the session's cluster, 12 steps, 2 workers."""
    from ermgap.quiet import QUIET_ENV

    root = tmp_path_factory.mktemp("reference")
    overrides = train_overrides(small_manifest, tiny_model, root)
    cfg = root / "run.yaml"
    cfg.write_text("{}\n")
    run_dir = root / "runs" / "reference"
    # The environment a user's shell has: not this process's RAY_ADDRESS, verbosity or quieting (a command run
    # in-process by another test may have quieted it; the CLI must quiet itself).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ERMGAP_VERBOSE") and k not in QUIET_ENV}
    proc = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "train", str(cfg), *overrides,
                           "--run-dir", str(run_dir), "--address", ray_cluster],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return finished_run(run_dir, f"sqlite:///{root}/mlflow.db", output, overrides, root)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (a disk that fills up); skipped where mounting needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({mount.stderr.strip() or 'mount failed'}); needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)
