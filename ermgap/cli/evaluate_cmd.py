"""`ermgap evaluate`: zero-shot (or adapter) predictions on a manifest split, written as PREDS.csv."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console

from ermgap.config import Modality, PredictMode, Split
from ermgap.errors import ConfigError


def evaluate(
    model: str = typer.Option(..., "--model", help="Qwen2-Audio hub id or local dir; for --backend openai the API model name."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV to write (PREDS.csv layout)."),
    split: Split = typer.Option("test", "--split", help="train | dev | test."),
    modality: Modality = typer.Option("uni", "--modality", help="uni (speech + instruction) | multi (+ transcript)."),
    mode: PredictMode = typer.Option("score", "--mode", help="score (label log-likelihoods) | generate (free text + parser)."),
    backend: str = typer.Option("qwen2-audio", "--backend", help="qwen2-audio | openai (chat-completions audio API)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Utterances per forward pass / request batch."),
    adapter: Path = typer.Option(None, "--adapter", help="peft LoRA adapter directory to apply (qwen2-audio)."),
    config: Path = typer.Option(None, "--config", help="Run config YAML whose prompt/model settings to use."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    dtype: str = typer.Option(None, "--dtype", help="auto | bf16 | fp16 | fp32 (default: the config's)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Generation length (mode generate)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N rows of the split."),
    base_url_env: str = typer.Option("OPENAI_BASE_URL", "--base-url-env", help="Env var holding the API base URL (openai)."),
    base_url: str = typer.Option(None, "--base-url", help="API base URL, e.g. http://127.0.0.1:8000/v1 (overrides --base-url-env)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Env var holding the API key (openai)."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.01, help="Per-request timeout in seconds (openai)."),
    max_retries: int = typer.Option(5, "--max-retries", min=0, help="Retries on 429/5xx/timeouts (openai)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Parallel requests (openai)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial output instead of resuming it."),
) -> None:
    """Predict every utterance of a split and write PREDS.csv (resumes an interrupted run)."""
    from ermgap.config import load_config
    from ermgap.evaluate import evaluate_rows, load_split, summary

    if out.exists() and not force:
        from ermgap.errors import OutputExistsError
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it")
    cfg = load_config(config) if config else load_config()
    rows = load_split(manifest, split, modality=modality, limit=limit)
    info = {"backend": backend, "model": model, "manifest": str(Path(manifest).resolve()), "split": split,
            "mode": mode, "adapter": str(adapter) if adapter else None, "limit": limit}
    if backend == "qwen2-audio":
        import torch

        from ermgap.backends.qwen2_audio import Qwen2AudioBackend

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model_cfg = cfg.model.model_copy(update={"name_or_path": model, **({"dtype": dtype} if dtype else {})})
        be = Qwen2AudioBackend(model_cfg, cfg.prompt, modality=modality, mode=mode, device=dev,
                               adapter=str(adapter) if adapter else None, max_new_tokens=max_new_tokens,
                               sample_rate=cfg.data.sample_rate)
    elif backend == "openai":
        from ermgap.backends.openai_compat import OpenAICompatBackend

        if mode != "generate":
            raise ConfigError("--backend openai answers in free text: use --mode generate")
        url = base_url or os.environ.get(base_url_env)
        if not url:
            raise ConfigError(f"no API base URL: pass --base-url or set ${base_url_env}")
        be = OpenAICompatBackend(url, model, cfg.prompt, modality=modality, api_key=os.environ.get(api_key_env),
                                 timeout_s=timeout, max_retries=max_retries, concurrency=concurrency,
                                 sample_rate=cfg.data.sample_rate)
        info["base_url"] = url
    else:
        raise ConfigError(f"--backend {backend!r}: allowed: qwen2-audio, openai")
    t0 = time.perf_counter()
    df = evaluate_rows(be, rows, out, modality=modality, batch_size=batch_size, force=force, restart=restart,
                       run_info=info)
    s = summary(df)
    Console().print(f"wrote {out}: {s['n']} utterances, acc {100 * s['acc']:.1f} %, "
                    f"invalid {100 * s['invalid_rate']:.1f} %, {time.perf_counter() - t0:.1f} s")
