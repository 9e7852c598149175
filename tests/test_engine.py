"""The generation engine: continuous batching, chunked prefill, prefix reuse and logprobs against transformers."""

import copy
import dataclasses

import pytest
import torch
from hf_tiny import save_hf_model

from llamaherd import kernels
from llamaherd.engine import Engine, SamplingParams
from llamaherd.errors import InputError
from llamaherd.generate import stream_text
from llamaherd.load import load_gpt

NO_STOP = frozenset()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A tiny random GQA LLaMA: its directory and the transformers model saved there."""
    path = tmp_path_factory.mktemp("llama-gqa")
    return path, save_hf_model("llama-gqa", path)


@pytest.fixture(scope="module")
def models(gqa):
    path, hf = gqa
    return hf, load_gpt(path)


def hf_greedy(hf, prompt: list[int], n: int, **kw) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): log-softmax of transformers' logits at each position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_ids=NO_STOP, **kw)


PROMPTS = [[5, 17, 33, 9, 60, 71, 23], [40], [3, 4, 5], list(range(10, 40)), [90, 91, 92, 93, 94, 95, 96, 97, 98]]


def test_greedy_batch_with_joins_equals_transformers_one_at_a_time(models):
    """Mixed prompt lengths, more requests than rows, requests joining mid-way, chunked prefill: each output
    equals transformers' greedy generate of that prompt alone."""
    hf, ours = models
    engine = Engine(ours, max_batch=3, max_len=64, prefill_chunk=5)
    lengths = [12, 5, 9, 7, 10]
    requests = [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS[:2], lengths[:2])]
    for _ in range(3):
        engine.step()
    requests += [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS[2:], lengths[2:])]
    list(engine.stream())
    for request, prompt, n in zip(requests, PROMPTS, lengths):
        assert request.completions[0].token_ids == hf_greedy(hf, prompt, n)
        assert request.completions[0].finish_reason == "length"
    many = engine.generate_many(PROMPTS[:3], greedy(6))
    assert [r.completions[0].token_ids for r in many] == [hf_greedy(hf, p, 6) for p in PROMPTS[:3]]


class PrefillPasses:
    """Stands in for the engine's model: records the (rows, positions) of each pass over several positions (a
    prefill) and forwards everything to the model."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, idx, **kwargs):
        if idx.shape[1] > 1:
            self.shapes.append((idx.shape[0], idx.shape[1]))
        return self.model(idx, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_burst_of_prompts_is_prefilled_in_one_pass(models):
    """Prompts waiting together run their chunks as one forward pass, rows padded to the longest chunk (within the
    chunk budget; a prompt of 30 ids and one of 1 share it): one pass, and each output still equals transformers'
    greedy generate of that prompt alone. With a budget of 8 (ids to compute: 6, 0, 2, 29, 8), by hand: [6],
    [2, 4 of 29], [8], [8], [8], [1, 4 of 8], [4]: 7 passes."""
    hf, ours = models

    for chunk, passes in ((512, 1), (8, 7)):
        engine = Engine(ours, max_batch=5, max_len=64, prefill_chunk=chunk)
        engine.model = recording = PrefillPasses(ours)
        requests = [engine.add_request(p, greedy(4)) for p in PROMPTS]
        list(engine.stream())
        assert len(recording.shapes) == passes
        for request, prompt in zip(requests, PROMPTS):
            assert request.completions[0].token_ids == hf_greedy(hf, prompt, 4)


def test_a_chunk_that_would_pad_a_pass_too_much_gets_a_pass_of_its_own(models):
    """Chunks of 4 and 60 ids: padding the short row to 60 would add 56 rows (> PAD_ROWS = 48), so they run as two
    passes in the same step; 4 and 40 (36 rows of padding) still share one. Each output equals transformers'
    greedy generate alone."""
    from llamaherd.engine.engine import PAD_ROWS

    hf, ours = models
    assert PAD_ROWS == 48  # the counts below are worked out for it
    for long, want in ((61, [(1, 4), (1, 60)]), (41, [(2, 40)])):
        prompts = [[9, 8, 7, 6, 5], [t % 90 + 3 for t in range(long)]]
        engine = Engine(ours, max_batch=2, max_len=64)
        engine.model = recording = PrefillPasses(ours)
        requests = [engine.add_request(p, greedy(3)) for p in prompts]
        engine.step()
        assert recording.shapes == want
        list(engine.stream())
        for request, prompt in zip(requests, prompts):
            assert request.completions[0].token_ids == hf_greedy(hf, prompt, 3)


def test_graphed_decode_steps_give_transformers_tokens(models):
    """The CUDA-graph step's static inputs, key buckets (64 then 128 positions) and padding rows (3 running rows
    padded to 4, writing a scratch row), run without the capture (a CPU has no CUDA graphs): each output equals
    transformers' greedy generate alone."""
    from llamaherd.engine.cuda_graphs import GraphedDecode
    from llamaherd.model import SlotCache

    hf, ours = models
    engine = Engine(ours, max_batch=3, max_len=160, prefill_chunk=16)
    engine.cache = SlotCache(ours.config, 4, 160, torch.float32)  # as Engine sizes it on a GPU: a scratch row
    engine.graphs = GraphedDecode(ours, engine.cache, scratch=3, max_graphs=4, capture=False)
    prompts = [*PROMPTS, [t % 90 + 3 for t in range(70)]]  # the last one's positions pass 64: the 128 bucket
    lengths = [12, 5, 9, 7, 10, 8]
    requests = [engine.add_request(p, greedy(n)) for p, n in zip(prompts[:2], lengths[:2])]
    for _ in range(3):
        engine.step()
    requests += [engine.add_request(p, greedy(n)) for p, n in zip(prompts[2:], lengths[2:])]
    seen = set()
    while engine.has_work:
        engine.step()
        seen |= set(engine.graphs.graphs)
    for request, prompt, n in zip(requests, prompts, lengths):
        assert request.completions[0].token_ids == hf_greedy(hf, prompt, n)
    assert {bucket for _, bucket, _ in seen} == {64, 128} and {rows for rows, _, _ in seen} >= {1, 2, 4}
    assert {view for *_, view in seen} == {True, False}  # rows 0, 1, ... read as a view; others gathered
    assert len(engine.graphs.graphs) <= 4


