"""One typed config tree for a training run, loaded from YAML with dotted-key overrides.

Paper defaults (section 3.2) are the defaults. Every value is validated at load time;
errors name the file, the dotted key and what is allowed.

    cfg = load_config("configs/tiny.yaml", ["objective.p=1", "lambda.eta=0.25"])
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from ermgap.errors import ConfigError, ErmgapWarning
from ermgap.labels import EMOTIONS
from ermgap.metric_registry import METRICS, SPLIT_METRICS, split_metrics
from ermgap.objectives import OBJECTIVES
from ermgap.settings import Section, mounted_fields, section_reference
from ermgap.task import MAX_LABELS, STRATUM_JOIN, stratum_columns

# Choices shared by the config tree and the command line (one declaration each).
Split = Literal["train", "dev", "test"]
Modality = Literal["uni", "multi"]
PredictMode = Literal["score", "generate"]


_Section = Section


class DataConfig(_Section):
    manifest: str = Field("data/synth/manifest.csv", description="Canonical manifest CSV (see `ermgap data validate`).")
    modality: Modality = Field("uni", description="uni: speech + instruction; multi: + ground-truth transcript.")
    languages: list[str] | None = Field(None, description="Restrict to these language codes (default: all in the manifest).")
    labels: list[str] | dict[str, str] | Literal["infer"] = Field(
        default_factory=lambda: list(EMOTIONS),
        description="Ordered label set (class index = position): a list, a mapping label -> answer string, or "
                    "`infer` (the train split's labels, sorted). Default: MELD's seven (answers: prompt.verbalizers).")
    attribute: str = Field("gender", min_length=1, description="Protected attribute: the manifest column whose groups the gaps compare.")
    attribute_values: list[str] | Literal["infer"] | None = Field(
        None, description="Ordered attribute values (k >= 2); `infer`: the train split's, sorted; null: F, M for "
                          "gender, else inferred.")
    sample_rate: int = Field(16000, gt=0, description="Audio is resampled to this rate (Hz).")
    max_audio_s: float | None = Field(None, gt=0, description="Crop audio longer than this (default: the feature extractor's window).")
    num_loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray Train worker.")
    sampler: Literal["length", "stratified"] = Field(
        "length", description="How train rows form each optimizer step's global batch. length: a seeded permutation, "
                              "length-grouped, every row once per epoch. stratified: every global batch holds at least "
                              "data.min_per_cell rows of every (stratum, attribute) cell present in train, small cells "
                              "cycled more often (the ERM term is reweighted: objective.erm_weighting).")
    min_per_cell: int = Field(1, ge=1, description="(data.sampler=stratified) Rows of every train (stratum, attribute) cell "
                                                   "in every global batch; × the number of cells must not exceed "
                                                   "optim.effective_batch_size.")
    feature_cache: str = Field("", description="Encoder-output cache directory (frozen audio encoder only); 'off' disables; "
                                               "default <tracking.storage_path>/feature_cache.")

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("labels")
    @classmethod
    def _label_set(cls, v):
        if isinstance(v, str):
            return v
        names = list(v)
        if len(names) < 2 or len(names) > MAX_LABELS:
            raise ValueError(f"must list 2 to {MAX_LABELS} labels, got {len(names)}")
        if any(not str(x).strip() for x in names) or len(set(names)) != len(names):
            raise ValueError("labels must be distinct non-empty strings")
        if isinstance(v, dict) and len(set(v.values())) != len(v):
            raise ValueError("answer strings must be distinct")
        return v

    @field_validator("attribute_values")
    @classmethod
    def _attribute_values(cls, v):
        if isinstance(v, list) and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError(f"must list at least two distinct values, got {v}")
        return v


class ModelConfig(_Section):
    name_or_path: str = Field("Qwen/Qwen2-Audio-7B-Instruct", description="Hub id or local directory of a Qwen2-Audio checkpoint.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU. fp16 is refused for training (no loss scaling is "
                            "configured: use bf16); `ermgap evaluate --dtype fp16` accepts it for inference.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")


DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                      description="Module-name suffixes in the language model to adapt.")
    train_audio_encoder: bool = Field(False, description="Also adapt the audio encoder (frozen by default).")

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one module name")
        return v


class PromptConfig(_Section):
    instruction: str = Field(
        "Recognize the emotion of the speaker in the audio. Answer with exactly one of: {labels}.",
        description="Task instruction; {labels} is replaced by the comma-separated label list.")
    multimodal_instruction: str = Field(
        "Recognize the emotion of the speaker in the audio. The transcript is: \"{transcript}\". "
        "Answer with exactly one of: {labels}.",
        description="Instruction for multimodal input; {transcript} and {labels} are filled in.")
    verbalizers: dict[str, str] = Field(
        default_factory=lambda: {e: e for e in EMOTIONS},
        description="MELD emotion -> answer string the model is trained to produce (other label sets: data.labels), "
                    "followed by the end-of-turn token "
                    "<|im_end|>. Training loss: the MEAN cross-entropy over the answer's n tokens and that "
                    "terminator (n + 1) per utterance "
                    "(every utterance weighs the same whatever its answer's length). Label scoring: the SUM of "
                    "their log-probabilities, not length-normalised, so at equal per-token confidence a longer "
                    "answer scores lower: prefer answers of one token, or of equal token length.")

    @field_validator("verbalizers")
    @classmethod
    def _all_labels(cls, v: dict[str, str]) -> dict[str, str]:
        missing = [e for e in EMOTIONS if e not in v]
        extra = [k for k in v if k not in EMOTIONS]
        if missing or extra:
            raise ValueError(f"must map exactly the 7 emotions {list(EMOTIONS)}; missing {missing}, unknown {extra} "
                             "(for another label set give data.labels as a mapping label -> answer string)")
        if len(set(v.values())) != len(v):
            raise ValueError("answer strings must be distinct")
        return v

    @model_validator(mode="after")
    def _placeholders(self) -> PromptConfig:
        if "{transcript}" not in self.multimodal_instruction:
            raise ValueError("multimodal_instruction must contain {transcript}")
        return self


# The training objectives: `ermgap.objectives.OBJECTIVES` (each kind's module declares its own config keys,
# composed into the tree below at their paths).
ObjectiveKind = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]
OBJECTIVE_KINDS: tuple[str, ...] = get_args(ObjectiveKind)


_KIND_SETTINGS = [setting for cls in OBJECTIVES.values() for setting in cls.settings]  # in registry order


class _ObjectiveChecks(_Section):
    """ObjectiveConfig's rules (its fields are composed below)."""

    @field_validator("kind", check_fields=False)
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in OBJECTIVES:  # the live registry: a kind registered at run time (register_objective) is valid
            kinds = [repr(k) for k in OBJECTIVES]
            raise ValueError(f"Input should be {', '.join(kinds[:-1])} or {kinds[-1]}")
        return v

    @field_validator("stratum", check_fields=False)
    @classmethod
    def _stratum_columns(cls, v: str) -> str:
        try:
            return STRATUM_JOIN.join(stratum_columns(v))
        except ConfigError as err:
            raise ValueError(str(err)) from None


