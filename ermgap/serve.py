"""`ermgap serve`: an OpenAI-compatible `/v1/chat/completions` endpoint over a local speech LLM.

    ERMGAP_SERVE_TOKEN=... ermgap serve models/tiny --adapter runs/train/my-run/adapter --port 8000

A request is one user message whose content holds one `input_audio` part (base64 WAV/FLAC/MP3) and
text parts (the instruction), optionally after system (or developer) messages, whose text is PREPENDED to
the instruction (the chat template keeps the system turn the model was trained with; a system message equal
to that default, "You are a helpful assistant.", is already there and is not repeated). The prompt is built
with the model's own chat template, audio first, as the training collator does. With `response_format` a
JSON schema whose answer is a string enum (`{"type": "string", "enum": [...]}` or an object with one such
property), the answer is chosen by label scoring: every enum value's log-likelihood in one forward, the best
returned as JSON, all of them in `choices[0].label_logprobs` (and, with `logprobs: true`, in OpenAI's
`logprobs.content` layout: one entry per answer, the labels as its `top_logprobs`). Otherwise the answer is
greedy free text (`logprobs` is refused there).

Decoding is always greedy, whatever `temperature` (0–2) or `top_p` say: the response's `ermgap` object says
so (`decoding`, the `temperature` asked for), with what was done to the audio (channels averaged to mono,
resampled). `usage` counts the prompt's tokens as the model saw them (audio positions included) and the
generated tokens (end-of-turn included), or for a scored answer the returned JSON's tokens. Audio output, streaming and n > 1 are refused with 400.

Security: binds 127.0.0.1 unless told otherwise; every route but `/health` needs
`Authorization: Bearer <token>` (the token comes from an environment variable and is never printed)
unless `--no-auth`, which is refused on a non-loopback host; request bodies over `max_request_bytes`
are refused (413) before they are read in full. Malformed requests get a 4xx with an OpenAI-style
`{"error": {"message", "type", "param", "code"}}` body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ermgap.data.audio import resample
from ermgap.errors import ConfigError
from ermgap.loopback import is_loopback_host

AUDIO_FORMATS = ("wav", "flac", "mp3")
MAX_TOKENS_LIMIT = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# The system turn Qwen2-Audio's chat template always has (and training used); a client sending it is not
# asking for anything else.
TEMPLATE_SYSTEM = "You are a helpful assistant."
SYSTEM_ROLES = ("system", "developer")


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class AudioInput:
    """A decoded `input_audio` part: mono float32 at the model's rate, and what it was before."""

    samples: np.ndarray
    channels: int
    sample_rate: int

    def note(self, target_rate: int) -> dict:
        done = []
        if self.channels > 1:
            done.append(f"{self.channels} channels averaged to mono")
        if self.sample_rate != target_rate:
            done.append(f"resampled from {self.sample_rate} Hz to {target_rate} Hz")
        return {"channels": self.channels, "sample_rate": self.sample_rate, "converted": "; ".join(done) or "none"}


@dataclass(frozen=True)
class ChatRequest:
    """What a validated request asks for: one audio clip, the instruction (system text first), and either an
    answer set (`labels`, scored; `label_key` is the JSON property holding the answer, None for a bare
    string) or free generation of at most `max_tokens` tokens; `top_logprobs` None unless logprobs asked."""

    audio: np.ndarray
    text: str
    labels: tuple[str, ...] | None
    label_key: str | None
    max_tokens: int
    temperature: float = 0.0
    top_logprobs: int | None = None
    audio_note: dict | None = None


