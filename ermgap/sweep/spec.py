"""The sweep spec: which training configs a sweep runs, how it searches and how it picks a winner.

A spec is YAML validated like every config (errors name file:dotted-key, with did-you-mean), and
*every* trial config it can produce is validated as a full `RunConfig` before Ray starts:

    name: demo
    base: ../configs/tiny.yaml          # path relative to this file, or an inline mapping
    overrides: {optim.epochs: 6}        # dotted RunConfig keys applied to the base
    variants:                           # named, coupled settings; the sweep is a grid over them
      erm:         {lambda.mode: fixed, lambda.init: 0.0}
      adaptive_p2: {lambda.mode: adaptive, objective.p: 2}
    space:                              # any RunConfig leaf key -> one kind
      optim.lr: {grid: [3.0e-4, 5.0e-4]}          # grid | choice | uniform | loguniform | randint
    seeds: [42, 43]                     # each config repeated per seed (an `optim.seed` grid)
    algorithm: grid                     # grid | random | optuna_tpe | optuna_multi
    scheduler: {type: asha, metric: dev_w_f1, mode: max, grace_period: 2, max_t: 10}
    resources: {num_workers: 1, cpus_per_worker: 0.9, gpus_per_worker: 0}
    max_concurrent_trials: 2

`load_sweep_spec(path, overrides)` returns a `SweepSpec` holding the validated spec and the resolved
base tree; `spec.trial_config(params)` builds the RunConfig of one trial from its sampled params.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ermgap.config import (
    RunConfig,
    apply_overrides,
    did_you_mean,
    format_errors,
    known_keys,
    parse_scalar,
    read_yaml,
    set_dotted,
    validate_tree,
)
from ermgap.errors import ConfigError
from ermgap.metric_registry import reported_keys

VARIANT_PARAM = "variant"
SEED_KEY = "optim.seed"
# Metrics every training report carries (contract "train": the registry's reported metrics per split, and the
# best checkpoint's dev W-F1); objectives/selection/scheduler must use one.
def reported_metrics() -> tuple[str, ...]:
    return (*reported_keys(), "best_dev_w_f1")


REPORTED_METRICS = reported_metrics()  # the shipped metrics (a metric registered later: reported_metrics())
ALGORITHMS = ("grid", "random", "optuna_tpe", "optuna_multi")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_metric(v: str) -> str:
    if v not in reported_metrics():
        raise ValueError(f"unknown metric {v!r}; reported metrics are {list(reported_metrics())}")
    return v


class Dimension(_Section):
    """One search dimension: exactly one of the kinds."""

    grid: list[Any] | None = Field(None, description="Every value is tried (grid search).")
    choice: list[Any] | None = Field(None, description="A value sampled uniformly from the list.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled log-uniformly (low > 0).")
    randint: tuple[int, int] | None = Field(None, description="[low, high] integer, both ends inclusive.")

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(KINDS)}, got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} must list at least one value (an empty {kind} gives no trials)")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def probe_values(self) -> list[Any]:
        """Values that exercise validation: every listed value, both ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        return [self.args[0], self.args[1]]


