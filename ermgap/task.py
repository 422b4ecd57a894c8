"""The task: which labels are predicted, over which protected attribute the gaps are measured, and inside which
groups (strata). Declared in the run config or inferred from a manifest, resolved once, then used everywhere.

    spec = TaskSpec.from_config(cfg)           # what the config declares
    task = spec.resolve(manifest_df, file=...)   # a Task: every order fixed
    task = Task.from_config(cfg, manifest_df)    # the same in one call

A `Task` fixes three orders that must never differ between train, dev, test, `evaluate`, `metrics` and
`report`: the class index of each label (position in `labels`), the attribute index (position in
`attribute_values`) and the stratum index (position in `stratum_values`).

How an undeclared part is resolved (deterministic, from the TRAIN split; from all rows when the manifest has
no train split, as an evaluation-only manifest):

- labels: `data.labels` (a list, or a mapping label → answer string) in the order given; `infer`: the train
  split's distinct labels sorted by code point. The default is MELD's seven emotions in MELD's order (the
  paper's setting), whose answer strings are `prompt.verbalizers`; any other list answers with the label itself.
- attribute values: `data.attribute_values` in the order given; `infer`: the train values sorted; left
  unset: F, M for the default attribute `gender` (the paper), the train values sorted for any other column.
- stratum values: the train split's values of the stratum column(s), sorted; a combination such as
  `language+modality` names each group by its parts joined with `_` (`deu_uni`). `modality` is the run's
  `data.modality` unless the manifest has a column of that name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ermgap.errors import ConfigError, ManifestError
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES

LABEL_COLUMN = "emotion"  # the manifest column holding the gold label
INFER = "infer"
MAX_LABELS = 50
STRATUM_JOIN = "+"  # in the config: objective.stratum = language+modality
VALUE_JOIN = "_"  # in group names: deu_uni
# The run's modality can be a stratum part without being a manifest column (it is one value per run).
RUN_MODALITY = "modality"
_LEGACY_STRATA = {"language_modality": "language+modality"}


class TaskError(ManifestError):
    """The data contradict the task (an attribute with one value, too many labels, a missing column).

    Carries the column and value so manifest validation can report it like any other problem."""

    def __init__(self, file: str, message: str, *, column: str | None = None, value: str | None = None):
        self.file, self.message, self.column, self.value = file, message, column, value
        where = f"{file}: column '{column}'" if column else file
        shown = f"value {value!r}: " if value is not None else ""
        super().__init__(f"{where}: {shown}{message}")


def stratum_columns(stratum: str) -> tuple[str, ...]:
    """`language+modality` → ("language", "modality"); the legacy `language_modality` is accepted."""
    stratum = _LEGACY_STRATA.get(stratum, stratum)
    parts = tuple(p.strip() for p in stratum.split(STRATUM_JOIN))
    if not all(parts):
        raise ConfigError(f"objective.stratum {stratum!r}: expected a column name or columns joined by "
                          f"'{STRATUM_JOIN}' (e.g. language, language{STRATUM_JOIN}modality)")
    return parts


@dataclass(frozen=True)
class Task:
    """A resolved task. `verbalizers[i]` is the answer string of `labels[i]`."""

    labels: tuple[str, ...] = EMOTIONS
    verbalizers: tuple[str, ...] = EMOTIONS
    attribute: str = "gender"
    attribute_values: tuple[str, ...] = GENDERS
    stratum: tuple[str, ...] = ("language",)
    stratum_values: tuple[str, ...] = LANGUAGES
    # Where the labels came from, for error messages ("data.labels", "the train split").
    labels_from: str = field(default="data.labels", compare=False)

    def __post_init__(self) -> None:
        if len(self.verbalizers) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels but {len(self.verbalizers)} verbalizers")

    # ----------------------------------------------------------------------------- names
    @property
    def stratum_name(self) -> str:
        """`language`, or `language+modality` for a combination (the config's spelling)."""
        return STRATUM_JOIN.join(self.stratum)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def answer_of(self) -> dict[str, str]:
        return dict(zip(self.labels, self.verbalizers))

    # ----------------------------------------------------------------------------- codes
    def stratum_key(self, row: Mapping[str, Any], modality: str | None = None) -> str:
        """One row's (a dict's) stratum name; the run's modality fills a `modality` part the row lacks."""
        return VALUE_JOIN.join(str(row[c]) if c in row else str(modality) for c in self.stratum)

    def stratum_keys(self, frame: pd.DataFrame, modality: str | None = None) -> list[str]:
        """Each row's stratum name (`deu`, or `deu_uni` for language+modality)."""
        parts = []
        for col in self.stratum:
            if col in frame.columns:
                parts.append(frame[col].astype(str).tolist())
            elif col == RUN_MODALITY and modality is not None:
                parts.append([modality] * len(frame))
            else:
                raise ManifestError(f"stratum column '{col}' is not in the data (columns: {', '.join(frame.columns)})")
        return [VALUE_JOIN.join(p) for p in zip(*parts)] if parts else []

    def codes(self, values: Iterable, vocab: Sequence[str]) -> np.ndarray:
        """Index of each value in `vocab`; -1 where it is not there. int64 [N]."""
        index = {v: i for i, v in enumerate(vocab)}
        return np.array([index.get(str(v), -1) for v in values], dtype=np.int64)

    def label_codes(self, values: Iterable) -> np.ndarray:
        return self.codes(values, self.labels)

    def attribute_codes(self, values: Iterable) -> np.ndarray:
        return self.codes(values, self.attribute_values)

    def stratum_codes(self, frame: pd.DataFrame, modality: str | None = None) -> np.ndarray:
        return self.codes(self.stratum_keys(frame, modality), self.stratum_values)

    def cell_codes(self, frame: pd.DataFrame, modality: str | None = None) -> np.ndarray:
        """Each row's (stratum, attribute) cell, row-major: stratum × len(attribute_values) + attribute (the
        order of `ermgap.objectives.CellGrid.cell_names`); int64 [N], values already validated."""
        return (self.stratum_codes(frame, modality) * len(self.attribute_values)
                + self.attribute_codes(frame[self.attribute]))

    # ----------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain lists (for the resolved config YAML, MLflow params and the Ray loop config)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def mlflow_params(self) -> dict[str, str]:
        """`task.*` params: the orders that fix class, attribute and stratum indices."""
        return {"task.labels": ",".join(self.labels), "task.verbalizers": "|".join(self.verbalizers),
                "task.attribute": self.attribute, "task.attribute_values": ",".join(self.attribute_values),
                "task.stratum": self.stratum_name, "task.stratum_values": ",".join(self.stratum_values)}

    @classmethod
    def from_config(cls, cfg, manifest_df: pd.DataFrame, *, file: str = "manifest") -> Task:
        return TaskSpec.from_config(cfg).resolve(manifest_df, file=file, modality=cfg.data.modality)


DEFAULT_TASK = Task()
_MELD_VERBALIZERS = {e: e for e in EMOTIONS}


def _sorted_unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values}))