def decode_audio(data: str, fmt: str, sample_rate: int, *, param: str) -> AudioInput:
    """base64 audio → mono float32 at `sample_rate` Hz (channels averaged); RequestError(400) if unreadable,
    empty or holding NaN/infinite samples (the manifest check refuses such files too)."""
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"{param}.format {fmt!r} is not supported; use one of {', '.join(AUDIO_FORMATS)}",
                           param=f"{param}.format")
    if not isinstance(data, str) or not data:
        raise RequestError(400, f"{param}.data must be a non-empty base64 string", param=f"{param}.data")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{param}.data is not valid base64", param=f"{param}.data") from None
    try:
        x, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        # libsndfile's message starts "Error opening <_io.BytesIO object at 0x...>: "; keep what follows.
        detail = str(err).strip().splitlines()[-1].split(">: ")[-1] if str(err).strip() else type(err).__name__
        raise RequestError(400, f"{param}.data is not a decodable {fmt} file ({detail})",
                           param=f"{param}.data", code="invalid_audio") from None
    if x.shape[0] == 0:
        raise RequestError(400, f"{param}.data holds no audio samples", param=f"{param}.data", code="invalid_audio")
    bad = int((~np.isfinite(x)).sum())
    if bad:  # a float WAV can hold them; every feature and score would silently become NaN
        raise RequestError(400, f"{param}.data has {bad} NaN or infinite sample(s); expected finite samples in "
                           "[-1, 1]", param=f"{param}.data", code="invalid_audio")
    return AudioInput(resample(x.mean(axis=1), int(sr), sample_rate), channels=x.shape[1], sample_rate=int(sr))


def answer_labels(response_format) -> tuple[tuple[str, ...] | None, str | None]:
    """(enum values, property name or None) of a json_schema response_format; (None, None) for free text."""
    if response_format is None or response_format == {"type": "text"}:
        return None, None
    where = "response_format"
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        raise RequestError(400, f"{where} must be {{'type': 'text'}} or {{'type': 'json_schema', ...}}; "
                           f"got {json.dumps(response_format)[:200]}", param=where)
    schema = (response_format.get("json_schema") or {}).get("schema")
    key = None
    if isinstance(schema, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        enums = [k for k, v in props.items() if isinstance(v, dict) and "enum" in v]
        if len(props) == 1 and len(enums) == 1:
            key = enums[0]
            schema = props[key]
    values = schema.get("enum") if isinstance(schema, dict) else None
    if (not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, str) and v for v in values)
            or len(set(values)) != len(values)):
        raise RequestError(400, f"{where}.json_schema.schema must be a string enum of at least 2 distinct non-empty "
                           "values, or an object with exactly one such property (this server answers by scoring "
                           "the enum values)", param=f"{where}.json_schema.schema")
    return tuple(values), key


def _text_content(content, param: str) -> str:
    """A system message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise RequestError(400, f"{param} must be a string or a list of text parts", param=param)


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (lo < value if lo_open else lo <= value) \
        and value <= hi
    if not ok:
        raise RequestError(400, f"{key} {value!r}: expected a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]",
                           param=key)
    return float(value)


def _sampling(body: dict) -> float:
    """The requested temperature (OpenAI's range), after checking top_p; decoding stays greedy."""
    _number(body, "top_p", 0, 1, lo_open=True)
    temperature = _number(body, "temperature", 0, 2)
    return 0.0 if temperature is None else temperature


def _output_options(body: dict) -> None:
    """Refuse what this server cannot return: streams, several choices, audio."""
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported; send stream: false", param="stream")
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "only n = 1 is supported", param="n")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError(400, f"modalities {modalities!r}: this server answers with text only; send ['text']",
                           param="modalities")
    if body.get("audio") is not None:
        raise RequestError(400, "audio output is not supported (this server answers with text)", param="audio")


