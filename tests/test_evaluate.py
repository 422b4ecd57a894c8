"""`ermgap evaluate`: PREDS.csv from the tiny model, and the OpenAI-compatible audio backend against a real
local HTTP server (errors, timeouts, 429 backoff, malformed answers, interruption and resume)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ermgap.backends import BackendError
from ermgap.backends.openai_compat import OpenAICompatBackend
from ermgap.config import PromptConfig
from ermgap.errors import ConfigError, OutputExistsError
from ermgap.evaluate import evaluate_rows, load_split, predictions_frame
from ermgap.labels import EMOTIONS
from ermgap.metrics import read_predictions

# Answers the fake server gives, keyed by the tone frequency it finds in the uploaded WAV.
ANSWERS = ["I think the speaker is happy.", "sadness", "Die Person klingt wütend.", "怖いです",
           "neutral", "Hmm, hard to say.", "surprised!", "Ekel"]
EXPECTED = ["joy", "sadness", "anger", "fear", "neutral", "invalid", "surprise", "disgust"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """8 test utterances (eng/deu × F/M), each a tone whose frequency encodes its row index."""
    root = tmp_path_factory.mktemp("evalcorpus")
    rows = []
    for i in range(8):
        t = np.arange(int(16000 * (0.5 + 0.1 * i))) / 16000
        sf.write(root / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)).astype(np.float32), 16000)
        rows.append(dict(utt_id=f"u{i}", split="test", language=["eng", "deu"][i % 2], emotion=EMOTIONS[i % 7],
                         speaker=f"s{i % 4}", gender="FFMM"[i % 4], transcript=f"sentence number {i}", audio=f"u{i}.wav"))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


class FakeChatServer:
    """A stdlib HTTP server speaking chat-completions; `script` is a list of per-request behaviours."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[str] = []  # consumed one per request: "ok", "500", "429", "slow", "badjson", "401", "nochoices"
        self.default = "ok"
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    action = server.script.pop(0) if server.script else server.default
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body, "action": action, "t": time.monotonic()})
                if action == "slow":
                    time.sleep(3.0)
                if action in ("500", "401"):
                    return self._send(int(action), b'{"error": {"message": "nope"}}')
                if action == "429":
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0.3"})
                if action == "badjson":
                    return self._send(200, b'{"choices": [ {"message": ')
                if action == "nochoices":
                    return self._send(200, b'{"object": "chat.completion", "choices": []}')
                audio_b64 = body["messages"][0]["content"][0]["input_audio"]["data"]
                x, sr = sf.read(io.BytesIO(base64.b64decode(audio_b64)))
                freq = np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x)
                idx = int(round((freq - 200) / 100))
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWERS[idx]}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code, payload, headers=None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # do not wait for a deliberately slow handler at shutdown
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _backend(url: str, **kw) -> OpenAICompatBackend:
    # A generous timeout: a loaded CI machine must not turn a normal answer into a retry.
    args = dict(modality="multi", api_key="sk-test", timeout_s=10.0, max_retries=3, backoff_s=0.05, concurrency=1)
    args.update(kw)
    return OpenAICompatBackend(url, "gpt-4o-mini-audio-preview", PromptConfig(), **args)


def test_openai_backend_writes_parsed_predictions(manifest, tmp_path):
    rows = load_split(manifest, "test", modality="multi")
    with FakeChatServer() as server:
        df = evaluate_rows(_backend(server.url, concurrency=3), rows, tmp_path / "preds.csv", modality="multi",
                           batch_size=3, progress=False)
    assert df["pred"].tolist() == EXPECTED
    assert df["utt_id"].tolist() == [f"u{i}" for i in range(8)]
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "gpt-4o-mini-audio-preview" and req["body"]["temperature"] == 0
    audio_part, text_part = req["body"]["messages"][0]["content"]
    assert audio_part["type"] == "input_audio" and audio_part["input_audio"]["format"] == "wav"
    assert "sentence number" in text_part["text"] and "neutral, joy, sadness" in text_part["text"]
    back = read_predictions(tmp_path / "preds.csv")  # the metrics module accepts it
    assert back["valid"].tolist() == [p != "invalid" for p in EXPECTED]
    assert not (tmp_path / "preds.csv.partial").exists()
    with pytest.raises(OutputExistsError):
        evaluate_rows(_backend(server.url), rows, tmp_path / "preds.csv", modality="multi", progress=False)


