"""The speech-LLM backbone: Qwen2-Audio loading, LoRA wrapping, and tiny / random-weight builders.

One loading path for everything: `load_backbone` calls `from_pretrained` on a hub id
(`Qwen/Qwen2-Audio-7B-Instruct`) or on a local directory — including the tiny model that
`build_tiny` writes in the standard layout (config, safetensors, tokenizer, feature extractor,
processor with the Instruct chat template).

Losses and label scores live in `ermgap.scoring` (`per_sample_loss`, `score_labels`, `generate`).
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoProcessor,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from ermgap.config import LoraConfig, ModelConfig, PromptConfig
from ermgap.errors import ConfigError
from ermgap.io import atomic_dir
from ermgap.labels import EMOTIONS
from ermgap.prompts import SYNONYMS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# Qwen2-Audio-7B(-Instruct), written out from the public config.json (they equal transformers'
# Qwen2AudioConfig defaults for the encoder; the text side is Qwen-7B: MHA, 11008 MLP, 156032 vocab).
QWEN2_AUDIO_7B: dict[str, Any] = {
    "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                     "num_mel_bins": 128, "max_source_positions": 1500, "activation_function": "gelu",
                     "scale_embedding": False},
    "text_config": {"vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645},
    "audio_token_index": 151646,
}
ARCHS = {"qwen2-audio-7b": QWEN2_AUDIO_7B}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy for training)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# A hub that does not answer within this is taken as unreachable (its client would retry for ~40 s).
HUB_PROBE_TIMEOUT_S = 5.0
MODEL_TYPE = "qwen2_audio"  # config.json's model_type for Qwen2AudioForConditionalGeneration (the default)


def model_source(name_or_path: str) -> str:
    """`model.name_or_path` as something `from_pretrained` accepts: a resolved local directory or a hub id.

    A name that exists on disk, starts with `.`, `/` or `~`, has other than one `/`, or whose first
    component is an existing local folder (`models/nope`) is a local path; a missing one is a ConfigError
    here rather than a hub id that `from_pretrained` would retry against the network.
    """
    local = Path(name_or_path).expanduser()
    first = name_or_path.split("/", 1)[0]
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
                   or (first and Path(first).is_dir()))
    if not (local.exists() or looks_local):
        return hub_source(name_or_path)  # a hub id such as Qwen/Qwen2-Audio-7B-Instruct
    if not (local / "config.json").is_file():
        what = "does not exist" if not local.exists() else "is not a saved model directory (no config.json)"
        raise ConfigError(f"model.name_or_path: {name_or_path} {what}; expected a Qwen2-Audio model directory or "
                          "a hub id like Qwen/Qwen2-Audio-7B-Instruct (build a local one with "
                          "`ermgap model tiny --out DIR`)")
    return str(local.resolve())


def hub_source(repo_id: str) -> str:
    """What `from_pretrained` should load for the hub id `repo_id`: the id while the hub answers; the cached
    snapshot directory when it does not (offline mode, or no network: the hub client would retry each file
    for ~40 s first). A ConfigError at once when the model is neither reachable nor cached."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    why = "offline mode is on (HF_HUB_OFFLINE)" if is_offline_mode() else hub_unreachable()
    if why is None:
        return repo_id
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    where = "" if is_offline_mode() else f"the Hugging Face Hub ({constants.ENDPOINT}) "
    raise ConfigError(f"model.name_or_path: {repo_id} is not a local directory and not in the Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}), and {where}{why}; download it where the hub is reachable "
                      "(`hf download REPO_ID`, then copy the cache) or set model.name_or_path to a local model "
                      "directory")


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub does not answer from this process (None: it does). Asked once per process."""
    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                    timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:  # it answered
        return None
    except (urllib.error.URLError, OSError) as err:
        return f"cannot be reached ({getattr(err, 'reason', err)})"


def open_model_config(name_or_path: str, model_type: str = MODEL_TYPE):
    """The transformers config of `model.name_or_path`; ConfigError unless its model_type is `model_type`."""
    path = model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        # ValueError: a config.json without (or with an unknown) model_type, e.g. `{}`.
        raise ConfigError(f"model.name_or_path: cannot read the model config of {name_or_path!r} "
                          f"({_first_line(err)}); expected config.json with model_type {model_type!r}") from None
    if config.model_type != model_type:
        raise ConfigError(f"model.name_or_path: {name_or_path} is a {config.model_type!r} model; expected "
                          f"model_type {model_type!r}")
    return config


def open_processor(name_or_path: str):
    """The processor (tokenizer + feature extractor + chat template) of `model.name_or_path`."""
    try:
        return AutoProcessor.from_pretrained(model_source(name_or_path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"model.name_or_path: cannot load the processor of {name_or_path!r} "
                          f"({_first_line(err)}); a Qwen2-Audio directory holds its tokenizer and "
                          "preprocessor_config.json") from None


def check_model(model_cfg: ModelConfig) -> None:
    """Pre-flight: the model's config and processor open (cheap; no weights are read)."""
    open_model_config(model_cfg.name_or_path)
    open_processor(model_cfg.name_or_path)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_backbone(model_cfg: ModelConfig, *, device: str | torch.device = "cpu", model_class=None):
    """Load (Qwen2AudioForConditionalGeneration, processor) from a hub id or a local directory.

    The model is returned in eval mode on `device` in the configured dtype; with
    `gradient_checkpointing` it is enabled (non-reentrant, so frozen inputs need no grad hooks).
    `model_class` loads another transformers speech LLM the same way (e.g. VoxtralForConditionalGeneration).
    """
    model_class = model_class or Qwen2AudioForConditionalGeneration
    src = model_cfg.name_or_path
    # A clear error for a folder that is not this kind of model, before any weights load.
    open_model_config(src, model_class.config_class.model_type)
    processor = open_processor(src)
    dtype = resolve_dtype(model_cfg.dtype, device)
    try:
        # On a GPU, load the weights straight onto it (a 7B model would otherwise pass through host memory).
        placement = {} if torch.device(device).type == "cpu" else {"device_map": str(device)}
        model = model_class.from_pretrained(
            model_source(src), dtype=dtype, attn_implementation=model_cfg.attn_implementation, **placement)
    except OSError as err:
        raise ConfigError(f"model.name_or_path: cannot load {src!r}: {err}") from None
    model.to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.eval()
    return model, processor


