"""Encoder-output cache benchmark: train-step and evaluation time with cached vs recomputed audio features.

Side by side in one run, on two models with a frozen audio encoder and LoRA on the language model:
1. `tiny`: the tiny Qwen2-Audio (4 s window);
2. `wide`: Qwen2-Audio-7B's widths (encoder d_model 1280 on the full 30 s window, LM hidden 4096,
   MLP 11008, vocab 156k) with few layers (`--layers-audio`, `--layers-text`), random weights;
plus, for `wide`, the two other hot-path costs against their old form: logits at every position vs
only at the answer positions (train step), and label scoring with the prompt cache repeated per label
vs cropped (time, and the KV cache bytes held; on CUDA also the peak allocated memory).
And the FLOP-count estimate for the full 7B model at MELD's mean clip length (3.6 s), from the
exact parameter counts of the architecture (built on the meta device).

    .venv/bin/python bench/feature_cache.py [--device cpu|cuda] [--micro 2] [--steps 3]

Writes bench/results/feature_cache[_cuda].json with the machine description; prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from ermgap.batching import EmotionCollator, to_device  # noqa: E402
from ermgap.config import LoraConfig, ModelConfig, PromptConfig  # noqa: E402
from ermgap.feature_cache import encode  # noqa: E402
from ermgap.labels import EMOTIONS  # noqa: E402
from ermgap.model import QWEN2_AUDIO_7B, apply_lora, build_random, build_tiny, load_backbone  # noqa: E402
from ermgap.scoring import _positions, _run, model_inputs, per_sample_loss, score_labels  # noqa: E402

MELD_MEAN_S = 3.6


def _clips(n: int, seconds: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return [dict(utt_id=f"u{i}", language="eng", gender="FM"[i % 2], emotion=EMOTIONS[i % 7], speaker="s",
                 transcript="", audio=(0.3 * np.sin(2 * np.pi * (110 + 40 * i) * t)
                                       + 0.05 * rng.standard_normal(t.size)).astype(np.float32)) for i in range(n)]


def _wide_model(tokenizer, layers_audio: int, layers_text: int, device: str, vocab: int):
    tree = json.loads(json.dumps(QWEN2_AUDIO_7B))
    tree["text_config"]["vocab_size"] = vocab
    tree["audio_config"]["encoder_layers"] = layers_audio
    tree["text_config"]["num_hidden_layers"] = layers_text
    tree["audio_token_index"] = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    cfg = Qwen2AudioConfig(**tree)
    cfg.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2AudioForConditionalGeneration(cfg)
    # Real processor layout: Whisper's 30 s window, 128 mels; the tiny tokenizer (ids < the 7B vocab).
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)
    return model.eval(), processor


def _time(fn, steps: int, device: str) -> float:
    """Median seconds of `fn` over `steps` runs after one warm-up: CPU time of this process on CPU (robust
    when other jobs share the cores), wall time on CUDA."""
    fn()
    clock = time.perf_counter if device == "cuda" else time.process_time
    out = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(clock() - t0)
    return statistics.median(out)


def _full_logits_loss(model, batch):
    """The old training forward: logits at every position, then CE on the answer positions."""
    logits = model(use_cache=False, **model_inputs(model, batch)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return torch.zeros(labels.shape[0]).to(ce).index_add(0, rows, ce) / keep.sum(-1)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def _score_labels_repeat(model, batch):
    """The old label scoring: the prompt's KV cache repeated once per label (K copies) → (scores, cache bytes)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    label_ids, label_mask = batch["label_input_ids"], batch["label_attention_mask"]
    b, k = prompt_ids.shape[0], label_ids.shape[0]
    logits, out = _run(model, lambda s: s[:, -1], position_ids=_positions(prompt_mask), use_cache=True,
                       **model_inputs(model, batch, "prompt_input_ids", "prompt_attention_mask"))
    scores = torch.log_softmax(logits.float(), -1)[:, label_ids[:, 0]]
    cache = out.cache
    cache.batch_repeat_interleave(k)
    held = _cache_bytes(cache)
    cont_ids, cont_mask = label_ids[:, :-1].repeat(b, 1), label_mask[:, :-1].repeat(b, 1)
    positions = prompt_mask.long().sum(-1).repeat_interleave(k)[:, None] + torch.arange(cont_ids.shape[1],
                                                                                        device=cont_ids.device)
    attn = torch.cat([prompt_mask.repeat_interleave(k, 0), cont_mask], dim=1)
    logits2, _ = _run(model, lambda s: s, input_ids=cont_ids, attention_mask=attn, position_ids=positions,
                      cache=cache, use_cache=True)
    logp = torch.log_softmax(logits2.float(), -1)
    tok = logp.gather(-1, label_ids[:, 1:].repeat(b, 1)[..., None])[..., 0] * label_mask[:, 1:].repeat(b, 1)
    return scores + tok.sum(-1).view(b, k), held


