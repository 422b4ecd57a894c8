"""The CLI's own behaviour: usage errors end in typer's usage message and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _ermgap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("args", "expected"), [
    (["metrics"], "Missing argument"),                               # a required argument left out
    (["train", "--no-such-option"], "No such option"),               # an unknown option
    (["nope"], "No such command"),                                   # an unknown command
    (["evaluate", "m", "x.csv", "--batch-size", "0"], "--batch-size"),  # an out-of-range value
], ids=["missing-argument", "unknown-option", "unknown-command", "batch-size-0"])
def test_usage_errors_print_usage_and_exit_2(args, expected):
    proc = _ermgap(*args)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    assert "Usage: " in err and expected in err


def test_no_arguments_prints_help():
    proc = _ermgap()
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "Usage: " in out and "train" in out
