"""A module imported on first use, so that light entry points can import modules that use a heavy one.

`ermgap.config` composes the objective kinds' settings, so every `ermgap` command (`--help` and a refused
argument included) imports `ermgap.objectives`; their math needs torch, whose import alone is seconds. Those
modules name torch through a `LazyModule`: torch is imported when a function first reads an attribute of it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module `name`; reading an attribute imports it (once) and reads it there. A class statement
    at module level that subclasses one of its classes would import it at once: such classes live in modules
    imported where they are used (e.g. `ermgap.objectives.adversarial_head`)."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"
