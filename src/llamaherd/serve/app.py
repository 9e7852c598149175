"""The OpenAI-compatible HTTP API over the generation engine: `create_app` builds the FastAPI application.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics. Errors
carry OpenAI's body `{"error": {"message", "type", "param", "code"}}`. The engine runs on one background thread
(serve/runner.py); a request whose client goes away is cancelled there at once, freeing its rows.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaherd.chat import get_chat_format
from llamaherd.engine import Engine, Event, SamplingParams, TokenLogprob
from llamaherd.errors import InputError
from llamaherd.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_response,
    validation_message,
)
from llamaherd.serve.runner import EngineRunner, Failure, Stream

log = logging.getLogger("llamaherd.serve")
OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes)
# A request body's largest size: a full queue of prompts of 2,048 token ids takes ~1 MB, and parsing a JSON list
# costs ~10x its bytes in Python objects, so a body of gigabytes would take the server's memory with it.
MAX_BODY_BYTES = 32 * 2**20


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"the request body is over {MAX_BODY_BYTES:,} bytes; send fewer or shorter prompts")


class ApiError(Exception):
    """A request refused with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status, message, param, code, type_, headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


class _Failed(Exception):
    """A request failed inside the engine (its Failure's message)."""


@dataclass
class ServeConfig:
    """What `herd serve` was started with. max_queue: sequences (prompts x n completions) that may wait for a row
    beyond the max_batch running ones; model_id: the name clients send as `model` (default: the model's name)."""

    max_batch: int = 8
    max_len: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    model_id: str | None = None
    chat_format: str | None = None
    prefill_chunk: int = 512


