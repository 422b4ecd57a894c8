"""ermgap.report / ermgap.plots: tables checked against independently computed numbers, real PNGs, real MLflow."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from metrics_oracle import oracle, random_preds

from ermgap import plots
from ermgap.errors import ConfigError, OutputExistsError, PredictionsError
from ermgap.labels import LANGUAGES
from ermgap.report import System, build_report, load_systems_yaml, parse_preds_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_systems() -> dict[tuple[str, str], pd.DataFrame]:
    """Two models × two modalities on the same 900 utterances (same gold/gender/language)."""
    base = random_preds(900, 21)
    rng = np.random.default_rng(22)
    out = {}
    for name, skill in (("Base_1", 0.3), ("Ours", 0.6)):
        for mod, bonus in (("uni", 0.0), ("multi", 0.1)):
            hit = rng.random(len(base)) < skill + bonus
            out[(name, mod)] = base.assign(pred=np.where(hit, base["gold"], base["pred"]))
    return out


def as_systems(frames, **kw) -> list[System]:
    return [System(name=n, modality=m, preds=df, **kw) for (n, m), df in frames.items()]


def parse_markdown(text: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows as cells), with the bold/underline marks removed."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("|")]
    cells = [[re.sub(r"^_(.+)_$", r"\1", re.sub(r"\*\*", "", c).strip()) for c in ln.strip("|").split(" | ")]
             for ln in lines]
    return cells[0], cells[2:]


def test_table2_markdown_has_expected_rows_and_numbers(tmp_path):
    frames = fake_systems()
    paths = build_report(as_systems(frames), tmp_path / "rep")
    header, rows = parse_markdown(paths["table2_md"].read_text())
    assert header[0] == "Model" and header[1] == "Uni W-F1↑" and header[8] == "Multi W-F1↑"
    assert header[-1] == "Δ AVG (uni→multi)" and len(header) == 16
    assert [r[0] for r in rows] == ["*Multilingual*", "Base_1", "Ours", "*DEU*", "Base_1", "Ours",
                                    "*ENG*", "Base_1", "Ours", "*JPN*", "Base_1", "Ours"]
    keys = ("w_f1", "acc", "tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap", "avg_gap")
    subset_of_row = {1: None, 2: None, 4: "deu", 5: "deu", 7: "eng", 8: "eng", 10: "jpn", 11: "jpn"}
    for i, lang in subset_of_row.items():
        name = rows[i][0]
        want = {}
        for mod in ("uni", "multi"):
            df = frames[(name, mod)]
            want[mod] = oracle(df if lang is None else df[df["language"] == lang])
        expected = [f"{want[m][k]:.2f}" for m in ("uni", "multi") for k in keys]
        assert rows[i][1:15] == expected, (name, lang)
        delta = want["multi"]["avg_gap"] - want["uni"]["avg_gap"]
        assert rows[i][15] == ("↓" if delta < 0 else "↑") + f"{abs(delta):.2f}"
    # the CSV keeps full precision
    csv = pd.read_csv(paths["table2_csv"])
    ours = csv[(csv["subset"] == "multilingual") & (csv["model"] == "Ours")].iloc[0]
    assert ours["multi_avg_gap"] == pytest.approx(oracle(frames[("Ours", "multi")])["avg_gap"])
    # Table 3: multilingual only, one section per group
    _, rows3 = parse_markdown(paths["table3_md"].read_text())
    assert [r[0] for r in rows3] == ["*Systems*", "Base_1", "Ours"]
    tex = paths["table2_tex"].read_text()
    assert tex.startswith(r"\begin{tabular}") and r"Base\_1" in tex and r"\textbf{" not in tex  # top-2 of 2: no marks
    doc = json.loads(paths["metrics_json"].read_text())
    assert [(s["name"], s["modality"]) for s in doc["systems"]] == list(frames)
    assert set(doc["systems"][0]["per_language"]) == set(LANGUAGES)


def test_report_pngs_and_ci_outputs(tmp_path):
    frames = fake_systems()
    systems = as_systems(frames)
    systems[2].lambda_history = [(0, 0.0), (10, 0.4), (20, 0.9)]
    paths = build_report(systems, tmp_path / "rep", n_boot=100, seed=1, baseline="Base_1")
    pngs = [p for p in paths.values() if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {"fairness_accuracy.png", "gender_gaps.png", "lambda_trajectory.png",
                                      "Ours_uni.png", "Base_1_multi.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, p
    csv = pd.read_csv(paths["table2_csv"])
    assert (csv["uni_w_f1_lo"] <= csv["uni_w_f1"]).all() and (csv["uni_w_f1"] <= csv["uni_w_f1_hi"]).all()
    paired = pd.read_csv(paths["paired_csv"])
    # Ours is clearly more accurate than Base_1 in both modalities: the paired CI excludes 0
    vs = paired[(paired["comparison"] == "Base_1→Ours") & (paired["subset"] == "multilingual")
                & (paired["metric"] == "acc")]
    assert len(vs) == 2 and (vs["lo"] > 0).all()
    assert set(paired["comparison"]) == {"Base_1: uni→multi", "Ours: uni→multi", "Base_1→Ours"}


def test_plot_functions_write_pngs(tmp_path):
    out = plots.fairness_accuracy_scatter([(50, 4), (55, 5), (40, 6)], ["a", "b", "c"], tmp_path / "s.png",
                                          split="test")
    out2 = plots.lambda_trajectories({"run": [(1, 0.0), (2, 0.5)]}, tmp_path / "l.png")
    out3 = plots.pareto_plot(pd.DataFrame({"trial": ["t1", "t2"], "dev_w_f1": [40.0, 50.0],
                                           "dev_avg_gap": [3.0, 2.0]}), tmp_path / "p.png",
                             x="dev_avg_gap", y="dev_w_f1", label="trial", split="dev")
    for p in (out, out2, out3):
        assert p.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(OutputExistsError):
        plots.lambda_trajectories({"run": [(1, 0.0)]}, tmp_path / "l.png")


def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path):
    frames = fake_systems()
    out = tmp_path / "rep"
    dup = as_systems(frames)
    dup.append(dup[0])
    with pytest.raises(ConfigError, match="given twice"):
        build_report(dup, out)
    with pytest.raises(ConfigError, match="baseline"):
        build_report(as_systems(frames), out, baseline="nope")
    with pytest.raises(ConfigError, match="NAME:MODALITY:PATH"):
        parse_preds_spec("just-a-path.csv")
    good = tmp_path / "good.csv"
    frames[("Ours", "uni")].to_csv(good, index=False)
    with pytest.raises(ConfigError, match="modality 'audio'"):
        parse_preds_spec(f"Ours:audio:{good}")
    bad = tmp_path / "bad.csv"
    frames[("Ours", "uni")].assign(gold="happy").to_csv(bad, index=False)
    with pytest.raises(PredictionsError, match=r"bad\.csv: column 'gold': 900 bad value\(s\) at data row 1 \(CSV line 2\)"):
        parse_preds_spec(f"Ours:uni:{bad}")
    spec = tmp_path / "systems.yaml"
    spec.write_text("systems:\n  - {name: A, modality: uni, preds: good.csv, colour: red}\n")
    with pytest.raises(ConfigError, match=r"systems\[0\].*colour"):
        load_systems_yaml(spec)
    assert not out.exists()
    # CLI: clear message, exit 2, nothing written
    res = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "report", "--out", str(out),
                          "--preds", f"A:uni:{good}", "--preds", f"B:uni:{bad}"], capture_output=True, text=True)
    assert res.returncode == 2 and "column 'gold'" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
    # an existing report is kept unless --force
    spec.write_text("systems:\n  - {name: A, modality: uni, preds: good.csv, group: Main}\n")
    build_report(load_systems_yaml(spec), out)
    before = (out / "table2.md").read_text()
    with pytest.raises(OutputExistsError):
        build_report(as_systems(frames), out)
    assert (out / "table2.md").read_text() == before
    build_report(as_systems(frames), out, force=True)
    assert "Base_1" in (out / "table2.md").read_text()


def test_report_from_mlflow_parent_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="sweep").info.run_id
    frames = fake_systems()
    children = {}
    for (mode, init), (name, mod) in zip([("fixed", "0.0"), ("adaptive", "0.0"), ("fixed", "1.0")],
                                         [("Base_1", "uni"), ("Ours", "uni"), ("Ours", "multi")]):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        for k, v in {"data.modality": mod, "lambda.mode": mode, "lambda.init": init, "objective.p": "2.0"}.items():
            client.log_param(run, k, v)
        for step, lam in enumerate([0.0, 0.5, 1.0]):
            client.log_metric(run, "lambda", lam, step=step * 10)
        csv = tmp_path / f"{run}" / "test_preds.csv"
        csv.parent.mkdir()
        frames[(name, mod)].to_csv(csv, index=False)
        client.log_artifact(run, str(csv), "predictions")
        children[run] = (name, mod, mode, init)
    client.create_run(exp, tags={"mlflow.parentRunId": parent})  # a trial stopped before predicting
    out = tmp_path / "rep"
    res = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "report", "--mlflow-parent", parent,
                          "--tracking-uri", uri, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "skipped" in res.stdout and "no predictions/test_preds.csv" in res.stdout
    doc = json.loads((out / "metrics.json").read_text())
    got = {(s["name"], s["modality"]): s for s in doc["systems"]}
    assert set(got) == {("ERM (SFT)", "uni"), ("ERM-MinMaxGAP (p=2)", "uni"), ("λ = 1", "multi")}
    assert got[("λ = 1", "multi")]["overall"]["avg_gap"] == pytest.approx(oracle(frames[("Ours", "multi")])["avg_gap"])
    _, rows3 = parse_markdown((out / "table3.md").read_text())
    # The paper's sections and row labels; the adaptive p = 2 run is "Ours" in two sections.
    assert [r[0] for r in rows3] == ["*Main components*", "+ ERM (SFT)", "ERM-MinMaxGAP (Ours)",
                                     "*Lambda effect*", "λ = 0 (SFT)", "λ = 1", "λ = adaptive (Ours)"]
    assert (out / "lambda_trajectory.png").read_bytes()[:8] == PNG_MAGIC
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/table2.md", "report/fairness_accuracy.png", "report/lambda_trajectory.png"} <= logged
    # explicit run ids through the library entry point the sweep uses
    from ermgap.report import report_from_mlflow

    paths, skipped = report_from_mlflow(uri, tmp_path / "rep2", run_ids=list(children)[:2])
    assert skipped == []
    _, rows3 = parse_markdown(paths["table3_md"].read_text())
    assert [r[0] for r in rows3] == ["*Main components*", "+ ERM (SFT)", "ERM-MinMaxGAP (Ours)",
                                     "*Lambda effect*", "λ = 0 (SFT)", "λ = adaptive (Ours)"]


def test_report_names_and_groups_runs_by_objective_kind(tmp_path):
    from mlflow import MlflowClient

    from ermgap.report import report_from_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    frames = fake_systems()
    runs = []
    for params, frame in [({"objective.kind": "erm"}, frames[("Base_1", "uni")]),
                          ({"objective.kind": "group_dro", "objective.group_dro.eta": "0.05"}, frames[("Ours", "uni")]),
                          ({"objective.kind": "reweight"}, frames[("Base_1", "multi")]),
                          ({"objective.kind": "minmaxgap", "lambda.mode": "adaptive", "objective.p": "2.0"},
                           frames[("Ours", "multi")])]:
        run = client.create_run(exp).info.run_id
        for k, v in {"data.modality": "uni", "lambda.mode": "adaptive", **params}.items():
            client.log_param(run, k, v)
        csv = tmp_path / run / "test_preds.csv"
        csv.parent.mkdir()
        frame.to_csv(csv, index=False)
        client.log_artifact(run, str(csv), "predictions")
        runs.append(run)
    paths, _ = report_from_mlflow(uri, tmp_path / "rep", run_ids=runs)
    _, rows3 = parse_markdown(paths["table3_md"].read_text())
    assert [r[0] for r in rows3] == ["*Main components*", "+ ERM (SFT)", "ERM-MinMaxGAP (Ours)",
                                     "*Lambda effect*", "λ = 0 (SFT)", "λ = adaptive (Ours)",
                                     "*Other objectives*", "Group DRO (η=0.05)", "Reweighting"]


def test_top_two_marks_follow_the_metric_direction():
    from ermgap.report import table2

    rows = []
    for name, score, gap in (("a", 50.0, 3.0), ("b", 60.0, 1.0), ("c", 55.0, 2.0)):
        rows.append({"model": name, "modality": "uni", "group": "G", "subset": "multilingual",
                     **{k: score for k in ("w_f1", "acc")},
                     **{k: gap for k in ("tpr_gap", "fpr_gap", "w_f1_gap", "acc_gap", "avg_gap")},
                     "n": 10, "invalid_rate": 0.0})
    _, md, tex = table2(pd.DataFrame(rows))
    body = {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()[3:])}
    assert body["b"][0] == "**60.00**" and body["c"][0] == "_55.00_" and body["a"][0] == "50.00"
    assert body["b"][6] == "**1.00**" and body["c"][6] == "_2.00_" and body["a"][6] == "3.00"
    assert "<u>" not in md  # MLflow's Markdown preview shows raw HTML literally
    assert r"\textbf{60.00}" in tex and r"\underline{2.00}" in tex


def test_table3_has_the_papers_sections_labels_and_a_caption(tmp_path):
    """A sweep holding the paper's ablation (zero-shot from a file, ERM, fixed λ 1 and 5, adaptive p 1 and 2):
    Table 3 shows it as the paper does, with a caption stating split, n per gender and seeds."""
    from ermgap.objectives import describe_objective

    frames = fake_systems()
    base, ours = frames[("Base_1", "uni")], frames[("Ours", "uni")]
    runs = [{"lambda.mode": "fixed", "lambda.init": "0.0"}, {"lambda.mode": "fixed", "lambda.init": "5.0"},
            {"lambda.mode": "adaptive", "objective.p": "1.0"}, {"lambda.mode": "fixed", "lambda.init": "1.0"},
            {"lambda.mode": "adaptive", "objective.p": "2.0"}]
    systems = [System(name="Qwen2-Audio", modality="uni", preds=base, group="Main components")]
    for i, params in enumerate(runs):
        params = {**params, "optim.seed": "42"}
        systems.append(System(name=describe_objective(params), modality="uni", preds=ours if i % 2 else base,
                              params=params))
    paths = build_report(systems, tmp_path / "rep")
    text = paths["table3_md"].read_text()
    header, rows3 = parse_markdown(text)
    assert [r[0] for r in rows3] == [
        "*Main components*", "Qwen2-Audio", "+ ERM (SFT)", "ERM-MinMaxGAP (Ours)",
        "*Lambda effect*", "λ = 0 (SFT)", "λ = 1", "λ = 5", "λ = adaptive (Ours)",
        "*Penalty power effect*", "p = 1", "p = 2 (Ours)"]
    assert header[3] == "Uni TPR gap↓" and header[7] == "Uni AVG gap↓"
    # A row shows its system's numbers (oracle: the metrics module's independent reimplementation).
    by_label = {r[0]: r for r in rows3}
    assert by_label["λ = 1"][7] == f"{oracle(ours)['avg_gap']:.2f}" and by_label["λ = 5"][7] == f"{oracle(ours)['avg_gap']:.2f}"
    assert by_label["p = 1"][7] == f"{oracle(base)['avg_gap']:.2f}"
    counts = base["gender"].value_counts()
    assert text.startswith(f"**Table 3.** Ablations, multilingual, test split: n = {len(base)} utterances "
                           f"(F {counts['F']}, M {counts['M']}).")
    assert "Seeds: 42." in text and "**bold**: best, _italic_: second best" in text
    csv = pd.read_csv(paths["table3_csv"])
    assert list(csv.loc[csv["model"] == "p = 1", "system"]) == ["ERM-MinMaxGAP (p=1)"]


def test_a_run_that_trained_nothing_is_tables_zero_shot_row(tmp_path):
    """A sweep's zero-shot trial (optim.epochs 0; objective params as ERM's) is Table 3's first main row,
    named after its backbone, and never taken for ERM."""
    from ermgap.objectives import describe_objective

    frames = fake_systems()
    base, ours = frames[("Base_1", "uni")], frames[("Ours", "uni")]
    # The sweep's λ settings (adaptive, p = 2) stay on its zero-shot trial: it must not become "Ours".
    zero = {"objective.kind": "minmaxgap", "lambda.mode": "adaptive", "objective.p": "2.0", "optim.epochs": "0",
            "model.name_or_path": "models/tiny-pretrained/"}
    erm = {"objective.kind": "erm", "optim.epochs": "6"}
    adaptive = {"lambda.mode": "adaptive", "objective.p": "2.0", "optim.epochs": "6"}
    assert describe_objective(zero) == "zero-shot" and describe_objective(erm) == "ERM (SFT)"
    systems = [System(name=describe_objective(p), modality="uni", preds=pr, params=p)
               for p, pr in ((zero, base), (adaptive, ours), (erm, base))]
    _, rows3 = parse_markdown(build_report(systems, tmp_path / "rep")["table3_md"].read_text())
    assert [r[0] for r in rows3][:4] == ["*Main components*", "tiny-pretrained (zero-shot)", "+ ERM (SFT)",
                                         "ERM-MinMaxGAP (Ours)"]
    assert sum(r[0].startswith("λ = 0") for r in rows3) == 1  # the zero-shot run is not a λ = 0 row


def test_paired_comparison_lines_use_two_decimals_and_a_true_minus():
    from ermgap.report import paired_lines

    paired = pd.DataFrame([
        {"comparison": "ERM→Ours", "model": "Ours", "modality": "uni", "subset": "multilingual", "metric": "w_f1",
         "diff": 3.876, "lo": 1.0249, "hi": 6.5, "p_value": 0.01},
        {"comparison": "ERM→Ours", "model": "Ours", "modality": "uni", "subset": "multilingual", "metric": "avg_gap",
         "diff": -1.4812345, "lo": -5.1, "hi": 1.8712, "p_value": 0.4},
        {"comparison": "ERM→Ours", "model": "Ours", "modality": "uni", "subset": "deu", "metric": "avg_gap",
         "diff": 9.0, "lo": 8.0, "hi": 10.0, "p_value": 0.0}])
    assert paired_lines(paired) == ["ERM→Ours (uni): ΔW-F1 +3.88 [1.02, 6.50] · ΔAVG −1.48 [−5.10, 1.87]"]


def test_plot_notes_give_n_per_group():
    """Oracle: pandas counts of the predictions' (language, gender) cells."""
    from ermgap.report import group_sizes

    system = as_systems(fake_systems())[0]
    pooled, per_stratum = group_sizes(system)
    by_gender = system.preds["gender"].value_counts().sort_index()
    assert pooled == "n = 900: " + ", ".join(f"{g} {n}" for g, n in by_gender.items())
    cells = system.preds.groupby(["language", "gender"]).size()
    want = f"{cells.min()}" + (f"–{cells.max()}" if cells.max() != cells.min() else "")
    assert per_stratum == f"n per (language, gender): {want}"