def _top_logprobs(body: dict, scored: bool) -> int | None:
    """How many label alternatives to return with logprobs (None: logprobs not asked for)."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want not in (None, True, False):
        raise RequestError(400, f"logprobs {want!r}: expected true or false", param="logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError(400, f"top_logprobs {top!r}: expected an integer in [0, {MAX_TOP_LOGPROBS}]",
                           param="top_logprobs")
    if not want:
        if top is not None:
            raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    if not scored:
        raise RequestError(400, "logprobs are only returned for label scoring: send a response_format JSON schema "
                           "whose answer is a string enum (free-text generation has no token log-probabilities "
                           "here)", param="logprobs")
    return top or 0


def _messages(messages, sample_rate: int) -> tuple[str, AudioInput, str]:
    """(system text, audio, user text) of a single-turn conversation: system/developer messages, then one user
    message holding one input_audio part."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in (*SYSTEM_ROLES, "user") or (role == "user") != (i == len(messages) - 1):
            raise RequestError(400, "messages must be optional system (or developer) messages followed by exactly "
                               f"one message with role 'user' (single-turn requests); messages[{i}] has role "
                               f"{role!r}", param=f"messages[{i}]")
    system = "\n".join(_text_content(m.get("content"), f"messages[{i}].content") for i, m in enumerate(messages[:-1]))
    if system.strip() == TEMPLATE_SYSTEM:
        system = ""
    at = f"messages[{len(messages) - 1}]"
    content = messages[-1].get("content")
    if not isinstance(content, list):
        raise RequestError(400, f"{at}.content must be a list of parts with one input_audio part",
                           param=f"{at}.content")
    audio, texts = None, []
    for i, part in enumerate(content):
        param = f"{at}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            if audio is not None:
                raise RequestError(400, "only one input_audio part per request is supported", param=param)
            spec = part["input_audio"]
            audio = decode_audio(spec.get("data"), spec.get("format", "wav"), sample_rate, param=f"{param}.input_audio")
        else:
            raise RequestError(400, f"{param}: expected {{'type': 'text', 'text': ...}} or "
                               "{'type': 'input_audio', 'input_audio': {'data': ..., 'format': 'wav'}}", param=param)
    if audio is None:
        raise RequestError(400, f"{at}.content has no input_audio part", param=f"{at}.content")
    return system, audio, "\n".join(texts)


def parse_request(body, *, served_model: str, sample_rate: int, default_max_tokens: int = 16) -> ChatRequest:
    """Validate a chat-completions request body → ChatRequest; RequestError (4xx) naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") != served_model:
        if "model" not in body:
            raise RequestError(400, "missing 'model'", param="model")
        raise RequestError(404, f"model {body.get('model')!r} is not served here; this server serves "
                           f"{served_model!r}", param="model", code="model_not_found")
    _output_options(body)
    temperature = _sampling(body)
    system, audio, text = _messages(body.get("messages"), sample_rate)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(400, f"max_tokens {max_tokens!r}: expected an integer in [1, {MAX_TOKENS_LIMIT}]",
                           param="max_tokens")
    labels, key = answer_labels(body.get("response_format"))
    return ChatRequest(audio=audio.samples, text="\n".join(t for t in (system, text) if t), labels=labels,
                       label_key=key, max_tokens=max_tokens, temperature=temperature,
                       top_logprobs=_top_logprobs(body, scored=labels is not None),
                       audio_note=audio.note(sample_rate))


@dataclass(frozen=True)
class Answer:
    """The reply to one request: its text (JSON for an answer set), the label log-probabilities if scored,
    and the token counts of `usage`."""

    text: str
    label_logprobs: dict[str, float] | None
    prompt_tokens: int
    completion_tokens: int


def answer(model, req: ChatRequest) -> Answer:
    """Answer one request with a local backend (`chat_batch`, `score_chat`, `generate_chat`, `tokenizer`)."""
    completion = None
    if req.labels is None:
        (text,), (completion,) = model.generate_chat([req.audio], [req.text], req.max_tokens, with_counts=True)
        logprobs = None
    else:
        scores = model.score_chat([req.audio], [req.text], list(req.labels))[0]
        best = req.labels[int(scores.argmax())]
        text = json.dumps({req.label_key: best} if req.label_key else best, ensure_ascii=False)
        logprobs = {label: float(s) for label, s in zip(req.labels, scores)}
    # The prompt as the model saw it: chat template, audio positions included.
    prompt = int(model.chat_batch([req.audio], [req.text])["prompt_attention_mask"].sum())
    if completion is None:  # a scored answer: the returned JSON's tokens
        completion = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return Answer(text, logprobs, prompt, completion)


def _logprob_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs_body(label_logprobs: dict[str, float], chosen: str, top: int) -> dict:
    """OpenAI's `choices[0].logprobs` from label scores: one content entry for the chosen label (its summed
    log-probability over its tokens and terminator), its `top_logprobs` the `top` best labels."""
    ranked = sorted(label_logprobs.items(), key=lambda kv: -kv[1])[:top]
    entry = {**_logprob_entry(chosen, label_logprobs[chosen]), "top_logprobs": [_logprob_entry(k, v) for k, v in ranked]}
    return {"content": [entry], "refusal": None}


def completion_body(served_model: str, req: ChatRequest, out: Answer) -> dict:
    """The chat.completion response (OpenAI's layout, plus `label_logprobs` and the `ermgap` notes)."""
    finish = "length" if req.labels is None and out.completion_tokens >= req.max_tokens else "stop"  # all it may use
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text, "refusal": None},
              "finish_reason": finish, "logprobs": None}
    if out.label_logprobs is not None:
        choice["label_logprobs"] = out.label_logprobs
        if req.top_logprobs is not None:
            chosen = max(out.label_logprobs, key=out.label_logprobs.get)
            choice["logprobs"] = logprobs_body(out.label_logprobs, chosen, req.top_logprobs)
    notes = {"decoding": "greedy label scoring" if req.labels is not None else "greedy",
             "temperature": req.temperature, "audio": req.audio_note}
    if req.temperature > 0:
        notes["note"] = f"temperature {req.temperature:g} was accepted, but this server always decodes greedily"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served_model, "choices": [choice],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
            "ermgap": notes}