class SchedulerSpec(_Section):
    type: Literal["asha"] = Field("asha", description="Early stopping of weak trials (ASHA).")
    metric: str = Field("dev_w_f1", description="Dev metric ASHA compares at each rung.")
    mode: Literal["max", "min"] = Field("max", description="Whether larger `metric` is better.")
    time_attr: Literal["eval_round", "epoch", "step"] = Field("eval_round", description="Progress counter of the rungs.")
    grace_period: int = Field(1, gt=0, description="Evaluations before a trial can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="Keep 1/reduction_factor of the trials at each rung.")
    max_t: int = Field(20, gt=0, description="Progress at which every trial stops.")

    _metric = field_validator("metric")(classmethod(lambda cls, v: _check_metric(v)))

    @model_validator(mode="after")
    def _grace_le_max(self) -> SchedulerSpec:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_t ({self.max_t})")
        return self


class ResourcesSpec(_Section):
    num_workers: int | None = Field(None, gt=0, description="Ray Train workers per trial (default: the base config's).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker (default: the base config's).")
    gpus_per_worker: int | None = Field(None, ge=0, le=1, description="0 or 1 GPU per worker (default: the base config's).")
    trial_driver: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each trial driver requests besides its 0.1 CPU, e.g. {on_demand: 0.01} "
                    "to pin drivers to non-spot nodes started with --resources '{\"on_demand\": 1}'.")

    @field_validator("trial_driver")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for k, amount in v.items():
            if k.upper() in ("CPU", "GPU", "MEMORY") or amount <= 0:
                raise ValueError(f"{k}: {amount}: name a custom resource with a positive amount "
                                 "(CPU/GPU come from num_workers and cpus_per_worker)")
        return v


class MlflowSpec(_Section):
    experiment: str = Field("ermgap-sweeps", description="MLflow experiment of the parent and child runs.")
    tracking_uri: str | None = Field(None, description="Default: the base config's, then $MLFLOW_TRACKING_URI, then sqlite:///runs/mlflow.db.")


class SelectionSpec(_Section):
    """Default rule: the best dev W-F1 among trials whose dev AVG gap is within `tolerance` of the lowest."""

    metric: str = Field("dev_w_f1", description="Maximised (or minimised, see mode) among the admissible trials.")
    mode: Literal["max", "min"] = Field("max", description="Direction of `metric`.")
    gap_metric: str = Field("dev_avg_gap", description="Fairness metric (lower is better) that decides admissibility.")
    tolerance: float = Field(2.0, ge=0, description="Admissible: gap_metric <= lowest gap_metric + tolerance (same units, percent points).")

    _m = field_validator("metric", "gap_metric")(classmethod(lambda cls, v: _check_metric(v)))