def test_a_sweeps_zero_shot_variant_is_named_once_and_captions_say_what_the_table_has(tmp_path):
    """A sweep's variant named `zero_shot` is 'tiny-pretrained (zero-shot)', not '… (zero-shot) (zero_shot)'; a
    variant whose name says more than its objective keeps it. A one-modality Table 3 has no Δ AVG column, so
    its caption does not describe one; a two-modality Table 2 does. Bold marks point estimates: the caption
    says whether intervals were computed and where to read them."""
    frames = fake_systems()
    base, ours = frames[("Base_1", "uni")], frames[("Ours", "uni")]
    zero = {"objective.kind": "erm", "optim.epochs": "0", "model.name_or_path": "models/tiny-pretrained"}
    adaptive = {"lambda.mode": "adaptive", "objective.p": "1.0", "optim.epochs": "6"}
    systems = [System(name="zero_shot", modality="uni", preds=base, params=zero),
               System(name="adaptive_p1", modality="uni", preds=ours, params=adaptive)]
    paths = build_report(systems, tmp_path / "rep")
    text = paths["table3_md"].read_text()
    rows = [r[0] for r in parse_markdown(text)[1]]
    assert "tiny-pretrained (zero-shot)" in rows and not any("zero_shot" in r for r in rows), rows
    assert any(r.endswith("(adaptive_p1)") for r in rows), rows
    assert "Δ AVG" not in text and "no intervals were computed" in text
    both = build_report(as_systems(frames), tmp_path / "rep2", n_boot=20)
    text2 = both["table2_md"].read_text()
    assert "Δ AVG (uni→multi)" in parse_markdown(text2)[0] and "Δ AVG (uni→multi): multimodal minus" in text2
    assert "95 % bootstrap intervals" in text2 and "no intervals" not in text2


