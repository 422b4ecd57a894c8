"""A sweep's live view: one line per trial (variant, objective, status, epoch x/N, the objective's state, dev
W-F1, dev gap, elapsed, ETA), a line when a trial ends; Tune's own status tables stay off (`verbose=0`) unless
--verbose. The objective's name and state come from the objective (`ermgap.objectives`: `describe_objective`,
`live_values`).

It is a Tune `Callback`, so it runs in the sweep driver's event loop and sees every trial's
reports (one per dev evaluation: `epoch`, the objective's `log_values`, the dev metrics) as Tune does; a terminal gets a
table refreshed in place (rich Live), anything else the same rows every `interval_s` seconds.
The ETA extrapolates the trial's elapsed time over the fraction of its epochs done.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ermgap.config import flatten
from ermgap.formatting import fmt
from ermgap.metric_registry import label
from ermgap.objectives import describe_objective, live_values
from ermgap.progress import format_duration
from ermgap.sweep.leaderboard import failure_reason
from ermgap.sweep.spec import SEED_KEY, VARIANT_PARAM, SweepSpec

STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "ended", "ERROR": "failed"}


def trial_label(spec: SweepSpec, params: dict[str, Any]) -> str:
    """What a person calls a trial: its variant, the swept values, the seed when seeds repeat
    ("adaptive_p2 seed=43", "lambda.init=3"); also the MLflow child run's name after "<sweep>/"."""
    parts = [str(params[VARIANT_PARAM])] if params.get(VARIANT_PARAM) is not None else []
    parts += [f"{k}={fmt(params[k])}" for k in spec.model.space if k in params]
    if spec.model.seeds and len(spec.model.seeds) > 1 and SEED_KEY in params:
        parts.append(f"seed={params[SEED_KEY]}")
    return " ".join(parts) or "base"


class SweepProgress(Callback):
    """Tune callback that renders the trials of one sweep (see the module docstring)."""

    def __init__(self, spec: SweepSpec, console: Console | None = None, *, interval_s: float = 30.0,
                 live: bool | None = None) -> None:
        self.spec, self.interval_s = spec, interval_s
        self.gap = spec.model.selection.gap_metric
        self._console, self._live_wanted = console, live
        self._reset()

    def _reset(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self._live: Live | None = None
        self._last_print = 0.0

    # Tune pickles its RunConfig (callbacks included) for `Tuner.restore`: the display is not state.
    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "interval_s": self.interval_s, "gap": self.gap, "_live_wanted": self._live_wanted}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._console = None
        self._reset()

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console()
        return self._console

    # --------------------------------------------------------------------------- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._row(trial)["start"] = time.time()
        self._refresh(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = self._row(trial)
        row.update({"epoch": result.get("epoch"), "shown": live_values(row["params"], result),
                    "w_f1": result.get("dev_w_f1"), "gap": result.get(self.gap), "round": result.get("eval_round"),
                    "done": result.get("done")})
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        how = "finished" if row.get("done") else f"stopped by the scheduler after eval {fmt(row.get('round'))}"
        self._say(f"trial {row['label']} ({trial.trial_id}) · {row['objective']} {how} in "
                  f"{format_duration(self._elapsed(row))}: dev W-F1 {fmt(row.get('w_f1'))} · {label(self.gap)} "
                  f"{fmt(row.get('gap'))}" + "".join(f" · {k} {fmt(v, 3)}" for k, v in row.get("shown", {}).items()))
        self._refresh(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        error = trial.get_pickled_error()
        why = failure_reason(error) if error is not None else f"see {trial.error_file or trial.path}"
        self._say(f"trial {row['label']} ({trial.trial_id}) FAILED after {format_duration(self._elapsed(row))}: {why}")
        self._refresh(force=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        for trial in trials:
            self._row(trial)["status"] = STATUS.get(trial.status, trial.status.lower())
        self._refresh()

    def on_experiment_end(self, trials, **info) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # --------------------------------------------------------------------------- rendering
    def _row(self, trial) -> dict[str, Any]:
        row = self.rows.get(trial.trial_id)
        if row is None:
            cfg = self.spec.trial_config(dict(trial.config))
            params = flatten(cfg.to_dict())
            row = self.rows[trial.trial_id] = {"label": trial_label(self.spec, trial.config), "epochs": cfg.optim.epochs,
                                               "params": params, "objective": describe_objective(params)}
        row["status"] = STATUS.get(trial.status, trial.status.lower())
        return row

    @staticmethod
    def _elapsed(row: dict[str, Any]) -> float | None:
        return time.time() - row["start"] if "start" in row else None

    def cells(self, row: dict[str, Any]) -> list[str]:
        """variant, objective, status, epoch x/N, the objective's state, dev W-F1, dev gap, elapsed, ETA."""
        elapsed, epoch = self._elapsed(row), row.get("epoch")
        frac = epoch / row["epochs"] if epoch else None
        eta = elapsed * (1 - frac) / frac if elapsed is not None and frac and row["status"] == "running" else None
        # A zero-shot trial (optim.epochs 0) trains nothing: it has no epochs to count.
        progress = "zero-shot" if row["epochs"] == 0 else f"{fmt(epoch, 1) if epoch is not None else 0}/{row['epochs']}"
        state = " ".join(f"{k} {fmt(v, 3)}" for k, v in row.get("shown", {}).items()) or "-"
        return [row["label"], row["objective"], row["status"], progress,
                state, fmt(row.get("w_f1")), fmt(row.get("gap")), format_duration(elapsed),
                format_duration(eta) if row["status"] == "running" else "-"]

    def headers(self) -> list[str]:
        return ["trial", "objective", "status", "epoch", "state", "dev W-F1", label(self.gap), "elapsed", "ETA"]

    def table(self) -> Table:
        t = Table(title=f"sweep {self.spec.name}", title_justify="left")
        for h in self.headers():
            t.add_column(h, justify="left" if h in ("trial", "objective", "status") else "right")
        for row in self.rows.values():
            t.add_row(*self.cells(row))
        return t

    def _live_on(self) -> bool:
        return self.console.is_terminal if self._live_wanted is None else self._live_wanted

    def _refresh(self, force: bool = False) -> None:
        if not self.rows:
            return
        if self._live_on():
            if self._live is None:
                self._live = Live(self.table(), console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(self.table(), refresh=True)
            return
        now = time.time()
        if not force and now - self._last_print < self.interval_s:
            return
        self._last_print = now
        for row in self.rows.values():
            if row["status"] == "running":
                self.console.print(self.line(row), highlight=False, soft_wrap=True)

    def line(self, row: dict[str, Any]) -> str:
        """One trial as a console line of 'column value' pairs; the objective's state under its own names
        ('λ 0.268', 'max q 0.31'), left out for a kind that has none."""
        parts = []
        for i, (head, cell) in enumerate(zip(self.headers(), self.cells(row))):
            if head == "state":
                parts += [cell] if cell != "-" else []
            else:
                parts.append(f"{head} {cell}" if i else cell)
        return " · ".join(parts)

    def _say(self, text: str) -> None:
        (self._live.console if self._live is not None else self.console).print(text, highlight=False, soft_wrap=True)
