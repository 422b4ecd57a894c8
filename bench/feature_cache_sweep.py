"""A sweep's wall time with and without the encoder-output cache, side by side in one run.

The four training trials of sweeps/synth_lm.yaml (ERM, fixed λ = 3, adaptive p = 2 and p = 1; no zero-shot trial) on the
pretrained tiny backbone with a frozen encoder, two at a time on a local Ray cluster: once with
`data.feature_cache=off` (every step and every evaluation re-decodes the audio and reruns the encoder), once
with a cold cache of its own (so the cached sweep pays for filling it). Reports each sweep's wall time and
their ratio, the summed encoder seconds of the cached sweep's trials (from each trial's metrics.json:
feature_cache {hits, misses, encoder_s}) against one encoder pass over the corpus (measured here, one
process), and whether the two sweeps' results agree (their dev/test W-F1 per trial).

    .venv/bin/python bench/feature_cache_sweep.py [--epochs 2]
(needs data/synth and models/tiny-pretrained: `ermgap data synth --out data/synth` and
`ermgap model tiny --pretrain --out models/tiny-pretrained`.) JSON in
bench/results/feature_cache_sweep.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ermgap.sweep import run_sweep  # noqa: E402
from ermgap.sweep.spec import load_sweep_spec  # noqa: E402

TRAINING_VARIANTS = ("erm", "fixed_lam3", "adaptive_p2", "adaptive_p1")


def one_encoder_pass(manifest: Path, model: Path) -> dict:
    """Seconds to encode every utterance of the corpus once (audio decode + log-mel + encoder + projector)."""
    import torch

    from ermgap.batching import compute_features
    from ermgap.config import ModelConfig
    from ermgap.data.dataset import UtteranceDataset
    from ermgap.data.manifest import read_manifest
    from ermgap.feature_cache import encode
    from ermgap.model import load_backbone

    torch.set_num_threads(1)
    lm, processor = load_backbone(ModelConfig(name_or_path=str(model), dtype="fp32"))
    data = UtteranceDataset(read_manifest(manifest))
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(data), 16):
            audio = [data[i]["audio"] for i in range(start, min(start + 16, len(data)))]
            encode(lm, *compute_features(processor.feature_extractor, audio))
    return {"utterances": len(data), "seconds": time.perf_counter() - t0}


def sweep(spec_path: Path, variants: dict, name: str, root: Path, epochs: int, cache: str) -> dict:
    spec = load_sweep_spec(spec_path, [f"name={name}", f"storage_path={root / 'sweeps'}",
                                       f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                                       f"base.optim.epochs={epochs}", f"base.data.feature_cache={cache}",
                                       "variants=" + json.dumps(variants)])
    t0 = time.perf_counter()
    out = run_sweep(spec, force=True)
    wall = time.perf_counter() - t0
    trials = []
    for _, row in out.leaderboard.iterrows():
        f = out.root / "runs" / row["trial"] / "metrics.json"
        m = json.loads(f.read_text()) if f.is_file() else {}
        trials.append({"trial": row["trial"], "variant": row.get("variant"), "status": row["status"],
                       "dev_w_f1": row["dev_w_f1"], "test_w_f1": row["test_w_f1"],
                       "timing": m.get("timing"), "feature_cache": m.get("feature_cache")})
    return {"wall_s": wall, "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--spec", default=str(ROOT / "sweeps" / "synth_lm.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "feature_cache_sweep.json"))
    args = ap.parse_args()
    spec = load_sweep_spec(args.spec)
    cfg = spec.first_trial_config()
    manifest, model = Path(cfg.data.manifest), Path(cfg.model.name_or_path)
    variants = {v: spec.model.variants[v] for v in TRAINING_VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ermgap-bench-cache-") as tmp:
        root = Path(tmp)
        results = {"uncached": sweep(Path(args.spec), variants, "bench_cache_off", root / "off", args.epochs, "off"),
                   "cached": sweep(Path(args.spec), variants, "bench_cache_on", root / "on", args.epochs,
                                   str(root / "cache"))}
    one_pass = one_encoder_pass(manifest, model)
    stats = [t["feature_cache"] for t in results["cached"]["trials"] if t["feature_cache"]]
    encoder_s = sum(s["encoder_s"] for s in stats)
    misses = sum(s["misses"] for s in stats)
    pairs = list(zip(results["uncached"]["trials"], results["cached"]["trials"]))
    summary = {
        "wall_ratio_cached_vs_uncached": results["cached"]["wall_s"] / results["uncached"]["wall_s"],
        "cached_sweep_encoder_s": encoder_s, "cached_sweep_encoded_utterances": misses,
        "one_encoder_pass": one_pass, "encoder_s_vs_one_pass": encoder_s / one_pass["seconds"],
        "max_abs_diff_test_w_f1": max(abs(a["test_w_f1"] - b["test_w_f1"]) for a, b in pairs),
        "max_abs_diff_dev_w_f1": max(abs(a["dev_w_f1"] - b["dev_w_f1"]) for a, b in pairs),
    }
    doc = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
           "args": vars(args), "summary": summary, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"4-trial sweep wall time: uncached {results['uncached']['wall_s']:.0f} s, cached "
          f"{results['cached']['wall_s']:.0f} s (ratio {summary['wall_ratio_cached_vs_uncached']:.2f}); the cached "
          f"sweep encoded {misses} utterances in {encoder_s:.1f} s = {summary['encoder_s_vs_one_pass']:.2f}× one pass "
          f"over the corpus ({one_pass['utterances']} utterances, {one_pass['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
