"""`herd serve` without a socket (starlette's TestClient): the OpenAI endpoints against transformers and the
in-process engine, OpenAI's error bodies, the API key, the queue limit, an injected engine fault and a fuzz of
request bodies. Sockets, disconnects and the official clients are in test_serve_interop.py."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
from eval_tiny import save_tiny_eval_model
from starlette.testclient import TestClient

from llamaherd.engine import Engine, SamplingParams
from llamaherd.load import load_model
from llamaherd.serve.app import ServeConfig, create_app

# A template that writes the BOS itself, so transformers' apply_chat_template and llamaherd give the same ids.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What boils at zero?"}]
EOS = 2


def save_tiny_chat_model(out):
    """The tiny random Llama + BPE tokenizer of eval_tiny, with TEMPLATE as its chat template."""
    save_tiny_eval_model(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("serve-tiny"))


def hf_reference(path):
    """transformers' model and tokenizer on the same files: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def ref(tiny):
    return hf_reference(tiny)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny)


def serve(loaded, **kw) -> TestClient:
    return TestClient(create_app(loaded, ServeConfig(**{"max_batch": 2, "max_len": 64} | kw)))


@pytest.fixture
def client(loaded):
    with serve(loaded) as c:
        yield c


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, stopping at EOS (kept, as the server counts it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                          pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def text_of(tok, ids: list[int]) -> str:
    """The text the server returns for ids: without control tokens, as transformers decodes them so."""
    return tok.decode(ids, skip_special_tokens=True)


def assert_openai_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# ---- endpoints against transformers and the in-process engine ------------------------------------------------

def test_completion_echo_logprobs_equal_transformers_and_the_engine(client, ref, loaded):
    hf, tok = ref
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3,
                                             "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "serve-tiny0"
    choice = body["choices"][0]
    ids = tok(PROMPT).input_ids  # <s> first, as the tokenizer's post-processor adds it
    new = hf_greedy(hf, ids, 5)
    assert choice["text"] == text_of(tok, ids) + text_of(tok, new)
    assert choice["finish_reason"] == ("stop" if EOS in new else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(new),
                             "total_tokens": len(ids) + len(new)}

    lp = choice["logprobs"]
    every = ids + new
    want = hf_logprobs(hf, every)
    assert lp["tokens"] == [tok.decode([i]) for i in every]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:])
    assert (got - want[:-1].gather(-1, torch.tensor(every[1:])[:, None])[:, 0]).abs().max() <= 1e-4
    for top, row in zip(lp["top_logprobs"][1:], want[:-1]):
        best = row.topk(3)
        assert {tok.decode([i]) for i in best.indices.tolist()} <= set(top)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert "".join(choice["text"][a:b] for a, b in zip(offsets, offsets[1:] + [len(choice["text"])])) == \
        choice["text"]

    # exactly what the in-process engine computes for the same ids
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=64)
    request = engine.add_request(ids, SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=True))
    list(engine.stream())
    mine = [None] + [e.logprob for e in request.prompt_logprobs[1:]] + \
        [e.logprob for e in request.completions[0].logprobs]
    assert lp["token_logprobs"] == mine