@dataclass(frozen=True)
class TaskSpec:
    """What a config declares about the task (None / "infer" parts are resolved from data)."""

    labels: tuple[str, ...] | Mapping[str, str] | str = EMOTIONS
    verbalizers: Mapping[str, str] | None = None  # prompt.verbalizers (MELD's emotions only)
    attribute: str = "gender"
    attribute_values: tuple[str, ...] | str | None = None
    stratum: str = "language"

    @classmethod
    def from_config(cls, cfg) -> TaskSpec:
        labels = cfg.data.labels
        return cls(labels=labels if isinstance(labels, (str, dict)) else tuple(labels),
                   verbalizers=dict(cfg.prompt.verbalizers), attribute=cfg.data.attribute,
                   attribute_values=cfg.data.attribute_values if isinstance(cfg.data.attribute_values, (str, type(None)))
                   else tuple(cfg.data.attribute_values),
                   stratum=cfg.objective.stratum)

    @property
    def columns(self) -> tuple[str, ...]:
        """Manifest columns the task reads (label, attribute, stratum parts; the run's modality excepted)."""
        cols = [LABEL_COLUMN, self.attribute, *stratum_columns(self.stratum)]
        return tuple(dict.fromkeys(cols))

    def _verbalize(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        custom = self.verbalizers is not None and dict(self.verbalizers) != _MELD_VERBALIZERS
        if isinstance(self.labels, Mapping):
            if custom:
                raise ConfigError("answer strings are given twice: data.labels is a mapping label → answer and "
                                  "prompt.verbalizers is set too; keep them in data.labels")
            return tuple(str(self.labels[lab]) for lab in labels)
        if set(labels) == set(EMOTIONS) and self.verbalizers is not None:
            return tuple(self.verbalizers[lab] for lab in labels)
        if custom:
            raise ConfigError(f"prompt.verbalizers maps MELD's seven emotions, but the labels are {list(labels)}; "
                              "give the answer strings as data.labels: {label: answer, ...}")
        return labels

    def resolve(self, df: pd.DataFrame, *, file: str = "manifest", modality: str | None = None) -> Task:
        """The Task for a manifest frame (string columns; `split` holds train/dev/test).

        Raises TaskError (a ManifestError naming the file and column) when a needed column is missing, the
        attribute has fewer than two values or there are more than MAX_LABELS labels; ConfigError for a
        contradictory declaration. Values outside the resolved sets are reported by manifest validation.
        """
        strata = stratum_columns(self.stratum)
        for col in self.columns:
            if col not in df.columns and not (col == RUN_MODALITY and modality is not None):
                raise TaskError(file, f"the task needs this column (label {LABEL_COLUMN}, attribute "
                                      f"{self.attribute}, stratum {self.stratum}) but the header has: "
                                      f"{', '.join(df.columns)}", column=col)
        train = df[df["split"] == "train"] if "split" in df.columns else df
        source, where = (train, "the train split") if len(train) else (df, "the manifest")
        if isinstance(self.labels, str):
            if self.labels != INFER:
                raise ConfigError(f"data.labels {self.labels!r}: expected a list, a mapping or '{INFER}'")
            labels, labels_from = _sorted_unique(source[LABEL_COLUMN]), where
        else:
            labels, labels_from = tuple(str(x) for x in self.labels), "data.labels"
        if len(labels) > MAX_LABELS:
            raise TaskError(file, f"{len(labels)} distinct labels in {labels_from}; at most {MAX_LABELS} are "
                                  "supported (is this the label column?)", column=LABEL_COLUMN)
        if len(labels) < 2:
            raise TaskError(file, f"{labels_from} has {len(labels)} label(s) ({', '.join(labels)}); a classifier "
                                  "needs at least two", column=LABEL_COLUMN)
        if self.attribute_values is None and self.attribute == "gender":
            values = GENDERS
        elif self.attribute_values is None or self.attribute_values == INFER:
            values = _sorted_unique(source[self.attribute])
        elif isinstance(self.attribute_values, str):
            raise ConfigError(f"data.attribute_values {self.attribute_values!r}: expected a list or '{INFER}'")
        else:
            values = tuple(str(v) for v in self.attribute_values)
        if len(values) < 2:
            shown = f" (only {values[0]!r})" if values else ""
            raise TaskError(file, f"the protected attribute has {len(values)} value(s) in {where}{shown}; gaps "
                                  "compare at least two groups", column=self.attribute)
        frame = source if all(c in source.columns or c == RUN_MODALITY for c in strata) else df
        probe = Task(labels=labels, verbalizers=labels, attribute=self.attribute, attribute_values=values,
                     stratum=strata, stratum_values=())
        stratum_values = tuple(sorted(set(probe.stratum_keys(frame, modality))))
        return Task(labels=labels, verbalizers=self._verbalize(labels), attribute=self.attribute,
                    attribute_values=values, stratum=strata, stratum_values=stratum_values, labels_from=labels_from)


def task_for_predictions(df: pd.DataFrame, *, labels: Sequence[str] | str | None = None, attribute: str = "gender",
                         attribute_values: Sequence[str] | None = None, by: str = "language",
                         file: str = "predictions") -> Task:
    """The task of a predictions file read on its own (`ermgap metrics`, `ermgap report`).

    Labels: `labels` if a list; else the file's `score_<label>` columns in their order (the run's label order,
    written by label scoring); else, with `labels="infer"`, MELD's seven when every gold and predicted label is
    one of them (the paper) and the gold and predicted labels sorted otherwise; else (None) MELD's seven.
    Attribute values: given, else the file's sorted (F, M for gender). Strata: the values of the `by` column(s)
    found in the file, sorted. Raises TaskError when the attribute has fewer than two values.
    """
    from ermgap.labels import INVALID

    missing = [c for c in ("gold", "pred") if c not in df.columns]
    if missing:  # checked before the labels are inferred from them
        raise TaskError(file, f"required column(s) {', '.join(map(repr, missing))} missing; a predictions file "
                              f"needs utt_id, {by.replace('+', ', ')}, {attribute}, gold, pred "
                              f"(found: {', '.join(map(str, df.columns))})")
    if labels is None or labels == INFER:
        scored = [c[len("score_"):] for c in df.columns if str(c).startswith("score_")]
        seen = set(df["gold"].astype(str).str.strip()) | (set(df["pred"].astype(str).str.strip()) - {INVALID})
        if scored:
            labels = tuple(scored)
        elif labels == INFER and not seen <= set(EMOTIONS):
            labels = tuple(sorted(seen))
        else:
            labels = EMOTIONS
    if attribute_values is None and attribute in df.columns:
        found = _sorted_unique(df[attribute].astype(str).str.strip())
        attribute_values = GENDERS if attribute == "gender" and set(found) <= set(GENDERS) else found
        if len(attribute_values) < 2:
            raise TaskError(file, f"the attribute has {len(found)} value(s) in the file ({', '.join(found)}); gaps "
                                  "compare at least two groups (or pass --attribute-values)", column=attribute)
    strata = stratum_columns(by)
    probe = Task(labels=tuple(labels), verbalizers=tuple(labels), attribute=attribute,
                 attribute_values=tuple(attribute_values or ()), stratum=strata, stratum_values=())
    stripped = df[[c for c in strata if c in df.columns]].astype(str).apply(lambda col: col.str.strip())
    found_strata = tuple(sorted(set(probe.stratum_keys(stripped)))) if stripped.shape[1] == len(strata) else ()
    return Task(labels=tuple(labels), verbalizers=tuple(labels), attribute=attribute,
                attribute_values=tuple(attribute_values or ()), stratum=strata, stratum_values=found_strata,
                labels_from="the predictions")