def test_retries_500_timeout_and_429_with_retry_after(manifest, tmp_path):
    rows = load_split(manifest, "test", modality="uni", limit=1)
    with FakeChatServer() as server:
        server.script = ["500", "slow", "429", "ok"]
        be = _backend(server.url, modality="uni", timeout_s=1.0)
        df = evaluate_rows(be, rows, tmp_path / "p.csv", modality="uni", progress=False)
    assert df["pred"].tolist() == ["joy"]
    assert [r["action"] for r in server.requests] == ["500", "slow", "429", "ok"]
    assert be.retries == 3
    gap = server.requests[3]["t"] - server.requests[2]["t"]
    assert gap >= 0.3  # Retry-After honoured (backoff alone would be 0.05 * 2**2 = 0.2 s)
    assert "sentence number" not in server.requests[3]["body"]["messages"][0]["content"][1]["text"]


def test_malformed_answers_are_invalid_and_auth_errors_stop(manifest, tmp_path):
    rows = load_split(manifest, "test", modality="uni", limit=3)
    with FakeChatServer() as server:
        server.script = ["badjson", "nochoices"]
        df = evaluate_rows(_backend(server.url, modality="uni"), rows, tmp_path / "p.csv", modality="uni",
                           progress=False)
        assert df["pred"].tolist() == ["invalid", "invalid", "anger"]
        assert df["valid"].tolist() == ["False", "False", "True"]
        server.default = "401"
        with pytest.raises(BackendError, match="HTTP 401.*API key"):
            evaluate_rows(_backend(server.url, modality="uni"), rows, tmp_path / "q.csv", modality="uni",
                          progress=False)
    assert not (tmp_path / "q.csv").exists()


def test_interrupted_run_resumes_without_repeating_rows(manifest, tmp_path):
    rows = load_split(manifest, "test", modality="uni")
    out = tmp_path / "preds.csv"
    with FakeChatServer() as server:
        server.script = ["ok"] * 4 + ["500"] * 10  # u4 (third batch of 2) fails after its retries
        with pytest.raises(BackendError, match="giving up on u4"):
            evaluate_rows(_backend(server.url, modality="uni", max_retries=2), rows, out, modality="uni",
                          batch_size=2, progress=False, run_info={"model": "m"})
        assert not out.exists()
        partial = pd.read_csv(tmp_path / "preds.csv.partial")
        assert partial["utt_id"].tolist() == ["u0", "u1", "u2", "u3"]
        # A torn last line (killed mid-write) is ignored on resume.
        with open(tmp_path / "preds.csv.partial", "a") as fh:
            fh.write("u4,eng,F,joy,jo")
        with pytest.raises(ConfigError, match="different run"):
            evaluate_rows(_backend(server.url, modality="uni"), rows, out, modality="uni", progress=False,
                          run_info={"model": "other"})
        server.script, server.default = [], "ok"
        n_before = len(server.requests)
        df = evaluate_rows(_backend(server.url, modality="uni"), rows, out, modality="uni", batch_size=2,
                           progress=False, run_info={"model": "m"})
    asked = [r["body"]["messages"][0]["content"][0]["input_audio"]["data"] for r in server.requests[n_before:]]
    assert len(asked) == 4  # only u4..u7
    assert df["pred"].tolist() == EXPECTED
    assert not (tmp_path / "preds.csv.partial").exists()


def test_predictions_frame_accepts_indices_and_strings():
    df = predictions_frame(["a", "b"], [0, "eng"], ["F", 1], [1, "fear"], [-1, 4],
                           scores=np.arange(14.0).reshape(2, 7), modality="multi")
    assert df[["language", "gender", "gold", "pred"]].values.tolist() == [["deu", "F", "joy", "invalid"],
                                                                          ["eng", "M", "fear", "fear"]]
    assert df["valid"].tolist() == [False, True] and df["score_surprise"].tolist() == [6.0, 13.0]
    with pytest.raises(ValueError, match="shape"):
        predictions_frame(["a"], ["eng"], ["F"], ["joy"], ["joy"], scores=np.zeros((1, 6)))


