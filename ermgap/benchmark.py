"""The paper's zero-shot benchmark (Table 2) as one command: every system of a systems file that is reachable
predicts the test split in each of its modalities, the others are skipped with the reason, and the report
(`ermgap.report.build_report`: Table 2 in the paper's layout, metrics.json, plots) covers those that ran.

    ermgap benchmark sweeps/paper_zero_shot.yaml --manifest data/meld_st/manifest.csv --out runs/table2

Systems file (paths relative to it; `modalities` at the top is the default for every system)::

    modalities: [uni, multi]
    systems:
      - {name: Qwen2-Audio-7B-Instruct, backend: qwen2_audio, model: Qwen/Qwen2-Audio-7B-Instruct}
      - {name: Ultravox-0.4, backend: ultravox}                 # preset: vLLM at $ULTRAVOX_BASE_URL
      - {name: ours, backend: qwen2_audio, model: models/tiny, adapter: runs/x/adapter, modalities: [uni]}

Output folder: `preds/<system>_<modality>.csv` (each resumable, kept between runs: a rerun only predicts
what is missing), `skipped.json` (system → reason) and `report/` (replaced only with force).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ermgap import report as R
from ermgap.backends import BackendError
from ermgap.backends.registry import (
    LOCAL_BACKENDS,
    PRESETS,
    canonical,
    check_local_model,
    local_backend,
    remote_backend,
    remote_settings,
)
from ermgap.config import ModelConfig, PromptConfig
from ermgap.errors import ConfigError, ErmgapError, OutputExistsError
from ermgap.evaluate import evaluate_rows, load_split
from ermgap.io import atomic_write_text, check_replaceable
from ermgap.labels import MODALITIES

SYSTEM_KEYS = {"name", "backend", "model", "adapter", "modalities", "mode", "base_url", "api_key_env", "structured"}


@dataclass(frozen=True)
class SystemSpec:
    """One row of Table 2: a backend, its model (hub id, local dir or API model name) and its modalities."""

    name: str
    backend: str
    model: str | None = None
    adapter: str | None = None
    modalities: tuple[str, ...] = MODALITIES
    mode: str = "score"
    base_url: str | None = None
    api_key_env: str | None = None
    structured: bool | None = None

    @property
    def local(self) -> bool:
        return self.backend in LOCAL_BACKENDS


@dataclass
class BenchmarkOutcome:
    ran: list[tuple[str, str]] = field(default_factory=list)  # (system, modality)
    skipped: dict[str, str] = field(default_factory=dict)  # system → reason
    report: dict[str, Path] = field(default_factory=dict)


def load_systems_file(path: str | os.PathLike) -> list[SystemSpec]:
    """Validated SystemSpecs; ConfigError naming `file:systems[i].key` and what is allowed."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the systems file: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("systems"), list) or not doc["systems"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list 'systems'")
    unknown_top = set(doc) - {"systems", "modalities"}
    if unknown_top:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown_top)}; allowed: modalities, systems")
    default_mods = _modalities(doc.get("modalities", list(MODALITIES)), f"{path}:modalities")
    specs, names = [], set()
    for i, entry in enumerate(doc["systems"]):
        key = f"{path}:systems[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: expected a mapping with name and backend")
        unknown, missing = set(entry) - SYSTEM_KEYS, {"name", "backend"} - set(entry)
        if unknown or missing:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)} / missing {sorted(missing)}; "
                              f"allowed: {', '.join(sorted(SYSTEM_KEYS))}")
        name = str(entry["name"])
        if name in names:
            raise ConfigError(f"{key}.name: {name!r} is listed twice")
        names.add(name)
        try:
            backend = canonical(str(entry["backend"]))
        except ConfigError as err:
            raise ConfigError(f"{key}.backend: {err}") from None
        local = backend in LOCAL_BACKENDS
        mode = str(entry.get("mode", "score" if local else "generate"))
        if mode not in ("score", "generate") or (mode == "score" and not local):
            allowed = "score, generate" if local else "generate (remote systems answer in text)"
            raise ConfigError(f"{key}.mode: {mode!r}; allowed: {allowed}")
        if local and not entry.get("model"):
            raise ConfigError(f"{key}.model: a local backend ({backend}) needs a hub id or model directory")
        specs.append(SystemSpec(
            name=name, backend=backend, model=_rel(path, entry.get("model")) if local else entry.get("model"),
            adapter=_rel(path, entry.get("adapter")), mode=mode, base_url=entry.get("base_url"),
            api_key_env=entry.get("api_key_env"), structured=entry.get("structured"),
            modalities=_modalities(entry["modalities"], f"{key}.modalities") if "modalities" in entry else default_mods))
    return specs