def _objective_config() -> type[_Section]:
    """`objective:` = kind, the kinds' own leaves (`p`), stratum, erm_weighting, the kinds' sections (`group_dro`)."""
    leaves, sections = mounted_fields(_KIND_SETTINGS, "objective")
    return create_model(
        "ObjectiveConfig", __base__=_ObjectiveChecks, __doc__="The `objective:` section.",
        kind=(str, Field("minmaxgap", description="; ".join(f"{k}: {c.summary}" for k, c in OBJECTIVES.items()) + ".")),
        **leaves,
        stratum=(str, Field("language", description="Group within which the attribute gap is measured: a manifest column or columns joined by `+` (`language+modality`); the cells of group_dro and reweight are stratum × attribute value.")),
        erm_weighting=(Literal["population", "batch"], Field(
            "population", description="(data.sampler=stratified) population: the ERM mean weights each example by its cell's "
                                      "population share over its sampling share, so it estimates the train-population "
                                      "mean loss; batch: the plain mean of the stratified batch (small cells weigh more). "
                                      "Cell means, hence the gap term and Group DRO, are the same either way.")),
        **sections)


ObjectiveConfig = _objective_config()


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (at most 1).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    epochs: int = Field(20, ge=0, description="Maximum epochs. 0 trains nothing: the run evaluates the backbone as "
                                              "it is (a zero-shot row of the paper's Table 3; LoRA starts as the "
                                              "identity).")
    effective_batch_size: int = Field(64, gt=0, description="Global batch per optimizer step = micro × accumulation × workers.")
    micro_batch_size: int = Field(4, gt=0, description="Per-worker micro-batch.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="Learning-rate schedule after warm-up.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")


class EvalConfig(_Section):
    every_steps: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps (default: once per epoch).")
    patience: int = Field(5, ge=0, description="Early-stopping patience in evaluations (0 disables).")
    metric: str = Field("w_f1", description=f"Dev metric for early stopping and best checkpoint: one of {', '.join(SPLIT_METRICS)}.")
    metric_mode: Literal["max", "min"] | None = Field(
        None, validate_default=True,
        description="Whether larger `metric` is better; derived from the metric registry (gaps and losses: min), and an explicit value must agree.")
    predict: PredictMode = Field(
        "score", description="How training predicts dev/test labels: score (the label with the highest "
                             "log-likelihood). generate is refused here; free generation with the answer parser "
                             "and its invalid rate is `ermgap evaluate --mode generate`.")
    batch_size: int = Field(8, gt=0, description="Per-worker evaluation batch size.")

    @field_validator("predict")
    @classmethod
    def _score_only(cls, v: str) -> str:
        if v != "score":
            raise ValueError("'generate' is not supported during training (dev/test predictions, the objective's updates and early "
                             "stopping use label scoring); set eval.predict=score and run `ermgap evaluate --mode "
                             "generate --adapter RUN_DIR/adapter` for generated answers")
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in split_metrics():
            raise ValueError(f"{v!r} is not a dev metric; allowed: {', '.join(split_metrics())}")
        return v

    @field_validator("metric_mode")
    @classmethod
    def _registry_direction(cls, v: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")
        if metric is None:  # `metric` itself failed validation; that error is reported
            return v
        expected = METRICS[metric].direction
        if v is not None and v != expected:
            better = "larger" if expected == "max" else "smaller"
            raise ValueError(f"{v!r} contradicts eval.metric={metric}, where {better} is better "
                             f"({expected!r}); drop metric_mode, it is derived")
        return expected


class DistributedConfig(_Section):
    num_workers: int = Field(2, gt=0, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    max_failures: int = Field(1, ge=-1, description="Refits of the run from its last checkpoint after a fault such as a lost worker "
                                                    "(-1: unlimited); a user error in a worker (bad audio, NaN loss) is not retried.")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "SPREAD", description="Ray placement of a run's workers: SPREAD over the nodes that have room (best effort; "
                              "on one machine the same as PACK), PACK onto as few nodes as fit (less gradient traffic).")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db).")
    experiment: str = Field("ermgap", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: generated).")
    storage_path: str = Field("runs/ray", description="Ray Train/Tune storage (local dir, or s3:// / gs:// / NFS on a cluster).")


class _RunChecks(_Section):
    """RunConfig's rules across sections (its fields are composed below)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> _RunChecks:
        per_step = self.optim.micro_batch_size * self.distributed.num_workers
        if self.optim.effective_batch_size % per_step:
            raise ValueError(
                f"optim.effective_batch_size ({self.optim.effective_batch_size}) must be divisible by "
                f"optim.micro_batch_size × distributed.num_workers ({self.optim.micro_batch_size} × "
                f"{self.distributed.num_workers} = {per_step})")
        return self

    @model_validator(mode="after")
    def _no_fp16_training(self) -> _RunChecks:
        # fp16 without DeepSpeed's dynamic loss scaling underflows small gradients to zero (LoRA's are).
        if self.model.dtype == "fp16":
            raise ValueError("model.dtype fp16 is refused for training: no loss scaling is configured, so small "
                             "gradients underflow; use model.dtype=bf16 (or fp32). For inference only, "
                             "`ermgap evaluate --dtype fp16` accepts fp16")
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.optim.effective_batch_size // (self.optim.micro_batch_size * self.distributed.num_workers)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with YAML key names (`lambda`, not `lam`)."""
        return self.model_dump(mode="json", by_alias=True)


def _section(model: type[_Section]) -> tuple[type[_Section], Any]:
    return model, Field(default_factory=model)


# The whole tree, in the order config.yaml shows it; the objective kinds' own top-level sections (`lambda`)
# follow `objective`.
RunConfig = create_model(
    "RunConfig", __base__=_RunChecks, __doc__="One training run's configuration (the YAML file's tree).",
    data=_section(DataConfig), model=_section(ModelConfig), lora=_section(LoraConfig), prompt=_section(PromptConfig),
    objective=_section(ObjectiveConfig), **mounted_fields(_KIND_SETTINGS, "")[1], optim=_section(OptimConfig), eval=_section(EvalConfig),
    distributed=_section(DistributedConfig), tracking=_section(TrackingConfig))


# --------------------------------------------------------------------------- loading


def parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (`1` → int, `true` → bool, `[a, b]` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(known_keys(ann, key + "."))
    return keys


def did_you_mean(key: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(key, known_keys(model), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def apply_overrides(tree: dict[str, Any], overrides: list[str], *, source: str = "command line") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' must look like key=value (e.g. objective.p=1)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"{source}: override '{item}' has an empty key")
        set_dotted(tree, key, parse_scalar(raw))
    return tree


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_errors(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{did_you_mean(key, model)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def validate_tree(tree: dict[str, Any], source: str, model: type[BaseModel] = RunConfig) -> Any:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, model)) from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    root = None  # the document's node, for naming where a duplicate is

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if key in seen:
                where = ".".join([*_key_path(self.root, node), str(key)])
                raise ConfigError(f"key {where!r} appears twice (lines {seen[key]} and {line}); YAML would keep "
                                  "only the last one: merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _key_path(current, target, keys: tuple[str, ...] = ()) -> list[str] | None:
    """The keys leading from node `current` to node `target` (None: not below it)."""
    if current is target:
        return list(keys)
    children = (((str(k.value), v) for k, v in current.value) if isinstance(current, yaml.MappingNode) else
                ((str(i), v) for i, v in enumerate(current.value)) if isinstance(current, yaml.SequenceNode) else ())
    return next((p for k, v in children if (p := _key_path(v, target, (*keys, k))) is not None), None)


def safe_load_strict(text: str, source: str) -> Any:
    """yaml.safe_load, but a duplicated key is a ConfigError naming it and both of its lines."""
    loader = _StrictLoader(text)
    try:
        loader.root = loader.get_single_node()
        return None if loader.root is None else loader.construct_document(loader.root)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        hint = f"; did you mean {p / 'config.yaml'} (a run's config)?" if (p / "config.yaml").is_file() else ""
        raise ConfigError(f"{p} is a directory, not a config YAML file{hint}")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    tree = safe_load_strict(p.read_text(encoding="utf-8"), str(p))
    if tree is None:
        warnings.warn(f"{p} is empty: every setting takes its default (model.name_or_path "
                      f"{ModelConfig().name_or_path}, data.manifest {DataConfig().manifest})", ErmgapWarning,
                      stacklevel=2)
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config; relative `data.manifest` stays relative to the CWD."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        apply_overrides(tree, overrides, source=f"{source} (overrides)")
        source = f"{source} + overrides"
    return validate_tree(tree, source)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    return validate_tree(dict(tree), source)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists are kept as values (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_tracking_uri(cfg: RunConfig) -> str:
    """Config value, then $MLFLOW_TRACKING_URI, then a sqlite store under ./runs."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path('runs/mlflow.db').resolve()}"


def reference_markdown(model: type[BaseModel] = RunConfig, prefix: str = "") -> str:
    """A Markdown table of every config key with its default and description (docs/config.md, `ermgap config reference`)."""
    return section_reference(model, prefix)
