"""`ermgap features build CONFIG [overrides]`: fill the encoder-output cache ahead of a run or sweep."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="The encoder-output cache (frozen audio encoder: computed once per utterance).",
                  no_args_is_help=True)


@app.command("build")
def build(
    config: Path = typer.Argument(..., help="Run config YAML, or a sweep spec (its trials' cache is filled)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides (for a sweep spec: base.<key>=V ...)."),
    address: str = typer.Option(None, "--address", help="Join this Ray cluster (default: start one on 127.0.0.1)."),
    workers: int = typer.Option(None, "--workers", min=1, help="Encoder actors (default: distributed.num_workers)."),
) -> None:
    """Encode every utterance of the manifest once (Ray actors in parallel) so trials start with cache hits."""
    from ermgap.errors import ConfigError
    from ermgap.feature_cache import fill_cache, why_uncached
    from ermgap.preflight import check_inputs, run_manifest
    from ermgap.ray_runtime import ensure_ray

    cfg = _run_config(config, overrides or [])
    if why_uncached(cfg):
        raise ConfigError(f"nothing to build: {why_uncached(cfg)}")
    check_inputs(cfg)
    ensure_ray(address)
    directory, stats = fill_cache(cfg, run_manifest(cfg), workers=workers)
    Console(soft_wrap=True).print(f"feature cache {directory}: {stats.hits} already cached, {stats.misses} encoded "
                    f"in {stats.encoder_s:.1f} encoder-s" + (f", {stats.corrupt} corrupt entries replaced"
                                                             if stats.corrupt else ""))


def _run_config(path: Path, overrides: list[str]):
    """The resolved run config of a run config YAML, or of a sweep spec's first trial with the storage
    path its trials use (so the default cache location is theirs)."""
    from ermgap.config import load_config, read_yaml
    from ermgap.preflight import resolved_config

    if "base" not in read_yaml(path):
        return resolved_config(load_config(path, overrides))
    from ermgap.sweep.paths import SweepPaths
    from ermgap.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(path, overrides)
    cfg = spec.trial_config(spec.example_trials()[0])
    cfg.tracking.storage_path = str(SweepPaths.of(spec).train)
    return resolved_config(cfg)
