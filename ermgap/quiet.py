"""A quiet console: Ray, DeepSpeed, transformers, MLflow and tqdm stay silent unless the user asks (--verbose).

Only the standard library is imported here: the CLI quiets every command before it imports the libraries
that print on import.
"""

from __future__ import annotations

import logging
import os
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
