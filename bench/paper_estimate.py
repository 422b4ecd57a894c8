"""How much compute the paper's sweeps need on GPUs: an ESTIMATE from the FLOP count, not a measurement.

For every trial of `sweeps/paper_main.yaml` and `sweeps/paper_ablation.yaml` (their resolved configs:
epochs, batch, evaluation cadence, gradient checkpointing, modality) it counts the matmul FLOPs of the full
Qwen2-Audio-7B (`bench/feature_cache.py: flop_estimate`, exact parameter counts of the architecture built
on the meta device) over MELD-ST's split sizes (the paper's Table 1):

    train  = epochs × train rows × (2 × LM forward [+ 1 LM forward recomputed with gradient checkpointing])
    dev    = evaluations × dev rows × LM forward       (label scoring: one prompt pass, the labels are tiny)
    test   = test rows × LM forward
    encoder (frozen, cached once per utterance for the whole sweep) = all rows × encoder forward

and turns FLOPs into GPU hours at an assumed model-FLOP utilisation (MFU) of the GPU's dense bf16 peak. The
MFU is not measured here (no GPU): `bench/gpu_step.py` measures it on one; the range below brackets it.
Every trial is assumed to run all its epochs (early stopping only shortens it).

    .venv/bin/python bench/paper_estimate.py        # ~10 s on CPU; writes bench/results/paper_estimate.json
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from feature_cache import MELD_MEAN_S, flop_estimate  # noqa: E402

from ermgap.io import atomic_write_text  # noqa: E402
from ermgap.sweep.spec import load_sweep_spec  # noqa: E402

# MELD-ST after the paper's gender annotation (Table 1): utterances per split, all three languages.
MELD_ST = {"train": 23_368, "dev": 2_884, "test": 3_000}
# Prompt tokens besides the audio: the instruction and chat template (uni); multi adds the transcript
# (MELD utterances average ~10 words).
TEXT_TOKENS = {"uni": 60, "multi": 80}
GPUS = {"H100 SXM": 989e12, "A100": 312e12}  # dense bf16 peaks, NVIDIA datasheets (as bench/gpu_step.py)
MFU = (0.2, 0.4)
SPECS = ("sweeps/paper_main.yaml", "sweeps/paper_ablation.yaml")


def trial_flops(cfg, lm_fwd: float, sizes: dict[str, int]) -> dict[str, float]:
    """FLOPs of one trial by part (see the module docstring); lm_fwd: one utterance's LM forward."""
    epochs = cfg.optim.epochs
    steps_per_epoch = math.ceil(sizes["train"] / cfg.optim.effective_batch_size)
    every = cfg.eval.every_steps or steps_per_epoch
    evaluations = (epochs * steps_per_epoch) // every if epochs else 0
    per_train_utt = (3 if cfg.model.gradient_checkpointing else 2) * lm_fwd
    return {"train": epochs * sizes["train"] * per_train_utt, "dev": (evaluations + 1) * sizes["dev"] * lm_fwd,
            "test": sizes["test"] * lm_fwd, "evaluations": evaluations}


def estimate(spec_path: str) -> dict:
    spec = load_sweep_spec(REPO / spec_path)
    trials = spec.example_trials()
    per_modality = {m: flop_estimate(MELD_MEAN_S, text_tokens=t) for m, t in TEXT_TOKENS.items()}
    rows, total = [], 0.0
    for params in trials:
        cfg = spec.trial_config(params)
        f = per_modality[cfg.data.modality]
        parts = trial_flops(cfg, f["lm_forward_tflop"] * 1e12, MELD_ST)
        flops = parts["train"] + parts["dev"] + parts["test"]
        total += flops
        rows.append({"trial": params, "modality": cfg.data.modality, "epochs": cfg.optim.epochs,
                     "evaluations": parts["evaluations"], "pflop": flops / 1e15,
                     "gpus": cfg.distributed.num_workers})
    encoder = sum(MELD_ST.values()) * per_modality["uni"]["encoder_tflop"] * 1e12
    total += encoder
    out = {"spec": spec_path, "trials": len(trials), "training_trials": sum(r["epochs"] > 0 for r in rows),
           "max_concurrent_trials": spec.model.max_concurrent_trials, "encoder_pflop_once": encoder / 1e15,
           "total_pflop": total / 1e15, "rows": rows, "gpu_hours": {}, "wall_hours": {}}
    slots = spec.model.max_concurrent_trials or len(trials)
    gpus_at_once = slots * max(r["gpus"] for r in rows)
    longest = max(r["pflop"] for r in rows) * 1e15
    # Training trials run in waves of max_concurrent_trials, each on its own GPUs (zero-shot trials, a few
    # minutes each, fit beside them); the encoder pass is spread over the first wave's GPUs.
    waves = math.ceil(out["training_trials"] / slots)
    for gpu, peak in GPUS.items():
        for mfu in MFU:
            key = f"{gpu} @ {mfu:.0%} MFU"
            out["gpu_hours"][key] = total / (peak * mfu) / 3600
            hours = (waves * longest / rows[0]["gpus"] + encoder / gpus_at_once) / (peak * mfu) / 3600
            out["wall_hours"][key] = {"gpus": gpus_at_once, "hours": hours}
    return out


def main() -> None:
    f = flop_estimate(MELD_MEAN_S, text_tokens=TEXT_TOKENS["uni"])
    result = {"machine": platform.platform(), "clip_s": MELD_MEAN_S, "per_utterance_tflop": f, "meld_st": MELD_ST,
              "text_tokens": TEXT_TOKENS, "mfu_assumed": MFU, "peaks_flops": GPUS,
              "specs": [estimate(s) for s in SPECS]}
    for s in result["specs"]:
        print(f"{s['spec']}: {s['trials']} trials ({s['training_trials']} train), {s['total_pflop']:,.0f} PFLOP "
              f"(encoder once: {s['encoder_pflop_once']:,.0f})")
        for key, hours in s["gpu_hours"].items():
            wall = s["wall_hours"][key]
            print(f"  {key}: {hours:,.0f} GPU-hours; ~{wall['hours']:.1f} h wall on {wall['gpus']} GPUs")
    path = REPO / "bench" / "results" / "paper_estimate.json"
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n", force=True)
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
