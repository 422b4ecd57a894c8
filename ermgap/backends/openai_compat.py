"""OpenAI-compatible chat-completions audio backend (gpt-4o-mini-audio, vLLM-served Voxtral / Ultravox / Kimi-Audio).

Each utterance is one POST {base_url}/chat/completions with a user message holding the audio as a
base64 WAV `input_audio` part followed by the instruction text; temperature 0. The answer is mapped
to a label by `ermgap.prompts.parse_answer` (unparseable or malformed answers → "invalid").

With `structured=True` the request also carries a `response_format` JSON schema whose one property,
`emotion`, is an enum of the verbalisers (OpenAI structured outputs; vLLM guided decoding; `ermgap serve`
answers it by label scoring), so a conforming server can only answer with a label.

Transient failures (HTTP 429 / 5xx, timeouts, connection errors) are retried with exponential
backoff; a 429's Retry-After header is honoured. Other HTTP errors (401, 403, 404, 400) stop the run
with a BackendError: every further request would fail the same way. `max_requests` caps the HTTP
requests one backend sends (retries included), so a misconfigured run cannot spend an API budget.
Only the standard library is used.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime

import soundfile as sf

from ermgap.backends import BackendError, Prediction
from ermgap.config import PromptConfig
from ermgap.data.audio import load_audio
from ermgap.labels import INVALID
from ermgap.prompts import instruction_text, parse_answer, prompt_task
from ermgap.task import Task

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
ANSWER_KEY = "emotion"  # the JSON property a structured answer holds the label in


def wav_base64(audio, sample_rate: int) -> str:
    """16-bit PCM WAV of a float array in [-1, 1], base64-encoded."""

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def label_schema(labels: PromptConfig | Task) -> dict:
    """A `response_format` allowing only `{"emotion": <one verbaliser>}` (the task's label order; a PromptConfig
    stands for the paper's task)."""
    task = prompt_task(labels) if isinstance(labels, PromptConfig) else labels
    return {"type": "json_schema", "json_schema": {
        "name": "emotion_label", "strict": True,
        "schema": {"type": "object", "additionalProperties": False, "required": [ANSWER_KEY],
                   "properties": {ANSWER_KEY: {"type": "string", "enum": list(task.verbalizers)}}},
    }}


class OpenAICompatBackend:
    """Chat-completions audio client. `api_key` may be None for servers without auth (local vLLM)."""

    has_scores = False

    def __init__(self, base_url: str, model: str, prompt_cfg: PromptConfig, *, modality: str,
                 api_key: str | None = None, timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, concurrency: int = 4,
                 max_tokens: int = 32, sample_rate: int = 16000, structured: bool = False,
                 max_requests: int | None = None, task: Task | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"--base-url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.name = model
        self.model = model
        self.prompt_cfg = prompt_cfg
        self.task = prompt_task(prompt_cfg, task)
        self.modality = modality
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.sample_rate = sample_rate
        self.structured = structured
        self.max_requests = max_requests
        self.retries = 0  # transient failures retried so far (for logs and tests)
        self.requests = 0  # HTTP requests sent so far, retries included
        self._count_lock = threading.Lock()

    def request_body(self, row: dict, audio) -> dict:
        text = instruction_text(self.prompt_cfg, self.modality, row.get("transcript"), task=self.task)
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": wav_base64(audio, self.sample_rate), "format": "wav"}},
                {"type": "text", "text": text},
            ]}],
        }
        if self.structured:
            body["response_format"] = label_schema(self.task)
        return body

    def _spend_request(self, utt_id: str) -> None:
        with self._count_lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise BackendError(f"{self.url}: the request budget of {self.max_requests} requests is spent "
                                   f"(at {utt_id}); rows done so far are kept. Raise --max-requests and rerun to "
                                   "resume")
            self.requests += 1

    def _post(self, body: dict, utt_id: str) -> bytes:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            self._spend_request(utt_id)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace").strip()
                if err.code not in RETRY_STATUSES:
                    hint = " (check the API key environment variable)" if err.code in (401, 403) else ""
                    raise BackendError(f"{self.url} answered HTTP {err.code} for {utt_id}{hint}: {detail}") from None
                reason = f"HTTP {err.code}"
                if err.code == 429:
                    wait = _retry_after(err.headers.get("Retry-After")) if err.headers else None
                    wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) if wait is None else wait
            except (TimeoutError, socket.timeout) as err:
                reason = f"timeout after {self.timeout_s:g} s ({err})"
            except urllib.error.URLError as err:
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    reason = f"timeout after {self.timeout_s:g} s"
                else:
                    reason = f"connection failed ({err.reason})"
            except (ConnectionError, http.client.HTTPException) as err:
                reason = f"connection failed ({type(err).__name__}: {err})"
            if attempt == self.max_retries:
                raise BackendError(f"{self.url}: giving up on {utt_id} after {self.max_retries + 1} attempts; "
                                   f"last error: {reason}. Rows done so far are kept; rerun to resume.")
            with self._count_lock:
                self.retries += 1
            time.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def answer_text(raw: bytes) -> str | None:
        """choices[0].message.content as text; None when the body is not the expected JSON shape."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else None

    def predict_one(self, row: dict) -> Prediction:

        audio = load_audio(row["audio_path"], self.sample_rate)
        raw = self._post(self.request_body(row, audio), row["utt_id"])
        text = self.answer_text(raw)
        if text is None:
            return Prediction(INVALID, None, raw[:200].decode("utf-8", "replace"))
        return Prediction(self.label_of(text), None, text)

    def label_of(self, text: str) -> str:
        """The emotion an answer names: a structured answer's enum value when it is one, else the free-text parser."""
        if self.structured:
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            value = value.get(ANSWER_KEY) if isinstance(value, dict) else value
            by_answer = {v: lab for lab, v in self.task.answer_of.items()}
            if isinstance(value, str) and value in by_answer:
                return by_answer[value]
        return parse_answer(text, self.task.answer_of)

    def predict(self, rows: list[dict]) -> list[Prediction]:
        if self.concurrency == 1 or len(rows) == 1:
            return [self.predict_one(r) for r in rows]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows))) as pool:
            return list(pool.map(self.predict_one, rows))

