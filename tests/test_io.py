"""Atomic outputs: nothing half-written on failure, nothing overwritten without force."""

from __future__ import annotations

import pytest

from ermgap.errors import ConfigError, OutputExistsError
from ermgap.io import OWNER_MARKER, atomic_dir, atomic_path, atomic_write_text, check_replaceable


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_no_overwrite_without_force(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "one")
    with pytest.raises(OutputExistsError, match="--force"):
        atomic_write_text(target, "two")
    assert target.read_text() == "one"
    atomic_write_text(target, "two", force=True)
    assert target.read_text() == "two"


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "corpus"
    with atomic_dir(target, kind="corpus") as d:
        (d / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    with pytest.raises(OutputExistsError):
        with atomic_dir(target, kind="corpus"):
            pass
    with pytest.raises(ValueError):
        with atomic_dir(target, kind="corpus", force=True) as d:
            (d / "y").write_text("2")
            raise ValueError("bad input")
    with pytest.raises(ConfigError, match=r"holds a corpus \(corpus written by ermgap\), not a model: --force only "
                                          r"replaces a model with a model"):
        with atomic_dir(target, kind="model", force=True):
            pass
    # The old result survives a failed forced rewrite, and no temp dirs are left behind.
    assert sorted(p.name for p in target.iterdir()) == [OWNER_MARKER, "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with atomic_dir(target, kind="corpus", force=True) as d:
        (d / "y").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [OWNER_MARKER, "y"]


def test_markers_written_before_kinds_existed_still_name_their_kind(tmp_path):
    """A run or sweep directory claimed by an older ermgap has only the description line."""
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    for d, text in ((run, "a training run written by ermgap; `--force` may replace this directory\n"),
                    (sweep, "sweep demo written by ermgap; `--force` may replace this directory\n")):
        d.mkdir()
        (d / OWNER_MARKER).write_text(text)
    check_replaceable(run, "run")
    check_replaceable(sweep, "sweep")
    with pytest.raises(ConfigError, match=r"sweep holds a sweep \(sweep demo written by ermgap\), not a training run"):
        check_replaceable(sweep, "run")
