"""Shared, session-scoped fixtures: a small synthetic corpus and a tiny Qwen2-Audio, built once per test run.

Both are expensive enough (espeak-ng synthesis, tokenizer training) that every area reuses them.
Tests must not modify them; copy first if you need to mutate.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _procs import free_port  # noqa: F401  (re-exported for tests that import it from conftest)

# Keep Ray, tokenizers and BLAS from oversubscribing the 2 cores CI has.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A small biased synthetic corpus (manifest path); deu-F prosody partly neutralised."""
    from ermgap.data.synth import synthesize

    out = tmp_path_factory.mktemp("corpus") / "synth"
    return synthesize(out, per_cell=4, bias={("deu", "F"): 0.7}, train_share={}, seed=0, lexical_cue_rate=0.0,
                      workers=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised Qwen2-Audio saved in the standard layout (directory path)."""
    from ermgap.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 (2 CPUs, dashboard on: Train V2 needs it) for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
