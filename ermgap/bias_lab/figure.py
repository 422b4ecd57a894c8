"""The bias lab's figure: test W-F1 against the gap in ERM's widest language, one panel per corpus."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ermgap.bias_lab.table import NAMES  # noqa: E402
from ermgap.plots import save_figure  # noqa: E402

MARKERS = {"erm": "o", "minmaxgap": "D", "constrained": "P", "group_dro": "s", "reweight": "^", "adversarial": "X",
           "oracle": "*"}


def plot_lab(table: pd.DataFrame, out_path: str | os.PathLike, *, titles: Mapping[str, str] | None = None) -> Path:
    """One panel per corpus; a point per row at (gap mean, W-F1 mean) with ± 1 sd error bars over seeds (none with
    one seed). The caption line names the split, the language and n seeds; a row with fewer seeds says so in the
    legend. Written atomically; returns the path."""
    corpora = list(dict.fromkeys(table["corpus"]))
    most = int(table["seeds"].max())
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.6 * len(corpora), 4.4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        part = table[table["corpus"] == corpus]
        for _, r in part.iterrows():
            xerr = r["gap_sd"] if math.isfinite(r["gap_sd"]) else None
            yerr = r["w_f1_sd"] if math.isfinite(r["w_f1_sd"]) else None
            ax.errorbar(r["gap_mean"], r["w_f1_mean"], xerr=xerr, yerr=yerr, fmt=MARKERS.get(r["objective"], "o"),
                        markersize=9 if r["objective"] == "oracle" else 6, capsize=3,
                        label=NAMES.get(r["objective"], r["objective"])
                        + (f" ({int(r['seeds'])} seed{'s' * (r['seeds'] > 1)})" if r["seeds"] < most else ""))
        name = (titles or {}).get(corpus, corpus)
        ax.set_title(name.split(":")[0], fontsize=11)
        ax.set_xlabel(f"AVG gender gap in {part['worst_language'].iloc[0]} [%] ↓ (test)")
        ax.set_ylabel("W-F1 [%] ↑ (test, all languages)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Bias lab: mean ± sd over {most} seed(s) (fewer where the legend says); the gap is in the "
                 f"language ERM leaves widest",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path, force=True)
