"""An OpenAI-compatible HTTP endpoint as a teacher (`herd serve`, vLLM, llama.cpp's server, OpenAI itself).

Non-streaming POST /chat/completions and /completions under a base URL such as http://127.0.0.1:8000/v1, at most
`concurrency` requests in flight. A request is retried with exponential backoff on what a retry can mend: HTTP
408/409/429 and 5xx (waiting `Retry-After` when the server sends it), connection errors, timeouts, a body cut
short, malformed JSON, a JSON without the expected fields and an empty completion; other 4xx fail at once. A
request that still fails comes back as a reply with text None and the last reason: run() never raises and never
skips. The API key is read from an environment variable and sent as `Authorization: Bearer`; no attribute,
identity, repr or error text holds it (a server that quotes it back has it masked).
"""

from __future__ import annotations

import email.utils
import itertools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timezone
from typing import Any, TypeVar

import httpx

from llamaherd.errors import InputError
from llamaherd.synth.teacher import TeacherReply, TeacherRequest

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # what the official openai client retries
T = TypeVar("T")


class _Failure(Exception):
    """One attempt's failure. retryable: whether another attempt may mend it; retry_after: the server's wait in
    seconds, if it gave one; attempts: set once the retries are spent."""

    def __init__(self, reason: str, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retryable, self.retry_after, self.attempts = retryable, retry_after, 1


class HTTPTeacher:
    """Answers TeacherRequests through an OpenAI-compatible endpoint.

    base_url: up to and including the API version (http://127.0.0.1:8000/v1). model: the id sent as `model`;
    None asks GET /models once and takes the only one (InputError if there are several or none). api_key_env:
    the environment variable holding the key (unset or empty: no Authorization header, as local servers need).
    timeout: seconds per network operation (connect, each read). backoff: the first retry's wait in seconds,
    doubled each retry up to max_backoff, times a jitter in [0.5, 1) seeded by the request's content hash and
    the retry's number; a Retry-After header replaces it (capped at max_backoff too).
    """

    def __init__(self, base_url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
                 max_backoff: float = 60.0) -> None:
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise InputError(f"HTTPTeacher: concurrency must be >= 1, max_retries >= 0, timeout > 0, backoff and "
                             f"max_backoff >= 0; got {concurrency}, {max_retries}, {timeout}, {backoff}, "
                             f"{max_backoff}")
        if not re.match(r"https?://", base_url):
            raise InputError(f"--base-url {base_url!r} is not an http(s) URL; give one such as "
                             "http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.api_key_env, self.concurrency, self.max_retries = api_key_env, concurrency, max_retries
        self.timeout, self.backoff, self.max_backoff = timeout, backoff, max_backoff
        self.model = model if model is not None else self._only_model()
        self.identity: dict[str, Any] = {"kind": "http", "base_url": self.base_url, "model": self.model}
        self.teacher_id = f"http:{self.base_url}#{self.model}"

    def __repr__(self) -> str:
        return (f"HTTPTeacher(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"concurrency={self.concurrency}, max_retries={self.max_retries})")

    def run(self, requests: Iterable[TeacherRequest]) -> Iterator[TeacherReply]:
        """Answer every request, at most `concurrency` at a time, yielding replies in the order they finish.

        Requests are drawn from the iterable only as slots free up, so it may be a long or lazy stream. Closing
        the iterator early cancels what has not started and cuts short any backoff wait.
        """
        stop = threading.Event()
        with self._session() as (client, key), ThreadPoolExecutor(self.concurrency, "herd-teacher-http") as pool:
            todo, pending = iter(requests), set[Future]()
            try:
                while True:
                    for request in itertools.islice(todo, self.concurrency - len(pending)):
                        pending.add(pool.submit(self._answer, client, key, request, stop))
                    if not pending:
                        return
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                stop.set()
                for future in pending:
                    future.cancel()

    def body(self, request: TeacherRequest) -> dict[str, Any]:
        """The JSON body OpenAI's API takes for a request; options left unset are left out (server defaults)."""
        body: dict[str, Any] = {"model": self.model}
        if request.kind == "chat":
            body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
        else:
            body["prompt"] = request.prompt
        body |= {"max_tokens": request.max_tokens, "temperature": request.temperature}
        optional = {"top_p": request.top_p, "stop": list(request.stop) or None, "seed": request.seed}
        return body | {k: v for k, v in optional.items() if v is not None}

    # ---- one request ----------------------------------------------------------------------------------------
    def _answer(self, client: httpx.Client, key: str | None, request: TeacherRequest,
                stop: threading.Event) -> TeacherReply:
        """The reply to one request after up to max_retries retries; any failure is a reply, never an exception."""
        url = f"{self.base_url}/{'chat/completions' if request.kind == 'chat' else 'completions'}"
        body = self.body(request)

        def attempt() -> tuple[str, str | None, tuple[int, int]]:
            return _parse(_json_of(_send(client, "POST", url, self.timeout, json=body)), request.kind)

        try:
            (text, finish_reason, (prompt_tokens, completion_tokens)), attempts = self._with_retries(
                attempt, request.content_hash(self.teacher_id), stop)
        except _Failure as e:
            return TeacherReply(request, None, error=_masked(str(e), key), attempts=e.attempts)
        except Exception as e:  # a bug here must still come back as this row's failure, not end the run
            return TeacherReply(request, None, error=_masked(f"{type(e).__name__}: {e}", key))
        return TeacherReply(request, text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, attempts=attempts)

    def _with_retries(self, attempt: Callable[[], T], seed: str, stop: threading.Event) -> tuple[T, int]:
        """(what attempt() returned, the number of attempts made); the last _Failure, its attempts set, when it
        is not retryable, the retries are spent or `stop` is set while waiting."""
        n = 0
        while True:
            n += 1
            try:
                return attempt(), n
            except _Failure as e:
                e.attempts = n
                if not e.retryable or n > self.max_retries or stop.wait(self._delay(n, e.retry_after, seed)):
                    raise

    def _delay(self, retry: int, retry_after: float | None, seed: str) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        jitter = 0.5 + random.Random(f"{seed}:{retry}").random() / 2
        return min(self.backoff * 2 ** (retry - 1), self.max_backoff) * jitter

    # ---- the model id ---------------------------------------------------------------------------------------
    def _only_model(self) -> str:
        """The one model GET /models lists (with the same retries as a request)."""
        url = f"{self.base_url}/models"
        with self._session() as (client, key):
            try:
                data, _ = self._with_retries(lambda: _json_of(_send(client, "GET", url, self.timeout)), url,
                                             threading.Event())
            except _Failure as e:
                raise InputError(f"{_masked(str(e), key)}; check --base-url, or name the model with --model") \
                    from None
        models = data.get("data") if isinstance(data, dict) else None
        ids = [m.get("id") for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        if not ids or not all(isinstance(i, str) for i in ids):
            raise InputError(f"{url} lists no model ids (expected {{\"data\": [{{\"id\": ...}}]}}); name the model "
                             "with --model")
        if len(ids) > 1:
            raise InputError(f"{url} serves several models ({', '.join(ids)}); choose one with --model")
        return ids[0]

    @contextmanager
    def _session(self) -> Iterator[tuple[httpx.Client, str | None]]:
        """An httpx client that sends the key from the environment as a bearer token, and the key (to mask it in
        error texts); the key lives only as long as the client."""
        key = os.environ.get(self.api_key_env) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(headers=headers, timeout=self.timeout,
                          limits=httpx.Limits(max_connections=self.concurrency)) as client:
            yield client, key


def _send(client: httpx.Client, method: str, url: str, timeout: float, **kw) -> httpx.Response:
    """The response when it is a 200, else a _Failure naming the status and the server's message."""
    try:
        response = client.request(method, url, **kw)
    except httpx.TimeoutException as e:
        raise _Failure(f"{method} {url}: no answer within {timeout:g} s ({type(e).__name__})") from None
    except httpx.RequestError as e:  # refused, reset, a body cut short (RemoteProtocolError), bad encoding
        raise _Failure(f"{method} {url}: {type(e).__name__}: {_one_line(str(e)) or 'connection failed'}") from None
    if response.status_code == 200:
        return response
    status = response.status_code
    raise _Failure(f"HTTP {status} from {method} {url}: {_server_message(response)}", status in RETRY_STATUS,
                   retry_after(response.headers.get("retry-after")))


def _json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError both are
        what = "an empty body" if not response.content else f"malformed JSON ({_one_line(str(e))})"
        raise _Failure(f"{response.request.method} {response.request.url}: the server sent {what}") from None


def _parse(data: Any, kind: str) -> tuple[str, str | None, tuple[int, int]]:
    """(text, finish_reason, (prompt_tokens, completion_tokens)) of a response body; a _Failure when the text is
    missing or empty. Token counts are 0 when the endpoint sends no usage."""
    field = "choices[0].message.content" if kind == "chat" else "choices[0].text"
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        raise _Failure(f"the response has no {field}: {_one_line(str(data))[:200]}")
    finish_reason = choice.get("finish_reason")
    finish_reason = finish_reason if isinstance(finish_reason, str) else None
    if not text:
        raise _Failure(f"the response's {field} is empty (finish_reason {finish_reason!r})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    counts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    prompt_tokens, completion_tokens = (n if isinstance(n, int) and not isinstance(n, bool) else 0 for n in counts)
    return text, finish_reason, (prompt_tokens, completion_tokens)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait: delay-seconds or an HTTP date (RFC 9110 section 10.2.3); None
    when absent or unreadable. now: the clock (seconds since the epoch) a date is measured from."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": the RFC 5322 way of writing UTC without claiming a zone
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _server_message(response: httpx.Response) -> str:
    """The message of OpenAI's error body, or the start of whatever text came back."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    text = message if isinstance(message, str) else response.text
    return _one_line(text)[:300] or "(no body)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _masked(text: str, key: str | None) -> str:
    """text with the API key replaced by ***, in case a server or library quoted it back."""
    return text.replace(key, "***") if key else text
