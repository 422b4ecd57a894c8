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


def _body(model=SERVED, **over):
    wav = base64.b64encode(_wav_bytes(np.zeros(1600, dtype=np.float32))).decode()
    body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": [
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
    assert req.audio_note == {"channels": 2, "sample_rate": 8000,
                              "converted": "2 channels averaged to mono; resampled from 8000 Hz to 16000 Hz"}
    assert answer_labels({"type": "json_schema", "json_schema": {"schema": {"type": "string", "enum": ["a", "b"]}}}) \
        == (("a", "b"), None)
    assert answer_labels(None) == (None, None)


@pytest.mark.parametrize("change, status, message", [
    ({"model": "other"}, 404, "is not served here"),
    ({"temperature": 2.5}, 400, r"temperature 2.5: expected a number in \[0, 2\]"),
    ({"top_p": 0}, 400, "top_p"),
    ({"stream": True}, 400, "streaming"),
    ({"n": 2}, 400, "n = 1"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "exactly one message with role 'user'"),
    ({"modalities": ["text", "audio"]}, 400, "text only"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, 400, "audio output is not supported"),
    ({"logprobs": True}, 400, "only returned for label scoring"),
    ({"top_logprobs": 2}, 400, "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "enum": ["a", "b"]}}}}, 400, r"top_logprobs 21: expected an integer"),
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


def _float_wav(x, sr=16000) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_nan_samples_are_invalid_audio_like_the_manifest_check(tmp_path):
    x = np.zeros(1600, dtype=np.float32)
    x[[3, 700]] = [np.nan, np.inf]
    body = _body()
    body["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(_float_wav(x)).decode()
    with pytest.raises(RequestError, match=r"has 2 NaN or infinite sample\(s\)") as err:
        parse_request(body, served_model=SERVED, sample_rate=16000)
    assert err.value.status == 400 and err.value.code == "invalid_audio"
    # the manifest check (the oracle) refuses the same file
    (tmp_path / "bad.wav").write_bytes(_float_wav(x))
    with pytest.raises(Exception, match="2 NaN or infinite sample"):
        load_audio(tmp_path / "bad.wav")


def test_system_messages_are_prepended_and_the_template_default_is_not_repeated():
    def text_of(*system):
        body = _body()
        body["messages"] = [*({"role": r, "content": c} for r, c in system), *body["messages"]]
        return parse_request(body, served_model=SERVED, sample_rate=16000).text

    assert text_of() == "Emotion?"
    assert text_of(("system", "You are a helpful assistant.")) == "Emotion?"
    assert text_of(("system", "Be brief."), ("developer", [{"type": "text", "text": "One word."}])) \
        == "Be brief.\nOne word.\nEmotion?"


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
    """One `ermgap serve` process for the module, with no --served-model-name: clients name the model by its
    directory's name."""
    srv = ServerProcess(tiny_model, tmp_path_factory.mktemp("serve") / "serve.log", adapter=adapter, token=TOKEN)
    srv.model_id = tiny_model.name
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
    return OpenAICompatBackend(server.url, server.model_id, PromptConfig(), **opts)


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
@pytest.mark.server
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
@pytest.mark.server
def test_free_generation_equals_the_local_backend(server, rows, tiny_model, adapter):
    local = Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="multi",
                              mode="generate", adapter=str(adapter), max_new_tokens=8)
    subset = rows.head(4).to_dict("records")
    want = [p.answer for p in local.predict(subset)]
    got = _client(server, structured=False, max_tokens=8).predict(subset)
    assert [p.answer for p in got] == want


@pytest.mark.slow
@pytest.mark.server
def test_wrong_or_missing_token_is_refused(server, rows):
    row = rows.head(1).to_dict("records")
    with pytest.raises(BackendError, match="HTTP 401.*invalid bearer token"):
        _client(server, api_key="wrong-token").predict(row)
    with pytest.raises(BackendError, match="HTTP 401.*missing bearer token"):
        _client(server, api_key=None).predict(row)
    status, out = _post(server, b"{}", token="wrong")
    assert status == 401 and out["error"]["type"] == "authentication_error"


@pytest.mark.slow
@pytest.mark.server
def test_malformed_and_oversized_audio_get_a_4xx_with_a_message(server):
    body = _body(server.model_id)
    body["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(b"not a wav at all").decode()
    status, out = _post(server, json.dumps(body).encode())
    assert status == 400 and "not a decodable wav file" in out["error"]["message"]
    status, out = _post(server, b'{"model": ')
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    big = _body(server.model_id)  # 40 s of noise at 16 kHz ≈ 1.7 MB of base64 > the 1 MB limit this server runs with
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 40).astype(np.float32)
    big["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(_wav_bytes(noise)).decode()
    status, out = _post(server, json.dumps(big).encode())
    assert status == 413 and "exceeds the limit" in out["error"]["message"]


@pytest.mark.slow
@pytest.mark.server
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
@pytest.mark.server
def test_server_killed_mid_run_then_restarted_resumes_cleanly(tiny_model, adapter, rows, local_scores, tmp_path):
    srv = ServerProcess(tiny_model, tmp_path / "serve.log", adapter=adapter, token=TOKEN, served=SERVED)
    srv.model_id = SERVED
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


# ----------------------------------------------------------------------------- the official openai SDK


@pytest.fixture(scope="module")
def sdk(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oracle(tiny_model, adapter) -> Qwen2AudioBackend:
    """The local backend with the same adapter, called in-process: what the server must answer."""
    return Qwen2AudioBackend(ModelConfig(name_or_path=str(tiny_model)), PromptConfig(), modality="uni",
                             adapter=str(adapter))


def _wav_b64(x) -> str:
    return base64.b64encode(_wav_bytes(np.asarray(x, dtype=np.float32))).decode()


def _user(audio_b64: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def clip(rows) -> np.ndarray:
    """A test utterance as 16-bit PCM would carry it (what the server decodes)."""
    import io

    import soundfile as sf

    x, _ = sf.read(io.BytesIO(_wav_bytes(load_audio(rows.iloc[0]["audio_path"]))), dtype="float32")
    return x


TEXT = "Which emotion does the speaker express?"


@pytest.mark.slow
@pytest.mark.server
def test_sdk_defaults_model_id_usage_and_label_scores(sdk, server, oracle, clip, tiny_model):
    from transformers import AutoProcessor

    assert [m.id for m in sdk.models.list().data] == [tiny_model.name]  # the directory's name, not its path
    out = sdk.chat.completions.create(model=tiny_model.name, messages=[_user(_wav_b64(clip), TEXT)],
                                      response_format=label_schema(PromptConfig()))
    want = oracle.score_chat([clip], [TEXT], list(EMOTIONS))[0].numpy()
    got = out.choices[0].model_extra["label_logprobs"]
    np.testing.assert_allclose([got[e] for e in EMOTIONS], want, rtol=0, atol=1e-4)
    assert json.loads(out.choices[0].message.content) == {"emotion": EMOTIONS[int(want.argmax())]}
    assert out.choices[0].logprobs is None and out.model_extra["ermgap"]["decoding"] == "greedy label scoring"
    # usage: the prompt as Hugging Face's own processor expands it (audio placeholders included), and the content
    proc = AutoProcessor.from_pretrained(tiny_model)
    chat = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio_url": "x"},
                                                                  {"type": "text", "text": TEXT}]}],
                                    add_generation_prompt=True, tokenize=False)
    prompt = proc(text=chat, audio=[clip], sampling_rate=16000, return_tensors="pt")["input_ids"].shape[1]
    completion = len(proc.tokenizer(out.choices[0].message.content, add_special_tokens=False)["input_ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) \
        == (prompt, completion, prompt + completion)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sdk_temperature_is_accepted_and_decoding_stays_greedy(sdk, server, oracle, clip, temperature):
    out = sdk.chat.completions.create(model=server.model_id, messages=[_user(_wav_b64(clip), TEXT)],
                                      temperature=temperature, max_tokens=6)
    assert out.choices[0].message.content == oracle.generate_chat([clip], [TEXT], 6)[0]
    notes = out.model_extra["ermgap"]
    assert notes["decoding"] == "greedy" and notes["temperature"] == temperature
    assert ("always decodes greedily" in notes.get("note", "")) == (temperature > 0)
    # usage counts the generated tokens: 6 means it stopped for length (no end-of-turn token in them)
    assert 1 <= out.usage.completion_tokens <= 6
    assert out.choices[0].finish_reason == ("length" if out.usage.completion_tokens == 6 else "stop")


@pytest.mark.slow
@pytest.mark.server
def test_sdk_system_message_is_prepended_to_the_instruction(sdk, server, oracle, clip):
    fmt = label_schema(PromptConfig())

    def scores(*system: str) -> list[float]:
        msgs = [*({"role": "system", "content": s} for s in system), _user(_wav_b64(clip), TEXT)]
        got = sdk.chat.completions.create(model=server.model_id, messages=msgs, response_format=fmt)
        return [got.choices[0].model_extra["label_logprobs"][e] for e in EMOTIONS]

    plain = scores()
    np.testing.assert_allclose(scores("You are a helpful assistant."), plain, rtol=0, atol=1e-5)
    system = "You are an expert annotator of emotional speech."
    want = oracle.score_chat([clip], [f"{system}\n{TEXT}"], list(EMOTIONS))[0].numpy()
    got = scores(system)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(np.array(got) - np.array(plain)).max() > 1e-3  # the system text reached the prompt


@pytest.mark.slow
@pytest.mark.server
def test_sdk_logprobs_come_from_the_label_scores(sdk, server, oracle, clip):
    import openai

    out = sdk.chat.completions.create(model=server.model_id, messages=[_user(_wav_b64(clip), TEXT)],
                                      response_format=label_schema(PromptConfig()), logprobs=True, top_logprobs=3)
    want = oracle.score_chat([clip], [TEXT], list(EMOTIONS))[0].numpy()
    order = np.argsort(-want)
    entry = out.choices[0].logprobs.content[0]
    assert entry.token == EMOTIONS[order[0]] and entry.logprob == pytest.approx(want[order[0]], abs=1e-4)
    assert [t.token for t in entry.top_logprobs] == [EMOTIONS[i] for i in order[:3]]
    np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], want[order[:3]], rtol=0, atol=1e-4)
    with pytest.raises(openai.BadRequestError, match="only returned for label scoring"):
        sdk.chat.completions.create(model=server.model_id, messages=[_user(_wav_b64(clip), TEXT)], logprobs=True)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("option, message", [
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "text only"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio output is not supported"),
    ({"n": 2}, "only n = 1"),
    ({"stream": True}, "streaming is not supported"),
])
def test_sdk_refuses_what_it_cannot_return(sdk, server, clip, option, message):
    import openai

    with pytest.raises(openai.BadRequestError, match=message) as err:
        sdk.chat.completions.create(model=server.model_id, messages=[_user(_wav_b64(clip), TEXT)], **option)
    assert err.value.status_code == 400


@pytest.mark.slow
@pytest.mark.server
def test_sdk_nan_audio_is_refused_and_stereo_is_mixed_down(sdk, server, oracle, clip, tmp_path):
    import openai

    bad = clip.copy()
    bad[100] = np.nan
    with pytest.raises(openai.BadRequestError, match="NaN or infinite") as err:
        sdk.chat.completions.create(model=server.model_id, messages=[_user(base64.b64encode(_float_wav(bad)).decode(),
                                                                           TEXT)])
    assert err.value.code == "invalid_audio"
    # Stereo: the two channels are averaged (as the docs say), and the response says so.
    other = (0.5 * np.roll(clip, 400)).astype(np.float32)
    stereo = np.stack([clip, other], 1)
    fmt = label_schema(PromptConfig())
    out = sdk.chat.completions.create(model=server.model_id, response_format=fmt, messages=[_user(
        base64.b64encode(_float_wav(stereo)).decode(), TEXT)])
    assert out.model_extra["ermgap"]["audio"] == {"channels": 2, "sample_rate": 16000,
                                                  "converted": "2 channels averaged to mono"}
    want = oracle.score_chat([(clip + other) / 2], [TEXT], list(EMOTIONS))[0].numpy()
    got = out.choices[0].model_extra["label_logprobs"]
    np.testing.assert_allclose([got[e] for e in EMOTIONS], want, rtol=0, atol=1e-4)
