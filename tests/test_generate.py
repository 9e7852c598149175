"""One-off generation over the engine: sampling processors against transformers, batching, determinism, stops,
limits, and the engine sized to the request."""

import pytest
import torch
from test_engine import CharTokenizer

from llamaherd import generate
from llamaherd.config import Config
from llamaherd.engine.sampling import apply_repetition_penalty, warp_logits
from llamaherd.errors import InputError
from llamaherd.generate import SamplingParams, generate_batch, generate_ids, stream_text
from llamaherd.model import GPT

TINY = Config(name="tiny", vocab_size=97, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
              intermediate_size=48, block_size=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(3)
    logits = torch.randn(4, 50) * 3
    seen = torch.randint(0, 50, (4, 7))
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    ours = warp_logits(logits, params)
    ref = logits.clone()
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        ref = proc(seen, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], atol=1e-6)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_batched_generation_equals_one_by_one(model):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20]]
    params = SamplingParams(max_new_tokens=12)
    batched = generate_batch(model, prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out == generate_ids(model, prompt, max_new_tokens=12)


def test_stop_token_ends_row_in_batch(model):
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free = generate_batch(model, prompts, SamplingParams(max_new_tokens=10))
    stop = free[0][3]
    out = generate_batch(model, prompts, SamplingParams(max_new_tokens=10, stop_ids={stop}))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    first = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out[1] == free[1][:first]


def test_seeded_sampling_is_deterministic(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95)
    a = generate_ids(model, [1, 2, 3], seed=7, **kw)
    b = generate_ids(model, [1, 2, 3], seed=7, **kw)
    c = generate_ids(model, [1, 2, 3], seed=8, **kw)
    assert a == b and a != c


def test_seeded_batch_samples_each_prompt_as_alone(model):
    """A seeded batch gives every prompt the tokens it gets alone with that seed (its own generator)."""
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    prompts = [[1, 2, 3], [8, 9], [1, 2, 3]]
    batched = generate_batch(model, prompts, SamplingParams(**kw))
    assert batched == [generate_ids(model, p, **kw) for p in prompts]
    assert batched[0] != generate_ids(model, prompts[0], max_new_tokens=12)  # temperature 1 really samples


def test_top_k_one_is_greedy(model):
    assert generate_ids(model, [4, 5], max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == generate_ids(
        model, [4, 5], max_new_tokens=8
    )


def test_max_new_tokens_and_context_window(model):
    assert len(generate_ids(model, [1, 2], max_new_tokens=5)) == 5
    with pytest.warns(UserWarning, match="at most 5 new tokens after a 59-token prompt, not 50"):
        assert len(generate_ids(model, list(range(1, 60)), max_new_tokens=50)) == TINY.block_size - 59
    with pytest.raises(InputError, match="context window of 64 tokens"):
        generate_ids(model, [1] * 64, max_new_tokens=1)


def test_the_window_cuts_only_the_prompt_that_reaches_it(model):
    """In a batch, a long prompt stopped by the context window does not shorten a short prompt's output."""
    prompts = [list(range(1, 60)), [4, 5]]
    with pytest.warns(UserWarning, match="context window"):
        long, short = generate_batch(model, prompts, SamplingParams(max_new_tokens=20))
    assert len(long) == 5 and short == generate_ids(model, [4, 5], max_new_tokens=20)


def test_engine_is_sized_to_the_request_not_the_context(model, monkeypatch):
    sizes = []

    class Spy(generate.Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            sizes.append((self.cache.k.shape[1], self.cache.k.shape[3]))  # (rows, positions)

    monkeypatch.setattr(generate, "Engine", Spy)
    generate_batch(model, [[1, 2, 3], [4] * 9], SamplingParams(max_new_tokens=6))
    "".join(stream_text(model, CharTokenizer(), [1, 2, 3], SamplingParams(max_new_tokens=6, stop_ids=frozenset())))
    assert sizes == [(2, 9 + 6), (1, 3 + 6)]  # one row of just enough positions each


def test_stop_strings_truncate_stream(model):
    tok = CharTokenizer()
    full = "".join(chr(ord("a") + t % 26) for t in generate_ids(model, [3, 4], max_new_tokens=20))
    stop = full[6:8]
    params = SamplingParams(max_new_tokens=20, stop_strings=[stop])
    streamed = "".join(stream_text(model, tok, [3, 4], params))
    assert streamed == full[: full.index(stop)]


def test_a_conversation_computes_only_what_its_last_turn_did_not(model):
    """Four turns, each prompt the last prompt + its reply + one new id (as a chat template renders a history):
    each reply equals a one-off generation of its prompt on a fresh engine; a turn that does not fit makes a row
    of twice what it needs (4 + 8 -> 24 positions; 22 + 8 -> 60, the context window being 64), and a turn that
    fits prefills only what the row does not hold. It holds the last prompt and reply less the reply's last id
    (whose key the next step computes), so the engine computes len(prompt) - 1 - held prompt positions plus one
    per new token, against len(prompt) - 1 + 8 afresh."""
    tok = CharTokenizer()
    params = SamplingParams(max_new_tokens=8, stop_ids=frozenset())
    conversation = generate.Conversation(model, tok)
    prompt, last, sizes, reused = [3, 4, 5, 6], [], [], 0
    for turn in range(4):
        engine = conversation.engine
        before = engine.computed_tokens if engine else 0
        text = "".join(conversation.stream(prompt, params))
        reply = generate_ids(model, prompt, max_new_tokens=8, stop_ids=frozenset())
        assert text == "".join(chr(ord("a") + t % 26) for t in reply)
        sizes.append(conversation.engine.max_len)
        if conversation.engine is engine:
            held = len(last) + 8 - 1
            assert conversation.engine.computed_tokens - before == (len(prompt) - 1 - held) + 8
            reused += 1
        last, prompt = prompt, prompt + reply + [7 + turn]
    assert sizes == [24, 24, 60, 60] and reused == 2


def test_a_conversation_turn_stopped_early_leaves_the_engine_idle(model):
    conversation = generate.Conversation(model, CharTokenizer())
    params = SamplingParams(max_new_tokens=8, stop_ids=frozenset())
    pieces = conversation.stream([3, 4, 5], params)
    next(pieces)
    pieces.close()  # the reader stops (Ctrl-C in herd chat): the request is cancelled, its row free again
    assert not conversation.engine.has_work and conversation.engine.slots.free
    assert "".join(conversation.stream([3, 4, 5], params)) == "".join(
        chr(ord("a") + t % 26) for t in generate_ids(model, [3, 4, 5], max_new_tokens=8, stop_ids=frozenset()))
