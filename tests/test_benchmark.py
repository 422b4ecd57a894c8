"""`ermgap benchmark` on the synthetic corpus: tiny local Qwen2-Audio and Voxtral systems, the tiny Qwen2-Audio
behind a real `ermgap serve` reached through the openai backend, and three unreachable systems (connection
refused, missing model directory, missing API key). Table 2 holds exactly the reachable systems, with W-F1 equal
to scikit-learn's on predictions made independently; the skipped ones are named with their reason."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from _procs import ServerProcess, free_port
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from ermgap.backends.qwen2_audio import Qwen2AudioBackend
from ermgap.benchmark import load_systems_file
from ermgap.cli.main import app
from ermgap.config import ModelConfig, PromptConfig
from ermgap.errors import ConfigError
from ermgap.evaluate import load_split
from ermgap.model import build_tiny_voxtral


def test_systems_file_errors_name_the_entry(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"systems": [{"name": "a", "backend": "qwen2_audio", "model": "x"},
                                               {"name": "b", "backend": "whisper"}]}))
    with pytest.raises(ConfigError, match=r"systems\[1\]\.backend: backend 'whisper' is unknown"):
        load_systems_file(bad)
    bad.write_text(yaml.safe_dump({"systems": [{"name": "a", "backend": "ultravox", "mode": "score"}]}))
    with pytest.raises(ConfigError, match=r"systems\[0\]\.mode: 'score'; allowed: generate"):
        load_systems_file(bad)
    bad.write_text(yaml.safe_dump({"systems": [{"name": "a", "backend": "voxtral", "model": "m",
                                                "modalities": ["speech"]}]}))
    with pytest.raises(ConfigError, match=r"systems\[0\]\.modalities"):
        load_systems_file(bad)


def test_the_paper_systems_file_lists_the_five_systems():
    specs = load_systems_file("sweeps/paper_zero_shot.yaml")
    assert [s.backend for s in specs] == ["qwen2_audio", "voxtral", "kimi_audio", "ultravox", "openai"]
    assert all(s.modalities == ("uni", "multi") for s in specs)


@pytest.mark.slow
@pytest.mark.server
def test_benchmark_writes_table2_for_the_reachable_systems(synth_corpus, tiny_model, tmp_path, monkeypatch):
    voxtral = build_tiny_voxtral(tmp_path / "voxtral")
    srv = ServerProcess(tiny_model, tmp_path / "serve.log", token="bench-token-123456", served="tiny")
    monkeypatch.setenv("BENCH_SERVE_KEY", "bench-token-123456")
    monkeypatch.delenv("ERMGAP_TEST_ABSENT_KEY", raising=False)
    systems = tmp_path / "systems.yaml"
    systems.write_text(yaml.safe_dump({"modalities": ["uni", "multi"], "systems": [
        {"name": "tiny-qwen", "backend": "qwen2_audio", "model": str(tiny_model)},
        {"name": "tiny-voxtral", "backend": "voxtral", "model": str(voxtral), "modalities": ["uni"]},
        {"name": "tiny-served", "backend": "openai", "model": "tiny", "base_url": srv.url,
         "api_key_env": "BENCH_SERVE_KEY", "structured": True},
        {"name": "closed-port", "backend": "ultravox", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        {"name": "no-weights", "backend": "voxtral", "model": "./models/does-not-exist"},
        {"name": "no-key", "backend": "openai", "api_key_env": "ERMGAP_TEST_ABSENT_KEY"},
    ]}))
    out = tmp_path / "bench"
    args = ["benchmark", str(systems), "--manifest", str(synth_corpus), "--out", str(out), "--batch-size", "8",
            "--device", "cpu"]
    srv.start()
    try:
        res = CliRunner().invoke(app, args)
    finally:
        srv.kill()
    assert res.exit_code == 0, res.output

    skipped = json.loads((out / "skipped.json").read_text())
    assert set(skipped) == {"closed-port", "no-weights", "no-key"}
    assert "Connection refused" in skipped["closed-port"] and "vllm serve" in skipped["closed-port"]
    assert "no config.json" in skipped["no-weights"] and "$ERMGAP_TEST_ABSENT_KEY is not set" in skipped["no-key"]
    assert "not in the table" in res.output

    table = pd.read_csv(out / "report" / "table2.csv")
    assert set(table["model"]) == {"tiny-qwen", "tiny-voxtral", "tiny-served"}
    assert table["uni_w_f1"].notna().all() and table.loc[table["model"] == "tiny-voxtral", "multi_w_f1"].isna().all()
    assert "tiny-served" in (out / "report" / "table2.md").read_text()

    # oracle: the local backend's predictions made here, scored by scikit-learn
    rows = load_split(synth_corpus, "test", modality="uni")
    be = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="uni")
    pred = [p.pred for p in be.predict(rows.to_dict("records"))]
    want = 100 * f1_score(rows["emotion"], pred, average="weighted")
    multi = table[table["subset"] == "multilingual"].set_index("model")
    assert multi.loc["tiny-qwen", "uni_w_f1"] == pytest.approx(want, abs=1e-9)
    assert multi.loc["tiny-served", "uni_w_f1"] == pytest.approx(want, abs=1e-9)  # same model, over HTTP
    served = pd.read_csv(out / "preds" / "tiny-served_uni.csv")
    assert served["pred"].tolist() == pred

    # a rerun refuses to replace the report; with --force it reuses every prediction file (no server needed now)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "preds").iterdir()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)
    again = CliRunner().invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "preds").iterdir()} == mtimes
    skipped = json.loads((out / "skipped.json").read_text())
    assert "tiny-served" in skipped  # the server is down now: named, not silently dropped
    assert np.isin(pd.read_csv(out / "report" / "table2.csv")["model"], ["tiny-qwen", "tiny-voxtral"]).all()
