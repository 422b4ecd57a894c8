"""Metrics throughput: compute_metrics rows/s and bootstrap time per 1,000 resamples at 30,000 rows (the full
MELD-ST size) and 3,000 rows (a test split); the vectorised bootstrap vs a naive per-resample scikit-learn
loop (same stratified resampling, fewer resamples, scaled to 1,000) is printed LAST.

    .venv/bin/python bench/metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # single-threaded BLAS: CPU time == cost
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ermgap import metrics as M  # noqa: E402
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES  # noqa: E402


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gold = rng.choice(EMOTIONS, n, p=[0.4, 0.15, 0.1, 0.1, 0.05, 0.05, 0.15])
    pred = np.where(rng.random(n) < 0.5, gold, rng.choice([*EMOTIONS, "invalid"], n))
    return pd.DataFrame({"utt_id": [f"u{i}" for i in range(n)], "language": rng.choice(LANGUAGES, n),
                         "gender": rng.choice(GENDERS, n), "gold": gold, "pred": pred})


def best_of(fn, repeats: int) -> float:
    """Best CPU time of `repeats` runs. Everything here is single-threaded, so process CPU time is the
    cost, robust to other jobs sharing the cores (wall time on a loaded CI box is not)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def naive_bootstrap(df: pd.DataFrame, n_boot: int, seed: int = 0) -> None:
    """What one would write first: per resample, draw row indices within each language and call the
    scikit-learn metrics (the same code path as compute_metrics, without re-validating) per subset."""
    codes = M.encode(M.validate_predictions(df))
    rng = np.random.default_rng(seed)
    by_lang = [np.flatnonzero(codes["stratum"] == li) for li in range(len(LANGUAGES))]
    for _ in range(n_boot):
        idx = np.concatenate([rows[rng.integers(0, len(rows), len(rows))] for rows in by_lang if len(rows)])
        g, y, p, lang = codes["attribute"][idx], codes["gold"][idx], codes["pred"][idx], codes["stratum"][idx]
        M._subset_metrics(y, p, g)
        for li in range(len(LANGUAGES)):
            m = lang == li
            M._subset_metrics(y[m], p[m], g[m])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke run)")
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    naive_n = 5 if args.quick else 30
    out: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "numpy": np.__version__, "scikit-learn": version("scikit-learn"),
                    "pandas": pd.__version__, "torch": version("torch")},
        "timing": "best-of-N process CPU seconds (single-threaded)",
        "results": {},
    }
    res = out["results"]
    for n in (30_000, 3_000):
        df = synthetic(n)
        t_metrics = best_of(lambda: M.compute_metrics(df), repeats)
        t_boot = best_of(lambda: M.bootstrap_ci(df, n_boot=1000, seed=0), repeats)
        other = df.assign(pred=np.where(np.random.default_rng(1).random(n) < 0.2, df["gold"], df["pred"]))
        t_paired = best_of(lambda: M.paired_bootstrap(df, other, n_boot=1000, seed=0), repeats)
        t_naive = best_of(lambda: naive_bootstrap(df, naive_n), 1) / naive_n * 1000
        res[str(n)] = {"compute_metrics_s": t_metrics, "compute_metrics_rows_per_s": n / t_metrics,
                       "bootstrap_1000_s": t_boot, "paired_bootstrap_1000_s": t_paired,
                       "naive_sklearn_bootstrap_1000_s_extrapolated": t_naive, "naive_resamples_timed": naive_n,
                       "speedup_vectorised_vs_naive": t_naive / t_boot}
        print(f"{n:>6} rows: compute_metrics {t_metrics * 1e3:7.1f} ms ({n / t_metrics:,.0f} rows/s) | "
              f"bootstrap 1000 resamples {t_boot:6.3f} s | paired 1000 {t_paired:6.3f} s | "
              f"naive sklearn loop ≈{t_naive:7.1f} s per 1000 (timed {naive_n})")
    path = Path(__file__).resolve().parent / "results" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"saved {path}")
    for n in ("30000", "3000"):
        print(f"vectorised bootstrap vs naive per-resample sklearn loop at {n} rows: "
              f"{res[n]['speedup_vectorised_vs_naive']:,.0f}x faster")


if __name__ == "__main__":
    main()
