"""Atomic outputs: nothing half-written on failure, nothing overwritten without force."""

from __future__ import annotations

import pytest

from ermgap.errors import OutputExistsError
from ermgap.io import atomic_dir, atomic_path, atomic_write_text


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
    with atomic_dir(target) as d:
        (d / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    with pytest.raises(OutputExistsError):
        with atomic_dir(target):
            pass
    with pytest.raises(ValueError):
        with atomic_dir(target, force=True) as d:
            (d / "y").write_text("2")
            raise ValueError("bad input")
    # The old result survives a failed forced rewrite, and no temp dirs are left behind.
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
