"""`ermgap fronts`: several sweeps' trials on one test-split trade-off (ermgap.fronts).

Oracles: scikit-learn (weighted F1, accuracy, confusion matrices) and an independent bootstrap written here for
the point values and intervals; hand-designed predictions whose Pareto fronts are known for the fronts; a
miniature MLflow store (sqlite, real client) holding two sweeps and a lab-style reference for the command's path.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score  # the oracle's oracle
from test_user_errors import run_cli

from ermgap.labels import EMOTIONS

LANGS = ("deu", "eng")


def _preds(correct: dict[tuple[str, str], float], *, per_cell: int = 60, seed: int = 0) -> pd.DataFrame:
    """Predictions of 2 languages × 2 genders × `per_cell` utterances, gold among 3 emotions; in cell (language,
    gender) a share `correct[cell]` is right (the first ones), the rest predicted as the next emotion."""
    rng = np.random.default_rng(seed)
    rows = []
    for lang in LANGS:
        for g in ("F", "M"):
            gold = rng.integers(0, 3, per_cell)
            right = np.arange(per_cell) < round(correct[(lang, g)] * per_cell)
            for i, (y, ok) in enumerate(zip(gold, right)):
                rows.append({"utt_id": f"{lang}{g}{i}", "language": lang, "gender": g, "gold": EMOTIONS[y],
                             "pred": EMOTIONS[y if ok else (y + 1) % 3]})
    return pd.DataFrame(rows)


def _task(df):
    from ermgap.task import task_for_predictions

    return task_for_predictions(df)


# ----------------------------------------------------------------------------------------------- the oracle


def _rates(gold: np.ndarray, pred: np.ndarray) -> tuple:
    """(TPR per label, FPR per label, weighted F1, accuracy) of one group, from its confusion matrix."""
    k = len(EMOTIONS)
    cm = np.bincount(gold * k + pred, minlength=k * k).reshape(k, k)
    tp, pos, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    f1 = np.where(pos + predicted > 0, 2 * tp / np.maximum(pos + predicted, 1), 0.0)
    return (np.where(pos > 0, tp / np.maximum(pos, 1), np.nan), (predicted - tp) / (len(gold) - pos),
            float((pos * f1).sum() / len(gold)), float(tp.sum() / len(gold)))


def _avg_gap(gold: np.ndarray, pred: np.ndarray, male: np.ndarray) -> float:
    """AVG gender gap of one language: mean of the TPR gap (labels with gold examples in both genders), the FPR gap
    (all seven labels), the W-F1 gap and the ACC gap, in percent."""
    (tf, ff, wf, af), (tm, fm, wm, am) = (_rates(gold[m], pred[m]) for m in (~male, male))
    both = np.isfinite(tf) & np.isfinite(tm)
    return 100 * float(np.mean([np.abs(tf - tm)[both].mean(), np.abs(ff - fm).mean(), abs(wf - wm), abs(af - am)]))


def _codes(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    index = {e: i for i, e in enumerate(EMOTIONS)}
    return (df["gold"].map(index).to_numpy(), df["pred"].map(index).to_numpy(), (df["gender"] == "M").to_numpy(),
            df["language"].to_numpy())


def _oracle(df: pd.DataFrame) -> tuple[float, float]:
    """(W-F1 over all languages, the largest per-language AVG gap), percent."""
    gold, pred, male, lang = _codes(df)
    return 100 * _rates(gold, pred)[2], max(_avg_gap(gold[lang == lg], pred[lang == lg], male[lang == lg])
                                            for lg in LANGS)


def test_the_oracle_agrees_with_sklearn():
    """The oracle's confusion-matrix rates are scikit-learn's (weighted F1, accuracy, per-label recall)."""
    df = _preds({("deu", "F"): 0.9, ("deu", "M"): 0.6, ("eng", "F"): 0.85, ("eng", "M"): 0.58}, per_cell=80)
    gold, pred, male, _ = _codes(df)
    tpr, _fpr, wf1, acc = _rates(gold[male], pred[male])
    sub = df[df["gender"] == "M"]
    assert wf1 == pytest.approx(f1_score(sub["gold"], sub["pred"], average="weighted", zero_division=0))
    assert acc == pytest.approx(accuracy_score(sub["gold"], sub["pred"]))
    cm = confusion_matrix(sub["gold"], sub["pred"], labels=list(EMOTIONS))
    assert np.allclose(tpr[:3], np.diag(cm)[:3] / cm.sum(1)[:3])


def test_point_values_and_intervals_match_sklearn_and_an_independent_bootstrap():
    from ermgap.fronts import trial_point

    # Two languages with gaps of similar size: the max over languages moves between resamples, so the interval of
    # the worst-language gap is not the interval of one fixed language's gap.
    df = _preds({("deu", "F"): 0.9, ("deu", "M"): 0.6, ("eng", "F"): 0.85, ("eng", "M"): 0.58}, per_cell=80)
    got = trial_point(df, _task(df), n_boot=4000, seed=1)
    wf1, gap = _oracle(df)
    assert got["w_f1"] == pytest.approx(wf1, abs=1e-9) and got["worst_lang_gap"] == pytest.approx(gap, abs=1e-9)
    assert got["n"] == len(df) and got["worst_language"] in LANGS

    rng = np.random.default_rng(7)  # utterances resampled with replacement within language
    gold, pred, male, lang = _codes(df)
    idx = [np.flatnonzero(lang == lg) for lg in LANGS]
    boots = []
    for _ in range(2000):
        picks = [rng.choice(i, i.size) for i in idx]
        every = np.concatenate(picks)
        boots.append((100 * _rates(gold[every], pred[every])[2],
                      max(_avg_gap(gold[p], pred[p], male[p]) for p in picks)))
    boots = np.array(boots)
    for col, key in ((0, "w_f1"), (1, "worst_lang_gap")):
        lo, hi = np.percentile(boots[:, col], [2.5, 97.5])
        width = hi - lo
        assert got[f"{key}_lo"] == pytest.approx(lo, abs=0.12 * width), key
        assert got[f"{key}_hi"] == pytest.approx(hi, abs=0.12 * width), key
    # The max over languages: its interval lies above the fixed worst language's own interval.
    from ermgap.metrics import bootstrap_ci

    fixed = bootstrap_ci(df, n_boot=4000, seed=1, task=_task(df))["per_language"][got["worst_language"]]["avg_gap"]
    assert got["worst_lang_gap_lo"] > fixed[0] + 0.5


def _trial(family, name, df):
    from ermgap.fronts import Trial

    return Trial(family, name, f"run-{name}", {"x": "1"}, df, _task(df), "sweeps/" + family)


def test_each_family_has_its_own_front_and_references_belong_to_none():
    from ermgap.fronts import fronts_table

    all_right = {(lg, g): 1.0 for lg in LANGS for g in ("F", "M")}
    a1 = _preds(all_right)                                               # W-F1 100, gap 0: beats everything
    a2 = _preds({**all_right, ("deu", "M"): 0.5})                       # worse on both than a1
    b1 = _preds({k: 0.5 for k in all_right})                            # gap ~0, low W-F1
    b2 = _preds({**all_right, ("deu", "M"): 0.4})                       # higher W-F1 than b1, larger gap
    ref = _preds(all_right)                                             # a perfect reference: no front's member
    table = fronts_table([_trial("A", "a1", a1), _trial("A", "a2", a2), _trial("B", "b1", b1),
                          _trial("B", "b2", b2)], [_trial("reference", "erm", ref)], n_boot=200)
    points = {r["trial"]: _oracle(df) for r, df in zip(table.to_dict("records"), (a1, a2, b1, b2, ref))}
    assert points["b1"][0] < points["b2"][0] and points["b1"][1] < points["b2"][1]  # the hand design holds
    assert list(table["front"]) == [True, False, True, True, False]
    assert list(table["front_all"]) == [True, False, False, False, False]
    for col in ("w_f1", "worst_lang_gap"):  # every interval is finite and ordered
        assert (table[f"{col}_lo"] <= table[f"{col}_hi"]).all()


def test_trials_on_other_test_utterances_are_refused():
    from ermgap.errors import PredictionsError
    from ermgap.fronts import fronts_table

    a = _preds({(lg, g): 1.0 for lg in LANGS for g in ("F", "M")})
    with pytest.raises(PredictionsError, match="another test utterances .*2 differ"):
        fronts_table([_trial("A", "a", a), _trial("A", "b", a.assign(utt_id=a["utt_id"].str.replace("deuF0", "x")))])


# ----------------------------------------------------------------------------------------------- the command


def _store(tmp_path):
    """A sqlite MLflow store with two Pareto-style sweeps (minmaxgap: 2 trials, constrained: 1) and a lab-style
    sweep (variant positive.erm, seeds 42 and 43); each sweep directory holds its sweep_state.json."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("fronts-test", artifact_location=str(tmp_path / "artifacts"))
    sweeps = {}

    def sweep(name, trials):
        parent = c.create_run(exp, run_name=name).info.run_id
        for i, (params, tags, correct) in enumerate(trials):
            run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "ermgap.trial_id": f"{name[-3:]}_0000{i}",
                                          **{f"ermgap.param.{k}": v for k, v in tags.items()}}).info.run_id
            for k, v in params.items():
                c.log_param(run, k, v)
            df = _preds(correct)
            c.log_metric(run, "best/test_w_f1", _oracle(df)[0])
            csv = tmp_path / "preds" / run / "test_preds.csv"
            csv.parent.mkdir(parents=True)
            df.to_csv(csv, index=False)
            c.log_artifact(run, str(csv), "predictions")
            c.set_terminated(run)
        c.set_terminated(parent)
        where = tmp_path / "sweeps" / name
        where.mkdir(parents=True)
        (where / "sweep_state.json").write_text(json.dumps({"name": name, "parent_run_id": parent,
                                                            "tracking_uri": uri, "experiment": "fronts-test"}))
        sweeps[name] = where

    cells = [(lg, g) for lg in LANGS for g in ("F", "M")]
    sweep("pareto_minmaxgap", [({"objective.kind": "minmaxgap"}, {"lambda.lam_max": "0.3"},
                                {**{k: 0.9 for k in cells}, ("deu", "M"): 0.5}),
                               ({"objective.kind": "minmaxgap"}, {"lambda.lam_max": "1.0"}, {k: 0.7 for k in cells})])
    sweep("pareto_constrained", [({"objective.kind": "constrained"}, {"objective.constrained.mu_max": "0.6"},
                                  {**{k: 0.8 for k in cells}, ("eng", "M"): 0.6})])
    sweep("lab", [({"objective.kind": "erm", "optim.seed": s}, {"variant": "positive.erm", "optim.seed": s},
                   {**{k: 0.85 for k in cells}, ("deu", "M"): 0.3}) for s in ("42", "43")])
    return sweeps


