"""pytest plugin: how busy the machine was during each test, to tell a test that computes from one that waits.

    make test PYTEST_ARGS="-p bench.suite_cpu"        # JSON: $ERMGAP_SUITE_CPU or bench/results/suite_cpu.json

Without $ERMGAP_SUITE_CPU, a run of part of the suite (test paths, -k or -m given) writes
bench/results/suite_cpu.partial.json, so it never replaces the whole suite's file.

For each test (set-up, call and teardown together): its wall time, the CPU seconds the whole machine spent
in that time (/proc/stat: every process, Ray's daemons and the servers a test starts included), the pytest
process's own share (with the children it waited for), and the idle core-seconds (wall × cores − busy).
A suite that is CPU-bound gains only from less work; a test with many idle core-seconds waits (a poll, a
timeout, a sleep) and gains from less waiting. The JSON lists the tests by idle core-seconds; the console
shows the top 15 and the totals.
Under `make test`'s two xdist workers the controller writes the file, and a test's machine CPU includes the
light tests the other worker ran meanwhile (PYTEST_WORKERS=0 for one test at a time).
Linux only (/proc/stat); elsewhere the plugin does nothing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_started: dict[str, tuple[float, tuple[int, int], float]] = {}
_rows: list[dict] = []


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot; idle and iowait count as not busy."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def plain_id(nodeid: str) -> str:
    """A test's id without the xdist group pytest-xdist appends under `make test` ("…::test_x@heavy",
    tests/conftest.py); a parametrized id keeps any "@" inside its brackets."""
    return re.sub(r"@[A-Za-z_]+$", "", nodeid)


def pytest_runtest_logstart(nodeid, location) -> None:
    jiffies = _machine_jiffies()
    if jiffies is not None:
        _started[nodeid] = (time.monotonic(), jiffies, _own_cpu())


def pytest_runtest_logfinish(nodeid, location) -> None:
    if nodeid not in _started:
        return
    t0, (busy0, total0), own0 = _started.pop(nodeid)
    wall, (busy1, total1) = time.monotonic() - t0, _machine_jiffies()
    hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    busy_s = (busy1 - busy0) / hz
    _rows.append({"test": plain_id(nodeid), "wall_s": round(wall, 2), "busy_cpu_s": round(busy_s, 2),
                  "busy_share": round((busy1 - busy0) / max(total1 - total0, 1), 3),
                  "pytest_cpu_s": round(_own_cpu() - own0, 2),
                  "idle_core_s": round(max(wall * cores - busy_s, 0.0), 2)})


def _totals(rows: list[dict]) -> dict[str, float]:
    """The rows' sums, and the share of the machine's cores busy over their wall time."""
    totals = {k: round(sum(r[k] for r in rows), 1) for k in ("wall_s", "busy_cpu_s", "pytest_cpu_s", "idle_core_s")}
    totals["busy_share"] = round(totals["busy_cpu_s"] / max(totals["wall_s"] * (os.cpu_count() or 1), 1e-9), 3)
    return totals


def _out(config) -> Path:
    if os.environ.get("ERMGAP_SUITE_CPU"):
        return Path(os.environ["ERMGAP_SUITE_CPU"])
    import pytest

    whole = (config.args_source != pytest.Config.ArgsSource.ARGS and not config.option.keyword
             and not config.option.markexpr)
    return RESULTS / ("suite_cpu.json" if whole else "suite_cpu.partial.json")


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _rows or os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist the controller writes every test's row
        return
    out = _out(session.config)
    rows = sorted(_rows, key=lambda r: -r["idle_core_s"])
    machine = {"platform": platform.platform(), "cores": os.cpu_count() or 1, "load_avg_after": os.getloadavg()}
    doc = {"machine": machine, "tests": len(rows), "totals": _totals(rows), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _rows:
        return
    tr = terminalreporter
    rows = sorted(_rows, key=lambda r: -r["idle_core_s"])[:15]
    totals = _totals(_rows)
    tr.write_sep("=", f"machine CPU per test ({_out(tr.config)})")
    tr.write_line(f"{len(_rows)} tests, {totals['wall_s']:.0f} s wall, machine busy {totals['busy_cpu_s']:.0f} CPU-s "
                  f"({totals['busy_share']:.0%} of its cores)")
    tr.write_line(f"{'idle core-s':>11} {'wall s':>7} {'busy':>5}  test (most idle first)")
    for r in rows:
        name = r["test"].removeprefix("tests/")[:72]
        tr.write_line(f"{r['idle_core_s']:11.1f} {r['wall_s']:7.1f} {r['busy_share']:5.0%}  {name}")
