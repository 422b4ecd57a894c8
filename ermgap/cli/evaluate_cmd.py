"""`ermgap evaluate`: zero-shot (or adapter) predictions on a manifest split, written as PREDS.csv."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from ermgap.config import Modality, PredictMode, Split
from ermgap.errors import ConfigError


def evaluate(
    model: str = typer.Option(None, "--model", help="Hub id or local dir (qwen2_audio, voxtral); the API model name "
                                                  "for a remote backend (default: its preset's)."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Predictions CSV to write (PREDS.csv layout)."),
    split: Split = typer.Option("test", "--split", help="train | dev | test."),
    modality: Modality = typer.Option("uni", "--modality", help="uni (speech + instruction) | multi (+ transcript)."),
    mode: PredictMode = typer.Option("score", "--mode", help="score (label log-likelihoods) | generate (free text + parser)."),
    backend: str = typer.Option("qwen2_audio", "--backend",
                                help="qwen2_audio | voxtral (local) | openai | ultravox | kimi_audio (chat-completions API)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Utterances per forward pass / request batch."),
    adapter: Path = typer.Option(None, "--adapter", help="peft LoRA adapter directory to apply (local backends)."),
    config: Path = typer.Option(None, "--config", help="Run config YAML whose prompt, model and task (data.labels, data.attribute, objective.stratum) settings to use."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    dtype: str = typer.Option(None, "--dtype", help="auto | bf16 | fp16 | fp32 (default: the config's)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Generation length (mode generate)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N rows of the split."),
    base_url: str = typer.Option(None, "--base-url",
                                 help="API base URL, e.g. http://127.0.0.1:8000/v1 (default: the preset's variable, "
                                      "e.g. $OPENAI_BASE_URL, then its default URL)."),
    api_key_env: str = typer.Option(None, "--api-key-env", help="Env var holding the API key (default: the preset's)."),
    structured: bool = typer.Option(None, "--structured/--no-structured",
                                    help="Constrain answers to the labels with a JSON-schema enum (default: the preset's)."),
    max_requests: int = typer.Option(None, "--max-requests", min=1, help="Request budget, retries included (remote)."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.01, help="Per-request timeout in seconds (openai)."),
    max_retries: int = typer.Option(5, "--max-retries", min=0, help="Retries on 429/5xx/timeouts (openai)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Parallel requests (openai)."),
    feature_cache: str = typer.Option(None, "--feature-cache",
                                      help="Encoder-output cache directory for --mode score, or 'off' "
                                           "(default: the config's data.feature_cache when set, else off)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial output instead of resuming it."),
) -> None:
    """Predict every utterance of a split and write PREDS.csv (resumes an interrupted run)."""
    from ermgap.backends.registry import LOCAL_BACKENDS, canonical, local_backend, remote_backend
    from ermgap.config import load_config
    from ermgap.evaluate import check_replaceable_predictions, evaluate_rows, load_split_and_task, summary

    check_replaceable_predictions(out, force)  # before any model is loaded
    cfg = load_config(config) if config else load_config()
    rows, task = load_split_and_task(manifest, split, modality=modality, limit=limit, cfg=cfg)
    info = {"backend": canonical(backend), "model": model, "manifest": str(Path(manifest).resolve()), "split": split,
            "mode": mode, "adapter": str(adapter) if adapter else None, "limit": limit}
    name = info["backend"]
    if name in LOCAL_BACKENDS:
        import torch

        if not model:
            raise ConfigError(f"--backend {name} needs --model (a hub id or a local directory)")
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        cache = feature_cache if feature_cache is not None else cfg.data.feature_cache
        model_cfg = cfg.model.model_copy(update={"name_or_path": model, **({"dtype": dtype} if dtype else {})})
        be = local_backend(name, model_cfg, cfg.prompt, modality=modality, mode=mode, device=dev,
                           adapter=str(adapter) if adapter else None, max_new_tokens=max_new_tokens,
                           sample_rate=cfg.data.sample_rate, task=task,
                           feature_cache=None if cache in ("", "off") else str(Path(cache).expanduser()))
    else:
        if mode != "generate":
            raise ConfigError(f"--backend {name} answers in text: use --mode generate")
        be = remote_backend(name, cfg.prompt, modality=modality, model=model, base_url=base_url,
                            api_key_env=api_key_env, structured=structured, timeout_s=timeout,
                            max_retries=max_retries, concurrency=concurrency, sample_rate=cfg.data.sample_rate,
                            max_requests=max_requests, task=task)
        info.update(model=be.model, base_url=be.base_url, structured=be.structured)
    t0 = time.perf_counter()
    df = evaluate_rows(be, rows, out, modality=modality, batch_size=batch_size, force=force, restart=restart,
                       run_info=info, task=task)
    s = summary(df)
    Console().print(f"wrote {out}: {s['n']} utterances, acc {100 * s['acc']:.1f} %, "
                    f"invalid {100 * s['invalid_rate']:.1f} %, {time.perf_counter() - t0:.1f} s")
