"""The README's config reference is the code's: a changed default or key must be reflected there."""

from __future__ import annotations

from pathlib import Path

from ermgap.config import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_is_current():
    text = README.read_text(encoding="utf-8")
    assert reference_markdown() in text, "README config reference is stale: paste `ermgap config reference`"


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in README.read_text(encoding="utf-8").splitlines() if ln.startswith("make ")]
    assert lines[:2] and lines[0].startswith("make demo") and lines[1].startswith("make test")