def test_lm_eval_reads_the_continuation_loglikelihood_from_the_echo(client, ref):
    """What lm-eval's local-completions sends for a log-likelihood request (token ids, echo, logprobs=1,
    max_tokens=1, temperature 0), parsed by lm-eval's own code, equals transformers' sum over the continuation."""
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    hf, tok = ref
    context, continuation = tok("Question: What boils?\nAnswer:").input_ids, tok(" water").input_ids[1:]
    r = client.post("/v1/completions", json={"model": "serve-tiny0", "prompt": [context + continuation],
                                             "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                             "echo": True})
    assert r.status_code == 200, r.text
    [(loglik, greedy)] = lm_eval_api.LocalCompletionsAPI.parse_logprobs(r.json(), ctxlens=[len(context)])
    want = hf_logprobs(hf, context + continuation)
    targets = torch.tensor(continuation)
    rows = want[len(context) - 1:-1]
    assert loglik == pytest.approx(rows.gather(-1, targets[:, None]).sum().item(), abs=1e-4)
    assert greedy == bool((rows.argmax(-1) == targets).all())


def test_completion_prompts_as_token_lists_and_n(client, ref):
    hf, _ = ref
    prompts = [[1, 40, 41, 7], [1, 9, 30]]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 4, "temperature": 0, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    _, tok = ref
    for k, c in enumerate(choices):
        assert c["text"] == text_of(tok, hf_greedy(hf, prompts[k // 2], 4))
    single = client.post("/v1/completions", json={"prompt": prompts[1], "max_tokens": 4, "temperature": 0})
    assert single.json()["choices"][0]["text"] == choices[2]["text"]


def test_chat_completion_uses_the_template_and_equals_transformers(client, ref):
    hf, tok = ref
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS
    new = hf_greedy(hf, ids, 6)
    body = {"model": "serve-tiny0", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text_of(tok, new)}
    assert choice["finish_reason"] == ("stop" if EOS in new else "length")
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == len(new)
    want = hf_logprobs(hf, ids + new)[len(ids) - 1:-1]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [tok.decode([i]) for i in new]
    assert max(abs(c["logprob"] - row[i].item()) for c, row, i in zip(content, want, new)) <= 1e-4
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == \
        [[tok.decode([i]) for i in row.topk(2).indices.tolist()] for row in want]

    # streamed: the deltas add up to the same reply; a usage chunk, then [DONE]
    with client.stream("POST", "/v1/chat/completions",
                       json=body | {"stream": True, "logprobs": False, "top_logprobs": None,
                                    "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]


def test_stop_strings_seed_and_streamed_completions(client):
    free = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    stop = text[4:6]
    cut = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                               "stop": [stop, "zzz"]}).json()["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"

    sampled = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 3, "n": 2}
    a, b = (client.post("/v1/completions", json=sampled).json()["choices"] for _ in range(2))
    assert [c["text"] for c in a] == [c["text"] for c in b] and a[0]["text"] != a[1]["text"]
    with client.stream("POST", "/v1/completions", json=sampled | {"stream": True}) as s:
        chunks = [json.loads(x.removeprefix("data: ")) for x in s.iter_lines() if x and x != "data: [DONE]"]
    for i in range(2):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) == a[i]["text"]


def test_models_health_and_metrics(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "serve-tiny0" and model["owned_by"] == "llamaherd" and model["object"] == "model"
    assert model["metadata"]["fingerprint"].startswith("sha256:") and model["max_model_len"] == 64
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    text = client.get("/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["llamaherd_queue_length"] == "0" and samples["llamaherd_running_sequences"] == "0"
    assert samples["llamaherd_kv_rows_free"] == "2"
    assert int(samples["llamaherd_generation_tokens_total"]) >= 1
    assert float(samples["llamaherd_generation_tokens_per_second"]) > 0
    assert samples['llamaherd_http_requests_total{path="/v1/completions",status="200"}'] == "1"
    assert samples['llamaherd_http_requests_total{path="/v1/completions",status="400"}'] == "1"


# ---- bad input: OpenAI's error bodies ---------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, ["not valid JSON"]),
    ("/v1/completions", b'[1, 2]', 400, ["JSON object"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, ["max_tokens", "integer"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ["max_tokens", "greater than or equal to 1"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, ["max_tokens"]),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, ["temperature"]),
    ("/v1/completions", {"prompt": "x", "stream": 1}, 400, ["stream", "boolean"]),
    ("/v1/completions", {"prompt": ["a", 3]}, 400, ["prompt: must be a string"]),
    ("/v1/completions", {"prompt": []}, 400, ["prompt: is empty"]),
    ("/v1/completions", {"prompt": [5, 999]}, 400, ["prompt ids must be integers in [0, 128)"]),
    ("/v1/completions", {"max_tokens": 3}, 400, ["prompt: required"]),
    ("/v1/completions", {"prompt": "x", "max_token": 3}, 400, ["Unrecognized request argument", "max_token"]),
    ("/v1/completions", {"prompt": "x", "logit-bias": None}, 400, ["Unrecognized request argument", "logit-bias"]),
    ("/v1/completions", {"prompt": "x", "str": 1}, 400, ["Unrecognized request argument", "argument supplied: str"]),
    ("/v1/completions", {"prompt": "x", "a b\nc": 1}, 400, ["Unrecognized request argument", "a b\\nc"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "body": 1}]}, 400,
     ["Unrecognized request argument", "messages.0.body"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400,
     ["stream_options: only allowed when stream is true"]),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, ["presence_penalty", "not implemented"]),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, ["gpt-4", "serve-tiny0"]),
    ("/v1/completions", {"prompt": [7] * 64}, 400, ["maximum context length is 64 tokens", "prompt has 64 tokens"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 80}]}, 400,
     ["maximum context length is 64 tokens", "but the prompt has"]),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 62}, 400, ["64 tokens", "65 tokens", "3 in the prompt",
                                                                        "62 for the completion"]),
    ("/v1/completions", {"prompt": "x", "n": 10**30}, 400, ["n"]),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, ["seed"]),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, ["stop: must be a non-empty string"]),
    ("/v1/chat/completions", {"messages": []}, 400, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, ["messages.0.role"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, ["messages.0.content"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, ["top_logprobs needs logprobs"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, ["max_completion_tokens"]),
    ("/v1/completions", b"", 400, ["body must be a JSON object"]),
    ("/v1/completions", '{"prompt": "\u00e9"}'.encode("latin-1"), 400, ["could not be read", "UTF-8"]),
    ("/v1/nothing", {}, 404, ["POST /v1/nothing: no such path", "POST /v1/completions"]),
])
def test_bad_requests_get_openai_errors(client, path, body, status, words):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    error = assert_openai_error(r, status, *words)
    assert error["type"] == ("not_found_error" if path == "/v1/nothing" else "invalid_request_error")


def test_a_wrong_method_names_the_right_one(client):
    for method, path, allowed in (("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
                                  ("DELETE", "/v1/completions", "POST"), ("POST", "/v1/models", "GET")):
        error = assert_openai_error(client.request(method, path), 405, f"{method} {path}", f"use {allowed}")
        assert error["type"] == "invalid_request_error"


def test_non_finite_numbers_are_refused(client):
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                b'{"prompt": "x", "temperature": 1e999}'):
        assert_openai_error(client.post("/v1/completions", content=raw, headers={"Content-Type":
                                                                                  "application/json"}), 400)


def test_optional_fields_sent_as_null_take_their_defaults_as_openai_reads_them(client):
    """OpenAI's API reference (and openai-python's Optional[...] request types) mark the optional fields nullable:
    a client may send null for 'not given'. The same greedy request with every other optional field null gives
    the same choices; a required field sent as null is still a 400 naming it."""
    nulls = {name: None for name in ("model", "top_p", "top_k", "repetition_penalty", "ignore_eos", "n", "stream",
                                     "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
                                     "user")}
    for path, body, extra in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 4},
                               {"logprobs": None, "echo": None, "best_of": None}),
                              ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4},
                               {"max_completion_tokens": None, "logprobs": None, "top_logprobs": None})):
        plain = client.post(path, json=body | {"temperature": 0})
        nulled = client.post(path, json=body | {"temperature": 0} | nulls | extra)
        assert plain.status_code == nulled.status_code == 200, nulled.text
        assert nulled.json()["choices"] == plain.json()["choices"]
        assert client.post(path, json=body | {"temperature": None, "seed": 3}).status_code == 200
    assert_openai_error(client.post("/v1/completions", json={"prompt": None}), 400, "prompt")
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": None}), 400, "messages")


