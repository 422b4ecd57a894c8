"""Plots a paper can print: the tests read the drawn artists back (error-bar segments, axis ranges, legend,
columns, titles) and compare them with the numbers given, not with the code's own output."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from ermgap import plots  # noqa: E402
from ermgap.labels import EMOTIONS, INVALID  # noqa: E402
from ermgap.sweep.render import paper_names  # noqa: E402
from ermgap.sweep.spec import load_sweep_spec  # noqa: E402

POINTS = [(50.0, 5.0), (53.0, 6.4), (48.0, 4.9)]  # (W-F1, AVG gap): the demo's spread
ERRORS = [((47.0, 53.0), (2.0, 8.0)), ((50.5, 55.5), (3.1, 9.9)), ((45.0, 51.0), (1.5, 8.5))]


def _segments(ax) -> list[np.ndarray]:
    return [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]


def test_trade_off_error_bars_split_title_and_axes():
    fig = plots.trade_off_figure(POINTS, ["ERM (SFT)", "ERM-MinMaxGAP, p = 1", "λ = 3"], split="test",
                                 errors=ERRORS, note="n = 112 per (language, gender)")
    ax = fig.axes[0]
    assert "(test split, bootstrap 95 % intervals)" in ax.get_title() and "n = 112" in ax.get_title()
    segs = _segments(ax)
    # one horizontal (gap) and one vertical (W-F1) bar per point, spanning exactly the intervals given
    horizontal = sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in segs if s[0][1] == s[1][1])
    vertical = sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segs if s[0][0] == s[1][0])
    assert horizontal == sorted((lo, hi) for _, (lo, hi) in ERRORS)
    assert vertical == sorted((lo, hi) for (lo, hi), _ in ERRORS)
    # the gap axis starts at 0 and holds every interval; the score axis spans at least 10 points
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert x0 == 0 and x1 >= 9.9 and y1 - y0 >= 10 and y0 <= 45 and y1 >= 55.5
    # points are labelled with the names given (the paper's)
    assert sorted(t.get_text() for t in ax.texts) == sorted(["ERM (SFT)", "ERM-MinMaxGAP, p = 1", "λ = 3"])
    plt.close(fig)


def test_pareto_legend_only_draws_a_front_it_has():
    one = plots.trade_off_figure([(50.0, 4.0), (40.0, 6.0)], ["a", "b"], split="dev")  # a dominates b
    ax = one.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Pareto front" not in labels and any("on the Pareto front" in t for t in labels)
    assert "(dev split)" in ax.get_title()
    two = plots.trade_off_figure(POINTS, ["a", "b", "c"], split="dev")  # a trade-off: a step line
    ax2 = two.axes[0]
    front = [ln for ln in ax2.get_lines() if ln.get_label() == "Pareto front"]
    assert len(front) == 1 and len(front[0].get_xdata()) >= 2
    plt.close(one)
    plt.close(two)


def test_gap_bars_carry_the_intervals_given():
    gaps = {"ERM (SFT)": {"Multilingual": 5.0, "DEU": 7.0}, "ERM-MinMaxGAP, p = 2": {"Multilingual": 4.0, "DEU": 3.0}}
    errors = {"ERM (SFT)": {"Multilingual": (2.0, 9.0), "DEU": (3.5, 12.0)},
              "ERM-MinMaxGAP, p = 2": {"Multilingual": (1.0, 6.5), "DEU": (0.5, 7.0)}}
    fig = plots.gap_bars_figure(gaps, errors=errors, split="test", note="n = 112 per (language, gender)")
    ax = fig.axes[0]
    spans = sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in _segments(ax))
    assert spans == sorted(v for g in errors.values() for v in g.values())
    assert "(test split, bootstrap 95 % intervals)" in ax.get_title() and "n = 112" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(gaps)
    plt.close(fig)


def test_confusion_matrices_show_invalid_only_when_there_is_one():
    k = len(EMOTIONS)
    scored = {g: np.hstack([np.eye(k, dtype=int) * 3, np.zeros((k, 1), dtype=int)]) for g in ("F", "M")}
    fig = plots.confusion_figure(scored, title="ERM (SFT)")
    assert all(INVALID not in [t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes)
    assert all(len(ax.get_xticklabels()) == k for ax in fig.axes)
    plt.close(fig)
    generated = {g: m.copy() for g, m in scored.items()}
    generated["M"][0, k] = 2  # two unparseable answers
    fig = plots.confusion_figure(generated, title="ERM (SFT)")
    assert all([t.get_text() for t in ax.get_xticklabels()][-1] == INVALID for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == [f"ERM (SFT) — F (n={3 * k})", f"ERM (SFT) — M (n={3 * k + 2})"]
    plt.close(fig)


def test_a_sweeps_points_are_named_as_the_paper_names_them():
    spec = load_sweep_spec("sweeps/demo.yaml")
    board = pd.DataFrame({"trial": ["t0", "t1", "t2", "t3"], "variant": ["erm", "fixed_lam3", "adaptive_p2", "x"],
                          "objective": ["ERM (SFT)", "λ = 3", "ERM-MinMaxGAP (p=2)", "ERM-MinMaxGAP (p=2)"]})
    assert paper_names(board, spec) == ["ERM (SFT)", "λ = 3", "ERM-MinMaxGAP (p=2) [adaptive_p2]",
                                        "ERM-MinMaxGAP (p=2) [x]"]
