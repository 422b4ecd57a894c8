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
