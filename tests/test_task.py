"""Any corpus: a task whose labels, strata and protected attribute come from the data, not from code.

The corpus is built here (tones whose pitch depends on the label): labels {calm, happy, sad, angry},
languages {fra, spa} and a three-valued attribute `age_group`. It is validated, evaluated with the tiny
model, and the per-language metrics of the written predictions are checked against scikit-learn / fairlearn
(k = 3 groups: every gap is max − min over the groups). Each error names the file, row and value.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from metrics_oracle import oracle

from ermgap.config import load_config
from ermgap.data.manifest import validate_manifest
from ermgap.errors import ConfigError, ErmgapError
from ermgap.task import Task, TaskSpec

LABELS = ("calm", "happy", "sad", "angry")
LANGS = ("fra", "spa")
AGES = ("young", "middle", "old")
PITCH = {"calm": 180.0, "happy": 320.0, "sad": 140.0, "angry": 260.0}
CONFIG = "data:\n  labels: infer\n  attribute: age_group\n"


def write_corpus(folder, *, per_cell=None, rows_fn=None):
    """One 0.3 s tone per (split, language, age, label) cell (two per cell in train)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_cell = per_cell or {"train": 2, "dev": 1, "test": 1}
    rows = []
    rng = np.random.default_rng(0)
    for split, lang, age, label in itertools.product(("train", "dev", "test"), LANGS, AGES, LABELS):
        for k in range(per_cell[split]):
            uid = f"{split}-{lang}-{age}-{label}-{k}"
            t = np.arange(4800) / 16000
            x = 0.3 * np.sin(2 * np.pi * (PITCH[label] * (1 + 0.03 * rng.standard_normal())) * t)
            sf.write(folder / f"{uid}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
            rows.append(dict(utt_id=uid, split=split, language=lang, emotion=label, speaker=f"{lang}-{age}-{split}",
                             age_group=age, transcript="bonjour", audio=f"{uid}.wav", duration_s=0.3))
    df = pd.DataFrame(rows)
    if rows_fn:
        df = rows_fn(df)
    path = folder / "manifest.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("anycorpus") / "c")


def spec(**kw) -> TaskSpec:
    return TaskSpec(**{"labels": "infer", "attribute": "age_group", **kw})


def test_task_resolves_from_the_train_split_in_a_documented_order(corpus):
    df = pd.read_csv(corpus, dtype=str, keep_default_na=False)
    task = spec().resolve(df, file=str(corpus))
    assert task.labels == ("angry", "calm", "happy", "sad")  # sorted, not the file order
    assert task.verbalizers == task.labels
    assert task.attribute_values == ("middle", "old", "young")
    assert task.stratum_values == ("fra", "spa")
    declared = spec(labels={"calm": "calm voice", "happy": "happy", "sad": "sad", "angry": "angry"},
                    attribute_values=("young", "middle", "old")).resolve(df)
    assert declared.labels == LABELS and declared.verbalizers[0] == "calm voice"
    assert declared.attribute_values == AGES
    combo = spec(stratum="language+modality").resolve(df, modality="uni")
    assert combo.stratum == ("language", "modality") and combo.stratum_values == ("fra_uni", "spa_uni")
    assert Task.from_dict(declared.to_dict()) == declared
    assert validate_manifest(corpus, task=spec()) == []
    # the paper's task rejects this corpus with a clear message
    problems = validate_manifest(corpus)
    assert any("required column is missing" in str(p) and "'gender'" in str(p) for p in problems)


def test_config_keys_and_verbalizer_rules(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  labels: {calm: calm, happy: happy}\n  attribute: age_group\n"
                 "  attribute_values: [young, old]\nobjective:\n  stratum: language+speaker\n")
    cfg = load_config(p)
    s = TaskSpec.from_config(cfg)
    assert s.labels == {"calm": "calm", "happy": "happy"} and s.attribute_values == ("young", "old")
    assert s.columns == ("emotion", "age_group", "language", "speaker")
    assert load_config(None, ["objective.stratum=language_modality"]).objective.stratum == "language+modality"
    with pytest.raises(ConfigError, match="data.attribute_values"):
        load_config(None, ["data.attribute_values=[F]"])
    # MELD-style verbalizers do not silently apply to another label set
    df = pd.DataFrame({"split": ["train"] * 2, "emotion": ["calm", "sad"], "gender": ["F", "M"], "language": ["x"] * 2})
    custom = dict(load_config().prompt.verbalizers, joy="happy-ish")
    with pytest.raises(ConfigError, match="prompt.verbalizers maps MELD"):
        TaskSpec(labels="infer", verbalizers=custom).resolve(df)
    with pytest.raises(ConfigError, match="given twice"):
        TaskSpec(labels={"calm": "c", "sad": "s"}, verbalizers=custom).resolve(df)


# (case id, manifest edit, fragments every message must contain)
def _set(uid_prefix, col, value):
    def fn(df):
        i = df.index[df["utt_id"].str.startswith(uid_prefix)][0]
        df.loc[i, col] = value
        return df
    return fn


def _row_of(path, uid_prefix):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return int(df.index[df["utt_id"].str.startswith(uid_prefix)][0]) + 1


ERRORS = [
    ("dev-label-not-in-train", _set("dev-spa-old-sad", "emotion", "bored"),
     ["column 'emotion'", "'bored'", "angry, calm, happy, sad", "train split"]),
    ("test-attribute-not-in-train", _set("test-fra-young-calm", "age_group", "child"),
     ["column 'age_group'", "'child'", "middle, old, young"]),
    ("dev-language-not-in-train", _set("dev-fra-young-happy", "language", "ita"),
     ["column 'language'", "'ita'", "fra, spa"]),
]


@pytest.mark.parametrize("case,edit,fragments", ERRORS, ids=[e[0] for e in ERRORS])
def test_value_absent_from_train_names_file_row_column_value(tmp_path, monkeypatch, capsys, case, edit, fragments):
    path = write_corpus(tmp_path / "c", rows_fn=edit)
    uid = {"dev-label-not-in-train": "dev-spa-old-sad", "test-attribute-not-in-train": "test-fra-young-calm",
           "dev-language-not-in-train": "dev-fra-young-happy"}[case]
    row = _row_of(path, uid)
    problems = validate_manifest(path, task=spec(), check_audio=False)
    assert len(problems) == 1, [str(p) for p in problems]
    text = str(problems[0])
    for frag in [str(path), f"row {row} (line {row + 1})", *fragments]:
        assert frag in text, (frag, text)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    code, out = run_cli(monkeypatch, capsys, "data", "validate", str(path), "--config", str(cfg), "--no-audio")
    assert code == 2 and f"row {row}" in out and fragments[1] in out and "Traceback" not in out


def test_too_many_labels_and_a_one_valued_attribute_are_errors(tmp_path):
    many = write_corpus(tmp_path / "many", per_cell={"train": 3, "dev": 1, "test": 1}, rows_fn=lambda df: df.assign(
        emotion=[f"label{i}" if s == "train" else "label0" for i, s in enumerate(df["split"])]))
    problems = validate_manifest(many, task=spec(), check_audio=False)
    assert len(problems) == 1 and "72 distinct labels" in str(problems[0])
    assert "at most 50" in str(problems[0]) and "column 'emotion'" in str(problems[0]) and str(many) in str(problems[0])
    one = write_corpus(tmp_path / "one", rows_fn=lambda df: df.assign(age_group="adult"))
    problems = validate_manifest(one, task=spec(), check_audio=False)
    assert len(problems) == 1
    assert "column 'age_group'" in str(problems[0]) and "'adult'" in str(problems[0]) and str(one) in str(problems[0])
    assert "1 value" in str(problems[0])


def test_dev_stratum_with_one_attribute_value_is_a_warning(tmp_path):
    path = write_corpus(tmp_path / "c", rows_fn=lambda df: df[~((df["split"] == "dev") & (df["language"] == "spa")
                                                                 & (df["age_group"] != "old"))])
    problems = validate_manifest(path, task=spec(), check_audio=False)
    assert len(problems) == 1 and problems[0].kind == "warning"
    text = str(problems[0])
    assert "split 'dev', language 'spa' has no middle or young rows" in text and "will not drive λ" in text
    from ermgap.data.manifest import read_manifest

    assert len(read_manifest(path, task=spec(), allow_warnings=True)) == len(pd.read_csv(path))


def run_cli(monkeypatch, capsys, *args):
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


@pytest.mark.slow
def test_evaluate_and_metrics_on_the_custom_corpus_match_sklearn(corpus, tiny_model, tmp_path):
    from transformers import AutoProcessor
    from typer.testing import CliRunner

    from ermgap.cli.main import app
    from ermgap.prompts import label_token_ids, prompt_text

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("data:\n  labels: {calm: calm, happy: happy, sad: sad, angry: angry}\n"
                        "  attribute: age_group\n  attribute_values: [young, middle, old]\n")
    cfg = load_config(cfg_path)
    task = Task.from_config(cfg, pd.read_csv(corpus, dtype=str, keep_default_na=False))
    # the tiny tokenizer (byte-level BPE trained on MELD words) still spells the new labels, distinctly
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    seqs = label_token_ids(processor.tokenizer, cfg.prompt, task=task)
    assert len({tuple(s) for s in seqs}) == 4
    assert "Answer with exactly one of: calm, happy, sad, angry." in prompt_text(processor, cfg.prompt, "uni", task=task)

    runner = CliRunner()
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["data", "validate", str(corpus), "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_model), "--manifest", str(corpus), "--split", "test",
                              "--config", str(cfg_path), "--batch-size", "6", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(preds.columns[:5]) == ["utt_id", "language", "age_group", "gold", "pred"]
    assert [c for c in preds.columns if c.startswith("score_")] == [f"score_{lab}" for lab in LABELS]
    assert len(preds) == 24 and set(preds["pred"]) <= set(LABELS)
    scores = preds[[f"score_{lab}" for lab in LABELS]].astype(float).to_numpy()
    assert (np.array(LABELS)[scores.argmax(1)] == preds["pred"].to_numpy()).all()

    res = runner.invoke(app, ["metrics", str(out), "--attribute", "age_group", "--by", "language", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert set(got["per_language"]) == set(LANGS)
    assert set(got["overall"]["by_age_group"]) == set(AGES)
    for name, block in [("overall", got["overall"]), *got["per_language"].items()]:
        part = preds if name == "overall" else preds[preds["language"] == name]
        want = oracle(part, labels=LABELS, attribute="age_group")
        for key, value in want.items():
            assert block[key] == pytest.approx(value, abs=1e-9), (name, key)
    # the table form names the groups and says how k > 2 gaps are taken
    res = runner.invoke(app, ["metrics", str(out), "--attribute", "age_group", "--by", "language"])
    assert res.exit_code == 0 and "FRA" in res.output and "max − min" in res.output
    res = runner.invoke(app, ["metrics", str(out), "--by", "speaker_id"])  # CliRunner bypasses main()'s exit 2
    assert isinstance(res.exception, ErmgapError) and "'speaker_id'" in str(res.exception)

    rep = tmp_path / "rep"
    res = runner.invoke(app, ["report", "--preds", f"tiny:uni:{out}", "--attribute", "age_group", "--out", str(rep),
                              "--no-log"])
    assert res.exit_code == 0, res.output
    table = (rep / "table2.md").read_text()
    assert "*FRA*" in table and "*SPA*" in table and "*DEU*" not in table
    # the caption counts the corpus's own groups (n per age group and per language), not F/M
    counts = preds["age_group"].value_counts()
    assert ", ".join(f"{g} {n}" for g, n in counts.sort_index().items()) in table
    assert f"max − min over the {len(AGES)} age_group values" in table
    doc = json.loads((rep / "metrics.json").read_text())
    assert set(doc["systems"][0]["per_language"]) == set(LANGS)
    assert (rep / "confusion" / "tiny_uni.png").is_file()


def test_k_ary_gaps_are_max_minus_min_over_all_groups():
    """Three groups where the LAST in sorted order (young) is the extreme: a gap over any two groups only,
    or the first two, differs from the oracle's."""
    from ermgap.metrics import compute_metrics, metrics_from_counts
    from ermgap.task import task_for_predictions

    rng = np.random.default_rng(3)
    n = 3000
    age = rng.choice(AGES, n)
    gold = rng.choice(LABELS, n)
    skill = np.where(age == "young", 0.9, np.where(age == "old", 0.5, 0.3))
    pred = np.where(rng.random(n) < skill, gold, rng.choice(LABELS, n))
    df = pd.DataFrame({"utt_id": [f"u{i}" for i in range(n)], "language": rng.choice(LANGS, n), "age_group": age,
                       "gold": gold, "pred": pred})
    task = task_for_predictions(df, labels="infer", attribute="age_group")
    assert task.attribute_values == ("middle", "old", "young") and task.labels == ("angry", "calm", "happy", "sad")
    got = compute_metrics(df, task)
    for name, part in [("overall", df), *((lang, df[df["language"] == lang]) for lang in LANGS)]:
        block = got["overall"] if name == "overall" else got["per_language"][name]
        want = oracle(part, labels=task.labels, attribute="age_group")
        for key, value in want.items():
            assert block[key] == pytest.approx(value, abs=1e-9), (name, key)
        # the vectorised (bootstrap) path agrees: counts [A, K, K+1]
        counts = np.zeros((3, 4, 5))
        for a, y, p in zip(task.attribute_codes(part["age_group"]), task.label_codes(part["gold"]),
                           task.label_codes(part["pred"])):
            counts[a, y, p] += 1
        vec = metrics_from_counts(counts)
        for key, value in want.items():
            assert float(vec[key]) == pytest.approx(value, abs=1e-9), (name, key)
    assert got["overall"]["acc_gap"] > 40  # young vs middle: the spread really spans the third group


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_train_one_epoch_on_the_custom_corpus(ray_cluster, corpus, tiny_model, tmp_path):
    """One epoch, one worker (DeepSpeed ZeRO-2, gloo): the task is resolved once on the driver, written into
    config.yaml and the MLflow params, and the reported metrics are those of the written predictions."""
    import yaml
    from mlflow import MlflowClient

    from ermgap.driver import run_training

    cfg = load_config(None, [
        f"data.manifest={corpus}", "data.labels=infer", "data.attribute=age_group",
        f"model.name_or_path={tiny_model}", "model.dtype=fp32",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.storage_path={tmp_path}/runs",
        "optim.lr=5e-4", "optim.epochs=1", "optim.effective_batch_size=8", "optim.micro_batch_size=4",
        "eval.batch_size=12", "distributed.num_workers=1", "distributed.cpus_per_worker=1",
        "distributed.zero_stage=2", "lambda.eta=5"])
    final = run_training(cfg, run_dir=tmp_path / "runs" / "own")
    run_dir = tmp_path / "runs" / "own"
    assert final["done"] is True and final["step"] == 6  # 48 train utterances / 8
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["data"]["labels"] == ["angry", "calm", "happy", "sad"]
    assert written["data"]["attribute_values"] == ["middle", "old", "young"]
    params = MlflowClient(final["tracking_uri"]).get_run(final["mlflow_run_id"]).data.params
    assert params["task.labels"] == "angry,calm,happy,sad" and params["task.attribute"] == "age_group"
    assert params["task.attribute_values"] == "middle,old,young" and params["task.stratum_values"] == "fra,spa"
    for split, n in (("dev", 24), ("test", 24)):
        preds = pd.read_csv(run_dir / f"{split}_preds.csv", dtype=str, keep_default_na=False)
        assert len(preds) == n and list(preds.columns[:5]) == ["utt_id", "language", "age_group", "gold", "pred"]
        assert [c for c in preds.columns if c.startswith("score_")] == [f"score_{lab}" for lab in
                                                                       ("angry", "calm", "happy", "sad")]
        want = oracle(preds, labels=("angry", "calm", "happy", "sad"), attribute="age_group")
        assert final[f"{split}_w_f1"] == pytest.approx(want["w_f1"], abs=1e-9)
        assert final[f"{split}_avg_gap"] == pytest.approx(want["avg_gap"], abs=1e-9)
        for lang in LANGS:
            per = oracle(preds[preds["language"] == lang], labels=("angry", "calm", "happy", "sad"),
                         attribute="age_group")
            assert final[f"{split}_avg_gap_{lang}"] == pytest.approx(per["avg_gap"], abs=1e-9), (split, lang)
            assert final[f"{split}_w_f1_{lang}"] == pytest.approx(per["w_f1"], abs=1e-9), (split, lang)
        assert final[f"{split}_worst_lang_gap"] == pytest.approx(
            max(final[f"{split}_avg_gap_{lang}"] for lang in LANGS), abs=1e-12)
    # λ moved on the dev loss gap measured over the three age groups within fra and spa
    assert len(final["lambda_history"]) == 1 and final["dev_loss_gap"] > 0


def test_data_stats_on_the_custom_corpus(corpus, tmp_path):
    from typer.testing import CliRunner

    from ermgap.cli.main import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    res = CliRunner().invoke(app, ["data", "stats", str(corpus), "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    df = pd.read_csv(corpus, dtype=str, keep_default_na=False)
    oracle_t1 = pd.crosstab([df["language"], df["age_group"]], df["split"])
    for (lang, age), row in oracle_t1.iterrows():
        assert {k: v for k, v in doc["table1"][lang][age].items() if k != "total"} == row.to_dict()
    oracle_em = pd.crosstab([df["language"], df["age_group"]], df["emotion"])
    for (lang, age), row in oracle_em.iterrows():
        assert {k: v for k, v in doc["emotions"][lang][age].items() if k != "total"} == row.to_dict()
    assert set(doc["num_speakers"]) == set(AGES)


def test_a_sweep_on_the_custom_corpus_logs_its_manifest_as_the_parent_input(corpus, tiny_model, tmp_path):
    """The sweep's parent run reads the manifest for the trials' task (attribute age_group): the default
    task would require a gender column this corpus does not have (a regression: it did)."""
    from mlflow import MlflowClient

    from ermgap.sweep.paths import SweepPaths
    from ermgap.sweep.run import SweepOutcome, _open_parent
    from ermgap.sweep.spec import load_sweep_spec

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_sweep_spec({
        "name": "ages", "base": str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
        "overrides": {"data.manifest": str(corpus), "data.labels": "infer", "data.attribute": "age_group",
                      "model.name_or_path": str(tiny_model)},
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0}}, "algorithm": "grid",
        "mlflow": {"experiment": "ages"}, "storage_path": str(tmp_path / "sweeps")})
    outcome = SweepOutcome(name="ages", root=tmp_path / "sweeps" / "ages", parent_run_id=None, tracking_uri=uri,
                           experiment="ages")
    parent = _open_parent(spec, SweepPaths(outcome.root), outcome, None)
    inputs = MlflowClient(uri).get_run(parent).inputs.dataset_inputs
    assert [i.dataset.source for i in inputs] and "age_group" in inputs[0].dataset.schema
