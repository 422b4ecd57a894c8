"""Where a sweep lives on disk, and its state file (what `--resume` reads back).

`<storage_path>/<name>/` holds `tune/` (the Tune experiment, what --resume restores), `train/`
(Train V2 runs and checkpoints), `runs/<trial_id>/` (each training run's outputs), `artifacts/` and
`report/` (leaderboard, plots, the paper's tables) and `sweep_state.json` (parent run id, spec hash).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ermgap.errors import ConfigError
from ermgap.io import atomic_write_text
from ermgap.sweep.spec import SweepSpec

STATE_FILE = "sweep_state.json"


@dataclass
class SweepPaths:
    root: Path

    @classmethod
    def of(cls, spec: SweepSpec) -> SweepPaths:
        if "://" in spec.model.storage_path:
            raise ConfigError(f"{spec.source}: storage_path {spec.model.storage_path!r}: the sweep driver keeps its "
                              "state next to the Tune experiment, so give a local or NFS directory")
        return cls(Path(spec.model.storage_path).resolve() / spec.name)

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state, json.dumps(state, indent=2) + "\n", force=True)

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.root}: no sweep to resume ({STATE_FILE} missing); run without --resume") from None