def test_text_leaves_out_control_tokens_as_openai_and_vllm_do(client, ref):
    hf, tok = ref
    ids = tok("fox <s> dog").input_ids  # <s> at the start and inside the prompt
    assert ids.count(1) == 2
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 40, "temperature": 1.0, "seed": 0, "n": 4,
                                             "logprobs": 0, "echo": True})
    assert r.status_code == 200, r.text
    generated_bos = 0
    for choice in r.json()["choices"]:
        lp, text = choice["logprobs"], choice["text"]
        assert lp["tokens"][:len(ids)] == [tok.decode([i]) for i in ids]  # logprobs still name every token
        generated_bos += lp["tokens"][len(ids):].count("<s>")
        assert text.startswith(text_of(tok, ids)) and "<s>" not in text and "</s>" not in text
        ends = lp["text_offset"][1:] + [len(text)]
        pieces = [text[a:b] for a, b in zip(lp["text_offset"], ends)]
        assert all(p == "" for p, t in zip(pieces, lp["tokens"]) if t in ("<s>", "</s>"))
    assert generated_bos >= 1  # the random model does sample <s>: this checks the completion's text too
    chat = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20, "temperature": 1.0,
                                                     "seed": 0, "n": 4}).json()
    assert all("<s>" not in c["message"]["content"] for c in chat["choices"])


def test_the_stop_limit_counts_strings_not_characters(client):
    long_stop = "Question: and what comes next?"  # 30 characters, one string
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": long_stop})
    assert r.status_code == 200, r.text
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": [long_stop]}).status_code \
        == 200
    assert_openai_error(client.post("/v1/completions", json={"prompt": PROMPT, "stop": ["x"] * 17}), 400,
                        "stop: must be", "at most 16")