@pytest.mark.parametrize("kind", ["llama-mha", "llama-tied", "falcon-7b-style", "falcon-40b-style"])
def test_greedy_batch_equals_transformers_for_each_family(kind, tmp_path):
    hf = save_hf_model(kind, tmp_path)
    engine = Engine(load_gpt(tmp_path), max_batch=2, max_len=64, prefill_chunk=4)
    requests = engine.generate_many(PROMPTS[:3], greedy(8))
    assert [r.completions[0].token_ids for r in requests] == [hf_greedy(hf, p, 8) for p in PROMPTS[:3]]


def test_chunked_prefill_keeps_streams_running_and_gives_the_same_tokens(models):
    hf, ours = models
    long_prompt = list(range(3, 43))
    outs = {}
    for chunk in (4, 512):
        engine = Engine(ours, max_batch=2, max_len=64, prefill_chunk=chunk)
        short = engine.add_request([7, 8], greedy(20))
        engine.step()
        long = engine.add_request(long_prompt, greedy(8, logprobs=0))
        steps_with_short_only = 0
        while not long.completions[0].token_ids:
            events = engine.step()
            steps_with_short_only += all(e.request_id == short.request_id for e in events) and bool(events)
        list(engine.stream())
        outs[chunk] = long.completions[0]
        assert short.completions[0].token_ids == hf_greedy(hf, [7, 8], 20)
        if chunk == 4:  # 39 prompt tokens in chunks of 4: the short stream decodes during each of 10 steps
            assert steps_with_short_only == 9
    assert outs[4].token_ids == outs[512].token_ids == hf_greedy(hf, long_prompt, 8)
    lp4 = torch.tensor([e.logprob for e in outs[4].logprobs])
    lp512 = torch.tensor([e.logprob for e in outs[512].logprobs])
    assert torch.allclose(lp4, lp512, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_prompts_keys_and_first_logits_do_not_depend_on_how_it_was_chunked(models, gqa, precision):
    """Bit for bit, every way the engine may split a prompt: one pass, chunks of 1 to 20 positions, a prefix
    reused from another row, batched with another prompt (padding). Before one sum order per row (the prompt
    kernels for every chunk, one-position chunks included; a fixed-order RMSNorm sum) a resumed `herd synth` run
    sampled other tokens than an uninterrupted one; int8 weights too, until the prompt tiles read them."""
    if kernels.tile_lanes() != 8:
        pytest.skip("the prompt kernels serve AVX2 builds only (kernels.prompt_pass)")
    hf, ours = models
    model = {"fp32": lambda: ours, "bf16": lambda: copy.deepcopy(ours).to(torch.bfloat16),
             "int8": lambda: load_gpt(gqa[0], quantize="int8")}[precision]()
    prompt = [(7 * i + 3) % 90 + 5 for i in range(45)]
    wanted = SamplingParams(max_new_tokens=1, stop_ids=NO_STOP, logprobs=5)

    def run(chunk: int, before: list[int] | None = None, beside: list[int] | None = None):
        engine = Engine(model, max_batch=3, max_len=64, prefill_chunk=chunk)
        if before is not None:  # a prompt sharing a prefix runs first: its row's keys are reused
            engine.generate_many([before], greedy(1))
        extra = [] if beside is None else [engine.add_request(beside, greedy(1))]
        mine = engine.add_request(prompt, wanted)
        engine.step()
        if beside is not None:  # both prompts' first chunks in the first step's padded pass
            assert all(engine.slots.tokens[:2])
        list(engine.stream())
        assert all(r.done for r in extra)
        slot = next(i for i, ids in enumerate(engine.slots.tokens) if ids[:len(prompt)] == prompt)
        rows = (engine.cache.k[:, slot, :, :len(prompt) - 1], engine.cache.v[:, slot, :, :len(prompt) - 1])
        return rows, torch.tensor([lp for _, lp in mine.completions[0].logprobs[0].top], dtype=torch.float64)

    (k, v), logits = run(512)
    for chunk, before, beside in [(1, None, None), (5, None, None), (16, None, None), (20, None, None),
                                  (512, prompt[:17] + [1, 2], None), (7, prompt[:33] + [4], None),
                                  (512, None, list(range(50, 80))), (24, None, list(range(60, 70)))]:
        (k2, v2), logits2 = run(chunk, before, beside)
        assert torch.equal(k2, k) and torch.equal(v2, v), (chunk, before, beside)
        assert torch.equal(logits2, logits), (chunk, before, beside)


def test_seeded_sampling_does_not_depend_on_the_batch_and_settings_are_per_request(models):
    hf, ours = models
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=7, stop_ids=NO_STOP)
    alone = Engine(ours, max_batch=4, max_len=64).generate_many([PROMPTS[0]], sampled)[0].completions[0].token_ids

    engine = Engine(ours, max_batch=4, max_len=64, prefill_chunk=3)
    others = [engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=5, temperature=1.3, seed=1,
                                                             stop_ids=NO_STOP))]
    engine.step()
    mine = engine.add_request(PROMPTS[0], sampled)
    top1 = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=3,
                                                         stop_ids=NO_STOP))
    penalised = engine.add_request(PROMPTS[2], greedy(10, repetition_penalty=0.5))
    plain = engine.add_request(PROMPTS[2], greedy(10))
    other_seed = engine.add_request(PROMPTS[0], dataclasses.replace(sampled, seed=8))
    list(engine.stream())
    assert others[0].done
    assert mine.completions[0].token_ids == alone
    assert other_seed.completions[0].token_ids != alone
    assert alone != hf_greedy(hf, PROMPTS[0], 16)  # temperature 1 really samples
    assert top1.completions[0].token_ids == plain.completions[0].token_ids == hf_greedy(hf, PROMPTS[2], 10)
    assert penalised.completions[0].token_ids == hf_greedy(hf, PROMPTS[2], 10, repetition_penalty=0.5)
    assert penalised.completions[0].token_ids != plain.completions[0].token_ids


