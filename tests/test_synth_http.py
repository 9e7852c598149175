"""The HTTP teacher of `herd synth` and its request cache: faults injected by a fake OpenAI server on a real socket
(malformed JSON, an empty body, 5xx, a body cut mid-response, 429 with Retry-After, timeouts, ...), the
concurrency limit, the API key kept out of every text, and greedy replies through `herd serve` equal to the
in-process engine's."""

from __future__ import annotations

import email.utils
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_serve import MESSAGES, PROMPT, save_tiny_chat_model
from test_serve_interop import ServerThread

from llamaherd.chat import get_chat_format
from llamaherd.engine import Engine, SamplingParams
from llamaherd.errors import InputError
from llamaherd.load import load_model
from llamaherd.serve.app import ServeConfig, create_app
from llamaherd.synth.cache import RequestCache
from llamaherd.synth.teacher import TeacherReply, TeacherRequest
from llamaherd.synth.teacher_http import HTTPTeacher, retry_after

KEY = "sk-synth-test-5f3c9a0e7b"
KEY_ENV = "LLAMAHERD_TEST_TEACHER_KEY"


# ---- a fake OpenAI endpoint that fails on cue ---------------------------------------------------------------

class FakeOpenAI(ThreadingHTTPServer):
    """An OpenAI-compatible server on 127.0.0.1 whose answer to a row's n-th attempt is scripts[row][n] (a fault),
    then success. A row is the prompt, or a chat's last message. Records each attempt (row, fault, time, the
    Authorization header) and the most requests it ever had in flight."""

    daemon_threads = True

    def __init__(self, scripts: dict[str, list[str]] | None = None, delays: dict[str, float] | None = None,
                 models: tuple[str, ...] = ("fake-model",)) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scripts, self.delays, self.models = scripts or {}, delays or {}, models
        self.log: list[dict] = []
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def attempts(self, row: str) -> list[dict]:
        return [e for e in self.log if e["row"] == row]


