"""Label scoring vs free generation on the tiny Qwen2-Audio: utterances/s (goal: scoring ≥ 5× faster) and agreement.

Two settings, each measured side by side (score and generate alternate batch by batch, so load
changes on a shared machine hit both alike):

- zero-shot: the randomly initialised tiny model; free generation runs until `--max-new-tokens`
  (like a zero-shot chat model answering in a sentence);
- fine-tuned: the same model after a few full fine-tuning steps on tone "utterances" whose pitch
  encodes the emotion, so that generation answers "<label><|im_end|>" and stops after 2 tokens
  (the cheapest possible generation; agreement with scoring is meaningful here).

Prints the zero-shot ratio last; JSON goes to bench/results/eval.json.

    .venv/bin/python bench/eval.py [--n 32] [--batch-size 8] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ermgap.batching import EmotionCollator, featurize  # noqa: E402
from ermgap.config import ModelConfig, PromptConfig  # noqa: E402
from ermgap.labels import EMOTIONS  # noqa: E402
from ermgap.model import build_tiny, load_backbone  # noqa: E402
from ermgap.prompts import parse_answer  # noqa: E402
from ermgap.scoring import generate, per_sample_loss, score_labels  # noqa: E402


def tones(n: int, seed: int) -> list[dict]:
    """Utterances whose fundamental (150 + 60·k Hz, jittered) encodes emotion k; 1–3 s long."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % len(EMOTIONS)
        t = np.arange(int(16000 * rng.uniform(1.0, 3.0))) / 16000
        f = (150 + 60 * k) * rng.uniform(0.97, 1.03)
        x = 0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(4 * np.pi * f * t) + 0.02 * rng.standard_normal(t.size)
        out.append(dict(utt_id=f"u{seed}-{i}", language="eng", gender="FM"[i % 2], emotion=EMOTIONS[k],
                        transcript="", audio=x.astype(np.float32)))
    return out


def measure(model, processor, batches, cfg, max_new_tokens) -> dict:
    """Interleaved timing of score_labels and generate over the same batches; predictions of both."""
    with torch.no_grad():
        score_labels(model, batches[0])  # warm-up
        generate(model, batches[0], processor.tokenizer, max_new_tokens=2)
        t_score = t_gen = 0.0
        scored, texts = [], []
        for b in batches:
            t0 = time.perf_counter()
            scored += [EMOTIONS[int(i)] for i in score_labels(model, b).argmax(-1)]
            t1 = time.perf_counter()
            texts += generate(model, b, processor.tokenizer, max_new_tokens=max_new_tokens)
            t_gen += time.perf_counter() - t1
            t_score += t1 - t0
    parsed = [parse_answer(t, cfg.verbalizers) for t in texts]
    gold = [g for b in batches for g in b["gold"].tolist()]
    n = len(gold)
    new_tokens = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return {
        "score": {"seconds": t_score, "utt_per_s": n / t_score,
                  "acc": float(np.mean([EMOTIONS.index(p) == g for p, g in zip(scored, gold)]))},
        "generate": {"seconds": t_gen, "utt_per_s": n / t_gen,
                     "acc": float(np.mean([p != "invalid" and EMOTIONS.index(p) == g for p, g in zip(parsed, gold)])),
                     "invalid_rate": float(np.mean([p == "invalid" for p in parsed])),
                     "mean_answer_tokens": float(np.mean(new_tokens)), "examples": texts[:3]},
        "agreement": float(np.mean([a == b for a, b in zip(scored, parsed)])),
        "speedup": (n / t_score) / (n / t_gen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="held-out utterances")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(Path(tmp) / "tiny")
        model, processor = load_backbone(ModelConfig(name_or_path=str(path)))
    cfg = PromptConfig()
    collator = EmotionCollator(processor, cfg, "uni")
    test = featurize(processor, tones(args.n, seed=2))
    batches = [collator(test[i:i + args.batch_size]) for i in range(0, len(test), args.batch_size)]
    zero_shot = measure(model, processor, batches, cfg, args.max_new_tokens)

    # A few full fine-tuning steps so that greedy generation answers "<label><|im_end|>".
    train = featurize(processor, tones(56, seed=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        idx = np.random.default_rng(step).choice(len(train), 8, replace=False)
        loss = per_sample_loss(model, collator([train[i] for i in idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    tuned = measure(model, processor, batches, cfg, args.max_new_tokens)

    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0]},
        "setup": {"n": args.n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                  "train_steps": args.train_steps, "final_train_loss": float(loss.detach()),
                  "train_s": round(train_s, 2), "params": sum(p.numel() for p in model.parameters())},
        "zero_shot": zero_shot,
        "fine_tuned": tuned,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, r in (("fine-tuned", tuned), ("zero-shot", zero_shot)):
        print(f"[{name}] label scoring {r['score']['utt_per_s']:.1f} utt/s | free generation "
              f"{r['generate']['utt_per_s']:.1f} utt/s ({r['generate']['mean_answer_tokens']:.1f} answer tokens, "
              f"invalid {r['generate']['invalid_rate']:.2f}) | agreement {r['agreement']:.2f} | "
              f"speedup {r['speedup']:.2f}x")
    print(f"wrote {args.out}")
    print(f"speedup score/generate (zero-shot, max_new_tokens={args.max_new_tokens}): {zero_shot['speedup']:.2f}x")


if __name__ == "__main__":
    main()
