"""`herd serve` on a real socket: the official `openai` client, clients that disconnect mid-stream, the `herd serve`
command itself (API key kept out of its logs), and lm-eval's local-completions against `herd eval` (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch
from test_serve import (
    MESSAGES,
    PROMPT,
    hf_greedy,
    hf_logprobs,
    hf_reference,
    on_sampling,
    save_tiny_chat_model,
    text_of,
)

from llamaherd.load import load_model
from llamaherd.serve.app import ServeConfig, create_app

openai = pytest.importorskip("openai")
KEY = "sk-test-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a thread of this process, for as long as the `with` lasts."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("interop-tiny"))


@pytest.fixture(scope="module")
def ref(tiny):
    return hf_reference(tiny)


@pytest.fixture(scope="module")
def served(tiny):
    app = create_app(load_model(tiny), ServeConfig(max_batch=4, max_len=128, api_key=KEY))
    with ServerThread(app) as server:
        server.app = app
        yield server


def test_openai_client_chat_streaming_and_completions_with_logprobs(served, ref):
    hf, tok = ref
    client = openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
    model = client.models.list().data[0]
    assert model.id == "interop-tiny0" and model.owned_by == "llamaherd"

    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = text_of(tok, hf_greedy(hf, ids, 8))
    chat = client.chat.completions.create(model=model.id, messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == reply and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model=model.id, messages=MESSAGES, max_completion_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    prompt_ids = tok(PROMPT).input_ids
    new = hf_greedy(hf, prompt_ids, 6)
    done = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                     echo=True)
    choice = done.choices[0]
    assert choice.text == text_of(tok, prompt_ids) + text_of(tok, new)
    want = hf_logprobs(hf, prompt_ids + new)
    every = prompt_ids + new
    assert choice.logprobs.token_logprobs[0] is None
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    assert (got - want[:-1].gather(-1, torch.tensor(every[1:])[:, None])[:, 0]).abs().max() <= 1e-4

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model.id, prompt=PROMPT, max_tokens=0)


async def _stream_and_hang_up(port: int, body: dict, events: int) -> int:
    """Open a streaming request on its own connection, read `events` SSE events, close the socket; the number of
    events read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode() +
                 b"\r\n\r\n" + data)
    await writer.drain()
    seen = 0
    while seen < events:
        line = await reader.readline()
        assert line, "the server closed the stream"
        seen += line.startswith(b"data: {")
    writer.close()
    await writer.wait_closed()
    return seen