def _success(path: str, row: str, text: str | None = None) -> dict:
    text = f"re: {row}" if text is None else text
    choice = {"index": 0, "finish_reason": "stop"} | (
        {"message": {"role": "assistant", "content": text}} if path.endswith("chat/completions") else {"text": text})
    return {"choices": [choice], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        self.send(status, json.dumps(body).encode(), headers)

    def do_GET(self) -> None:
        if self.headers.get("Authorization") == f"Bearer {KEY}-refused":
            return self.error(401, f"key {self.headers['Authorization']} refused")
        self.send(200, json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                               for m in self.server.models]}).encode())

    def do_POST(self) -> None:
        fake = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        row = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        with fake.lock:
            n = sum(e["row"] == row for e in fake.log)
            script = fake.scripts.get(row, [])
            fault = script[n] if n < len(script) else "ok"
            fake.log.append({"row": row, "fault": fault, "time": time.monotonic(),
                             "auth": self.headers.get("Authorization")})
            fake.bodies.append(body)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self.answer(fault, self.path, row)
        except OSError:  # the client gave up first (timeout)
            pass
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def answer(self, fault: str, path: str, row: str) -> None:
        full = json.dumps(_success(path, row)).encode()
        if fault == "ok":
            time.sleep(self.server.delays.get(row, 0.0))
            self.send(200, full)
        elif fault == "malformed":
            self.send(200, b'{"choices": [{"text": "half')
        elif fault == "empty":
            self.send(200, b"")
        elif fault in ("500", "502", "504", "400", "404"):
            self.error(int(fault), f"injected {fault}")
        elif fault == "401":  # a careless server quoting the key back
            self.error(401, f"key {self.headers.get('Authorization')} refused")
        elif fault == "429":
            self.error(429, "slow down", {"Retry-After": "1"})
        elif fault == "cut":  # headers promise the whole body; half of it comes, then the connection closes
            self.send(200, full[:len(full) // 2], length=len(full))
            self.close_connection = True
        elif fault == "drop":  # the connection closes without a response
            self.close_connection = True
        elif fault == "slow":  # later than the client's timeout
            time.sleep(2.0)
            self.send(200, full)
        elif fault == "nofields":
            self.send(200, b'{"choices": []}')
        elif fault == "emptytext":
            self.send(200, json.dumps(_success(path, row, text="")).encode())
        else:
            raise AssertionError(fault)


@pytest.fixture
def fake():
    servers = []

    def start(*args, **kw) -> FakeOpenAI:
        servers.append(FakeOpenAI(*args, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def chat(row: str, **kw) -> TeacherRequest:
    return TeacherRequest(key=row, messages=(("system", "Be brief."), ("user", row)), **kw)


def by_key(replies) -> dict[str, TeacherReply]:
    out = {}
    for reply in replies:
        assert reply.request.key not in out, "a request answered twice"
        out[reply.request.key] = reply
    return out


# ---- faults -------------------------------------------------------------------------------------------------

FAULTS = ["malformed", "empty", "500", "cut", "429"]  # the list, in turn


def test_a_row_is_retried_through_every_fault_until_it_succeeds_and_the_run_goes_on(fake):
    server = fake({"faulty": FAULTS, "refused": ["400"]})
    teacher = HTTPTeacher(server.base_url, model="fake-model", max_retries=5, backoff=0.0, timeout=5)
    requests = [chat("faulty"), chat("fine"), TeacherRequest("done", prompt="fine too"), chat("refused")]
    replies = by_key(teacher.run(requests))
    assert set(replies) == {"faulty", "fine", "done", "refused"}  # nothing skipped

    faulty = replies["faulty"]
    assert (faulty.text, faulty.error, faulty.attempts) == ("re: faulty", None, 6)
    assert (faulty.finish_reason, faulty.prompt_tokens, faulty.completion_tokens) == ("stop", 11, 3)
    assert [e["fault"] for e in server.attempts("faulty")] == [*FAULTS, "ok"]
    times = [e["time"] for e in server.attempts("faulty")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[4] >= 0.95  # Retry-After: 1 after the 429
    assert max(gaps[:4]) < 0.5  # backoff=0: the others at once

    assert replies["fine"].text == "re: fine" and replies["fine"].attempts == 1
    assert replies["done"].text == "re: fine too"
    refused = replies["refused"]  # a 400 is not retried
    assert refused.text is None and refused.attempts == 1 and len(server.attempts("refused")) == 1
    assert refused.error.startswith("HTTP 400 from POST ") and refused.error.endswith("/v1/chat/completions: "
                                                                                      "injected 400")


def test_with_fewer_retries_than_faults_the_row_fails_with_the_last_reason(fake):
    server = fake({"faulty": FAULTS})
    teacher = HTTPTeacher(server.base_url, model="fake-model", max_retries=3, backoff=0.0, timeout=5)
    replies = by_key(teacher.run([chat("faulty"), chat("fine")]))
    faulty = replies["faulty"]
    assert faulty.text is None and faulty.attempts == 4 and len(server.attempts("faulty")) == 4
    assert "RemoteProtocolError" in faulty.error  # the 4th fault: the cut body
    assert replies["fine"].text == "re: fine"


@pytest.mark.parametrize("retries", [0, 2])
def test_each_fault_is_reported_in_one_line_and_only_4xx_are_not_retried(fake, retries):
    reasons = {"malformed": "the server sent malformed JSON", "empty": "the server sent an empty body",
               "500": "HTTP 500 from POST", "502": "HTTP 502", "504": "HTTP 504", "429": "HTTP 429",
               "cut": "RemoteProtocolError", "drop": "RemoteProtocolError",
               "nofields": "the response has no choices[0].message.content",
               "emptytext": "the response's choices[0].message.content is empty", "400": "HTTP 400",
               "404": "HTTP 404"}
    server = fake({fault: [fault] * 3 for fault in reasons})
    teacher = HTTPTeacher(server.base_url, model="fake-model", max_retries=retries, backoff=0.0, max_backoff=0.0,
                          timeout=10)
    replies = by_key(teacher.run([chat(fault) for fault in reasons]))
    for fault, reason in reasons.items():
        reply = replies[fault]
        assert reply.text is None and reason in reply.error and "\n" not in reply.error, (fault, reply.error)
        tries = 1 if fault in ("400", "404") else retries + 1
        assert reply.attempts == tries and len(server.attempts(fault)) == tries, fault
    assert "injected 500" in replies["500"].error  # the server's own message


def test_a_request_that_times_out_is_retried(fake):
    server = fake({"late once": ["slow"], "always late": ["slow", "slow"]})
    teacher = HTTPTeacher(server.base_url, model="fake-model", max_retries=1, backoff=0.0, timeout=0.5)
    replies = by_key(teacher.run([chat("late once"), chat("always late")]))
    assert replies["late once"].text == "re: late once" and replies["late once"].attempts == 2
    late = replies["always late"]
    assert late.text is None and late.attempts == 2 and "no answer within 0.5 s (ReadTimeout)" in late.error


def test_retry_after_reads_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert retry_after("3", now) == 3.0 and retry_after("0", now) == 0.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now) == 30.0  # RFC 5322's zone-less UTC
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after(None) is None and retry_after("soon") is None


def test_retry_after_caps_at_max_backoff(fake):
    server = fake({"busy": ["429"]})
    teacher = HTTPTeacher(server.base_url, model="fake-model", backoff=0.0, max_backoff=0.1)
    reply = next(teacher.run([chat("busy")]))
    times = [e["time"] for e in server.attempts("busy")]
    assert reply.ok and reply.attempts == 2 and times[1] - times[0] < 0.5


def test_the_request_body_follows_openais_api(fake):
    server = fake()
    teacher = HTTPTeacher(server.base_url, model="fake-model", backoff=0.0)
    request = chat("q", max_tokens=7, temperature=0.7, top_p=0.9, stop=("\n\n", "User:"), seed=5)
    list(teacher.run([request, TeacherRequest("p", prompt="Once", max_tokens=3)]))
    bodies = {("messages" in b): b for b in server.bodies}
    assert bodies[True] == {"model": "fake-model", "messages": [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "q"}],
                            "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n", "User:"], "seed": 5}
    assert bodies[False] == {"model": "fake-model", "prompt": "Once", "max_tokens": 3, "temperature": 0.0}


# ---- concurrency --------------------------------------------------------------------------------------------

def test_never_more_than_concurrency_requests_in_flight_and_replies_come_as_they_finish(fake):
    rows = [f"row {i}" for i in range(10)]
    server = fake(delays={row: 0.1 for row in rows} | {"row 0": 1.0})
    teacher = HTTPTeacher(server.base_url, model="fake-model", concurrency=3, backoff=0.0)
    drawn = []

    def requests():
        for row in rows:
            drawn.append(row)
            yield chat(row)

    order, drawn_at_first = [], None
    for reply in teacher.run(requests()):
        drawn_at_first = len(drawn) if drawn_at_first is None else drawn_at_first
        assert reply.ok
        order.append(reply.request.key)
    assert sorted(order) == sorted(rows)
    assert server.max_in_flight == 3  # the limit, and reached
    assert drawn_at_first <= 3  # requests are drawn as slots free up, not all at once
    assert order[-1] == "row 0"  # the slow first row comes last


# ---- the API key --------------------------------------------------------------------------------------------

def test_the_api_key_is_sent_but_never_shown(fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = fake({"careless": ["401"]})
    teacher = HTTPTeacher(server.base_url, api_key_env=KEY_ENV, backoff=0.0)  # model=None: GET /models
    assert teacher.model == "fake-model" and teacher.teacher_id == f"http:{server.base_url}#fake-model"
    assert teacher.identity == {"kind": "http", "base_url": server.base_url, "model": "fake-model"}
    replies = by_key(teacher.run([chat("careless"), chat("fine")]))
    assert {e["auth"] for e in server.log} == {f"Bearer {KEY}"}
    assert replies["careless"].error.startswith("HTTP 401") and "key Bearer *** refused" in replies["careless"].error
    texts = [repr(teacher), str(vars(teacher)), json.dumps(teacher.identity), teacher.teacher_id,
             *(repr(r) for r in replies.values())]
    monkeypatch.setenv(KEY_ENV, KEY + "-refused")
    with pytest.raises(InputError) as refused:
        HTTPTeacher(server.base_url, api_key_env=KEY_ENV, backoff=0.0)
    texts.append(str(refused.value))
    assert "HTTP 401" in texts[-1] and "--model" in texts[-1]
    assert not [t for t in texts if KEY in t]

    monkeypatch.delenv(KEY_ENV)
    list(HTTPTeacher(server.base_url, model="fake-model", api_key_env=KEY_ENV).run([chat("no key")]))
    assert server.attempts("no key")[0]["auth"] is None


def test_model_none_needs_exactly_one_served_model(fake):
    with pytest.raises(InputError, match=r"serves several models \(a, b\); choose one with --model"):
        HTTPTeacher(fake(models=("a", "b")).base_url)
    with pytest.raises(InputError, match="lists no model ids"):
        HTTPTeacher(fake(models=()).base_url)
    with pytest.raises(InputError, match="not an http"):
        HTTPTeacher("127.0.0.1:8000/v1", model="m")


# ---- against herd serve -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("synth-tiny"))


@pytest.fixture(scope="module")
def served(tiny):
    with ServerThread(create_app(load_model(tiny), ServeConfig(max_batch=4, max_len=128, api_key=KEY))) as server:
        yield server


def engine_replies(tiny, requests: list[TeacherRequest]) -> list[tuple[str, str, int, int]]:
    """(text, finish_reason, prompt tokens, completion tokens) of the in-process engine for greedy requests,
    encoded as herd serve documents it (docs/serving.md): chat through the model's template with its stop strings,
    a completion prompt with the tokenizer's default BOS, control tokens left out of the text."""
    loaded = load_model(tiny)
    tok = loaded.tokenizer
    fmt = get_chat_format(loaded.chat_format, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    prompts, params = [], []
    for r in requests:
        if r.messages is not None:
            prompts.append(fmt.encode([{"role": role, "content": c} for role, c in r.messages], tok))
            stops = list(dict.fromkeys([*fmt.stop_strings, *r.stop]))
        else:
            prompts.append(tok.encode(r.prompt, add_bos=tok.add_bos_default))
            stops = list(r.stop)
        params.append(SamplingParams(max_new_tokens=r.max_tokens, stop_strings=stops, skip_special_tokens=True))
    done = Engine(loaded.model, tok, max_batch=2, max_len=128).generate_many(prompts, params)
    return [(d.completions[0].text, d.completions[0].finish_reason, len(ids), len(d.completions[0].token_ids))
            for d, ids in zip(done, prompts)]


def test_greedy_replies_through_herd_serve_equal_the_in_process_engine(served, tiny, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    teacher = HTTPTeacher(served.base_url, api_key_env=KEY_ENV, concurrency=3, backoff=0.0)
    assert teacher.model == "synth-tiny0"
    chat_messages = tuple((m["role"], m["content"]) for m in MESSAGES)
    requests = [TeacherRequest("chat", messages=chat_messages, max_tokens=12),
                TeacherRequest("chat 2", messages=(("user", "Name a llama."),), max_tokens=9, stop=("e",)),
                TeacherRequest("completion", prompt=PROMPT, max_tokens=10),
                TeacherRequest("completion 2", prompt="Once upon a time", max_tokens=6, stop=("a",))]
    replies = by_key(teacher.run(requests))
    want = engine_replies(tiny, requests)
    for request, (text, finish_reason, prompt_tokens, completion_tokens) in zip(requests, want):
        reply = replies[request.key]
        assert reply.error is None and reply.attempts == 1, reply.error
        assert (reply.text, reply.finish_reason) == (text, finish_reason), request.key
        assert (reply.prompt_tokens, reply.completion_tokens) == (prompt_tokens, completion_tokens)

    wrong_model = next(HTTPTeacher(served.base_url, model="nope", api_key_env=KEY_ENV).run(requests[:1]))
    assert wrong_model.error.startswith("HTTP 404") and "does not exist" in wrong_model.error
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    refused = next(HTTPTeacher(served.base_url, model="synth-tiny0", api_key_env=KEY_ENV).run(requests[:1]))
    assert refused.error.startswith("HTTP 401") and refused.attempts == 1


# ---- the request cache --------------------------------------------------------------------------------------

def _reply(text: str | None, key: str = "k") -> TeacherReply:
    return TeacherReply(TeacherRequest(key, prompt="p"), text, finish_reason="stop" if text else None,
                        prompt_tokens=4, completion_tokens=2, error=None if text else "HTTP 500")


def test_cache_round_trip_survives_reopening(tmp_path):
    path = tmp_path / "out" / "cache.jsonl"
    cache = RequestCache(path)
    assert cache.get("h1") is None
    cache.put("h1", _reply("one\u2028line"))  # a Unicode line separator inside a text
    cache.put("h2", _reply("two"))
    cache.put("h1", _reply("again"))  # already held: not written twice
    want = {"text": "one\u2028line", "finish_reason": "stop", "prompt_tokens": 4, "completion_tokens": 2}
    assert cache.get("h1") == want
    again = RequestCache(path)
    assert len(again) == 2 and again.get("h1") == want and again.get("h2")["text"] == "two"
    assert len(path.read_text().splitlines()) == 2


def test_a_failed_reply_is_not_cached(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = RequestCache(path)
    cache.put("h", _reply(None))
    assert cache.get("h") is None and RequestCache(path).get("h") is None


def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path):
    path = tmp_path / "cache.jsonl"
    RequestCache(path).put("h1", _reply("one"))
    with open(path, "a") as f:
        f.write('{"hash": "h2", "text": "tw')  # killed mid-write
    cache = RequestCache(path)
    assert len(cache) == 1 and cache.get("h2") is None
    cache.put("h3", _reply("three"))
    assert RequestCache(path).get("h3")["text"] == "three"


def test_a_bad_line_that_is_not_the_last_is_an_error(tmp_path):
    path = tmp_path / "cache.jsonl"
    RequestCache(path).put("h1", _reply("one"))
    with open(path, "a") as f:
        f.write('not json\n{"hash": "h2", "text": "x"}\n')
    with pytest.raises(InputError, match=r"cache.jsonl: line 2 is not a request-cache entry"):
        RequestCache(path)


def test_a_put_is_in_the_file_when_it_returns(tmp_path):
    """A process killed (SIGKILL) right after put() keeps the entry: nothing waits in a buffer."""
    path = tmp_path / "cache.jsonl"
    code = ("import os, signal, sys; from llamaherd.synth.cache import RequestCache; "
            "from llamaherd.synth.teacher import TeacherReply, TeacherRequest; "
            "RequestCache(sys.argv[1]).put('h', TeacherReply(TeacherRequest('k', prompt='p'), 'kept')); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL
    assert RequestCache(path).get("h")["text"] == "kept"