def lora_target_regex(lora_cfg: LoraConfig) -> str:
    """A peft `target_modules` regex matching the given projection names in the language model only.

    The Whisper-style audio encoder also has q_proj/k_proj/v_proj; a bare suffix list would adapt it too.
    """
    towers = "language_model|audio_tower" if lora_cfg.train_audio_encoder else "language_model"
    names = "|".join(sorted(set(lora_cfg.target_modules)))
    return rf".*\.({towers})\..*\.({names})$"


def apply_lora(model, lora_cfg: LoraConfig):
    """Wrap with peft LoRA; only the LoRA matrices require grad. Seed torch before calling for a fixed init."""

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=lora_target_regex(lora_cfg), bias="none")
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules {lora_cfg.target_modules}: {err}") from None
    return wrapped


def load_adapter(model, adapter_dir: str | os.PathLike, *, trainable: bool = False):
    """Attach a saved peft adapter (plain `PeftModel.from_pretrained`)."""

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json; not a peft adapter directory")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


# --------------------------------------------------------------------------- tiny local model


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: chat scaffolding, instructions, labels, synonyms, sample sentences."""

    pc = PromptConfig()
    labels = ", ".join(EMOTIONS)
    lines = ["system\nYou are a helpful assistant.\n", "user\nAudio 1: \n", "assistant\n",
             pc.instruction.format(labels=labels),
             pc.multimodal_instruction.format(labels=labels, transcript="I can't believe it, this is great news.")]
    lines += list(EMOTIONS) + [s for forms in SYNONYMS.values() for s in forms]
    lines += [
        "The weather is nice today.", "I did not expect to see you here.", "Please close the door.",
        "We are going to the station tomorrow morning.", "What time is it?", "That is not what I said.",
        "Das Wetter ist heute schön.", "Ich habe dich hier nicht erwartet.", "Bitte schließ die Tür.",
        "Wir fahren morgen früh zum Bahnhof.", "Wie spät ist es?", "Das habe ich nicht gesagt.",
        "今日はいい天気ですね。", "ここで会うとは思わなかった。", "ドアを閉めてください。",
        "明日の朝、駅に行きます。", "今何時ですか？", "そんなことは言っていない。",
    ]
    return lines * 4


def _build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE with Qwen2's pre-tokenizer, trained locally, wrapped as transformers' Qwen2Tokenizer."""

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    qtok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", errors="replace",
                          additional_special_tokens=SPECIAL_TOKENS[1:])
    qtok.model_max_length = 2048
    return qtok


def tiny_config(vocab_size: int, audio_token_index: int, *, d_model: int = 128, layers: int = 2,
                max_source_positions: int = 200):
    """Qwen2-Audio in miniature: same module structure, 4 s audio window (2×max_source_positions mel frames)."""

    audio = Qwen2AudioEncoderConfig(d_model=d_model, encoder_layers=layers, encoder_attention_heads=4,
                                    encoder_ffn_dim=2 * d_model, num_mel_bins=128,
                                    max_source_positions=max_source_positions)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0)
    return Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=audio_token_index)


