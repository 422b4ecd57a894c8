"""`make test`'s two pytest-xdist workers (tests/conftest.py): every heavy test runs on one worker, in order, the
light ones beside it. The grouping fails silently (with pytest 9.2, pytest-xdist 3.8 ignored it and the heavy
tests ran two at a time): this runs the suite's own conftest under `-n 2 --dist loadgroup` on a few marked tests
and reads which worker ran each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import HEAVY_MARKERS

TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest

@pytest.mark.ray
def test_ray(): pass

@pytest.mark.slow
def test_slow(): pass

@pytest.mark.server
def test_server(): pass

@pytest.mark.deepspeed
def test_deepspeed(): pass

@pytest.mark.parametrize("i", range(6))
def test_light(i): pass
'''


def test_heavy_tests_run_on_one_worker_and_light_ones_on_both(tmp_path):
    for name in ("conftest.py", "_procs.py", "_runs.py"):
        (tmp_path / name).symlink_to(TESTS / name)
    (tmp_path / "test_cases.py").write_text(CASES)
    markers = "\n".join(f"    {m}: heavy" for m in sorted(HEAVY_MARKERS))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nmarkers =\n{markers}\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                           "-p", "no:cacheprovider", "test_cases.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = dict((m[2], m[1]) for m in re.finditer(r"\[(gw\d)\] .*PASSED test_cases\.py::(\S+)", proc.stdout))
    assert len(ran) == 10, proc.stdout[-3000:]
    heavy = {name: worker for name, worker in ran.items() if not name.startswith("test_light")}
    assert sorted(heavy) == ["test_deepspeed@heavy", "test_ray@heavy", "test_server@heavy", "test_slow@heavy"], ran
    assert len(set(heavy.values())) == 1, f"heavy tests on more than one worker: {heavy}"
    (other,) = {"gw0", "gw1"} - set(heavy.values())
    assert other in {ran[name] for name in ran if name.startswith("test_light")}, ran