def _peak(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_model(name: str, model, processor, *, micro: int, steps: int, device: str, seconds: float,
                hot_path: bool) -> dict:
    model = apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0)).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collator = EmotionCollator(processor, PromptConfig(), "uni")
    examples = _clips(micro, seconds)
    raw = to_device(collator(examples), device)
    t0 = time.perf_counter()
    embeds = encode(model, raw["input_features"], raw["feature_attention_mask"])
    encode_s = time.perf_counter() - t0
    cached = to_device(collator([{**{k: v for k, v in ex.items() if k != "audio"}, "audio_embeds": e.cpu()}
                                 for ex, e in zip(examples, embeds)]), device)

    def train_step(batch, loss_fn=per_sample_loss):
        def step():
            model.train()
            loss_fn(model, batch).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def evaluate(batch, fn=score_labels):
        def run():
            model.eval()
            with torch.no_grad():
                return fn(model, batch)
        return run

    res: dict = {"tokens_per_example": float(raw["attention_mask"].sum(-1).float().mean()),
                 "audio_tokens_per_example": float((raw["input_ids"] == model.config.audio_token_index).sum() / micro),
                 "encode_s_per_batch": encode_s}
    res["train_uncached_s"] = _time(train_step(raw), steps, device)
    res["train_cached_s"] = _time(train_step(cached), steps, device)
    res["eval_uncached_s"] = _time(evaluate(raw), steps, device)
    res["eval_cached_s"] = _time(evaluate(cached), steps, device)
    res["train_ratio"] = res["train_cached_s"] / res["train_uncached_s"]
    res["eval_ratio"] = res["eval_cached_s"] / res["eval_uncached_s"]
    with torch.no_grad():
        model.eval()
        res["max_abs_loss_diff_cached"] = float((per_sample_loss(model, cached) - per_sample_loss(model, raw)).abs().max())
    if hot_path:
        res["train_full_logits_s"] = _time(train_step(cached, _full_logits_loss), steps, device)
        res["train_head_ratio"] = res["train_cached_s"] / res["train_full_logits_s"]
        res["eval_repeat_cache_s"] = _time(evaluate(cached, lambda m, b: _score_labels_repeat(m, b)[0]), steps, device)
        res["eval_crop_ratio"] = res["eval_cached_s"] / res["eval_repeat_cache_s"]
        with torch.no_grad():
            model.eval()
            old_scores, held = _score_labels_repeat(model, cached)
            out = _run(model, lambda s: s[:, -1], position_ids=_positions(cached["prompt_attention_mask"]),
                       use_cache=True, **model_inputs(model, cached, "prompt_input_ids", "prompt_attention_mask"))[1]
            res["kv_cache_mb_repeat"] = held / 2**20
            res["kv_cache_mb_crop"] = _cache_bytes(out.cache) / 2**20
            res["max_abs_score_diff_crop_vs_repeat"] = float((score_labels(model, cached) - old_scores).abs().max())
        res["eval_peak_mb_repeat"] = _peak(evaluate(cached, lambda m, b: _score_labels_repeat(m, b)[0]), device)
        res["eval_peak_mb_crop"] = _peak(evaluate(cached), device)
    print(f"{name}: train cached/uncached {res['train_ratio']:.3f} · eval cached/uncached {res['eval_ratio']:.3f}"
          + (f" · head-at-answers/full-logits {res['train_head_ratio']:.3f} · crop/repeat eval "
             f"{res['eval_crop_ratio']:.3f}, KV {res['kv_cache_mb_crop']:.0f} vs {res['kv_cache_mb_repeat']:.0f} MB"
             if hot_path else ""), flush=True)
    return res


