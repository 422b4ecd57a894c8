"""`ermgap serve` as a real process on 127.0.0.1 serving the tiny Qwen2-Audio with a LoRA adapter, talked to by
the `openai` backend: its predictions equal the local backend's on the same rows (label scoring and free
generation), tokens are enforced, bad audio gets a 4xx with a message, and a server killed mid-run leads to a
clean resume that only sends the unfinished rows."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _procs import ServerProcess

from ermgap.backends import BackendError
from ermgap.backends.openai_compat import OpenAICompatBackend, label_schema
from ermgap.backends.qwen2_audio import Qwen2AudioBackend
from ermgap.config import LoraConfig, ModelConfig, PromptConfig
from ermgap.data.audio import load_audio
from ermgap.errors import ConfigError
from ermgap.evaluate import evaluate_rows, load_split
from ermgap.labels import EMOTIONS
from ermgap.serve import RequestError, answer_labels, parse_request, resolve_token

TOKEN = "test-token-0123456789"
SERVED = "tiny-lora"
N_ROWS = 10


# ----------------------------------------------------------------------------- request validation (no server)


def _body(**over):
    wav = base64.b64encode(_wav_bytes(np.zeros(1600, dtype=np.float32))).decode()
    body = {"model": SERVED, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}, {"type": "text", "text": "Emotion?"}]}]}
    body.update(over)
    return body


def _wav_bytes(x, sr=16000, channels=1) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, 1) if channels > 1 else x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_parse_request_reads_audio_text_and_label_enum():
    x = (0.5 * np.sin(np.linspace(0, 300, 8000))).astype(np.float32)
    wav = base64.b64encode(_wav_bytes(x, sr=8000, channels=2)).decode()
    body = _body(response_format=label_schema(PromptConfig()))
    body["messages"][0]["content"][0]["input_audio"]["data"] = wav
    req = parse_request(body, served_model=SERVED, sample_rate=16000)
    assert req.text == "Emotion?" and req.labels == EMOTIONS and req.label_key == "emotion"
    assert req.audio.shape == (16000,)  # 8 kHz stereo → 16 kHz mono
    assert answer_labels({"type": "json_schema", "json_schema": {"schema": {"type": "string", "enum": ["a", "b"]}}}) \
        == (("a", "b"), None)
    assert answer_labels(None) == (None, None)


@pytest.mark.parametrize("change, status, message", [
    ({"model": "other"}, 404, "is not served here"),
    ({"temperature": 0.7}, 400, "greedily"),
    ({"stream": True}, 400, "streaming"),
    ({"messages": []}, 400, "exactly one message"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "enum": ["a"]}}}},
     400, "at least 2"),
    ({"max_tokens": 0}, 400, "max_tokens"),
])
def test_parse_request_rejects_with_the_field(change, status, message):
    with pytest.raises(RequestError, match=message) as err:
        parse_request(_body(**change), served_model=SERVED, sample_rate=16000)
    assert err.value.status == status


@pytest.mark.parametrize("data, fmt, message", [
    ("@@not base64@@", "wav", "not valid base64"),
    (base64.b64encode(b"RIFF....WAVEjunk").decode(), "wav", "not a decodable wav"),
    (base64.b64encode(_wav_bytes(np.zeros(0, dtype=np.float32))).decode(), "wav", "no audio samples"),
    ("AAAA", "ogg-opus", "format 'ogg-opus' is not supported"),
])
def test_bad_audio_is_a_400_naming_the_part(data, fmt, message):
    body = _body()
    body["messages"][0]["content"][0]["input_audio"] = {"data": data, "format": fmt}
    with pytest.raises(RequestError, match=message) as err:
        parse_request(body, served_model=SERVED, sample_rate=16000)
    assert err.value.status == 400 and err.value.param.startswith("messages[0].content[0].input_audio")


def test_token_resolution_and_no_auth_only_on_loopback():
    assert resolve_token("T", {"T": " abc "}, no_auth=False, host="127.0.0.1") == "abc"
    assert resolve_token("T", {}, no_auth=True, host="::1") is None
    with pytest.raises(ConfigError, match=r"\$T is not set"):
        resolve_token("T", {}, no_auth=False, host="127.0.0.1")
    with pytest.raises(ConfigError, match="--no-auth is refused on --host 0.0.0.0"):
        resolve_token("T", {"T": "abc"}, no_auth=True, host="0.0.0.0")


def test_cli_refuses_no_auth_on_a_public_host(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "serve", str(tiny_model), "--host", "0.0.0.0",
                           "--no-auth"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--no-auth is refused" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B matrices (so it changes the model's answers), saved by peft."""
    from ermgap.model import apply_lora, load_backbone

    model, _ = load_backbone(ModelConfig(name_or_path=str(tiny_model)))
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model, adapter, tmp_path_factory):
    srv = ServerProcess(tiny_model, tmp_path_factory.mktemp("serve") / "serve.log", adapter=adapter, token=TOKEN,
                        served=SERVED)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def rows(synth_corpus) -> pd.DataFrame:
    return load_split(synth_corpus, "test", modality="multi", limit=N_ROWS)


@pytest.fixture(scope="module")
def local_scores(tiny_model, adapter, rows) -> tuple[list[str], np.ndarray]:
    """The local qwen2_audio backend's label-scoring predictions with the same adapter (the oracle)."""
    be = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="multi",
                           adapter=str(adapter))
    preds = be.predict(rows.to_dict("records"))
    return [p.pred for p in preds], np.array([p.scores for p in preds])


