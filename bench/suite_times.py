"""Where the test suite's time goes: per-test times from a `pytest --junitxml` run, grouped by file and by
what each test starts (a training on Ray Train + DeepSpeed, a sweep, a Ray cluster, DeepSpeed alone, a server,
the tiny model, MLflow, nothing heavy), and a before/after comparison of two runs.

    .venv/bin/python -m pytest -q --durations=0 --junitxml=/tmp/suite.xml     # the run to read (heavy lock)
    .venv/bin/python bench/suite_times.py /tmp/suite.xml [--top 40]
    .venv/bin/python bench/suite_times.py --before /tmp/base.xml --after /tmp/suite.xml [--top 40]

junit times are per test, set-up and teardown included (pytest's default `junit_duration_report = total`), so a
session or module fixture is charged to the first test that uses it. What a test starts is read from the test
collection of the current tree (markers, fixtures, the source of the test and of its test-module fixtures);
tests that no longer exist fall back to their file's markers. Prints markdown tables (100 columns);
`--json` also writes them as data.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from suite_cpu import plain_id  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]

# The first category that matches is a test's own; order = what dominates the time.
CATEGORIES = (
    ("sweep", "a Ray Tune sweep (Ray cluster, trials with Train worker groups, DeepSpeed, MLflow)"),
    ("training", "a training run (Ray cluster or session cluster, Ray Train worker group, DeepSpeed, MLflow)"),
    ("ray", "a Ray cluster, no training"),
    ("deepspeed", "DeepSpeed without Ray"),
    ("server", "a server process (ermgap serve, mlflow server/ui, moto S3, Chromium)"),
    ("model", "the tiny model (forward passes, pretraining, evaluation)"),
    ("mlflow", "MLflow (sqlite) only"),
    ("cli", "a CLI subprocess only"),
    ("pure", "nothing heavy"),
)
_PATTERNS = {
    "sweep": r"run_sweep\(|\"sweep\"|_cli\(spec|sweep_on|two_node_sweep",
    "training": r"run_training\(|_train\(|\"train\",|ermgap train|submit\b.*tiny\.yaml|training_job",
    "server": r"ServerProcess|moto|mlflow server|\"ui\"|chromium|server\b",
    "model": r"tiny_model|load_backbone|build_tiny|tiny_voxtral|pretrain",
    "mlflow": r"MlflowClient|mlflow|sqlite:",
    "cli": r"ermgap\.cli\.main|CliRunner|_cli\(",
}


class _Collector:
    """pytest plugin: markers, fixtures and source text of every collected test."""

    def __init__(self) -> None:
        self.items: dict[str, dict] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            fn = getattr(item, "function", None)
            texts = []
            for f in [fn, *_module_fixtures(item)]:
                try:
                    texts.append(inspect.getsource(f))
                except (OSError, TypeError):
                    pass
            self.items[item.nodeid] = {"markers": sorted({m.name for m in item.iter_markers()}),
                                       "fixtures": sorted(getattr(item, "fixturenames", ())),
                                       "source": "\n".join(texts)}


def _module_fixtures(item) -> list:
    """The functions of the fixtures a test uses that its own test module (or one it imports) defines."""
    out = []
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(info, "names_closure", ()):
        for d in info.name2fixturedefs.get(name, ()):
            func = getattr(d, "func", None)
            if func is not None and "conftest" not in getattr(func, "__module__", ""):
                out.append(func)
    return out


def collect() -> dict[str, dict]:
    import contextlib
    import io

    import pytest

    plugin = _Collector()
    with contextlib.redirect_stdout(io.StringIO()):  # the collection listing
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")], plugins=[plugin])
    return plugin.items


def category(info: dict | None) -> str:
    if info is None:
        return "unknown"
    markers, fixtures, src = set(info["markers"]), set(info["fixtures"]), info["source"]
    if re.search(_PATTERNS["sweep"], src) and "ray" in markers:
        return "sweep"
    if ("deepspeed" in markers and "ray" in markers) or (re.search(_PATTERNS["training"], src) and "ray" in markers):
        return "training"
    if "ray" in markers or "ray_cluster" in fixtures:
        return "ray"
    if "deepspeed" in markers:
        return "deepspeed"
    if "chromium" in markers or fixtures & {"server", "moto_endpoint", "s3"} or re.search(_PATTERNS["server"], src):
        return "server"
    if "tiny_model" in fixtures or re.search(_PATTERNS["model"], src):
        return "model"
    if re.search(_PATTERNS["mlflow"], src):
        return "mlflow"
    if re.search(_PATTERNS["cli"], src):
        return "cli"
    return "pure"


def read_junit(path: Path) -> dict[str, float]:
    """{nodeid: seconds} of every test case (passed, failed or skipped) in a junit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        parts = cls.split(".")
        # classname is tests.test_x[.Class]: the file is the first two parts, a class the rest.
        file = "/".join(parts[:2]) + ".py"
        nodeid = plain_id("::".join([file, *parts[2:], name]))
        out[nodeid] = out.get(nodeid, 0.0) + float(case.get("time", 0.0))
    return out


