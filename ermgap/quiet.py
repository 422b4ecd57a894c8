"""A quiet console: Ray, DeepSpeed, transformers, MLflow and tqdm stay silent unless the user asks (--verbose).

Only the standard library is imported here: the CLI quiets every command before it imports the libraries
that print on import.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Libraries whose INFO/WARNING chatter (accelerator detection, deprecations, Tune's status tables)
# is hidden unless --verbose; errors still show.
NOISY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "deepspeed", "DeepSpeed", "transformers",
                 "torch.distributed", "mlflow", "alembic", "urllib3", "filelock")
# Inherited by every process the driver starts (Ray workers of a local cluster included).
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             # MLflow sets its logger to this level when it is imported (possibly after quiet_console ran).
             "MLFLOW_LOGGING_LEVEL": "ERROR",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
             "RAY_DEDUP_LOGS": "1",
             # Tune's new output engine prints its configuration box, a results path and a TensorBoard hint
             # into Ray's temporary directory at every start, whatever `verbose` says; the legacy engine
             # honours verbose=0 (sweeps pass 2 with --verbose, and show their own per-trial lines).
             "RAY_AIR_NEW_OUTPUT": "0"}


class _BelowError(logging.Filter):
    """DeepSpeed resets its logger to WARNING when it is imported (after quiet_console may have run), so its
    level cannot be set ahead; a filter on the same logger object stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _TokenAuthEnabled(logging.Filter):
    """Ray announces that token authentication is on (ermgap wants it on): drop that notice only, so the
    warning that a cluster runs *without* authentication still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


# Ray 2.60's raylet tells every driver on the cluster when a burst of worker processes starts (its exact text,
# from the raylet's format string). On a small machine every sweep trips it: Tune's trial drivers and Ray
# Train's workers start together, each asking for a fraction of a CPU, which is how ermgap packs trials.
RAYLET_WORKER_BURST = re.compile(
    r"WARNING: \d+ \w+ worker processes have been started on node: \S+ with address: \S+, which is \d+x the "
    r"maximum expected startup concurrency \(\d+\)\. This could be a result of using a large number of actors, "
    r"tasks blocked in ray\.get\(\) calls, or tasks with fractional CPU requests \(e\.g\., num_cpus=0\.1\) "
    r"allowing high concurrency\. See https://github\.com/ray-project/ray/issues/3644 for some discussion of "
    r"workarounds\.")


def drop_raylet_notices() -> None:
    """Keep RAYLET_WORKER_BURST off the driver's console (a quiet console only; Ray's own logs keep it).

    Ray prints raylet messages on the driver with `print`, not through logging (`listen_error_messages` →
    `ray._private.worker.print_to_stdstream`), so a logging filter cannot reach it: the printer is wrapped,
    dropping that message only. Call after importing Ray, before `ray.init` (idempotent)."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "ermgap_filtered", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        lines = data.get("lines") or []
        kept = [ln for ln in lines if not (data.get("pid") == "raylet" and RAYLET_WORKER_BURST.search(ln))]
        if kept or not lines:
            printer({**data, "lines": kept}, ignore_prefix)

    print_to_stdstream.ermgap_filtered = True
    ray_worker.print_to_stdstream = print_to_stdstream


_QUIETED = False


def quiet_console(verbose: bool) -> None:
    """Silence Ray, DeepSpeed, transformers, MLflow and tqdm in this process and its children unless
    `verbose`. The CLI calls it once (`--verbose` / $ERMGAP_VERBOSE); a notebook may call it too.

    Worker output is kept out of the driver separately (`ensure_ray(log_to_driver=verbose)`); it is
    still in Ray's session logs. Python's own "once per location" rule keeps other warnings visible."""
    global _QUIETED
    if verbose or _QUIETED:
        return
    _QUIETED = True
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).addFilter(_BelowError())
    # ray.init sets the level of the "ray" logger tree again when it starts: a filter is what survives.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthEnabled())
    # The environment reaches libraries imported from now on; those already imported are told directly.
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