def test_a_top_p_below_float32s_range_keeps_the_likeliest_token(client, ref):
    hf, tok = ref
    ids = tok(PROMPT).input_ids
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 1.0, "top_p": 1e-300,
                                             "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text_of(tok, hf_greedy(hf, ids, 6))  # the nucleus is the argmax


def test_api_key(loaded):
    with serve(loaded, api_key="s3cret-key") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            error = assert_openai_error(c.get("/v1/models", headers=headers), 401, "API key")
            assert error["code"] == "invalid_api_key" and "s3cret" not in json.dumps(error)
            assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401)
        assert c.get("/health").status_code == 200  # liveness probes need no key
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "bearer s3cret-key"}).status_code == 200  # RFC 7235
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Basic s3cret-key"}), 401)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=ok).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(loaded, monkeypatch):
    gate = threading.Event()
    on_sampling(monkeypatch, HOLD_SEED, lambda: gate.wait(30))  # requests with this seed wait for the gate
    with serve(loaded, max_batch=1, max_queue=1) as c:
        server, codes = c.app.state.server, []
        held = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "seed": HOLD_SEED}
        threads = [threading.Thread(target=lambda: codes.append(c.post("/v1/completions", json=held).status_code))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while server.outstanding < 2 and time.monotonic() < deadline:  # one running, one queued
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        error = assert_openai_error(r, 429, "busy")
        assert r.headers["Retry-After"] == "1" and error["code"] == "rate_limit_exceeded"
        gate.set()
        for t in threads:
            t.join(30)
        assert codes == [200, 200]
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_the_queue_counts_sequences_not_requests(loaded, monkeypatch):
    """Each of a request's n completions holds a row, so --max-batch + --max-queue bounds sequences: with room
    for 3, one request of n=4 is refused outright (400, naming n; 10,000 prompts: naming the prompt, before any
    is tokenized), and while a request of n=2 runs, another of n=2 gets 429 (counting requests, both would have
    been let in); when it ends, the count is back to 0."""
    gate = threading.Event()
    on_sampling(monkeypatch, HOLD_SEED, lambda: gate.wait(30))
    with serve(loaded, max_batch=1, max_queue=2) as c:
        server, codes = c.app.state.server, []
        error = assert_openai_error(c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 4}),
                                    400, "4 sequences", "at most 3")
        assert error["param"] == "n" and server.outstanding == 0
        encoded = []  # a huge prompt list is refused before any of it is tokenized
        real_encode = server.tokenizer.encode
        monkeypatch.setattr(server.tokenizer, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
        error = assert_openai_error(c.post("/v1/completions", json={"prompt": [PROMPT] * 10_000, "max_tokens": 2}),
                                    400, "10000 sequences", "at most 3")
        assert error["param"] == "prompt" and not encoded
        held = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "seed": HOLD_SEED, "n": 2}
        thread = threading.Thread(target=lambda: codes.append(c.post("/v1/completions", json=held).status_code))
        thread.start()
        deadline = time.monotonic() + 30
        while server.outstanding < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.outstanding == 2
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 2})
        assert_openai_error(r, 429, "2 sequence(s)", "at most 3")
        gate.set()
        thread.join(30)
        assert codes == [200] and server.outstanding == 0
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 2}).status_code == 200


def test_a_body_over_the_limit_gets_413_and_the_server_goes_on(loaded, monkeypatch):
    """MAX_BODY_BYTES (lowered here to 4 KiB) bounds a body by its Content-Length, and a chunked body (no
    length) as it arrives: parsing gigabytes of JSON would take the server's memory."""
    import llamaherd.serve.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 4096)
    body = json.dumps({"prompt": "x " * 3000, "max_tokens": 2}).encode()
    with serve(loaded) as c:
        assert_openai_error(c.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                            413, "over 4,096 bytes")
        pieces = iter([body[i:i + 1000] for i in range(0, len(body), 1000)])
        chunked = c.post("/v1/completions", content=pieces, headers={"content-type": "application/json"})
        assert_openai_error(chunked, 413, "over 4,096 bytes")
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
        assert c.app.state.server.outstanding == 0


# ---- faults and fuzz --------------------------------------------------------------------------------------------

FAULT_SEED, HOLD_SEED = 666, 777


