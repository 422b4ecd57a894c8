"""What a user sees while a training run runs: rank 0's progress on the driver (the quiet console: ermgap.quiet).

The channel: rank 0 pushes small dicts to a `ProgressBox`, a Ray actor with no resources, through
fire-and-forget `.remote` calls (an optimizer step never waits for the driver); the driver drains
the box from a thread while `trainer.fit()` blocks and renders what it gets (`TrainProgress`).
Why not Ray Train's reports: `ray.train.report` runs only at evaluations (it carries a
checkpoint), so it cannot say how far an epoch is. Why not a file in the run directory: rank 0
and the driver may be on different nodes of a cluster.

Events (every one has `kind` and `t`, rank 0's wall clock, so rates do not depend on polling):
    start  step, total_steps, steps_per_epoch, epochs   (step > 0 when resumed)
    step   step, epoch, loss, shown
    eval   round, step, metrics {dev_w_f1, dev_worst_lang_gap, dev_loss_gap}, shown, best, best_round, metric

`shown` is what the run's objective puts on a live display ({name: value}: `Objective.live_values`).
    phase  text                                           (e.g. the final evaluation of the best checkpoint)

On a terminal a rich progress bar shows epoch x/N, step, loss, the objective's shown values, steps/s and ETA, with one line
per evaluation above it; elsewhere (CI, `ray job logs`, a pipe) the same step line is printed
every `interval_s` seconds and at the end of each epoch.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ermgap.formatting import fmt
from ermgap.metric_registry import label


@ray.remote(num_cpus=0)
class ProgressBox:
    """Events from rank 0, held until the driver drains them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class ProgressSender:
    """Rank 0's end of the channel; inert (no box) on other ranks and when nobody listens (a sweep trial)."""

    def __init__(self, box, *, rank: int) -> None:
        self.box = box if rank == 0 else None

    def send(self, kind: str, **fields: Any) -> None:
        if self.box is not None:
            self.box.push.remote({"kind": kind, "t": time.time(), **fields})


def format_duration(seconds: float | None) -> str:
    """0:03:07 (h:mm:ss); '?' when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(0.0, seconds)))))


class StepRate:
    """Steps/s and ETA from (time, step) pairs since training (re)started; evaluations are inside the
    measured wall time, so the ETA includes them at the rate seen so far."""

    def __init__(self, t0: float, step0: int, total: int) -> None:
        self.t0, self.step0, self.total = t0, step0, total

    def rate(self, t: float, step: int) -> float | None:
        done, dt = step - self.step0, t - self.t0
        return done / dt if done > 0 and dt > 0 else None

    def eta(self, t: float, step: int) -> float | None:
        r = self.rate(t, step)
        return (self.total - step) / r if r else None


class TrainProgress:
    """The driver's live view of one run; use as a context manager around `trainer.fit()`."""

    def __init__(self, box, console: Console, *, interval_s: float = 10.0, poll_s: float = 0.5,
                 live: bool | None = None) -> None:
        self.box, self.console, self.interval_s, self.poll_s = box, console, interval_s, poll_s
        self.live = console.is_terminal if live is None else live
        self.rate: StepRate | None = None
        self.start: dict[str, Any] = {}
        self.last: dict[str, Any] | None = None
        self.last_printed = 0.0
        self._bar: Progress | None = None
        self._task = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ermgap-progress", daemon=True)

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()  # what rank 0 sent after the last poll
        if self._bar is not None:
            self._bar.stop()

    # --------------------------------------------------------------------------- polling
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        try:
            events = ray.get(self.box.drain.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):  # the cluster is going away with the run
            return
        for event in events:
            getattr(self, f"_on_{event['kind']}")(event)

    # --------------------------------------------------------------------------- events
    def _on_start(self, e: dict[str, Any]) -> None:
        self.start = e
        self.rate = StepRate(e["t"], e["step"], e["total_steps"])
        self.last_printed = e["t"]
        resumed = f", resumed at step {e['step']}" if e["step"] else ""
        self._print(f"training: {e['epochs']} epoch(s) × {e['steps_per_epoch']} steps = {e['total_steps']} "
                    f"optimizer steps{resumed}")
        if self.live:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("epoch", total=e["total_steps"], completed=e["step"], info="")

    def step_line(self, e: dict[str, Any]) -> str:
        """'epoch 1/2 · step 3/12 · loss 2.0812 · <shown values> · 0.41 steps/s · ETA 0:00:22'"""
        s = self.start
        rate = self.rate.rate(e["t"], e["step"]) if self.rate else None
        eta = self.rate.eta(e["t"], e["step"]) if self.rate else None
        return (f"epoch {e['epoch'] + 1}/{s.get('epochs', '?')} · step {e['step']}/{s.get('total_steps', '?')} · "
                f"loss {e['loss']:.4f} · " + "".join(f"{k} {v:.3f} · " for k, v in (e.get("shown") or {}).items()) +
                f"{'?' if rate is None else f'{rate:.2f}'} steps/s · ETA {format_duration(eta)}")

    def _on_step(self, e: dict[str, Any]) -> None:
        self.last = e
        spe = self.start.get("steps_per_epoch") or 1
        if self._bar is not None:
            line = self.step_line(e)
            head, _, info = line.partition(" · step ")
            self._bar.update(self._task, completed=e["step"], description=head,
                             info=" · ".join(info.split(" · ")[1:]))
            return
        first = self.rate is not None and e["step"] == self.rate.step0 + 1
        if first or e["step"] % spe == 0 or e["t"] - self.last_printed >= self.interval_s:
            self._print(self.step_line(e))
            self.last_printed = e["t"]

    def eval_line(self, e: dict[str, Any]) -> str:
        """'eval 2 @ step 6: dev W-F1 41.67 · dev worst-lang gap 12.50 · dev Δloss 0.0312 · <shown> → 0.520 ·
        best dev W-F1 41.67 (eval 2)'"""
        parts = [f"{label(k)} {fmt(v, 4 if k.endswith('loss_gap') else 2)}" for k, v in e["metrics"].items()]
        best = f"best {label('dev_' + e['metric'])} {fmt(e['best'])} (eval {e['best_round']})"
        shown = "".join(f" · {k} → {v:.3f}" for k, v in (e.get("shown") or {}).items())  # ERM shows nothing
        return f"eval {e['round']} @ step {e['step']}: " + " · ".join(parts) + f"{shown} · {best}"

    def _on_eval(self, e: dict[str, Any]) -> None:
        if self._bar is None and self.last is not None and self.last["t"] > self.last_printed:
            self._print(self.step_line(self.last))  # where the steps stand when the evaluation ran
            self.last_printed = self.last["t"]
        self._print(self.eval_line(e))

    def _on_phase(self, e: dict[str, Any]) -> None:
        self._print(e["text"])

    def _print(self, text: str) -> None:
        (self._bar.console if self._bar is not None else self.console).print(text, highlight=False, soft_wrap=True)


# Ray's link to the newest session of a local cluster: where a quiet driver's worker output still is.
WORKER_LOGS = "/tmp/ray/session_latest/logs"