def test_prefix_reuse_same_tokens_and_logprobs_fewer_computed(models):
    hf, ours = models
    system = list(range(20, 44))  # 24 tokens shared
    prompts = [system + [5, 6, 7], system + [8, 9]]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11, stop_ids=NO_STOP, logprobs=2)
    results = {}
    for reuse in (True, False):
        engine = Engine(ours, max_batch=4, max_len=64, prefill_chunk=8, prefix_reuse=reuse)
        k_samples = engine.add_request(prompts[0], sampled, n=3)
        other = engine.add_request(prompts[1], sampled)
        list(engine.stream())
        results[reuse] = (k_samples, other, engine.computed_tokens)
    (k_on, other_on, computed_on), (k_off, other_off, computed_off) = results[True], results[False]
    for on, off in zip([*k_on.completions, *other_on.completions], [*k_off.completions, *other_off.completions]):
        assert on.token_ids == off.token_ids
        assert torch.allclose(torch.tensor([e.logprob for e in on.logprobs]),
                              torch.tensor([e.logprob for e in off.logprobs]), atol=1e-5)
        assert [[i for i, _ in e.top] for e in on.logprobs] == [[i for i, _ in e.top] for e in off.logprobs]
    assert len({tuple(c.token_ids) for c in k_on.completions}) > 1  # n samples differ (seed + index)
    decoded = 4 * 6  # every completion decodes 6 tokens, its prompt's last id included in the first
    assert computed_off == 3 * 26 + 25 + decoded  # each prompt less its last id, per completion
    assert computed_on == 26 + 1 + decoded  # prompt 0 once; prompt 1 reuses the 24 system tokens, computes 1


