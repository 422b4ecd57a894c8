"""The README is a front page and the docs are a site: the README stays under its size budget, starts with the
two commands and links every docs page; the site builds with MkDocs in strict mode (a broken link, anchor or
include fails); the generated references (every command, every config key) equal the code's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ermgap.cli.reference import block, generated_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_BUDGET = 20 * 1024


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=root,
                          capture_output=True, text=True, timeout=110, env=env)


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= README_BUDGET, f"README.md is {len(text.encode())} bytes, over {README_BUDGET}"
    commands = [ln for ln in text.splitlines() if ln.startswith("make ")]
    assert commands[:2] and commands[0].startswith("make demo") and commands[1].startswith("make test")
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", text))
    pages = {f"docs/{p.relative_to(DOCS).as_posix()}" for p in DOCS.rglob("*.md")}
    assert pages - linked == set(), f"README.md does not link these docs pages: {sorted(pages - linked)}"
    assert linked - pages == set(), f"README.md links missing docs pages: {sorted(linked - pages)}"
    for target in ("LICENSE", "CITATION.cff"):
        assert (ROOT / target).is_file() and target in text


def test_licence_matches_pyproject():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert "license: Apache-2.0" in (ROOT / "CITATION.cff").read_text()


@pytest.mark.parametrize("name", sorted(generated_blocks()))
def test_generated_reference_is_current(name):
    page, text = generated_blocks()[name]
    assert block(name, text) in (DOCS / page).read_text(encoding="utf-8"), (
        f"docs/{page}: the generated {name} is stale; run `python -m ermgap.cli.reference docs` (or `make docs`)")


def test_every_command_and_config_key_is_in_the_reference():
    from ermgap.config import RunConfig, flatten

    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    for cmd in ("ermgap train", "ermgap sweep", "ermgap serve", "ermgap data synth", "ermgap runs list", "ermgap ui"):
        assert f"### `{cmd}`" in cli
    config = (DOCS / "config.md").read_text(encoding="utf-8")
    # A mapping-valued key (prompt.verbalizers) is one row; flatten() spells out its entries.
    missing = [k for k in flatten(RunConfig().to_dict())
               if f"| `{k}` |" not in config and f"| `{k.rsplit('.', 1)[0]}` |" not in config]
    assert not missing, f"docs/config.md lacks {missing}"


def test_site_builds_strictly_and_catches_a_broken_link(tmp_path):
    site = tmp_path / "site"
    done = _build(ROOT, site)
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ("index.html", "reproduce/index.html", "cli/index.html", "architecture/index.html"):
        assert (site / page).is_file(), page
    # The included files are in the pages, not links to them.
    assert "Driver and workers" in (site / "architecture/index.html").read_text()
    assert "Submitting work" in (site / "cluster/index.html").read_text()
    # The same tree with one broken link and one broken anchor: strict mode must refuse both.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("mkdocs.yml", "docs", "ARCHITECTURE.md", "cluster"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name)
    page = copy / "docs" / "metrics.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md) and [there](concepts.md#no-such-anchor).\n")
    broken = _build(copy, tmp_path / "site2")
    assert broken.returncode != 0
    assert "no-such-page.md" in broken.stderr and "no-such-anchor" in broken.stderr