def test_cli_evaluate_tiny_model_score_and_generate(manifest, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from ermgap.cli.main import app

    runner = CliRunner()
    out = tmp_path / "preds.csv"
    args = ["evaluate", "--model", str(tiny_model), "--manifest", str(manifest), "--split", "test",
            "--modality", "multi", "--batch-size", "3", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--mode", "score", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = read_predictions(out)
    assert len(df) == 8 and df["valid"].all()
    scores = df[[f"score_{e}" for e in EMOTIONS]].astype(float).to_numpy()
    assert (scores < 0).all()
    assert (np.array(EMOTIONS)[scores.argmax(1)] == df["pred"].to_numpy()).all()
    res = runner.invoke(app, [*args, "--mode", "generate", "--max-new-tokens", "3", "--out", str(tmp_path / "g.csv")])
    assert res.exit_code == 0, res.output
    gen = read_predictions(tmp_path / "g.csv")
    assert len(gen) == 8 and "answer" in gen.columns


def test_cli_evaluate_with_adapter_changes_scores(manifest, tiny_model, tmp_path):
    import torch
    from typer.testing import CliRunner

    from ermgap.cli.main import app
    from ermgap.config import LoraConfig, ModelConfig
    from ermgap.model import apply_lora, load_backbone

    torch.manual_seed(0)
    peft_model = apply_lora(load_backbone(ModelConfig(name_or_path=str(tiny_model)))[0], LoraConfig(r=4))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    runner = CliRunner()
    args = ["evaluate", "--model", str(tiny_model), "--manifest", str(manifest), "--limit", "3", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "base.csv")]).exit_code == 0
    res = runner.invoke(app, [*args, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora.csv")])
    assert res.exit_code == 0, res.output
    cols = [f"score_{e}" for e in EMOTIONS]
    base = pd.read_csv(tmp_path / "base.csv")[cols].to_numpy()
    lora = pd.read_csv(tmp_path / "lora.csv")[cols].to_numpy()
    assert base.shape == lora.shape == (3, 7) and np.abs(base - lora).max() > 1e-3


def _ermgap(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_evaluate_refuses_nonfinite_audio(manifest, tiny_model, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(manifest.parent, corpus)
    x, sr = sf.read(corpus / "u5.wav", dtype="float32")
    x[100:110] = np.nan
    sf.write(corpus / "u5.wav", x, sr, subtype="FLOAT")
    out = tmp_path / "preds.csv"
    proc = _ermgap("evaluate", "--model", str(tiny_model), "--manifest", str(corpus / "manifest.csv"),
                   "--split", "test", "--device", "cpu", "--batch-size", "4", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "u5.wav has 10 NaN or infinite sample(s)" in proc.stderr
    assert not out.exists()


def test_model_folder_that_is_not_qwen2_audio_is_a_config_error(manifest, tmp_path):
    from ermgap.config import ModelConfig
    from ermgap.model import check_model, load_backbone

    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot read the model config.*model_type 'qwen2_audio'"):
        load_backbone(ModelConfig(name_or_path=str(folder)))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="is a 'bert' model; expected model_type 'qwen2_audio'"):
        check_model(ModelConfig(name_or_path=str(folder)))
    (folder / "config.json").write_text("{}")
    proc = _ermgap("evaluate", "--model", str(folder), "--manifest", str(manifest), "--device", "cpu",
                   "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(folder) in proc.stderr and "model_type" in proc.stderr


def test_missing_local_model_path_is_not_a_hub_id(tmp_path, monkeypatch):
    from ermgap.model import model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match="models/nope does not exist"):
        model_source("models/nope")
    # A hub-like id goes to the hub path (offline here, so it is refused as a hub id, not as a missing folder):
    # whether the hub answers depends on the machine's network, which the test must not.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="Qwen/Qwen2-Audio-7B-Instruct is not a local directory and not in the "
                                          "Hugging Face cache"):
        model_source("Qwen/Qwen2-Audio-7B-Instruct")


def test_nan_label_scores_are_an_error_not_neutral(manifest, tiny_model):
    import torch

    from ermgap.backends.qwen2_audio import Qwen2AudioBackend
    from ermgap.config import ModelConfig

    be = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="uni")
    rows = load_split(manifest, "test", modality="uni", limit=2).to_dict("records")
    assert all(np.isfinite(p.scores).all() for p in be.predict(rows))
    with torch.no_grad():
        be.model.lm_head.weight[:] = float("nan")  # what an overflowing fp16 forward produces
    with pytest.raises(ConfigError, match="NaN or infinite label scores for utterance.*u0, u1"):
        be.predict(rows)
