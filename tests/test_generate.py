"""Generation: sampling processors against transformers, batching, determinism, stops, limits."""

import pytest
import torch
from test_engine import CharTokenizer

from llamaherd.config import Config
from llamaherd.errors import InputError
from llamaherd.generate import (
    SamplingParams,
    apply_repetition_penalty,
    generate_batch,
    generate_ids,
    stream_text,
    warp_logits,
)
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
    out = generate_batch(model, prompts, SamplingParams(max_new_tokens=10), stop_ids={stop})
    assert out[0] == free[0][: free[0].index(stop) + 1]
    first = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out[1] == free[1][:first]


def test_seeded_sampling_is_deterministic(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95)
    a = generate_ids(model, [1, 2, 3], seed=7, **kw)
    b = generate_ids(model, [1, 2, 3], seed=7, **kw)
    c = generate_ids(model, [1, 2, 3], seed=8, **kw)
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    assert generate_ids(model, [4, 5], max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == generate_ids(
        model, [4, 5], max_new_tokens=8
    )


def test_max_new_tokens_and_context_window(model):
    assert len(generate_ids(model, [1, 2], max_new_tokens=5)) == 5
    assert len(generate_ids(model, list(range(1, 60)), max_new_tokens=50)) == TINY.block_size - 59
    with pytest.raises(InputError, match="context window of 64 tokens"):
        generate_ids(model, [1] * 64, max_new_tokens=1)


def test_stop_strings_truncate_stream(model):
    tok = CharTokenizer()
    full = "".join(chr(ord("a") + t % 26) for t in generate_ids(model, [3, 4], max_new_tokens=20))
    stop = full[6:8]
    params = SamplingParams(max_new_tokens=20, stop_strings=[stop])
    streamed = "".join(stream_text(model, tok, [3, 4], params))
    assert streamed == full[: full.index(stop)]