def _metrics(base_url: str) -> dict[str, float]:
    request = urllib.request.Request(base_url.removesuffix("/v1") + "/metrics",
                                     headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def test_clients_that_hang_up_mid_stream_free_their_rows(served, monkeypatch):
    """50 streams, each closed after 3 events, while generation is slowed to 5 ms a token: every request is
    cancelled in the engine (rows free, nothing queued or running, far fewer tokens generated than asked), a
    normal request then succeeds, and the process's memory returns to its level before."""
    slow_seed, max_tokens = 4242, 100
    on_sampling(monkeypatch, slow_seed, lambda: time.sleep(0.005) or 5)  # 5 ms and never EOS: a long stream
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "seed": slow_seed, "stream": True}
    server, process = served.app.state.server, psutil.Process()

    async def hang_up(k: int) -> list[int]:
        return await asyncio.gather(*(_stream_and_hang_up(served.port, body, 3) for _ in range(k)))

    def settled() -> dict[str, float]:
        deadline = time.monotonic() + 30
        while True:
            m = _metrics(served.base_url)
            if (m["llamaherd_sequences_in_flight"], m["llamaherd_running_sequences"], m["llamaherd_queue_length"],
                    m["llamaherd_kv_rows_free"]) == (0, 0, 0, 4) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    asyncio.run(hang_up(10))  # warm up: allocator pools, uvicorn's connection objects
    before = settled()
    rss_before = process.memory_info().rss
    assert asyncio.run(hang_up(50)) == [3] * 50
    after = settled()
    assert (after["llamaherd_sequences_in_flight"], after["llamaherd_running_sequences"],
            after["llamaherd_queue_length"], after["llamaherd_kv_rows_free"]) == (0, 0, 0, 4)
    generated = after["llamaherd_generation_tokens_total"] - before["llamaherd_generation_tokens_total"]
    assert 150 <= generated < 50 * max_tokens / 4  # each stream was cut short, not run to max_tokens
    assert not server.engine.requests and sorted(server.engine.slots.free) == [0, 1, 2, 3]

    client = openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
    done = client.completions.create(model="interop-tiny0", prompt=PROMPT, max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    growth = process.memory_info().rss - rss_before
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_a_client_that_hangs_up_before_a_plain_response_is_cancelled(served, monkeypatch):
    slow_seed = 4243
    on_sampling(monkeypatch, slow_seed, lambda: time.sleep(0.01) or 5)  # 10 ms and never EOS: a long reply
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "temperature": 1.0, "seed": slow_seed}).encode()
    before = _metrics(served.base_url)["llamaherd_generation_tokens_total"]
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while _metrics(served.base_url)["llamaherd_running_sequences"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while True:
        m = _metrics(served.base_url)
        state = (m["llamaherd_sequences_in_flight"], m["llamaherd_running_sequences"], m["llamaherd_kv_rows_free"])
        if state == (0, 0, 4) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert state == (0, 0, 4)
    assert m["llamaherd_generation_tokens_total"] - before < 50  # of the 100 asked


def test_herd_serve_command_keeps_the_api_key_out_of_its_logs(tiny, tmp_path):
    """The real `herd serve` process: 127.0.0.1, the KV-cache size printed at start (computed here from
    config.json), 401 without the key and 200 with it from $LLAMAHERD_API_KEY, and the key nowhere in its output
    (debug logging, including a request that sends a wrong key and one that fails)."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_herd_serve(tiny, port, log, {"LLAMAHERD_API_KEY": KEY}, "--max-len", "100", "--log-level", "debug")
    try:
        base = f"http://127.0.0.1:{port}"

        def post(path: str, body: dict, key: str | None) -> tuple[int, dict]:
            headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
            request = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, None)[0] == 401
        assert post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, KEY[:-1])[0] == 401
        status, body = post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, KEY)
        assert status == 200 and body["choices"][0]["text"]
        assert post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 999}, KEY)[0] == 400
    finally:
        proc.terminate()
        proc.wait(30)
    output = log.read_text()
    cfg = json.loads((tiny / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    mib = 2 * 3 * 100 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head * 4 / 2**20
    assert f"KV cache: 3 rows x 100 positions, {mib:.1f} MiB" in output
    assert f"http://127.0.0.1:{port}" in output and "POST /v1/completions" in output  # uvicorn's access log
    assert KEY not in output and KEY[:-1] not in output and KEY[3:12] not in output


HERD = (sys.executable, "-m", "llamaherd.cli")


def start_herd_serve(model, port: int, log, env: dict, *options: str, herd: tuple[str, ...] = HERD) -> subprocess.Popen:
    """`herd serve model` (3 rows, one thread) as a process writing to `log`, once its /health answers (a 2xx;
    urlopen raises on the rest). `herd` is the command line that runs the CLI."""
    with log.open("w") as out:
        proc = subprocess.Popen([*herd, "serve", str(model), "--port", str(port), "--max-batch", "3", *options],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"} | env)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


def test_herd_serve_on_port_0_names_the_port_it_serves_on(tiny, tmp_path):
    """--port 0: the system picks a free port, and the banner gives that port (not 0); /health answers there."""
    import re

    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*HERD, "serve", str(tiny), "--port", "0", "--max-batch", "1"], stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        port = int(found.group(1))
        assert port != 0
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    assert answer.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_herd_serve_finishes_the_streams_in_flight_on_sigterm_or_ctrl_c_then_exits_0(tiny, tmp_path, sig):
    """The command runs the engine on its main thread and uvicorn on another, so it handles the signals itself:
    as uvicorn would, a stream already running gets all its tokens, then the process ends cleanly."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_herd_serve(tiny, port, log, {}, "--max-len", "256")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as stream:
            first = stream.readline()
            proc.send_signal(sig)
            rest = stream.read().decode()
        assert first.startswith(b"data: ") and rest.count("data: ") > 100  # most of the stream came after the signal
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest.replace(" ", "")
        assert proc.wait(30) == 0, log.read_text()
    finally:
        proc.kill()
    assert "Application shutdown complete" in log.read_text()


def test_herd_serve_called_from_a_thread_serves(tiny, tmp_path):
    """Off the main thread (signals are the main thread's), the command keeps uvicorn and the engine thread."""
    port, log = free_port(), tmp_path / "serve.log"
    script = ("import sys, threading\nfrom llamaherd.cli import main\n"
              "t = threading.Thread(target=main, args=(sys.argv[1:],))\nt.start()\nt.join()\n")
    proc = start_herd_serve(tiny, port, log, {}, herd=(sys.executable, "-c", script))
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 3
    finally:
        proc.kill()
        proc.wait(30)


def test_a_port_out_of_range_is_a_one_line_error(tmp_path, capsys):
    from llamaherd.cli import main

    assert main(["serve", str(tmp_path / "no-such-model"), "--port", "65536"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --port must be between 0 and 65535, got 65536"]


@pytest.mark.slow
def test_lm_eval_local_completions_over_http_predicts_as_herd_eval(shared_dir, tmp_path, monkeypatch):
    """lm-eval's local-completions model (as `lm_eval --model local-completions --model_args base_url=...`
    builds it) on ARC-Challenge 25-shot, 4 docs, against this server: the same per-item predictions as `herd
    eval` (harness protocol), log-likelihoods within 1e-3."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from llamaherd.evaluate.reference import compare, export_hf, local_data_dir, run_lm_eval
    from llamaherd.evaluate.runner import EvalOptions, evaluate
    from llamaherd.evaluate.tasks import resolve_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = export_hf(None, tmp_path / "smollm2-hf")
    data_dir = local_data_dir(shared_dir / "benchmarks", tmp_path / "data", n_validation=100)
    out = tmp_path / "herd-eval"
    results = evaluate(EvalOptions(model=str(model_dir), protocol="harness", tasks=["arc_challenge"], limit=4,
                                   batch_size=4, output=out, data_dir=data_dir, device="cpu", progress=False))
    loaded = load_model(model_dir)
    max_len = loaded.config.block_size
    app = create_app(loaded, ServeConfig(max_batch=2, max_len=max_len))
    with ServerThread(app) as server:
        lm = get_model("local-completions").create_from_arg_string(
            f"base_url={server.base_url}/completions,model={model_dir.name},tokenizer={model_dir},"
            f"tokenizer_backend=huggingface,max_length={max_len},num_concurrent=1,max_retries=1", {"batch_size": 1})
        peer = run_lm_eval(resolve_tasks("arc_challenge", data_dir), model_dir, 4, 1, "cpu", lm)
    [comparison] = compare(out, results, peer).values()
    assert comparison.n_docs == 4 and peer.n_requests == results["timings"]["requests"]
    assert comparison.same_prediction == 4, comparison
    assert comparison.max_logprob_diff <= 1e-3, comparison
