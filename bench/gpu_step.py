"""One LoRA fine-tuning step of the 7B Qwen2-Audio architecture (random weights, no download) on one GPU.

bf16, with and without gradient checkpointing, SDPA (or FlashAttention-2 when installed): step time,
tokens/s, peak memory, MFU against the GPU's dense bf16 peak, and the ERM-MinMaxGAP / ERM step-time
ratio (printed LAST; goal ≤ 1.02). MFU counts the FLOPs a LoRA step needs: the frozen audio encoder
forward (its input needs no grad, so no backward), the language model forward + activation-gradient
backward (4·N·T; frozen weights get no weight gradient), LoRA weight gradients and attention scores;
gradient-checkpointing recompute is NOT counted, so MFU drops with it by construction.

    python bench/gpu_step.py                 # on a CUDA machine: the 7B architecture
    python bench/gpu_step.py --tiny          # smoke run with the tiny model (CPU is fine)

Without a CUDA device the GPU figures are not measured: the script says so and records nulls — it
never estimates them.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ermgap.batching import IGNORE, audio_token_count  # noqa: E402
from ermgap.config import LoraConfig, ModelConfig  # noqa: E402
from ermgap.io import atomic_write_text  # noqa: E402
from ermgap.labels import LANGUAGES  # noqa: E402
from ermgap.model import apply_lora, build_random, build_tiny, load_backbone  # noqa: E402
from ermgap.objectives.minmaxgap import erm_minmaxgap_loss  # noqa: E402
from ermgap.scoring import per_sample_loss  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched by substring of
# torch.cuda.get_device_name(), most specific first.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
NOT_MEASURED = "GPU figures not measured: no CUDA device on this machine"


def bf16_peak(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def attention_impl(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# --------------------------------------------------------------------------- model and batch


def build_model(tiny: bool, device: str, attn: str, workdir: Path, tiny_path: Path | None = None):
    """(peft-wrapped model, its Qwen2AudioConfig) with only the LoRA matrices trainable."""
    torch.manual_seed(0)
    if tiny:
        path = tiny_path if tiny_path is not None else build_tiny(workdir / "tiny")
        dtype = "bf16" if device == "cuda" else "fp32"
        model, _ = load_backbone(ModelConfig(name_or_path=str(path), dtype=dtype, attn_implementation=attn),
                                 device=device)
    else:
        model = build_random("qwen2-audio-7b", device=device, dtype=torch.bfloat16, attn_implementation=attn)
    model = apply_lora(model, LoraConfig())
    model.train()
    return model, model.base_model.model.config


def synthetic_batch(cfg, batch_size: int, prompt_tokens: int, answer_tokens: int, device: str,
                    dtype: torch.dtype) -> dict:
    """A full-window utterance per row: the encoder's audio tokens inside a prompt, then the answer.

    Shapes match what EmotionCollator produces (right padding not needed: all rows have equal length).
    """
    g = torch.Generator().manual_seed(0)
    frames = 2 * cfg.audio_config.max_source_positions  # the encoder's fixed input window (mel frames)
    n_audio = audio_token_count([frames])[0]
    audio_id, vocab = cfg.audio_token_index, cfg.text_config.vocab_size
    # Ordinary text ids, away from the special tokens: the 7B vocab puts them at the end (audio id 151646),
    # the tiny BPE at the start (ids 0-5).
    low, high = (16, audio_id - 4) if audio_id > vocab // 2 else (audio_id + 8, vocab)
    pre = torch.randint(low, high, (batch_size, prompt_tokens // 2), generator=g)
    post = torch.randint(low, high, (batch_size, prompt_tokens - prompt_tokens // 2), generator=g)
    answer = torch.randint(low, high, (batch_size, answer_tokens), generator=g)
    audio = torch.full((batch_size, n_audio), audio_id)
    input_ids = torch.cat([pre, audio, post, answer], dim=1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -answer_tokens:] = answer
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "input_features": torch.randn(batch_size, cfg.audio_config.num_mel_bins, frames, generator=g).to(device, dtype),
        "feature_attention_mask": torch.ones(batch_size, frames, dtype=torch.long).to(device),
        # Groups for the fairness term: every (language, gender) cell present, as in a mixed batch.
        "stratum": (torch.arange(batch_size) % len(LANGUAGES)).to(device),
        "attribute": ((torch.arange(batch_size) // len(LANGUAGES)) % 2).to(device),
    }


def step_flops(model, cfg, batch: dict) -> dict[str, float]:
    """Matmul FLOPs of one LoRA training step (no recompute), split by part; see the module docstring.

    Per utterance: audio encoder forward only (conv1 runs on the 2·P mel frames, the rest on P = max
    source positions; frozen and fed by inputs without grad, so no backward), projector forward on the
    audio tokens, language-model linears 4·N·T (forward + activation gradients), the LM head only on
    answer tokens (`per_sample_loss` projects just those), LoRA 6·N·T, attention scores 4·L·d·T²
    forward (×3 with backward in the LM). Checked against torch's FlopCounterMode in the tests.
    """
    b, t = batch["input_ids"].shape
    a, x = cfg.audio_config, cfg.text_config
    p_enc = a.max_source_positions
    n_audio = int((batch["input_ids"] == cfg.audio_token_index).sum()) // b
    n_answer = int((batch["labels"][:, 1:] != IGNORE).sum()) / b
    parts = {"audio_encoder_fwd": 4 * a.encoder_layers * a.d_model * p_enc**2,
             "language_model": 12 * x.num_hidden_layers * x.hidden_size * t**2, "lora": 0}
    for name, prm in model.named_parameters():
        n = prm.numel()
        if "lora_" in name:
            parts["lora"] += 6 * n * t
        elif "embed_positions" in name or "embed_tokens" in name:  # lookups, not matmuls
            continue
        elif "audio_tower.conv1" in name:
            parts["audio_encoder_fwd"] += 2 * n * 2 * p_enc
        elif "audio_tower" in name:
            parts["audio_encoder_fwd"] += 2 * n * p_enc
        elif "multi_modal_projector" in name:
            parts["audio_encoder_fwd"] += 2 * n * n_audio
        elif "lm_head" in name:
            parts["language_model"] += 4 * n * n_answer
        else:
            parts["language_model"] += 4 * n * t
    out = {k: float(b * v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_step(model, opt, batch: dict, objective: str) -> float:
    losses = per_sample_loss(model, batch)
    if objective == "erm":
        loss = losses.mean()
    else:
        loss = erm_minmaxgap_loss(losses, batch["stratum"], batch["attribute"], lam=1.0, p=2.0,
                                  num_strata=len(LANGUAGES)).total
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(model, opt, batch: dict, device: str, *, rounds: int, steps_per_block: int, warmup: int) -> dict:
    """Median step time of ERM and ERM-MinMaxGAP, measured in interleaved blocks (drift hits both alike)."""
    for objective in ("erm", "erm_minmaxgap"):
        for _ in range(warmup):
            one_step(model, opt, batch, objective)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {"erm": [], "erm_minmaxgap": []}
    for _ in range(rounds):
        for objective in ("erm", "erm_minmaxgap"):
            for _ in range(steps_per_block):
                sync(device)
                t0 = time.perf_counter()
                one_step(model, opt, batch, objective)
                sync(device)
                times[objective].append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": {k: statistics.median(v) for k, v in times.items()},
            "steps_timed": {k: len(v) for k, v in times.items()}, "peak_memory_gib": peak}


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    result = {"machine": machine(), "arch": "tiny" if args.tiny else "qwen2-audio-7b", "device": device,
              "gpu_measured": False, "note": None, "runs": [], "ratio_minmaxgap_over_erm": {}}
    if not cuda and not args.tiny:
        result["note"] = NOT_MEASURED + " (run on a GPU machine, or --tiny for a CPU smoke run)"
        return result
    if not cuda:
        result["note"] = NOT_MEASURED + "; these are CPU figures of the tiny model (a smoke run, not a benchmark)"
    attn = attention_impl(device)
    with tempfile.TemporaryDirectory(prefix="ermgap-gpu-step-") as tmp:
        tiny_path = args.tiny_model if args.tiny_model and (args.tiny_model / "config.json").is_file() else None
        model, cfg = build_model(args.tiny, device, attn, Path(tmp), tiny_path)
        dtype = next(model.parameters()).dtype
        batch = synthetic_batch(cfg, args.batch_size, args.prompt_tokens, args.answer_tokens, device, dtype)
        flops = step_flops(model, cfg, batch)
        peak = bf16_peak(torch.cuda.get_device_name(0)) if cuda and not args.tiny else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for gc in (False, True):
            if gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m = measure(model, opt, batch, device, rounds=args.rounds, steps_per_block=args.steps, warmup=args.warmup)
            tokens = batch["input_ids"].numel()
            for objective, s in m["step_s"].items():
                result["runs"].append({
                    "gradient_checkpointing": gc, "objective": objective, "attention": attn,
                    "batch_size": args.batch_size, "seq_len": batch["input_ids"].shape[1],
                    "step_s": s, "tokens_per_s": tokens / s, "peak_memory_gib": m["peak_memory_gib"],
                    "model_tflops_per_step": flops["total"] / 1e12,
                    "mfu": flops["total"] / s / peak if peak else None, "steps_timed": m["steps_timed"][objective]})
            result["ratio_minmaxgap_over_erm"]["gc_on" if gc else "gc_off"] = (
                m["step_s"]["erm_minmaxgap"] / m["step_s"]["erm"])
        result["flops_per_step"] = flops
        result["gpu_measured"] = cuda and not args.tiny
        if cuda and peak is None and not args.tiny:
            result["note"] = f"MFU not computed: no bf16 peak on record for {torch.cuda.get_device_name(0)}"
    return result


def report(result: dict) -> None:
    print(f"device: {result['device']}  arch: {result['arch']}  machine: {result['machine']}")
    if result["note"]:
        print(result["note"])
    for r in result["runs"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        print(f"  gc={'on ' if r['gradient_checkpointing'] else 'off'} {r['objective']:<14} "
              f"step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  peak {mem:>10}  MFU {mfu}")
    if not result["gpu_measured"]:
        print("GPU figures not measured.")
    for k, v in result["ratio_minmaxgap_over_erm"].items():
        print(f"ERM-MinMaxGAP / ERM step time ({k}): {v:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny local model instead of the 7B architecture")
    ap.add_argument("--tiny-model", type=Path, default=Path("models/tiny"),
                    help="with --tiny: an existing tiny model dir (`ermgap model tiny`); built in a temp dir if absent")
    ap.add_argument("--cpu", action="store_true", help="ignore CUDA even when present")
    ap.add_argument("--batch-size", type=int, default=4, help="utterances per step (paper micro-batch: 4)")
    ap.add_argument("--prompt-tokens", type=int, default=48, help="text tokens around the audio")
    ap.add_argument("--answer-tokens", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved ERM / MinMaxGAP blocks")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_step.json")
    args = ap.parse_args(argv)
    result = run(args)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n", force=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
