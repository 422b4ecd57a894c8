"""How long an `ermgap` command takes when it does no work: `--help`, `config show`, and a setting the command
refuses (`ermgap train` with a mistyped key, `ermgap bias-lab` with an unknown row, `ermgap sweep` with a mistyped
base key). A user waits this long for every such answer, and the suite pays it in each of its CLI tests that
expect a refusal.

Each command is a fresh interpreter (`python -c` running `ermgap.cli.main` as `ermgap` would), timed from outside
(wall) and asked which of torch, Ray and MLflow it imported. `--tree NAME=DIR` (repeated) runs the commands with
another checkout's `ermgap` package first on the path (e.g. the commit before a change, from `git worktree add`),
interleaved, so before and after are measured in one run:

    .venv/bin/python bench/cli_startup.py [--repeats 3]
    .venv/bin/python bench/cli_startup.py --tree before=/tmp/ermgap-before --tree after=.

JSON in bench/results/cli_startup.json (with the machine, its load and each tree's commit); prints a table with each
other tree's time as a ratio to the first tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow")
COMMANDS = {
    "--help": ["--help"],
    "config show": ["config", "show", "configs/tiny.yaml"],
    "train, a mistyped key": ["train", "configs/tiny.yaml", "optim.epochz=3"],
    "bias-lab, an unknown row": ["bias-lab", "--data-root", "{tmp}/lab", "--row", "erm", "--row", "bogus"],
    "sweep, a mistyped key": ["sweep", "sweeps/demo.yaml", "base.optim.epochz=3"],
}
# What each command must answer: its exit code (the measurement is of the answer, not of a crash).
EXIT = {"--help": 0, "config show": 0, "train, a mistyped key": 2, "bias-lab, an unknown row": 2,
        "sweep, a mistyped key": 2}


def _time(tree: Path, argv: list[str]) -> tuple[float, list[str], int]:
    """(wall seconds, which of HEAVY it imported, its exit code) of `ermgap ARGV` run from `tree`."""
    code = (f"import json, runpy, sys; sys.argv = ['ermgap', *{argv!r}]\n"
            "try:\n    runpy.run_module('ermgap.cli.main', run_name='__main__')\n    code = 0\n"
            "except SystemExit as e:\n    code = e.code or 0\n"
            f"print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]), file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(tree), COLUMNS="100")
    t0 = time.perf_counter()
    # cwd = the tree: `python -c` puts the working directory first on sys.path.
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    exit_code, loaded = json.loads(out.stderr.strip().splitlines()[-1])
    return wall, loaded, exit_code


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR: a checkout to measure (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli_startup.json"))
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(ROOT)}
    trees = {name: Path(path).resolve() for name, path in trees.items()}
    load_before = os.getloadavg()
    walls: dict[str, dict[str, list[float]]] = {n: {c: [] for c in COMMANDS} for n in trees}
    loaded: dict[str, dict[str, list[str]]] = {n: {} for n in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for command, argv in COMMANDS.items():
                for name, tree in trees.items():
                    wall, heavy, exit_code = _time(tree, [a.format(tmp=tmp) for a in argv])
                    if exit_code != EXIT[command]:
                        raise SystemExit(f"{name}: `ermgap {' '.join(argv)}` exited {exit_code}, "
                                         f"expected {EXIT[command]}")
                    walls[name][command].append(wall)
                    loaded[name][command] = heavy
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
        "repeats": args.repeats,
        "trees": {n: {"path": str(t), "commit": _commit(t)} for n, t in trees.items()},
        "commands": {c: " ".join(a) for c, a in COMMANDS.items()},
        "wall_s": {n: {c: {"median": round(statistics.median(v), 2), "all": [round(x, 2) for x in v]}
                       for c, v in per.items()} for n, per in walls.items()},
        "imported": loaded,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    names = list(trees)
    first, others = names[0], names[1:]  # each other tree's time as a ratio to the first's
    for n in others:
        result.setdefault("ratio_to_" + first, {})[n] = {
            c: round(result["wall_s"][n][c]["median"] / result["wall_s"][first][c]["median"], 2) for c in COMMANDS}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| command | " + " | ".join(f"{n} (s)" for n in names) + "".join(f" | {n} / {first}" for n in others)
          + " | " + " | ".join(f"{n} imports" for n in names) + " |")
    print("|---|" + "---:|" * (len(names) + len(others)) + "---|" * len(names))
    for command in COMMANDS:
        print(f"| {command} | " + " | ".join(f"{result['wall_s'][n][command]['median']:.2f}" for n in names)
              + "".join(f" | {result['ratio_to_' + first][n][command]:.2f}×" for n in others) + " | "
              + " | ".join(", ".join(loaded[n][command]) or "–" for n in names) + " |")
    print(f"\nmedian of {args.repeats}; load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f}; {args.out}")


if __name__ == "__main__":
    main()