def build_tiny(out_dir: str | os.PathLike, *, force: bool = False, seed: int = 0, d_model: int = 128,
               layers: int = 2, chunk_length_s: int = 4) -> Path:
    """Build and save a tiny randomly initialised Qwen2-Audio (model, tokenizer, feature extractor, processor).

    Deterministic given `seed`. The audio window is `chunk_length_s` seconds (the real model: 30 s);
    longer audio is cropped by the feature extractor. Returns `out_dir`.
    """

    tokenizer = _build_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=chunk_length_s,
                                 n_fft=400, padding_value=0.0, return_attention_mask=True)
    # 100 mel frames per second; the encoder's conv stride 2 → max_source_positions = 50 per second.
    cfg = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|AUDIO|>"), d_model=d_model, layers=layers,
                      max_source_positions=50 * chunk_length_s)
    cfg.text_config.pad_token_id = tokenizer.pad_token_id
    cfg.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg)
    # LoRA never touches lm_head, and the frozen final RMSNorm fixes |h| ~ sqrt(d); with the default
    # init (std 0.02) no logit can exceed ~0.02*d = 2.6 nats at d=128, so CE is floored near
    # ln(vocab) - 2.6 whatever LoRA learns (measured: dev loss stuck at ~5.0). std 1/sqrt(d) gives
    # unit-scale initial logits and headroom of ~sqrt(d) nats, like a pretrained head.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer)
    return _save_tiny(model, processor, out_dir, d_model=d_model, seed=seed, force=force)


def _save_tiny(model, processor, out_dir: str | os.PathLike, *, d_model: int, seed: int, force: bool) -> Path:
    """A tiny model's last steps: the lm_head at std 1/sqrt(d) (see build_tiny), pad token, atomic save."""
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, d_model ** -0.5,
                                                     generator=torch.Generator().manual_seed(seed + 1))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    with atomic_dir(out_dir, kind="model", force=force) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def build_random(arch: str = "qwen2-audio-7b", *, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa"):
    """The real architecture with random weights (no download). `device="meta"` allocates nothing."""

    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} is unknown; choose one of {sorted(ARCHS)}")
    cfg = Qwen2AudioConfig(**ARCHS[arch])
    cfg._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


# --------------------------------------------------------------------------- tiny local Voxtral

# Voxtral's Tekken vocabulary starts with control tokens at fixed ids; VoxtralProcessor and VoxtralConfig
# hard-code [AUDIO] = 24, and the instruct format uses <s> [INST] [BEGIN_AUDIO] [AUDIO]... text [/INST].
VOXTRAL_CONTROL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                          "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                          "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[TOOL_CONTENT]", *(f"<SPECIAL_{i}>" for i in range(20, 24)), "[AUDIO]", "[BEGIN_AUDIO]",
                          *(f"<SPECIAL_{i}>" for i in range(26, 32))]
VOXTRAL_AUDIO_TOKEN_ID = VOXTRAL_CONTROL_TOKENS.index("[AUDIO]")


def _build_voxtral_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained locally whose first 32 ids are Tekken's control tokens (the real tokenizer is
    mistral-common's Tekken, which needs its tekken.json from the hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=VOXTRAL_CONTROL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.model_max_length = 4096
    return fast


def build_tiny_voxtral(out_dir: str | os.PathLike, *, force: bool = False, seed: int = 0, d_model: int = 64,
                       layers: int = 2, chunk_length_s: int = 4) -> Path:
    """Build and save a tiny randomly initialised Voxtral (VoxtralForConditionalGeneration + VoxtralProcessor).

    Same modules as Voxtral-Mini-3B (Whisper-style encoder, 4-frame-stacking projector, Llama decoder) at
    d_model / 4·d_model sizes; audio is cut into `chunk_length_s`-second chunks (the real model: 30 s) of
    `12.5 · chunk_length_s` audio tokens each. Deterministic given `seed`. Returns `out_dir`.
    """
    from transformers import (
        LlamaConfig,
        VoxtralConfig,
        VoxtralEncoderConfig,
        VoxtralForConditionalGeneration,
        VoxtralProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = _build_voxtral_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=chunk_length_s,
                                 n_fft=400, padding_value=0.0, return_attention_mask=False)
    # 100 mel frames per second, conv stride 2 → 50 encoder positions per second; the projector stacks
    # intermediate_size / d_model = 4 positions per audio token (12.5 tokens per second, as in Voxtral).
    audio = VoxtralEncoderConfig(hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
                                 num_attention_heads=4, num_mel_bins=128, max_source_positions=50 * chunk_length_s)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4,
                       max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    cfg = VoxtralConfig(audio_config=audio, text_config=text, audio_token_id=VOXTRAL_AUDIO_TOKEN_ID)
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = VoxtralProcessor(feature_extractor=fe, tokenizer=tokenizer)
    return _save_tiny(model, processor, out_dir, d_model=d_model, seed=seed, force=force)