class Server:
    """The state behind the routes: the loaded model, its engine thread, admission and metrics."""

    def __init__(self, loaded, config: ServeConfig) -> None:
        from llamaherd.train.lineage import model_identity

        self.loaded, self.config, self.tokenizer = loaded, config, loaded.tokenizer
        self.engine = Engine(loaded.model, loaded.tokenizer, max_batch=config.max_batch, max_len=config.max_len,
                             prefill_chunk=config.prefill_chunk, isolate_faults=True)
        self.runner = EngineRunner(self.engine)
        self.model_id = config.model_id or loaded.source.name
        self.identity = model_identity(loaded.source)
        self.created = int(time.time())
        self.capacity = config.max_batch + config.max_queue  # sequences in flight at most (each takes a row)
        self.outstanding = 0  # sequences submitted and not yet ended; event loop thread only
        self.http_requests: dict[tuple[str, int], int] = {}
        chat_format = config.chat_format or loaded.chat_format
        self.chat_format = None if chat_format is None else get_chat_format(
            chat_format, bos_token=self.tokenizer.bos_token or "", eos_token=self.tokenizer.eos_token or "")

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    # ---- checks ---------------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """Policy: `model` may be left out or name the served model; any other name is OpenAI's 404."""
        if model is not None and model != self.model_id:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}' "
                                "(GET /v1/models)", "model", "model_not_found")

    def fit(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """max_tokens, or what is left of the context when None; 400 when the prompt or the request won't fit."""
        if prompt_len >= self.max_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens, but the prompt has "
                                f"{prompt_len} tokens; shorten the {param}", param, "context_length_exceeded")
        if max_tokens is None:
            return self.max_len - prompt_len
        if prompt_len + max_tokens > self.max_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens, but you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                "completion); shorten the prompt or lower max_tokens", "max_tokens",
                           "context_length_exceeded")
        return max_tokens

    def check(self, ids: list[int], params: SamplingParams, n: int, param: str) -> None:
        try:
            self.engine.check_request(ids, params, n)
        except InputError as e:
            raise ApiError(400, f"{param}: {e}", param) from None

    def check_size(self, prompts: int, n: int) -> None:
        """400 for one request of more sequences (prompts x n, each a KV row) than the server ever takes at once;
        called before any prompt is tokenized, so that a huge prompt list costs nothing."""
        k = prompts * n
        if k > self.capacity:
            raise ApiError(400, f"{k} sequences ({prompts} prompt(s) x n={n}) in one request; this server takes at "
                                f"most {self.capacity} at once (--max-batch + --max-queue); send fewer prompts or a "
                                "smaller n", "n" if n > 1 else "prompt")

    def admit(self, k: int) -> None:
        """Take k sequences (prompts x n, bounded by `check_size`) into the queue, or 429 when --max-queue is
        reached."""
        if self.outstanding + k > self.capacity:
            raise ApiError(429, f"the server is busy: {self.outstanding} sequence(s) running or queued and {k} more "
                                f"asked for, at most {self.capacity}; retry after a second", None,
                           "rate_limit_exceeded", "requests", {"Retry-After": "1"})
        self.outstanding += k

    # ---- text of tokens -------------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def pieces(self, ids: list[int]) -> list[str]:
        """Each id's share of the decoded text (partial UTF-8 characters go to the id that completes them; control
        tokens such as <s> have none, as the returned text leaves them out)."""
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        out = [decoder.push(i) for i in ids]
        if out:
            out[-1] += decoder.flush()
        return out

    def legacy_logprobs(self, ids: list[int], entries: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
        """/v1/completions' logprobs: tokens, token_logprobs (null where nothing precedes), top_logprobs (the top
        tokens and the chosen one, as OpenAI returns them) and each token's character offset in the text."""
        offsets, at = [], offset
        for piece in self.pieces(ids):
            offsets.append(at)
            at += len(piece)
        top = []
        for token_id, e in zip(ids, entries):
            if e is None:
                top.append(None)
                continue
            best: dict[str, float] = {}
            for i, lp in [*e.top, (token_id, e.logprob)]:
                best.setdefault(self.token_text(i), lp)
            top.append(best)
        return {"tokens": [self.token_text(i) for i in ids],
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """/v1/chat/completions' logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for e in entries]}

    # ---- running requests -----------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[Stream]:
        self.admit(len(prompts) * n)
        events: asyncio.Queue = asyncio.Queue()
        return [self.runner.submit(ids, p, n, events) for ids, p in zip(prompts, params)]

    def release(self, streams: list[Stream]) -> None:
        """The HTTP side is done with these requests: cancel any still running (a no-op for finished ones)."""
        for stream in streams:
            self.runner.cancel(stream.request_id)
        self.outstanding -= sum(stream.n for stream in streams)

    async def events(self, streams: list[Stream]) -> AsyncIterator[Event]:
        """The streams' events in the order the engine made them, until every completion has finished."""
        left = {s.request_id: s.n for s in streams}
        events = streams[0].queue
        while left:
            item = await events.get()
            if isinstance(item, Failure):
                raise _Failed(item.message)
            for event in item:
                yield event
                if event.finish_reason is not None:
                    left[event.request_id] -= 1
                    if not left[event.request_id]:
                        del left[event.request_id]

    async def collect(self, streams: list[Stream], request: Request) -> None:
        """Wait until the streams finish; if the client disconnects first, cancel them (raise ClientGone)."""
        async def consume() -> None:
            async for _ in self.events(streams):
                pass

        work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone
        work.result()

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        r = self.runner
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("llamaherd_queue_length", "gauge", "Sequences waiting for a KV-cache row.", [("", r.waiting)])
        metric("llamaherd_running_sequences", "gauge", "Sequences holding a KV-cache row.", [("", r.running)])
        metric("llamaherd_kv_rows_free", "gauge", "KV-cache rows free.", [("", r.free_slots)])
        metric("llamaherd_sequences_in_flight", "gauge", "Sequences (prompts x n) admitted and not finished.",
               [("", self.outstanding)])
        metric("llamaherd_generation_tokens_per_second", "gauge",
               "Generated tokens per second over the last 10 seconds.", [("", round(r.tokens_per_second(), 3))])
        metric("llamaherd_generation_tokens_total", "counter", "Tokens generated.", [("", r.generated_tokens)])
        metric("llamaherd_prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", r.prompt_tokens)])
        metric("llamaherd_engine_failures_total", "counter", "Requests failed inside the engine.", [("", r.failures)])
        metric("llamaherd_http_requests_total", "counter", "HTTP requests answered, by path and status.",
               [(f'{{path="{p}",status="{s}"}}', k) for (p, s), k in sorted(self.http_requests.items())])
        return "\n".join(lines) + "\n"


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EngineStreamResponse(StreamingResponse):
    """Server-sent events whose engine requests are released however the response ends (done, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _stream(server: Server, streams, chunks: AsyncIterator[str], body, usage_chunk) -> _EngineStreamResponse:
    """The SSE response of a streamed request: its chunks, then an error event if the engine failed it, or else
    the usage chunk when stream_options asks for it; then [DONE]. Its rows are released however it ends."""
    async def sse() -> AsyncIterator[str]:
        try:
            async for piece in chunks:
                yield piece
        except _Failed as failed:
            yield _sse({"error": {"message": str(failed), "type": "server_error", "param": None, "code": None}})
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(usage_chunk())
        yield _sse("[DONE]")
    return _EngineStreamResponse(sse(), lambda: server.release(streams))


async def _collect(server: Server, streams, request: Request) -> JSONResponse | None:
    """Wait for a plain (not streamed) request's completions; the error response if the engine failed it or the
    client hung up (its rows are released either way), else None."""
    try:
        await server.collect(streams, request)
    except _Failed as failed:
        return error_response(500, str(failed), "server_error")
    except ClientGone:
        return error_response(499, "client closed the request")
    finally:
        server.release(streams)
    return None


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _params(body, max_tokens: int, stop: list[str], logprobs: int | None, echo: bool = False) -> SamplingParams:
    """The engine's settings for a request; a temperature below 1e-5 is greedy (vLLM's rule: dividing the logits
    by less overflows float32); the text leaves out control tokens (<s>, </s>), as OpenAI's and vLLM's do."""
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=body.temperature if body.temperature >= 1e-5 else 0.0,
        top_k=body.top_k,
        top_p=None if body.top_p == 1.0 else body.top_p, repetition_penalty=body.repetition_penalty,
        stop_strings=stop, seed=body.seed, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
        skip_special_tokens=True, stop_ids=frozenset() if body.ignore_eos else None)


class _Observe:
    """ASGI middleware: the API key (constant-time compare; the key is never logged or echoed), the body size
    (MAX_BODY_BYTES: 413 from its Content-Length, or once a chunked body grows past it) and the per-path request
    counters of /metrics."""

    def __init__(self, app, server: Server, paths: set[str]) -> None:
        self.app, self.server, self.paths = app, server, paths
        key = server.config.api_key
        self.expected = None if not key else key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def observed(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"] not in OPEN_PATHS:
                scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
                # the scheme is case-insensitive (RFC 7235 section 2.1): "bearer KEY" is as good as "Bearer KEY"
                if not (hmac.compare_digest(given, self.expected) and scheme.lower() == b"bearer"):
                    response = error_response(401, "Missing or incorrect API key; send the header "
                                                   "'Authorization: Bearer <key>' with the key the server was "
                                                   "started with", code="invalid_api_key")
                    return await response(scope, receive, observed)
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                return await error_response(413, _BodyTooLarge().detail)(scope, receive, observed)
            received = 0

            async def bounded():  # a chunked body has no Content-Length: count what arrives
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge()  # FastAPI re-raises HTTP errors met reading the body
                return message

            await self.app(scope, bounded, observed)
        finally:
            counts = self.server.http_requests
            counts[(path, status)] = counts.get((path, status), 0) + 1


def create_app(loaded, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving `loaded` (llamaherd.load.Loaded); its engine thread runs while the app's
    lifespan does (uvicorn, or `with TestClient(app)`)."""
    server = Server(loaded, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.runner.start()
        try:
            yield
        finally:
            server.runner.stop()

    app = FastAPI(title="llamaherd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        headers, where = getattr(e, "headers", None), f"{request.method} {request.url.path}"
        message = {400: f"the body could not be read ({e.detail}); send a JSON object encoded as UTF-8",  # FastAPI's
                   404: f"{where}: no such path; the API is GET /v1/models, POST /v1/completions, POST "
                        "/v1/chat/completions, GET /health, GET /metrics",
                   405: f"{where}: method not allowed; use {(headers or {}).get('Allow', 'another method')}"
                   }.get(e.status_code, str(e.detail))
        return error_response(e.status_code, message, type_, headers=headers)

    @app.exception_handler(Exception)
    async def crashed(_: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)
        return error_response(500, f"the server failed on this request ({type(e).__name__}); other requests are "
                                   "unaffected", "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.runner.alive:
            return error_response(503, "the engine thread has stopped; restart the server", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        meta = {**server.identity, "max_model_len": server.max_len,
                "chat_template": server.chat_format is not None}
        return JSONResponse({"object": "list", "data": [{
            "id": server.model_id, "object": "model", "created": server.created, "owned_by": "llamaherd",
            "max_model_len": server.max_len, "metadata": meta}]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompts = _completion_prompts(server, body.prompt, body.n)
        params = []
        for ids in prompts:
            max_tokens = server.fit(len(ids), body.max_tokens, "prompt")
            p = _params(body, max_tokens, body.stop_strings, body.logprobs, body.echo)
            server.check(ids, p, body.n, "prompt")
            params.append(p)
        streams = server.submit(prompts, params, body.n)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}

        def choice(k: int, c, echo: bool) -> dict[str, Any]:
            stream = streams[k // body.n]
            ids, text, entries, offset = c.token_ids, c.text, c.logprobs, 0
            if echo:
                prompt = stream.handle.prompt_ids
                prompt_text = "".join(server.pieces(prompt))
                offset, text = len(prompt_text), prompt_text + text
            out = {"index": k, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
            if body.logprobs is not None:
                lp = server.legacy_logprobs(ids, entries, offset)
                if echo:
                    pre = server.legacy_logprobs(prompt, stream.handle.prompt_logprobs, 0)
                    lp = {key: pre[key] + lp[key] for key in lp}
                out["logprobs"] = lp
            return out

        usage = _usage_of(streams, prompts)
        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                started = set()
                async for e in server.events(streams):
                    if not (e.text or e.finish_reason or body.logprobs is not None or body.echo):
                        continue  # text held back (a partial character, a possible stop string)
                    k = [s.request_id for s in streams].index(e.request_id) * body.n + e.index
                    echo = body.echo and k not in started
                    started.add(k)
                    c = _Piece(e.token_ids, e.text, e.logprobs, e.finish_reason)
                    yield _sse(head | {"choices": [choice(k, c, echo)]} | _usage_field(body))
            return _stream(server, streams, chunks(), body, lambda: head | {"choices": [], "usage": usage()})
        if (failed := await _collect(server, streams, request)) is not None:
            return failed
        choices = [choice(k, stream.handle.completions[j], body.echo)
                   for k, (stream, j) in enumerate((s, j) for s in streams for j in range(body.n))]
        return JSONResponse(head | {"choices": choices, "usage": usage()})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        if server.chat_format is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions, or restart the server with "
                                "--chat-format NAME", "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        server.check_size(1, body.n)
        try:
            ids = server.chat_format.encode([m.as_dict() for m in body.messages], server.tokenizer)
        except InputError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        max_tokens = server.fit(len(ids), body.max_completion_tokens or body.max_tokens, "messages")
        stops = list(dict.fromkeys([*server.chat_format.stop_strings, *body.stop_strings]))
        params = _params(body, max_tokens, stops, (body.top_logprobs or 0) if body.logprobs else None)
        server.check(ids, params, body.n, "messages")
        streams = server.submit([ids], [params], body.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": server.model_id, "system_fingerprint": None}
        usage = _usage_of(streams, [ids])
        if body.stream:
            chunk = head | {"object": "chat.completion.chunk"}

            async def chunks() -> AsyncIterator[str]:
                for i in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse(chunk | {"choices": [{"index": i, "delta": delta, "logprobs": None,
                                                     "finish_reason": None}]} | _usage_field(body))
                async for e in server.events(streams):
                    if not (e.text or e.finish_reason or body.logprobs):
                        continue  # text held back (a partial character, a possible stop string)
                    lp = server.chat_logprobs(e.logprobs) if body.logprobs else None
                    choice = {"index": e.index, "delta": {"content": e.text} if e.text else {}, "logprobs": lp,
                              "finish_reason": e.finish_reason}
                    yield _sse(chunk | {"choices": [choice]} | _usage_field(body))
            return _stream(server, streams, chunks(), body, lambda: chunk | {"choices": [], "usage": usage()})
        if (failed := await _collect(server, streams, request)) is not None:
            return failed
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": server.chat_logprobs(c.logprobs) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for c in streams[0].handle.completions]
        return JSONResponse(head | {"choices": choices, "usage": usage()})

    paths = {route.path for route in app.routes}
    app.add_middleware(_Observe, server=server, paths=paths)
    return app


@dataclass
class _Piece:
    """A streamed event seen as a completion so far (the fields `choice` reads)."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


def _usage_field(body) -> dict[str, Any]:
    """OpenAI sends "usage": null on every chunk when the stream ends with a usage chunk."""
    return {"usage": None} if body.stream_options and body.stream_options.include_usage else {}


def _usage_of(streams: list[Stream], prompts: list[list[int]]) -> Callable[[], dict[str, int]]:
    """usage once the streams are done: each prompt counted once, every completion's tokens."""
    return lambda: _usage(sum(map(len, prompts)),
                          sum(len(c.token_ids) for s in streams for c in s.handle.completions))


def _completion_prompts(server: Server, prompt, n: int) -> list[list[int]]:
    """The prompt field as token id lists (strings encoded with the tokenizer's default BOS), once the request's
    size (prompts x n) is known to fit the server."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: is empty; send a string or token ids", "prompt")
    server.check_size(len(prompt), n)
    tok = server.tokenizer
    try:
        return [tok.encode(p, add_bos=tok.add_bos_default) if isinstance(p, str) else list(p) for p in prompt]
    except InputError as e:
        raise ApiError(400, f"prompt: {e}", "prompt") from None
