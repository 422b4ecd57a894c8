"""`ermgap serve`: an OpenAI-compatible chat-completions server over a local model (base or LoRA adapter)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from ermgap.errors import ConfigError


def serve(
    model: str = typer.Argument(..., help="Local model directory (or cached hub id): Qwen2-Audio or Voxtral."),
    adapter: Path = typer.Option(None, "--adapter", help="peft LoRA adapter directory (a training run's adapter/)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    token_env: str = typer.Option("ERMGAP_SERVE_TOKEN", "--token-env",
                                  help="Environment variable holding the bearer token clients must send."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No token (refused unless --host is a loopback address)."),
    backend: str = typer.Option("auto", "--backend", help="auto (from the model's config) | qwen2_audio | voxtral."),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="Name clients put in 'model' (default: the model directory's name, or the hub id)."),
    max_request_mb: float = typer.Option(25.0, "--max-request-mb", min=0.001, help="Largest request body accepted."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bf16 | fp16 | fp32."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (info logs one line per request)."),
) -> None:
    """Serve /v1/chat/completions (audio as input_audio base64 WAV) until interrupted."""
    import torch

    from ermgap import serve as S
    from ermgap.backends.registry import LOCAL_BACKENDS, canonical, check_local_model, detect_local, local_backend
    from ermgap.config import ModelConfig, PromptConfig

    token = S.resolve_token(token_env, os.environ, no_auth=no_auth, host=host)
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"--dtype {dtype!r}: allowed: auto, bf16, fp16, fp32")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json; not a peft adapter directory")
    check_local_model(model)
    name = detect_local(model) if backend == "auto" else canonical(backend)
    if name not in LOCAL_BACKENDS:
        raise ConfigError(f"--backend {backend!r}: ermgap serve loads local models only ({', '.join(LOCAL_BACKENDS)})")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    be = local_backend(name, ModelConfig(name_or_path=model, dtype=dtype), PromptConfig(), modality="uni",
                       device=dev, adapter=str(adapter) if adapter else None)
    served = served_model_name or S.default_served_name(model)
    auth = f"bearer token from ${token_env}" if token else "no authentication (--no-auth, loopback only)"
    Console(stderr=True).print(f"ermgap serve: {served!r} ({name}{', adapter ' + str(adapter) if adapter else ''}) "
                               f"on http://{host}:{port}/v1 — {auth}", highlight=False)
    S.serve(be, served_model=served, host=host, port=port, token=token,
            max_request_bytes=int(max_request_mb * 1024 * 1024), log_level=log_level)