def _client(server, **kw) -> OpenAICompatBackend:
    opts = dict(modality="multi", api_key=TOKEN, structured=True, concurrency=2, max_retries=1, backoff_s=0.1)
    opts.update(kw)
    return OpenAICompatBackend(server.url, SERVED, PromptConfig(), **opts)


def _post(server, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    """POST with http.client; a server that answers before reading the whole body (413) closes the connection
    while the body is still being sent, so a broken pipe is followed by reading the answer already sent."""
    import http.client

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_structured_predictions_equal_the_local_backend(server, rows, local_scores, tiny_model):
    local_pred, local_sc = local_scores
    base = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="multi")
    base_sc = np.array([p.scores for p in base.predict(rows.to_dict("records"))])
    assert np.abs(base_sc - local_sc).max() > 0.1  # the adapter matters, so serving the base model would fail

    client = _client(server)
    preds = client.predict(rows.to_dict("records"))
    assert [p.pred for p in preds] == local_pred
    assert client.requests == N_ROWS and client.retries == 0
    # the server's label log-probabilities are the local scores (one request, read directly)
    row = rows.iloc[0].to_dict()
    status, out = _post(server, json.dumps(client.request_body(row, load_audio(row["audio_path"]))).encode())
    assert status == 200
    got = out["choices"][0]["label_logprobs"]
    np.testing.assert_allclose([got[e] for e in EMOTIONS], local_sc[0], rtol=0, atol=1e-4)
    assert json.loads(out["choices"][0]["message"]["content"]) == {"emotion": local_pred[0]}


@pytest.mark.slow
def test_free_generation_equals_the_local_backend(server, rows, tiny_model, adapter):
    local = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="multi",
                              mode="generate", adapter=str(adapter), max_new_tokens=8)
    subset = rows.head(4).to_dict("records")
    want = [p.answer for p in local.predict(subset)]
    got = _client(server, structured=False, max_tokens=8).predict(subset)
    assert [p.answer for p in got] == want


@pytest.mark.slow
def test_wrong_or_missing_token_is_refused(server, rows):
    row = rows.head(1).to_dict("records")
    with pytest.raises(BackendError, match="HTTP 401.*invalid bearer token"):
        _client(server, api_key="wrong-token").predict(row)
    with pytest.raises(BackendError, match="HTTP 401.*missing bearer token"):
        _client(server, api_key=None).predict(row)
    status, out = _post(server, b"{}", token="wrong")
    assert status == 401 and out["error"]["type"] == "authentication_error"


@pytest.mark.slow
def test_malformed_and_oversized_audio_get_a_4xx_with_a_message(server):
    body = _body()
    body["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(b"not a wav at all").decode()
    status, out = _post(server, json.dumps(body).encode())
    assert status == 400 and "not a decodable wav file" in out["error"]["message"]
    status, out = _post(server, b'{"model": ')
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    big = _body()  # 40 s of noise at 16 kHz ≈ 1.7 MB of base64 > the 1 MB limit this server runs with
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 40).astype(np.float32)
    big["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(_wav_bytes(noise)).decode()
    status, out = _post(server, json.dumps(big).encode())
    assert status == 413 and "exceeds the limit" in out["error"]["message"]


@pytest.mark.slow
def test_request_budget_stops_the_client(server, rows):
    client = _client(server, concurrency=1, max_requests=3)
    with pytest.raises(BackendError, match="request budget of 3 requests is spent"):
        client.predict(rows.head(5).to_dict("records"))
    assert client.requests == 3


class _KillAfter:
    """The real client, with the server SIGKILLed once `batches` batches have been answered."""

    def __init__(self, backend, server, batches: int):
        self.backend, self.server, self.left = backend, server, batches
        self.name, self.has_scores = backend.name, backend.has_scores

    def predict(self, chunk):
        out = self.backend.predict(chunk)
        self.left -= 1
        if self.left == 0:
            self.server.kill()
        return out


@pytest.mark.slow
def test_server_killed_mid_run_then_restarted_resumes_cleanly(tiny_model, adapter, rows, local_scores, tmp_path):
    srv = ServerProcess(tiny_model, tmp_path / "serve.log", adapter=adapter, token=TOKEN, served=SERVED)
    srv.start()
    out = tmp_path / "preds.csv"
    info = {"backend": "openai", "model": SERVED}
    try:
        first = _client(srv, concurrency=1)
        with pytest.raises(BackendError, match="giving up.*connection failed.*rerun to resume"):
            evaluate_rows(_KillAfter(first, srv, batches=2), rows, out, modality="multi", batch_size=3,
                          run_info=info, progress=False)
        assert not out.exists()
        done = pd.read_csv(out.with_name(out.name + ".partial"))
        assert len(done) == 6
        srv.start()  # same port, fresh process
        second = _client(srv)
        df = evaluate_rows(second, rows, out, modality="multi", batch_size=3, run_info=info, progress=False)
    finally:
        srv.kill()
    assert second.requests == N_ROWS - 6  # only the unfinished rows were sent
    assert df["utt_id"].tolist() == rows["utt_id"].tolist()
    assert df["pred"].tolist() == local_scores[0]
