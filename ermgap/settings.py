"""The base of every config section, and how a component mounts its own settings into the config tree.

A section is a small pydantic model with a help string per field, validated once at load (peft's
`LoraConfig` style). Components that own settings (each objective kind: `ermgap.objectives`) declare
`Setting`s; `ermgap.config` composes them into `RunConfig` at their dotted paths, so the user-facing keys
(`lambda.eta`, `objective.group_dro.eta`, ...) are where a person looks for them while each component reads
a model it declared itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are valid YAML floats but no setting means anything with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Setting:
    """A component's setting at a dotted config path: a whole section (`model`: a `Section` subclass, e.g.
    "objective.group_dro") or one leaf (`model`: (type, pydantic Field), e.g. "objective.p").
    `attr`: the Python attribute when the key is not an identifier (`lambda` → `cfg.lam`)."""

    path: str
    model: Any
    attr: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def is_section(self) -> bool:
        return isinstance(self.model, type) and issubclass(self.model, BaseModel)


__all__ = ["Section", "Setting"]