def on_sampling(monkeypatch, seed: int, action) -> None:
    """Run `action` whenever the engine samples for a request with this seed (inside the engine's step); what it
    returns, unless None, is the sampled token."""
    import llamaherd.engine.engine as engine_module

    real = engine_module.sample_next

    def sample_next(logits, params, generator):
        if params.seed == seed and (token := action()) is not None:
            return torch.tensor([token])
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)


@pytest.fixture
def faulty_sampling(monkeypatch):
    """Sampling raises for requests with seed FAULT_SEED: an injected fault inside the engine's step."""
    def fault():
        raise RuntimeError("injected fault")

    on_sampling(monkeypatch, FAULT_SEED, fault)


def test_a_fault_in_the_engine_fails_only_its_request(loaded, faulty_sampling):
    with serve(loaded, max_batch=4) as c:
        good = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
        alone = c.post("/v1/completions", json=good).json()["choices"][0]["text"]
        results = {}

        def stream(i: int) -> None:
            with c.stream("POST", "/v1/completions", json=good | {"stream": True}) as s:
                lines = [x for x in s.iter_lines() if x]
            results[i] = (lines[-1], "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        bad = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0.5,
                                              "seed": FAULT_SEED})
        error = assert_openai_error(bad, 500, "failed")
        assert error["type"] == "server_error" and "injected" not in error["message"]
        with c.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "seed": FAULT_SEED,
                                                            "stream": True}) as s:
            events = [json.loads(x[6:]) for x in s.iter_lines() if x and x != "data: [DONE]"]
        assert events[-1]["error"]["type"] == "server_error"
        for t in threads:
            t.join(60)
        assert results == {0: ("data: [DONE]", alone), 1: ("data: [DONE]", alone)}
        assert c.post("/v1/completions", json=good).json()["choices"][0]["text"] == alone
        metrics = c.get("/metrics").text
        assert "llamaherd_engine_failures_total 2" in metrics and "llamaherd_kv_rows_free 4" in metrics


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value: wrong types, huge and negative numbers, unicode, long strings, nested junk."""
    kinds = ["int", "big", "neg", "float", "str", "unicode", "none", "bool", "list", "dict", "ids"]
    if depth > 2:
        kinds = kinds[:8]
    kind = rng.choice(kinds)
    return {
        "int": lambda: rng.randint(0, 100), "big": lambda: rng.choice([2**63, 10**40, 1e308, -1e308, 2**64 + 1]),
        "neg": lambda: rng.choice([-1, -2**63 - 1, -0.5, -1e-9]), "float": lambda: rng.uniform(-3, 3),
        "str": lambda: rng.choice(["", "x", "5", "null", "true", "NaN", "\x00", "-1"]),
        "unicode": lambda: rng.choice(["héllo wörld", "日本語のテキスト", "🦙" * 50, "\ud83e", "Ω≈ç√∫"]),
        "none": lambda: None, "bool": lambda: rng.random() < 0.5,
        "list": lambda: [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))],
        "dict": lambda: {rng.choice(["role", "content", "type", "text", "x"]): _junk(rng, depth + 1)
                         for _ in range(rng.randint(0, 3))},
        "ids": lambda: [rng.randint(-5, 200) for _ in range(rng.randint(0, 70))],
    }[kind]()


VALID = {"temperature": [0, 0.7, 2], "top_p": [0.1, 1], "top_k": [1, 5, None], "n": [1, 2, 3], "stream": [True, False],
         "stop": ["a", ["x", "\u00e9"], None], "seed": [0, -5, 2**62], "logprobs": [None, 0, 5], "echo": [True, False],
         "max_tokens": [1, 4], "repetition_penalty": [1.0, 1.3], "stream_options": [{"include_usage": True}]}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stop", "seed", "logprobs", "top_logprobs", "echo", "stream_options", "repetition_penalty",
          "presence_penalty", "best_of", "user", "unknown_field"]


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_keeps_answering(client):
    rng = random.Random(1234)
    big = "llama " * 200_000  # 1.2 MB
    raw = [b"", b"{", b"null", b'"text"', b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "n": 1' + b" " * 10**6,
           json.dumps({"prompt": big}).encode(), json.dumps({"messages": [{"role": "user", "content": big}]}).encode(),
           json.dumps({"prompt": "x", "stop": big, "max_tokens": 3}).encode(), b'{"prompt": "\\ud800"}',
           "{\"prompt\": \"\u00e9\"}".encode("latin-1"), b'{"prompt": [[1, 2], "x"]}', b'{"prompt": 1e999}']
    statuses: dict[int, int] = {}
    for i in range(400):
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        if i < len(raw) * 2:
            content = raw[i // 2]
        else:  # a third each: valid settings; valid but for one junk field; junk
            chat = path == "/v1/chat/completions"
            body = {"messages": MESSAGES} if chat else {"prompt": rng.choice([[1, 5, 9], "fox", ["a", "b"]])}
            valid = VALID | ({"logprobs": [True, False], "top_logprobs": [None]} if chat else {})
            body |= {name: rng.choice(valid[name]) for name in rng.sample(sorted(valid), rng.randint(1, 8))
                     if not (chat and name == "echo")}
            if not body.get("stream"):  # OpenAI refuses stream_options without stream
                body.pop("stream_options", None)
            if i % 3 == 1:
                body[rng.choice(FIELDS)] = _junk(rng)
            elif i % 3 == 2:
                body = {name: _junk(rng) for name in rng.sample(FIELDS, rng.randint(1, 6))}
            content = json.dumps(body).encode()
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (content[:300], r.text[:500])
        if r.status_code != 200:
            assert_openai_error(r, r.status_code)
    assert statuses.get(200, 0) >= 100 and statuses.get(400, 0) >= 100, statuses
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    server = client.app.state.server
    assert server.outstanding == 0 and server.runner.free_slots == 2


# ---- a PEFT adapter as MODEL ------------------------------------------------------------------------------------

def test_a_peft_adapter_directory_is_served_with_its_base_and_lineage(tiny, ref, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    adapter = tmp_path / "acme-adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(tiny)}))
    lineage = {"schema": 1, "child": {"name": "acme", "path": str(adapter), "fingerprint": None},
               "parent": {"name": "serve-tiny0", "path": str(tiny), "fingerprint": "sha256:0"},
               "method": "lora-sft", "data_files": [], "hyperparameters": {}, "final_metrics": {}, "date": "2024"}
    (adapter / "lineage.json").write_text(json.dumps(lineage))

    hf, tok = ref
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter).eval()
    ids = tok(PROMPT).input_ids
    with serve(load_model(adapter)) as c:
        model = c.get("/v1/models").json()["data"][0]
        assert model["id"] == "acme" and model["metadata"]["base"]["name"] == "serve-tiny0"
        assert model["metadata"]["lineage"]["parent"]["name"] == "serve-tiny0"
        text = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert text["choices"][0]["text"] == text_of(tok, hf_greedy(peft, ids, 8))
    assert text_of(tok, hf_greedy(peft, ids, 8)) != text_of(tok, hf_greedy(hf, ids, 8))  # the adapter matters


def test_a_busy_port_is_a_one_line_error_before_the_model_loads(tmp_path, capsys):
    import socket

    from llamaherd.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        missing_model = tmp_path / "no-such-model"  # never loaded: the port is checked first
        assert main(["serve", str(missing_model), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pass another --port, "
                   "or --host an address of this machine"]


@pytest.mark.parametrize("device, message", [
    ("gpu", "error: --device 'gpu' is not a device; use cpu, cuda or cuda:N"),
    ("cuda:99", "error: --device cuda:99: no such CUDA device here ({n} found); use --device cpu"),
    ("meta", "error: --device meta: herd serve runs on cpu or cuda"),
])
def test_a_bad_device_is_a_one_line_error_before_the_model_loads(tmp_path, capsys, device, message):
    from llamaherd.cli import main

    missing_model = tmp_path / "no-such-model"  # never loaded: the device is checked first
    assert main(["serve", str(missing_model), "--port", "0", "--device", device]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message.format(n=torch.cuda.device_count())]


def test_ignore_eos_generates_past_the_end_of_sequence_token(client, ref):
    """Token ids [24, 7, 9] make this tiny model say EOS after 29 tokens (transformers' greedy): with ignore_eos
    (vLLM's and llama.cpp's field, for benchmarks) the completion runs on to max_tokens, as transformers does
    with no EOS."""
    hf, tokenizer = ref
    prompt = [24, 7, 9]
    stops = hf_greedy(hf, prompt, 40)
    assert stops[-1] == EOS and len(stops) < 40
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "logprobs": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["finish_reason"] == "stop" and len(plain["logprobs"]["tokens"]) == len(stops)
    longer = client.post("/v1/completions", json=body | {"ignore_eos": True}).json()
    assert longer["choices"][0]["finish_reason"] == "length" and longer["usage"]["completion_tokens"] == 40
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert want[:len(stops)] == stops
    assert longer["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
