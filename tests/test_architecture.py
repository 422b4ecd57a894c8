"""ARCHITECTURE.md stays true: it names every module file under ermgap/, and its dependency order holds for
every `ermgap` import in the code (module-level and lazy ones)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")


def _modules() -> dict[str, Path]:
    """{dotted name without the `ermgap.` prefix: file} ("objectives.cells", "objectives", "ermgap" for the root)."""
    out = {}
    for f in sorted((REPO / "ermgap").rglob("*.py")):
        parts = f.relative_to(REPO / "ermgap").with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "ermgap"] = f
    return out


def _layers() -> dict[str, int]:
    block = re.search(r"```layers\n(.*?)```", DOC, re.S).group(1)
    order = {}
    for i, line in enumerate(block.strip().splitlines()):
        for name in line.split(":", 1)[1].split():
            assert name not in order, f"{name} is in two layers"
            order[name] = i
    return order


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ermgap."):
            out.add(node.module.removeprefix("ermgap."))
            out.update(f"{node.module.removeprefix('ermgap.')}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "ermgap":
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("ermgap.") for a in node.names if a.name.startswith("ermgap."))
    return out


def test_every_module_file_is_named():
    missing = []
    for name, f in _modules().items():
        rel = f.relative_to(REPO / "ermgap")
        # A package's files are named in its line ("objectives/ ... cells.py"), top-level ones as "name.py".
        named = (str(rel) in DOC) or (len(rel.parts) > 1 and f"{rel.parts[0]}/" in DOC and rel.name in DOC)
        if not named:
            missing.append(str(rel))
    assert missing == [], f"ARCHITECTURE.md does not name: {missing}"


def test_every_module_has_a_layer_and_imports_only_upward():
    layers, modules = _layers(), _modules()
    without = sorted(set(modules) - set(layers) - {"ermgap"})
    assert without == [], f"modules without a layer in ARCHITECTURE.md: {without}"
    assert sorted(set(layers) - set(modules)) == [], "ARCHITECTURE.md's layers name modules that do not exist"
    upward = []
    for name, f in modules.items():
        if name == "ermgap":
            continue
        for dep in _imports(f) & set(modules):
            if dep != name and not name.startswith(f"{dep}.") and layers[dep] > layers[name]:
                upward.append(f"{name} (layer {layers[name]}) imports {dep} (layer {layers[dep]})")
    assert upward == []