def test_logprobs_and_prompt_logprobs_equal_transformers(models):
    hf, ours = models
    prompt = PROMPTS[0] + PROMPTS[4]
    engine = Engine(ours, max_batch=2, max_len=64, prefill_chunk=5)
    request = engine.add_request(prompt, greedy(8, logprobs=3, prompt_logprobs=True), n=2)
    list(engine.stream())
    out = request.completions[1]
    ref = hf_logprobs(hf, prompt + out.token_ids)
    got = torch.tensor([e.logprob for e in out.logprobs])
    want = ref[len(prompt) - 1:-1].gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (got - want).abs().max() <= 1e-4
    for e, row in zip(out.logprobs, ref[len(prompt) - 1:-1]):
        values, ids = row.topk(3)
        assert [i for i, _ in e.top] == ids.tolist()
        assert max(abs(v - w) for (_, v), w in zip(e.top, values.tolist())) <= 1e-4

    scored = request.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    assert [e.token_id for e in scored[1:]] == prompt[1:]
    want = ref[:len(prompt) - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert (torch.tensor([e.logprob for e in scored[1:]]) - want).abs().max() <= 1e-4
    assert [[i for i, _ in e.top] for e in scored[1:]] == ref[:len(prompt) - 1].topk(3).indices.tolist()


def test_cancel_frees_the_slot_at_once(models):
    hf, ours = models
    engine = Engine(ours, max_batch=1, max_len=64)
    first = engine.add_request(PROMPTS[0], greedy(50))
    engine.step()
    second = engine.add_request(PROMPTS[2], greedy(6))
    engine.step()
    assert not second.completions[0].token_ids and engine.slots.free == []  # waiting for the only row
    assert engine.cancel(first.request_id) and not engine.cancel(first.request_id)
    assert first.completions[0].finish_reason == "cancelled" and engine.slots.free == [0]
    events = engine.step()
    assert [e.request_id for e in events] == [second.request_id]
    list(engine.stream())
    assert second.completions[0].token_ids == hf_greedy(hf, PROMPTS[2], 6)
    assert len(first.completions[0].token_ids) == 2


class CharTokenizer:
    """Id i reads as chr(ord('a') + i % 26); enough to test stop strings and stop ids."""

    def __init__(self, stop_ids=()):
        self.stop_ids = set(stop_ids)

    def stream_decoder(self, skip_special_tokens: bool = False):
        class Decoder:
            def push(self, t):
                return chr(ord("a") + t % 26)

            def flush(self):
                return ""

        return Decoder()


def test_stop_strings_and_stop_ids_end_a_completion_as_generate_does(models):
    _, ours = models
    free = Engine(ours, CharTokenizer(), max_batch=2, max_len=64).generate_many([PROMPTS[0]], greedy(20))[0]
    text = free.completions[0].text
    stop = text[6:8]
    params = SamplingParams(max_new_tokens=20, stop_strings=[stop])
    engine = Engine(ours, CharTokenizer(), max_batch=2, max_len=64)
    request = engine.add_request(PROMPTS[0], params)
    streamed = "".join(e.text for e in engine.stream())
    expected = text[: text.index(stop)]
    assert streamed == request.completions[0].text == expected
    assert expected == "".join(stream_text(ours, CharTokenizer(), PROMPTS[0], params))
    assert request.completions[0].finish_reason == "stop"

    stop_id = free.completions[0].token_ids[4]
    first = free.completions[0].token_ids.index(stop_id)
    engine = Engine(ours, CharTokenizer(stop_ids={stop_id}), max_batch=2, max_len=64)
    ended = engine.generate_many([PROMPTS[0]], SamplingParams(max_new_tokens=20))[0].completions[0]
    assert ended.token_ids == free.completions[0].token_ids[: first + 1] and ended.finish_reason == "stop"
    assert ended.text == text[:first]


@pytest.mark.parametrize("prompt, params, n, message", [
    ([], SamplingParams(), 1, "the prompt is empty"),
    ([1, 2], SamplingParams(temperature=-1), 1, "temperature must be >= 0"),
    ([1, 2], SamplingParams(top_p=1.5), 1, "top_p must be in"),
    ([1, 2], SamplingParams(top_k="3"), 1, "top_k must be a number"),
    ([1, 2], SamplingParams(max_new_tokens=0), 1, "max_new_tokens must be >= 1"),
    ([1, 2], SamplingParams(), 0, "n must be an integer >= 1"),
    ([1, 999], SamplingParams(), 1, r"prompt ids must be integers in \[0, 128\)"),
    ([1] * 60, SamplingParams(max_new_tokens=5), 1, "a prompt of 60 tokens plus max_new_tokens=5 exceeds the "
                                                    "engine's max_len of 64 tokens"),
    ([1, 2], SamplingParams(max_new_tokens=4, stop_strings=["x"]), 1, "stop_strings need the engine to have a"),
])
def test_bad_input_is_a_one_line_error(models, prompt, params, n, message):
    engine = Engine(models[1], max_batch=1, max_len=64)
    with pytest.raises(InputError, match=message) as err:
        engine.add_request(prompt, params, n=n)
    assert "\n" not in str(err.value)
    assert not engine.has_work


def test_a_running_request_id_cannot_be_reused(models):
    engine = Engine(models[1], max_batch=1, max_len=64)
    engine.add_request([1, 2], greedy(3), request_id="a")
    with pytest.raises(InputError, match="request_id 'a' is already running"):
        engine.add_request([1, 2], greedy(3), request_id="a")


def test_isolate_faults_ends_only_the_sequence_that_raised(models, monkeypatch):
    """A server's engine (isolate_faults) ends a sequence whose sampling raises with finish_reason "error" and
    keeps the rest of the batch going; a library engine raises."""
    import llamaherd.engine.engine as engine_module

    hf, ours = models
    real = engine_module.sample_next

    def faulty(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("injected fault")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", faulty)
    engine = Engine(ours, max_batch=2, max_len=64, isolate_faults=True)
    bad = engine.add_request(PROMPTS[0], greedy(5, seed=13))
    good = engine.add_request(PROMPTS[2], greedy(6))
    events = list(engine.stream())
    assert bad.completions[0].finish_reason == "error" and isinstance(bad.completions[0].error, RuntimeError)
    assert [e.finish_reason for e in events if e.request_id == bad.request_id] == ["error"]
    assert good.completions[0].token_ids == hf_greedy(hf, PROMPTS[2], 6)
    assert sorted(engine.slots.free) == [0, 1] and not engine.requests

    strict = Engine(ours, max_batch=2, max_len=64)
    strict.add_request(PROMPTS[0], greedy(5, seed=13))
    with pytest.raises(RuntimeError, match="injected fault"):
        list(strict.stream())


def test_sampling_draws_tokens_with_their_probabilities():
    """sample_next against the softmax it samples from: 20,000 seeded draws (one per row) land on each token as
    often as its probability says (chi-square, 19 degrees of freedom, p < 1e-6 bound), tokens cut by top-k never."""
    from llamaherd.engine.sampling import sample_next

    torch.manual_seed(0)
    logits = torch.randn(1, 20) * 2
    n = 20_000
    draws = sample_next(logits.expand(n, -1), SamplingParams(temperature=0.7), torch.Generator().manual_seed(3))
    probs = (logits[0] / 0.7).softmax(-1).double()
    counts = torch.bincount(draws, minlength=20).double()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert chi2 < 63.7, chi2  # the chi-square(19) quantile at 1 - 1e-6
    top = sample_next(logits.expand(n, -1), SamplingParams(temperature=1.0, top_k=3), torch.Generator().manual_seed(4))
    assert set(top.tolist()) == set(logits[0].topk(3).indices.tolist())
