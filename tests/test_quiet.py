"""Commands are quiet unless asked: no library progress bars or accelerator notices on a plain run, and the
same output comes back with ERMGAP_VERBOSE=1 (so the check sees a real difference, not an absent feature)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NOISE = ("Setting accelerator to CPU", "Writing model shards", "Loading weights")


def _model_tiny(tmp_path, **env) -> str:
    from ermgap.quiet import QUIET_ENV

    # Not this process's environment as it is: a command run in-process by another test (CliRunner) may have
    # quieted it, and the child would inherit that.
    environ = {k: v for k, v in os.environ.items() if k != "ERMGAP_VERBOSE" and k not in QUIET_ENV} | env
    res = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "model", "tiny", "--out", str(tmp_path / "m"),
                          "--force"], env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_model_tiny_prints_one_line_and_the_library_output_only_when_verbose(tmp_path):
    quiet = _model_tiny(tmp_path)
    assert [n for n in NOISE if n in quiet] == [], quiet
    assert " ".join(quiet.split()).startswith(f"wrote {tmp_path / 'm'} (")  # its one message (rich wraps it at 80)
    loud = _model_tiny(tmp_path, ERMGAP_VERBOSE="1")
    assert "Writing model shards" in loud, loud


def test_the_token_auth_notice_goes_and_the_no_auth_warning_stays():
    import logging

    from ermgap.quiet import _TokenAuthEnabled

    f = _TokenAuthEnabled()
    rec = lambda msg: logging.LogRecord("ray", logging.WARNING, __file__, 1, msg, None, None)  # noqa: E731
    assert not f.filter(rec("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert f.filter(rec("Token authentication is disabled for this Ray cluster. Anyone with network access"))


def test_the_raylet_worker_burst_warning_goes_by_its_exact_text(monkeypatch, capsys):
    """Oracle: the message as Ray's raylet formats it (its format string, read from the raylet binary), printed
    the way the driver prints raylet messages; any other raylet message still shows."""
    import inspect
    import re
    from pathlib import Path

    import ray
    import ray._private.worker as ray_worker

    from ermgap.quiet import drop_raylet_notices

    raylet = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
    fmt = re.search(rb"WARNING: %d %s worker processes have been started[^\0]*?workarounds\.", raylet.read_bytes())
    assert fmt, "the raylet binary no longer has this message: update RAYLET_WORKER_BURST"
    message = fmt.group(0).decode() % (8, "PYTHON", "0f3a9c", "127.0.0.1", 4, 2)
    # The driver's error listener prints through this module global (so wrapping it reaches the listener).
    assert "print_to_stdstream(" in inspect.getsource(ray_worker.listen_error_messages)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored afterwards
    drop_raylet_notices()
    drop_raylet_notices()  # idempotent: wrapped once
    for line in (message, "The node with node id 0f3a9c has been marked dead"):
        ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "worker processes have been started" not in out
    assert "has been marked dead" in out
