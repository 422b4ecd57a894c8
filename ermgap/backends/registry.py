"""Which backend a name means, and building one: local HF models (label scoring or generation) and
OpenAI-compatible servers (gpt-4o-mini-audio, vLLM, `ermgap serve`), with a preset per system of the
paper that has no loader here.

    local:  qwen2_audio, voxtral            (transformers; hub id or local directory, optional peft adapter)
    remote: openai, ultravox, kimi_audio    (chat-completions over HTTP; presets fill in model, URL, key)

Ultravox ships as transformers remote code and Kimi-Audio as its own inference package; neither can be
loaded from the package index alone, so both are reached through an OpenAI-compatible server whose
command is recorded in the preset (`serve_command`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ermgap.config import ModelConfig, PromptConfig
from ermgap.errors import ConfigError

LOCAL_BACKENDS = ("qwen2_audio", "voxtral")
# transformers model_type → the local backend that loads it
MODEL_TYPES = {"qwen2_audio": "qwen2_audio", "voxtral": "voxtral"}


@dataclass(frozen=True)
class RemotePreset:
    """Defaults for one OpenAI-compatible system: the model name the server knows it by, the environment
    variables holding the base URL and the key (None: the server needs none), the URL used when the
    variable is unset, whether the server honours a JSON-schema enum, and how to start the server."""

    model: str | None
    base_url_env: str
    default_base_url: str | None
    api_key_env: str | None
    structured: bool
    serve_command: str | None = None


PRESETS: dict[str, RemotePreset] = {
    "openai": RemotePreset(model="gpt-4o-mini-audio-preview", base_url_env="OPENAI_BASE_URL",
                           default_base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
                           structured=False),
    "ultravox": RemotePreset(
        model="fixie-ai/ultravox-v0_4", base_url_env="ULTRAVOX_BASE_URL", default_base_url="http://127.0.0.1:8001/v1",
        api_key_env="ULTRAVOX_API_KEY", structured=True,
        serve_command="vllm serve fixie-ai/ultravox-v0_4 --trust-remote-code --host 127.0.0.1 --port 8001 "
                      "--max-model-len 4096 --api-key \"$ULTRAVOX_API_KEY\""),
    "kimi_audio": RemotePreset(
        model="moonshotai/Kimi-Audio-7B-Instruct", base_url_env="KIMI_AUDIO_BASE_URL",
        default_base_url="http://127.0.0.1:8002/v1", api_key_env="KIMI_AUDIO_API_KEY", structured=False,
        serve_command=None),
}
BACKENDS = LOCAL_BACKENDS + tuple(PRESETS)


def canonical(name: str) -> str:
    """`qwen2-audio` → `qwen2_audio`; ConfigError for an unknown backend."""
    key = name.strip().lower().replace("-", "_")
    if key not in BACKENDS:
        raise ConfigError(f"backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return key


def detect_local(model: str) -> str:
    """The local backend for a model directory or cached hub id, from its config's model_type."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the model config of {model!r}: {str(err).splitlines()[0]}") from None
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{model}: model_type {model_type!r} has no local backend; supported: "
                          f"{', '.join(sorted(MODEL_TYPES))}")
    return MODEL_TYPES[model_type]


def check_local_model(model: str) -> None:
    """ConfigError when `model` names a local path that is not a saved model directory."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if (path.exists() or looks_local) and not (path / "config.json").is_file():
        raise ConfigError(f"model {model}: not a saved model directory (no config.json); build a local one with "
                          "`ermgap model tiny --out DIR` (see --arch)")


def local_backend(name: str, model_cfg: ModelConfig, prompt_cfg: PromptConfig, *, modality: str, mode: str = "score",
                  device: str = "cpu", adapter: str | None = None, max_new_tokens: int = 16,
                  sample_rate: int = 16000, task=None):
    """A qwen2_audio or voxtral backend (see those modules); `task` (an ermgap.task.Task, default the paper's)
    fixes the labels it scores and their order."""
    check_local_model(model_cfg.name_or_path)
    if canonical(name) == "qwen2_audio":
        from ermgap.backends.qwen2_audio import Qwen2AudioBackend as cls
    elif canonical(name) == "voxtral":
        from ermgap.backends.voxtral import VoxtralBackend as cls
    else:
        raise ConfigError(f"backend {name!r} is not a local backend; local: {', '.join(LOCAL_BACKENDS)}")
    return cls(model_cfg, prompt_cfg, modality=modality, mode=mode, device=device, adapter=adapter,
               max_new_tokens=max_new_tokens, sample_rate=sample_rate, task=task)


def remote_settings(name: str, *, model: str | None = None, base_url: str | None = None,
                    api_key_env: str | None = None, structured: bool | None = None,
                    environ=os.environ) -> dict:
    """The resolved model, base_url, api_key and structured flag of a remote backend (preset + overrides).

    ConfigError when the URL is unknown or the key variable the system needs is unset.
    """
    preset = PRESETS[canonical(name)]
    url = base_url or environ.get(preset.base_url_env) or preset.default_base_url
    if not url:
        raise ConfigError(f"{name}: no API base URL; set ${preset.base_url_env} or pass a base URL")
    key_env = api_key_env if api_key_env is not None else preset.api_key_env
    key = environ.get(key_env) if key_env else None
    if key_env and not key and url == preset.default_base_url and preset.default_base_url.startswith("https://"):
        raise ConfigError(f"{name}: ${key_env} is not set (the API at {url} needs a key)")
    chosen = model or preset.model
    if not chosen:
        raise ConfigError(f"{name}: no model name; pass one")
    return {"model": chosen, "base_url": url, "api_key": key or None,
            "structured": preset.structured if structured is None else structured}


def remote_backend(name: str, prompt_cfg: PromptConfig, *, modality: str, model: str | None = None,
                   base_url: str | None = None, api_key_env: str | None = None, structured: bool | None = None,
                   environ=os.environ, **client_options):
    """An OpenAICompatBackend for `openai` / `ultravox` / `kimi_audio` (client_options: timeout_s, retries...)."""
    from ermgap.backends.openai_compat import OpenAICompatBackend

    s = remote_settings(name, model=model, base_url=base_url, api_key_env=api_key_env, structured=structured,
                        environ=environ)
    return OpenAICompatBackend(s["base_url"], s["model"], prompt_cfg, modality=modality, api_key=s["api_key"],
                               structured=s["structured"], **client_options)

