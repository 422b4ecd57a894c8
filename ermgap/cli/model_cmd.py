"""`ermgap model tiny|random|info`: build the tiny local Qwen2-Audio, the 7B architecture with random weights, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Build and inspect backbones (Qwen2-Audio).", no_args_is_help=True)


@app.command("tiny")
def tiny(
    out: Path = typer.Option(..., "--out", help="Directory to write (standard from_pretrained layout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing directory."),
    seed: int = typer.Option(0, "--seed", help="Weight-initialisation seed."),
    d_model: int = typer.Option(None, "--d-model", min=16,
                                help="Hidden size of encoder and decoder (default: 128 for Qwen2-Audio, 64 for Voxtral)."),
    layers: int = typer.Option(2, "--layers", min=1, help="Encoder and decoder layers."),
    audio_seconds: int = typer.Option(4, "--audio-seconds", min=1,
                                      help="Audio window (Qwen2-Audio: longer audio is cropped; Voxtral: chunk length)."),
    arch: str = typer.Option("qwen2-audio", "--arch", help="qwen2-audio | voxtral."),
    pretrain: bool = typer.Option(False, "--pretrain", help="Train the tiny Qwen2-Audio in full on a pretraining corpus "
                                  "of its own (voices and sentences the demo corpus never uses, genders balanced, "
                                  "emotions always expressed through the shared prosodic mapping: never a "
                                  "`data synth --cue-shift` group's; ~1.5 min on 2 cores), so LoRA on its language "
                                  "model alone can learn (the paper's setting)."),
    pretrain_epochs: int = typer.Option(None, "--pretrain-epochs", min=1, help="Pretraining epochs (default 10; the "
                                        "weights of the best epoch on the pretraining corpus's dev split are kept)."),
    pretrain_genders: str = typer.Option(None, "--pretrain-genders", help="Pretrain on these genders' utterances only, "
                                         "comma-separated (default F,M): e.g. F for a backbone that has heard no "
                                         "emotional speech of a male minority, so fine-tuning is where the minority "
                                         "is learned."),
) -> None:
    """A tiny Qwen2-Audio or Voxtral with a locally trained BPE tokenizer (no download): random weights, or
    pretrained here with --pretrain."""
    from ermgap.errors import ConfigError
    from ermgap.model import build_tiny, build_tiny_voxtral

    builders = {"qwen2-audio": build_tiny, "voxtral": build_tiny_voxtral}
    if arch not in builders:
        raise ConfigError(f"--arch {arch!r}: allowed: {', '.join(builders)}")
    width = {"d_model": d_model} if d_model else {}
    if pretrain_epochs is not None and not pretrain:
        raise ConfigError("--pretrain-epochs needs --pretrain")
    if pretrain_genders is not None and not pretrain:
        raise ConfigError("--pretrain-genders needs --pretrain")
    if pretrain:
        if arch != "qwen2-audio":
            raise ConfigError(f"--pretrain builds a pretrained tiny Qwen2-Audio; --arch {arch!r} has no pretraining")
        genders = tuple(g.strip() for g in pretrain_genders.split(",")) if pretrain_genders else None
        _pretrain(out, force=force, seed=seed, layers=layers, audio_seconds=audio_seconds, epochs=pretrain_epochs,
                  genders=genders, **width)
        return
    path = builders[arch](out, force=force, seed=seed, layers=layers, chunk_length_s=audio_seconds, **width)
    Console().print(f"wrote {path} ({_describe(path)})")


def _pretrain(out: Path, *, force: bool, seed: int, layers: int, audio_seconds: int, epochs: int | None,
              genders: tuple[str, ...] | None, d_model: int = 128) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ermgap.pretrain import PretrainSettings, pretrain_tiny

    settings = PretrainSettings(seed=seed, **({"epochs": epochs} if epochs else {}),
                                **({"genders": genders} if genders else {}))
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[note]}"), console=console, transient=False) as bar:
        corpus = bar.add_task("pretraining corpus", total=None, note="")
        epochs_task = bar.add_task("pretraining", total=settings.epochs, note="", visible=False)

        def progress(event: str, f: dict) -> None:
            if event == "corpus":
                bar.update(corpus, completed=f["done"], total=f["total"])
            else:
                bar.update(epochs_task, visible=True, completed=f["epoch"],
                           note=f"train loss {f['train_loss']:.3f} · dev acc {100 * f['dev_acc']:.1f} %")

        path = pretrain_tiny(out, settings=settings, force=force, d_model=d_model, layers=layers,
                             chunk_length_s=audio_seconds, progress=progress)
    info = json.loads((path / "pretraining.json").read_text(encoding="utf-8"))
    trained = "" if len(settings.genders) == 2 else f" ({'+'.join(settings.genders)} only)"
    console.print(f"wrote {path} ({_describe(path)}): pretrained {settings.epochs} epochs on "
                  f"{info['corpus']['num_utterances']} utterances{trained} in {info['seconds']:.0f} s; kept epoch "
                  f"{info['best_epoch']} (dev acc {100 * info['best_dev_acc']:.1f} % on the pretraining corpus)")


@app.command("random")
def random(
    arch: str = typer.Option("qwen2-audio-7b", "--arch", help="Architecture (qwen2-audio-7b)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build on the meta device (no memory) and print the size."),
    device: str = typer.Option("cuda", "--device", help="Where to materialise the random weights."),
) -> None:
    """The real architecture with random weights, for GPU benchmarks without a download."""
    import torch

    from ermgap.model import build_random, count_parameters

    dev = "meta" if dry_run else device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        from ermgap.errors import ConfigError
        raise ConfigError("no CUDA device: use --dry-run (meta device) or --device cpu")
    model = build_random(arch, device=dev, dtype=torch.bfloat16)
    n = count_parameters(model)["total"]
    c = model.config
    Console().print(f"{arch}: {n / 1e9:.3f} B parameters ({n:,}) on {dev}; text {c.text_config.num_hidden_layers}×"
                    f"{c.text_config.hidden_size}, audio {c.audio_config.encoder_layers}×{c.audio_config.d_model}")


@app.command("info")
def info(path: str = typer.Argument(..., help="Local model directory (or hub id if cached).")) -> None:
    """Architecture, parameter count, audio window and label tokenization of a saved model."""
    Console().print(_describe(path, verbose=True))


def _describe(path, verbose: bool = False) -> str:
    from transformers import AutoConfig, VoxtralForConditionalGeneration

    from ermgap.config import ModelConfig, PromptConfig
    from ermgap.model import count_parameters, load_backbone
    from ermgap.prompts import label_token_ids

    voxtral = AutoConfig.from_pretrained(str(path)).model_type == "voxtral"
    model, processor = load_backbone(ModelConfig(name_or_path=str(path)),
                                     model_class=VoxtralForConditionalGeneration if voxtral else None)
    n = count_parameters(model)["total"]
    fe = processor.feature_extractor
    window = fe.n_samples / fe.sampling_rate
    kind = "Voxtral, audio chunk" if voxtral else "audio window"
    text = f"{n:,} parameters, {kind} {window:g} s, vocab {len(processor.tokenizer)}"
    if not verbose or voxtral:
        return text
    c = model.config
    labels = label_token_ids(processor.tokenizer, PromptConfig())
    return json.dumps({"path": str(path), "parameters": n, "audio_window_s": window,
                       "audio_tokens": (2 * c.audio_config.max_source_positions) // 4,
                       "text": {"layers": c.text_config.num_hidden_layers, "hidden": c.text_config.hidden_size,
                                "vocab": c.text_config.vocab_size},
                       "audio": {"layers": c.audio_config.encoder_layers, "d_model": c.audio_config.d_model},
                       "label_tokens": labels}, indent=2)