def _modalities(value, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(m not in MODALITIES for m in value):
        raise ConfigError(f"{key}: {value!r}; expected a non-empty list of {', '.join(MODALITIES)}")
    return tuple(dict.fromkeys(value))


def _rel(base: Path, value) -> str | None:
    """Paths in the file are relative to it; hub ids (`org/name` that is not a path there) stay as they are."""
    if value is None:
        return None
    value = str(value)
    candidate = base.parent / value
    if Path(value).is_absolute() or value.count("/") == 1 and not candidate.exists() and not value.startswith("."):
        return value
    return str(candidate)


def unreachable_reason(spec: SystemSpec, environ=os.environ, timeout_s: float = 5.0) -> str | None:
    """Why a system cannot be run now (missing model directory, hub model not downloaded, missing API key,
    server refusing connections or the token), or None when it can."""
    if spec.local:
        try:
            check_local_model(spec.model)
        except ConfigError as err:
            return str(err)
        if not Path(spec.model).expanduser().exists() and not _hub_cached(spec.model):
            return f"{spec.model} is a hub id with no local copy (download it, or give a local directory)"
        if spec.adapter and not (Path(spec.adapter) / "adapter_config.json").is_file():
            return f"adapter {spec.adapter} has no adapter_config.json"
        return None
    try:
        s = remote_settings(spec.backend, model=spec.model, base_url=spec.base_url, api_key_env=spec.api_key_env,
                            structured=spec.structured, environ=environ)
    except ConfigError as err:
        return str(err)
    headers = {"Authorization": f"Bearer {s['api_key']}"} if s["api_key"] else {}
    url = s["base_url"].rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            key = spec.api_key_env or PRESETS[spec.backend].api_key_env
            return f"{url} refused the credentials (HTTP {err.code}); check ${key}"
        return None if err.code == 404 else f"{url} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        hint = f"; start it with: {PRESETS[spec.backend].serve_command}" if PRESETS[spec.backend].serve_command else ""
        return f"no server at {s['base_url']} ({reason}){hint}"


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "system"


def _backend(spec: SystemSpec, modality: str, prompt_cfg: PromptConfig, device: str, batch_size: int, loaded=None):
    """The backend of one system in one modality; a local model already `loaded` is reused, not reloaded."""
    if spec.local:
        if loaded is not None:
            return loaded.for_modality(modality)
        return local_backend(spec.backend, ModelConfig(name_or_path=spec.model), prompt_cfg, modality=modality,
                             mode=spec.mode, device=device, adapter=spec.adapter)
    return remote_backend(spec.backend, prompt_cfg, modality=modality, model=spec.model, base_url=spec.base_url,
                          api_key_env=spec.api_key_env, structured=spec.structured, concurrency=batch_size)


def run_benchmark(specs: list[SystemSpec], manifest: str | os.PathLike, out_dir: str | os.PathLike, *,
                  split: str = "test", limit: int | None = None, batch_size: int = 8, device: str = "cpu",
                  prompt_cfg: PromptConfig | None = None, force: bool = False, n_boot: int = 0, seed: int = 0,
                  log=print) -> BenchmarkOutcome:
    """Predict with every reachable system (resuming earlier predictions), then write the report."""
    out_dir = Path(out_dir)
    report_dir = out_dir / "report"
    if report_dir.exists() and not force:
        raise OutputExistsError(f"{report_dir} already exists; pass --force to replace it (predictions are reused)")
    if force:
        check_replaceable(report_dir, "report")  # before any system runs
    prompt_cfg = prompt_cfg or PromptConfig()
    rows = {m: load_split(manifest, split, modality=m, limit=limit)
            for m in sorted({m for s in specs for m in s.modalities})}
    outcome, systems = BenchmarkOutcome(), []
    for spec in specs:
        reason = unreachable_reason(spec)
        if reason:
            outcome.skipped[spec.name] = reason
            log(f"skipped {spec.name}: {reason}")
            continue
        backend = None
        for modality in spec.modalities:
            preds = out_dir / "preds" / f"{_slug(spec.name)}_{modality}.csv"
            info = {"system": spec.name, "backend": spec.backend, "model": spec.model, "adapter": spec.adapter,
                    "mode": spec.mode, "manifest": str(Path(manifest).resolve()), "split": split, "limit": limit}
            if not preds.exists():
                try:
                    backend = _backend(spec, modality, prompt_cfg, device, batch_size, loaded=backend)
                    evaluate_rows(backend, rows[modality], preds, modality=modality, batch_size=batch_size,
                                  run_info=info, progress=False)
                except (BackendError, ErmgapError) as err:
                    outcome.skipped[spec.name] = f"failed during {modality}: {err}"
                    log(f"skipped {spec.name}: {outcome.skipped[spec.name]}")
                    break
            systems.append(R.load_system(spec.name, modality, preds, group="Zero-shot"))
            outcome.ran.append((spec.name, modality))
            log(f"{spec.name} ({modality}): {preds}")
    systems = [s for s in systems if s.name not in outcome.skipped]  # a system failing midway has no row
    outcome.ran = [(n, m) for n, m in outcome.ran if n not in outcome.skipped]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "skipped.json", json.dumps(outcome.skipped, indent=1) + "\n", force=True)
    if not systems:
        raise ConfigError("no system could be run: " + "; ".join(f"{k}: {v}" for k, v in outcome.skipped.items()))
    outcome.report = R.build_report(systems, report_dir, force=force, n_boot=n_boot, seed=seed)
    return outcome