class SweepSpecModel(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Sweep name (Tune experiment and MLflow parent run).")
    description: str = Field("", description="Free text, logged to the parent run.")
    base: str | dict[str, Any] = Field(..., description="Base training config: a YAML path relative to the spec, or an inline mapping.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted RunConfig keys applied to the base.")
    variants: dict[str, dict[str, Any]] | None = Field(None, description="Named coupled settings (dotted keys -> values); a grid over the names.")
    space: dict[str, Dimension] = Field(default_factory=dict, description="Dotted RunConfig key -> search dimension.")
    seeds: list[int] | None = Field(None, description="Repeat every config for each seed (grid over optim.seed).")
    algorithm: Literal["grid", "random", "optuna_tpe", "optuna_multi"] = Field("grid", description="Search algorithm.")
    objectives: dict[str, Literal["max", "min"]] = Field(
        default_factory=lambda: {"dev_w_f1": "max"},
        description="Optuna objectives (metric -> max|min): one for optuna_tpe, two or more for optuna_multi.")
    num_samples: int = Field(1, gt=0, description="Samples per grid point (random) or trials in all (optuna).")
    scheduler: SchedulerSpec | None = Field(None, description="Optional ASHA early stopping.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Per-trial worker resources.")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Trials running at once (default: as many as fit).")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="MLflow experiment of the sweep.")
    storage_path: str = Field("runs/sweeps", description="Tune experiments go to <storage_path>/<name> (local dir or a shared URI).")
    selection: SelectionSpec = Field(default_factory=SelectionSpec, description="How the best trial is chosen.")
    search_seed: int = Field(0, description="Seed of the search algorithm's own sampling.")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must name at least one metric")
        for k in v:
            _check_metric(k)
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("must list at least one seed (or leave it out)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        if v is not None and not v:
            raise ValueError("must name at least one variant (or leave it out)")
        return v

    @model_validator(mode="after")
    def _algorithm_fits(self) -> SweepSpecModel:
        optuna = self.algorithm.startswith("optuna")
        grids = [k for k, d in self.space.items() if d.kind == "grid"]
        sampled = [k for k, d in self.space.items() if d.kind != "grid"]
        if self.algorithm == "grid":
            if sampled:
                raise ValueError(f"algorithm 'grid' needs grid dimensions only; {sampled} are sampled "
                                 "(use algorithm 'random' or 'optuna_tpe', or make them grids)")
            if self.num_samples != 1:
                raise ValueError("algorithm 'grid' runs each grid point once: set num_samples 1 and repeat with `seeds`")
        if optuna:
            if grids:
                raise ValueError(f"Optuna cannot search grid dimensions {grids}: use `choice` instead")
            if self.seeds and len(self.seeds) > 1:
                raise ValueError("Optuna searches one config per trial: give one seed (repeat seeds with algorithm grid/random)")
        if self.algorithm == "optuna_tpe" and len(self.objectives) != 1:
            raise ValueError(f"optuna_tpe optimises one objective, got {list(self.objectives)} (use optuna_multi)")
        if self.algorithm == "optuna_multi" and len(self.objectives) < 2:
            raise ValueError(f"optuna_multi needs two or more objectives, got {list(self.objectives)}")
        if self.seeds and SEED_KEY in self.space:
            raise ValueError(f"give seeds either as `seeds` or as space['{SEED_KEY}'], not both")
        return self


# --------------------------------------------------------------------------- loaded spec


@dataclass
class SweepSpec:
    """A validated spec plus the resolved base config tree (base file + overrides + resources)."""

    model: SweepSpecModel
    source: str  # the spec file (or "<dict>")
    base_tree: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)  # the spec tree after CLI overrides (what gets logged)

    @property
    def name(self) -> str:
        return self.model.name

    def hash(self) -> str:
        """Stable short hash of the resolved spec: identifies a sweep across resumes."""
        blob = json.dumps({"spec": self.raw, "base": self.base_tree}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def param_names(self) -> list[str]:
        """Tune param names in display order: variant, the space keys, then optim.seed."""
        names = [VARIANT_PARAM] if self.model.variants else []
        names += list(self.model.space)
        if self.model.seeds:
            names.append(SEED_KEY)
        return names

    def trial_tree(self, params: dict[str, Any]) -> dict[str, Any]:
        tree = copy.deepcopy(self.base_tree)
        for key, value in params.items():
            if key == VARIANT_PARAM:
                for vkey, vvalue in self.model.variants[value].items():
                    set_dotted(tree, vkey, vvalue)
            else:
                set_dotted(tree, key, value)
        return tree

    def trial_config(self, params: dict[str, Any]) -> RunConfig:
        """The RunConfig of one trial from its Tune params ({'variant': name, 'optim.lr': 3e-4, ...})."""
        return validate_tree(self.trial_tree(params), f"{self.source}: trial {_show(params)}")

    def first_trial_config(self) -> RunConfig:
        """The first grid point's RunConfig: what every trial shares (data, task), read before any trial runs."""
        return self.trial_config(self.grid_points()[0])

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid combination (variants × grid dimensions × seeds), sampled dimensions left out."""
        axes: list[tuple[str, list[Any]]] = []
        if self.model.variants:
            axes.append((VARIANT_PARAM, list(self.model.variants)))
        axes += [(k, list(d.grid)) for k, d in self.model.space.items() if d.kind == "grid"]
        if self.model.seeds:
            axes.append((SEED_KEY, list(self.model.seeds)))
        names = [a for a, _ in axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*[v for _, v in axes])]

    def num_trials(self) -> int:
        if self.model.algorithm.startswith("optuna"):
            return self.model.num_samples
        return len(self.grid_points()) * self.model.num_samples

    def example_trials(self, seed: int = 0) -> list[dict[str, Any]]:
        """The trials as they will run; sampled values are drawn here for display only (Tune redraws them)."""
        rng = random.Random(seed)
        sampled = {k: d for k, d in self.model.space.items() if d.kind != "grid"}
        if self.model.algorithm.startswith("optuna"):
            points = [{VARIANT_PARAM: rng.choice(list(self.model.variants))} if self.model.variants else {}
                      for _ in range(self.model.num_samples)]
            if self.model.seeds:
                for p in points:
                    p[SEED_KEY] = self.model.seeds[0]
        else:
            points = [dict(p) for p in self.grid_points() for _ in range(self.model.num_samples)]
        for p in points:
            for k, d in sampled.items():
                p[k] = _draw(d, rng)
        order = self.param_names()
        return [{k: p[k] for k in order if k in p} for p in points]

    def trial_resources(self, params: dict[str, Any] | None = None) -> dict[str, float]:
        """{'CPU': ..., 'GPU': ...} one trial holds: its Tune function (0.1 CPU) plus its Train workers."""
        if params is None:
            params = self.example_trials()[0]
        d = self.trial_config(params).distributed
        return {"CPU": TRIAL_DRIVER_CPU + d.num_workers * d.cpus_per_worker,
                "GPU": float(d.num_workers if d.use_gpu else 0)}


# The Tune function trainable itself only waits on the Train run; Ray rejects a zero CPU request.
TRIAL_DRIVER_CPU = 0.1


def _draw(d: Dimension, rng: random.Random) -> Any:
    lo, hi = (d.args[0], d.args[1]) if d.kind in ("uniform", "loguniform", "randint") else (None, None)
    if d.kind == "choice":
        return rng.choice(list(d.args))
    if d.kind == "uniform":
        return rng.uniform(lo, hi)
    if d.kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(lo, hi)


def _show(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in params.items()) + "}"


# --------------------------------------------------------------------------- loading


def _check_key(key: str, where: str) -> None:
    """A dotted key must name a RunConfig leaf (not a section, not unknown)."""
    known = known_keys(RunConfig)
    if key not in known:
        raise ConfigError(f"{where}: unknown config key '{key}'{did_you_mean(key, RunConfig)}")
    if any(k.startswith(key + ".") for k in known):
        raise ConfigError(f"{where}: '{key}' is a config section, not a value; name a key inside it "
                          f"(e.g. '{next(k for k in known if k.startswith(key + '.'))}')")


def _split_overrides(overrides: list[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """CLI overrides: `base.<key>=v` edits the base config; `space.<key>=<yaml>` replaces a dimension
    (a list means a grid); anything else is a dotted key of the spec itself (e.g. `num_samples=4`), and a
    training key without `base.` (`optim.epochs=2`, as on `ermgap train`) is refused with that spelling."""
    spec_edits: dict[str, Any] = {}
    base_edits: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' must look like key=value (e.g. base.optim.epochs=2)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if key.startswith("base."):
            base_edits.append(f"{key[5:]}={raw}")
        elif not key:
            raise ConfigError(f"{source}: override '{item}' has an empty key")
        elif (head := key.partition(".")[0]) in RunConfig.model_fields and head not in SweepSpecModel.model_fields:
            # A training key typed as on `ermgap train` would otherwise be reported as "optim: unknown key".
            raise ConfigError(f"{source}: '{key}' is a training config key, not a sweep spec key; set it on the "
                              f"sweep's base config as base.{key}={raw}")
        else:
            spec_edits[key] = parse_scalar(raw)
    return spec_edits, base_edits


def _apply_spec_edits(tree: dict[str, Any], edits: dict[str, Any]) -> None:
    for key, value in edits.items():
        if key.startswith("space."):
            dim = {"grid": value} if isinstance(value, list) else value
            tree.setdefault("space", {})[key[6:]] = dim
        elif key.startswith("variants.") and key.count(".") >= 2:
            _, vname, vkey = key.split(".", 2)
            tree.setdefault("variants", {}).setdefault(vname, {})[vkey] = value
        elif key.startswith("overrides."):
            tree.setdefault("overrides", {})[key[10:]] = value
        else:
            set_dotted(tree, key, value)


def load_sweep_spec(path: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None,
                    *, base_dir: str | os.PathLike | None = None) -> SweepSpec:
    """Load, validate and expand a sweep spec; raises ConfigError naming file:key for any problem.

    `path` may be a YAML file or an already-parsed mapping (then relative `base` paths resolve
    against `base_dir`, default the CWD). Overrides: see `_split_overrides`.
    """
    if isinstance(path, dict):
        tree, source, here = copy.deepcopy(path), "<dict>", Path(base_dir or ".")
    else:
        tree, source, here = read_yaml(path), str(path), Path(path).parent
    spec_edits, base_edits = _split_overrides(list(overrides or []), f"{source} (overrides)")
    _apply_spec_edits(tree, spec_edits)
    if spec_edits or base_edits:
        source_o = f"{source} + overrides"
    else:
        source_o = source
    try:
        model = SweepSpecModel.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source_o, SweepSpecModel)) from None

    # Base tree: file or inline mapping, then spec overrides, then resources, then CLI base.* edits.
    if isinstance(model.base, str):
        base_path = (here / model.base) if not Path(model.base).is_absolute() else Path(model.base)
        base_tree = read_yaml(base_path)
        base_src = f"{source}: base {base_path}"
    else:
        base_tree, base_src = copy.deepcopy(model.base), f"{source}: base"
    for key, value in model.overrides.items():
        _check_key(key, f"{source_o}: overrides")
        set_dotted(base_tree, key, value)
    r = model.resources
    for key, value in (("distributed.num_workers", r.num_workers), ("distributed.cpus_per_worker", r.cpus_per_worker),
                       ("distributed.use_gpu", None if r.gpus_per_worker is None else bool(r.gpus_per_worker))):
        if value is not None:
            set_dotted(base_tree, key, value)
    if base_edits:
        for e in base_edits:
            _check_key(e.partition("=")[0].strip(), f"{source} (overrides)")
        apply_overrides(base_tree, base_edits, source=f"{source} (overrides)")
    validate_tree(copy.deepcopy(base_tree), base_src)

    for key in model.space:
        _check_key(key, f"{source_o}: space")
    for vname, settings in (model.variants or {}).items():
        if not settings:
            raise ConfigError(f"{source_o}: variants.{vname}: must set at least one key")
        for key in settings:
            _check_key(key, f"{source_o}: variants.{vname}")
            if key in model.space or (key == SEED_KEY and model.seeds):
                raise ConfigError(f"{source_o}: variants.{vname}: '{key}' is also searched in space/seeds; set it in one place")

    spec = SweepSpec(model=model, source=source_o, base_tree=base_tree, raw=tree)
    _validate_all_trials(spec)
    return spec


def _validate_all_trials(spec: SweepSpec) -> None:
    """Build the RunConfig of every grid point and of every probe value of the sampled dimensions."""
    points = spec.grid_points()
    if spec.model.algorithm.startswith("optuna"):
        # Optuna treats variants like a choice; probe each with the first seed.
        points = ([{VARIANT_PARAM: v} for v in spec.model.variants] if spec.model.variants else [{}])
        if spec.model.seeds:
            points = [{**p, SEED_KEY: spec.model.seeds[0]} for p in points]
    sampled = {k: d for k, d in spec.model.space.items() if d.kind != "grid"}
    lows = {k: d.probe_values()[0] for k, d in sampled.items()}
    for p in points:
        spec.trial_config({**p, **lows})
    first = points[0]
    for k, d in sampled.items():
        for v in d.probe_values():
            spec.trial_config({**first, **lows, k: v})


def dump_spec_yaml(spec: SweepSpec) -> str:
    """The spec as run (after CLI overrides), for logging next to the sweep."""
    return yaml.safe_dump(spec.raw, sort_keys=False, allow_unicode=True)