def create_app(model, *, served_model: str, token: str | None, max_request_bytes: int):
    """The Starlette app. `model` has score_chat / generate_chat / sample_rate (a local backend);
    `token` None disables authentication. Model calls run one at a time in a worker thread."""
    lock = threading.Lock()

    def error(err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def check_auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                               kind="authentication_error", code="missing_token")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise RequestError(401, "invalid bearer token", kind="authentication_error", code="invalid_token")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_request_bytes}",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise RequestError(413, f"request body exceeds the limit of {max_request_bytes} bytes",
                                   code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> JSONResponse:
        try:
            check_auth(request)
        except RequestError as err:
            return error(err)
        return JSONResponse({"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "ermgap"}]})

    def run_model(req: ChatRequest):
        with lock:
            return answer(model, req)

    async def chat(request: Request) -> JSONResponse:
        try:
            check_auth(request)
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not valid JSON ({err})") from None
            req = parse_request(body, served_model=served_model, sample_rate=model.sample_rate)
            try:
                out = await run_in_threadpool(run_model, req)
            except ConfigError as err:  # e.g. enum values whose tokens are prefixes of each other
                raise RequestError(400, str(err), param="response_format") from None
        except RequestError as err:
            return error(err)
        return JSONResponse(completion_body(served_model, req, out))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def resolve_token(token_env: str, environ, *, no_auth: bool, host: str) -> str | None:
    """The bearer token from `environ[token_env]`; None with --no-auth (loopback hosts only)."""
    if no_auth:
        if not is_loopback_host(host):
            raise ConfigError(f"--no-auth is refused on --host {host}: it is not a loopback address, so anyone who "
                              f"can reach it could use the model. Set ${token_env} instead")
        return None
    value = environ.get(token_env, "")
    if not value.strip():
        raise ConfigError(f"${token_env} is not set: export a secret token there (clients send it as "
                          "'Authorization: Bearer <token>'), or pass --no-auth on a loopback host")
    return value.strip()


def serve(model, *, served_model: str, host: str, port: int, token: str | None,
          max_request_bytes: int, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    app = create_app(model, served_model=served_model, token=token, max_request_bytes=max_request_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)


def default_served_name(model: str) -> str:
    """The model id clients send by default: a local directory's name, or the hub id as given."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


__all__: Sequence[str] = ["Answer", "AudioInput", "ChatRequest", "RequestError", "answer", "answer_labels",
                          "create_app", "decode_audio", "default_served_name", "parse_request", "resolve_token",
                          "serve"]