def _run(monkeypatch, capsys, *args):
    monkeypatch.setenv("COLUMNS", "100")
    return run_cli(monkeypatch, capsys, "fronts", *map(str, args))


def test_the_command_prints_the_table_and_writes_its_files_then_refuses_bad_input(tmp_path, monkeypatch, capsys):
    s = _store(tmp_path)
    out = tmp_path / "results" / "fronts"
    args = [s["pareto_minmaxgap"], s["pareto_constrained"], "--reference", f"{s['lab']}:positive.erm@42",
            "--out", out, "--n-boot", 200]
    code, text = _run(monkeypatch, capsys, *args)
    assert code == 0, text
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, text
    rows = [ln for ln in lines if ln.startswith(("ERM-MinMaxGAP", "Constrained ERM", "reference"))]
    assert len(rows) == 4 and "positive.erm seed 42" in rows[-1] and rows[-1].endswith("ref")
    assert "n = 240 utterances" in text and "lam_max 0.3" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    trials = {t["trial"]: t for t in doc["trials"]}
    assert doc["output"] == "ermgap fronts" and doc["split"] == "test" and len(trials) == 4
    wf1, gap = _oracle(_preds({**{(lg, g): 0.9 for lg in LANGS for g in ("F", "M")}, ("deu", "M"): 0.5}))
    assert trials["gap_00000"]["w_f1"] == pytest.approx(wf1) and trials["gap_00000"]["worst_lang_gap"] == pytest.approx(gap)
    assert trials["gap_00000"]["front"] and trials["gap_00001"]["front"]  # one higher W-F1, the other smaller gap
    assert out.with_suffix(".md").read_text().startswith("<!-- ermgap fronts -->")
    assert out.with_suffix(".png").stat().st_size > 10_000

    def error(*bad):
        code, text = _run(monkeypatch, capsys, *bad)
        assert code == 2 and "Traceback" not in text, text
        return " ".join(text.split())

    assert f"{out}.json already exists; pass --force" in error(*args)
    assert _run(monkeypatch, capsys, *args, "--force")[0] == 0  # its own output: replaced
    assert f"{tmp_path}: not a sweep directory" in error(tmp_path, "--out", tmp_path / "x")
    assert "expected DIR:VARIANT or DIR:VARIANT@SEED" in error(s["pareto_minmaxgap"], "--reference", "nowhere",
                                                               "--out", tmp_path / "x")
    assert "2 finished runs (seeds 42, 43); name one with @SEED" in error(
        s["pareto_minmaxgap"], "--reference", f"{s['lab']}:positive.erm", "--out", tmp_path / "x")
    assert "it has: positive.erm@42, positive.erm@43" in error(
        s["pareto_minmaxgap"], "--reference", f"{s['lab']}:positive.oracle@42", "--out", tmp_path / "x")
    foreign = tmp_path / "mine.md"
    foreign.write_text("a person's notes\n")
    assert f"{foreign} was not written by ermgap fronts" in error(s["pareto_minmaxgap"], "--out", tmp_path / "mine",
                                                                 "--force")
    assert foreign.read_text() == "a person's notes\n" and not (tmp_path / "x.json").exists()
