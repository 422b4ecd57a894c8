"""The base of every config section, and how a component mounts its own settings into the config tree.

A section is a small pydantic model with a help string per field, validated once at load (peft's
`LoraConfig` style). Components that own settings (each objective kind: `ermgap.objectives`) declare
`Setting`s; `ermgap.config` composes them into `RunConfig` at their dotted paths, so the user-facing keys
(`lambda.eta`, `objective.group_dro.eta`, ...) are where a person looks for them while each component reads
a model it declared itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


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


def mounted_fields(settings: Iterable[Setting], parent: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `settings` mounted directly under `parent` ("" = the top level) as pydantic field definitions by
    attribute name, in order: (leaves, sections), for `create_model`."""
    leaves: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for setting in settings:
        if setting.parent != parent:
            continue
        attr = setting.attr or setting.name
        if setting.is_section:
            alias = {"alias": setting.name} if attr != setting.name else {}
            sections[attr] = (setting.model, Field(default_factory=setting.model, **alias))
        else:
            leaves[attr] = setting.model
    return leaves, sections


def section_reference(model: type[BaseModel], prefix: str = "") -> str:
    """A Markdown table of every key of a section tree with its default and description."""
    rows: list[str] = []
    if not prefix:
        rows += ["| key | default | description |", "| --- | --- | --- |"]
    instance = model()
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append(section_reference(ann, key + "."))
            continue
        default = getattr(instance, name)
        shown = yaml.safe_dump(default, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        if len(shown) > 60:
            shown = shown[:57] + "..."
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {desc} |")
    return "\n".join(rows)


__all__ = ["Section", "Setting", "mounted_fields", "section_reference"]