def _fmt(s: float | None) -> str:
    return "–" if s is None else f"{s:,.1f}"


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def tables(times: dict[str, float], info: dict[str, dict], top: int, before: dict[str, float] | None = None) -> dict:
    """Markdown tables: the `top` slowest tests, per-file and per-category totals (before/after when given)."""
    ids = sorted(set(times) | set(before or {}), key=lambda n: -(times.get(n) or (before or {}).get(n, 0.0)))
    cat = {n: category(info.get(n)) for n in ids}
    cols = "| before s | after s " if before is not None else "| s "
    rows = []
    for n in ids[:top]:
        name = n if len(n) <= 70 else n[:67] + "..."
        vals = f"| {_fmt(before.get(n))} | {_fmt(times.get(n))} " if before is not None else f"| {_fmt(times[n])} "
        rows.append(f"| {name} | {cat[n]} {vals}|")
    top_md = "\n".join([f"| test | starts {cols}|", "|---|---" + "|---:" * (2 if before is not None else 1) + "|",
                        *rows])

    def grouped(key) -> str:
        groups: dict[str, list[str]] = defaultdict(list)
        for n in ids:
            groups[key(n)].append(n)
        lines = [f"| {'file' if key is _file else 'starts'} | tests {cols}| max s |",
                 "|---|---:" + "|---:" * (2 if before is not None else 1) + "|---:|"]
        order = sorted(groups, key=lambda g: -sum(times.get(n, 0.0) for n in groups[g]))
        for g in order:
            now = [times[n] for n in groups[g] if n in times]
            count = f"{len(now)}" if before is None else f"{sum(n in before for n in groups[g])} → {len(now)}"
            vals = f"| {_fmt(sum(now))} " if before is None else \
                f"| {_fmt(sum(before[n] for n in groups[g] if n in before))} | {_fmt(sum(now))} "
            lines.append(f"| {g} | {count} {vals}| {_fmt(max(now) if now else None)} |")
        total_now = sum(times.values())
        total = f"| **all** | {len(times)} | {_fmt(total_now)} |" if before is None else \
            f"| **all** | {len(before)} → {len(times)} | {_fmt(sum(before.values()))} | {_fmt(total_now)} |"
        return "\n".join(lines + [total + " |"])

    return {"top": top_md, "files": grouped(_file), "categories": grouped(lambda n: cat[n]),
            "category_of": cat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("junit", nargs="?", type=Path, help="a junit XML file (one run)")
    ap.add_argument("--before", type=Path, help="junit XML of the run to compare against")
    ap.add_argument("--after", type=Path, help="junit XML of the newer run")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", type=Path, help="also write the tables and per-test times here")
    args = ap.parse_args()
    if args.junit is None and not (args.before and args.after):
        ap.error("give one junit file, or --before and --after")
    info = collect()
    after = read_junit(args.after or args.junit)
    before = read_junit(args.before) if args.before else None
    out = tables(after, info, args.top, before)
    print("\n## Slowest tests\n\n" + out["top"])
    print("\n## Per file\n\n" + out["files"])
    print("\n## Per what a test starts\n\n" + out["categories"])
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in CATEGORIES))
    if args.json:
        args.json.write_text(json.dumps({"after": after, "before": before, **out}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
