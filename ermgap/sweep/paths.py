"""Where a sweep lives (a local/NFS directory or an s3:// / gs:// prefix), and its state file
(what `--resume` reads back, from the storage location alone, on any driver).

`<storage_path>/<name>/` holds `tune/` (the Tune experiment, what --resume restores), `train/`
(Train V2 runs and checkpoints), `runs/<trial_id>/` (each training run's outputs), `artifacts/` and
`report/` (leaderboard, plots, the paper's tables) and `sweep_state.json` (parent run id, spec hash).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ermgap.errors import ConfigError
from ermgap.storage import Location
from ermgap.sweep.spec import SweepSpec

STATE_FILE = "sweep_state.json"


def read_state(path) -> dict:
    """A finished or interrupted sweep directory's state (parent run, tracking URI, experiment), checked before any
    work: ConfigError naming the directory or its state file otherwise."""
    from pathlib import Path

    state = Path(path) / STATE_FILE
    if not state.is_file():
        raise ConfigError(f"{path}: not a sweep directory (no {STATE_FILE} in it; want e.g. "
                          f"runs/sweeps/pareto_minmaxgap)")
    try:
        got = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{state}: unreadable sweep state ({err})") from None
    missing = [k for k in ("parent_run_id", "tracking_uri", "experiment") if not (isinstance(got, dict) and got.get(k))]
    if missing:
        raise ConfigError(f"{state}: lacks {', '.join(missing)} (a sweep writes them when it starts)")
    return got


@dataclass
class SweepPaths:
    root: Location

    def __post_init__(self) -> None:
        self.root = Location.of(self.root)  # a plain directory path works too

    @classmethod
    def of(cls, spec: SweepSpec) -> SweepPaths:
        try:
            return cls(Location.of(spec.model.storage_path) / spec.name)
        except ConfigError as err:
            raise ConfigError(f"{spec.source}: storage_path: {err}") from None

    @property
    def tune(self) -> Location:
        return self.root / "tune"

    @property
    def train(self) -> Location:
        return self.root / "train"

    @property
    def runs(self) -> Location:
        return self.root / "runs"

    @property
    def artifacts(self) -> Location:
        return self.root / "artifacts"

    @property
    def report(self) -> Location:
        return self.root / "report"

    @property
    def state(self) -> Location:
        return self.root / STATE_FILE

    def write_state(self, state: dict[str, Any]) -> None:
        self.state.write_text(json.dumps(state, indent=2) + "\n", force=True)

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.root}: no sweep to resume ({STATE_FILE} missing); run without --resume") from None