def flop_estimate(seconds: float = MELD_MEAN_S, text_tokens: int = 60, answer_tokens: int = 2) -> dict:
    """2·params·positions (+ attention) for the full Qwen2-Audio-7B at a clip of `seconds`."""
    model = build_random("qwen2-audio-7b", device="meta")
    c = model.config
    enc = model.model.audio_tower
    enc_layers = sum(p.numel() for p in enc.layers.parameters())
    conv = sum(p.numel() for p in (*enc.conv1.parameters(), *enc.conv2.parameters()))
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    lm_layers = sum(p.numel() for p in model.model.language_model.layers.parameters())
    head = model.lm_head.weight.numel()
    window = 2 * c.audio_config.max_source_positions  # mel frames: always the full 30 s
    enc_pos = window // 2
    audio_tokens = int(seconds * 100 - 1) // 2 // 2 + 1
    tokens = audio_tokens + text_tokens
    d_a, d_t = c.audio_config.d_model, c.text_config.hidden_size
    encoder = (2 * enc_layers * enc_pos + 4 * c.audio_config.encoder_layers * enc_pos ** 2 * d_a
               + 2 * conv * enc_pos * 2 + 2 * proj * enc_pos // 2)  # conv1 runs at 2× the rate; projector on pooled
    lm_fwd = 2 * lm_layers * tokens + 4 * c.text_config.num_hidden_layers * tokens ** 2 * d_t
    out = {"clip_s": seconds, "audio_tokens": audio_tokens, "lm_tokens": tokens, "encoder_positions": enc_pos,
           "encoder_tflop": encoder / 1e12, "lm_forward_tflop": lm_fwd / 1e12,
           "head_full_tflop": 2 * head * tokens / 1e12, "head_answers_tflop": 2 * head * answer_tokens / 1e12,
           "encoder_padding_share": 1 - (audio_tokens * 2) / enc_pos}
    # LoRA backward: activation gradients through the LM (≈ one more forward); the frozen encoder has none.
    lm_train = 2 * lm_fwd + 2 * head * answer_tokens
    for gc, extra in (("", 0), ("_gc", lm_fwd)):
        total = encoder + lm_train + extra
        out[f"train_encoder_share{gc}"] = encoder / total
        out[f"train_cached_over_uncached{gc}"] = (lm_train + extra) / total
    out["eval_encoder_share"] = encoder / (encoder + lm_fwd)
    out["eval_cached_over_uncached"] = lm_fwd / (encoder + lm_fwd)
    return out


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--micro", type=int, default=2, help="micro-batch (training) = evaluation batch")
    ap.add_argument("--wide-micro", type=int, default=None, help="the wide model's micro-batch (default --micro)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions (median) after one warm-up")
    ap.add_argument("--layers-audio", type=int, default=1)
    ap.add_argument("--layers-text", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=QWEN2_AUDIO_7B["text_config"]["vocab_size"],
                    help="wide model's vocabulary (the 7B's 156k needs ~6 GB in fp32 for embeddings + head)")
    ap.add_argument("--skip-wide", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"machine": machine(args.device), "args": vars(args)}
    result["flops_7b"] = f = flop_estimate()
    print(f"7B FLOP estimate at {f['clip_s']} s: encoder {f['encoder_tflop']:.2f} TFLOP vs LM forward "
          f"{f['lm_forward_tflop']:.2f}; cached/uncached train {f['train_cached_over_uncached']:.3f} "
          f"(gc {f['train_cached_over_uncached_gc']:.3f}), eval {f['eval_cached_over_uncached']:.3f}; "
          f"{100 * f['encoder_padding_share']:.0f} % of the encoder's positions are padding", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = build_tiny(Path(tmp) / "tiny")
        model, processor = load_backbone(ModelConfig(name_or_path=str(tiny_dir), dtype="fp32"), device=args.device)
        result["tiny"] = bench_model("tiny", model, processor, micro=args.micro, steps=args.steps, device=args.device,
                                     seconds=MELD_MEAN_S, hot_path=False)
        del model
        if not args.skip_wide:
            tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
            model, processor = _wide_model(tokenizer, args.layers_audio, args.layers_text, args.device, args.vocab)
            result["wide"] = bench_model(f"wide ({args.layers_audio}+{args.layers_text} layers)", model, processor,
                                         micro=args.wide_micro or args.micro, steps=args.steps, device=args.device, seconds=MELD_MEAN_S,
                                         hot_path=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        "feature_cache.json" if args.device == "cpu" else f"feature_cache_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