def test_plot_legends_name_objectives_and_modalities_in_words():
    """Legends read as a paper's: a trained run by its objective (its name only where two share one), the
    modality in words and only when the report holds both (hand-written expectations)."""
    from ermgap.report import plot_names

    preds = fake_systems()[("Base_1", "uni")]
    p1 = {"lambda.mode": "adaptive", "objective.p": "1.0", "optim.epochs": "6"}
    erm = {"objective.kind": "erm", "optim.epochs": "6"}
    one = [System(name="adaptive_p1", modality="uni", preds=preds, params=p1),
           System(name="erm", modality="uni", preds=preds, params=erm),
           System(name="erm_seed2", modality="uni", preds=preds, params=erm),
           System(name="Qwen2-Audio", modality="uni", preds=preds)]
    assert plot_names(one) == {("adaptive_p1", "uni"): "ERM-MinMaxGAP (p=1)", ("erm", "uni"): "ERM (SFT) (erm)",
                               ("erm_seed2", "uni"): "ERM (SFT) (erm_seed2)", ("Qwen2-Audio", "uni"): "Qwen2-Audio"}
    two = [System(name="Qwen2-Audio", modality=m, preds=preds) for m in ("uni", "multi")]
    assert plot_names(two) == {("Qwen2-Audio", "uni"): "Qwen2-Audio, speech",
                               ("Qwen2-Audio", "multi"): "Qwen2-Audio, speech + transcript"}
