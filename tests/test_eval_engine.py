"""The log-likelihood engine against brute-force forwards, transformers and lm-eval's own HF model class."""

from __future__ import annotations

import pytest
import torch
from eval_tiny import TinyEncoder, save_tiny_eval_model

from llamaherd.evaluate.engine import LoglikelihoodEngine
from llamaherd.load import load_gpt

# Multiple-choice docs (shared contexts, continuations of 1..many tokens), a context with trailing
# whitespace, a context whose last piece merges with the continuation, and an empty context.
PAIRS = [
    *[("Question: What is the capital of France?\nAnswer:", c)
      for c in (" Paris", " the lazy dog", " water boils at one hundred degrees", " A")],
    *[("A person is washing a car. They", c) for c in (" rinse the soap off.", " jump", " eat the hose with a fox")],
    *[("The following are multiple choice questions (with answers) about biology.\n\nQ: legs?\nAnswer:", c)
      for c in (" A", " B", " C", " D")],
    ("Q: How many legs does a spider have?\nA: ", "Eight legs."),
    ("The quick brown fo", "x jumps"),
    ("", "ice melts at zero degrees"),
    ("water", " boils"),
]
# MMLU-like: three questions after the same long few-shot prefix (the engine runs that prefix once).
SHOTS = "".join(f"Question: where does the {a} live?\nAnswer: on the farm\n\n" for a in ("cow", "pig", "hen", "goat"))
SHARED_PREFIX_PAIRS = [(f"{SHOTS}Question: where does the {a} live?\nAnswer:", c)
                       for a in ("fox", "fish", "bee") for c in (" in the sea", " on land", " in a hive")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_eval_model(tmp_path_factory.mktemp("tiny-eval"))


def brute_force(model, encoded) -> list[tuple[list[float], bool]]:
    """One plain forward per request over its whole window, as the harness does it."""
    out = []
    for e in encoded:
        tokens = list(e.context) + list(e.continuation)
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]))[0]
        log_probs = logits.double().log_softmax(-1)[len(e.context) - 1:]
        cont = torch.tensor(e.continuation)
        out.append((log_probs.gather(1, cont[:, None])[:, 0].tolist(), bool((log_probs.argmax(-1) == cont).all())))
    return out


def greedy_pair(model, enc: TinyEncoder, add_bos: bool) -> tuple[str, str]:
    """A request whose one-token continuation is the model's own argmax, so is_greedy must be True."""
    for context in ("The quick brown fox jumps over the", "Question:", "A person is", "water boils at"):
        ids = enc.encode(context, add_bos=add_bos)
        with torch.no_grad():
            top = int(model(torch.tensor([ids]))[0, -1].argmax())
        continuation = enc.tok.id_to_token(top).replace("▁", " ")
        if enc.encode(context + continuation, add_bos=add_bos)[len(ids):] == [top]:
            return context, continuation
    raise AssertionError("no context found whose greedy token re-encodes to itself")


@pytest.mark.parametrize("add_bos", [False, True])
def test_engine_matches_brute_force(tiny_dir, add_bos):
    model = load_gpt(tiny_dir, dtype=torch.float64)
    enc = TinyEncoder(tiny_dir)
    engine = LoglikelihoodEngine(model, enc, add_bos=add_bos, batch_size=4)
    pairs = [*PAIRS, *SHARED_PREFIX_PAIRS, greedy_pair(model, enc, add_bos)]
    encoded = engine.encode(pairs)
    results = engine.loglikelihood(pairs)
    assert engine.prefix_tokens_reused >= 2 * 64  # the shared-prefix batch really took that path
    for r, (ref_lps, ref_greedy), e in zip(results, brute_force(model, encoded), encoded, strict=True):
        assert len(r.token_logprobs) == len(e.continuation)
        assert r.token_logprobs == pytest.approx(ref_lps, abs=1e-9)
        assert r.logprob == pytest.approx(sum(ref_lps), abs=1e-9)
        assert r.is_greedy == ref_greedy
    assert any(r.is_greedy for r in results) and not all(r.is_greedy for r in results)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_results_do_not_change_with_batch_size(tiny_dir, dtype, tol):
    """Padding never leaks: in fp64 batch sizes 1, 3 and 8 agree to 1e-9; in fp32 only kernel rounding
    differs (a few ulp of these large random-model log-probs)."""
    model = load_gpt(tiny_dir, dtype=dtype)
    pairs = PAIRS + SHARED_PREFIX_PAIRS
    runs = [LoglikelihoodEngine(model, TinyEncoder(tiny_dir), add_bos=False, batch_size=b).loglikelihood(pairs)
            for b in (1, 3, 8)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=tol)
            assert a.is_greedy == b.is_greedy


def test_left_truncation_matches_harness_window(tiny_dir):
    """A model context shorter than the prompt: keep the last max_length + 1 tokens, count it."""
    model = load_gpt(tiny_dir, dtype=torch.float64)
    enc = TinyEncoder(tiny_dir)
    max_length = 20
    engine = LoglikelihoodEngine(model, enc, add_bos=False, batch_size=3, max_length=max_length)
    encoded = engine.encode(PAIRS)
    results = engine.loglikelihood(PAIRS)
    n_truncated = 0
    for (context, continuation), e, r in zip(PAIRS, encoded, results, strict=True):
        if not context:
            continue
        whole = enc.encode(context + continuation)
        ctx = enc.encode(context.rstrip())
        window = (ctx + whole[len(ctx):])[-(max_length + 1):]
        assert list(e.context + e.continuation) == window
        n_truncated += r.truncated
        assert r.truncated == (len(whole) > max_length + 1)
    assert n_truncated >= 5
    for r, (ref_lps, ref_greedy) in zip(results, brute_force(model, encoded), strict=True):
        assert r.token_logprobs == pytest.approx(ref_lps, abs=1e-9)
        assert r.is_greedy == ref_greedy


def test_engine_matches_transformers(tiny_dir):
    """Independent model implementation: transformers on the same checkpoint, full sequence, no cache."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = load_gpt(tiny_dir, dtype=torch.float32)
    engine = LoglikelihoodEngine(model, TinyEncoder(tiny_dir), add_bos=True, batch_size=5)
    encoded = engine.encode(PAIRS)
    results = engine.loglikelihood(PAIRS)
    for e, r in zip(encoded, results, strict=True):
        tokens = list(e.context) + list(e.continuation)
        with torch.no_grad():
            log_probs = hf(torch.tensor([tokens[:-1]])).logits[0].float().log_softmax(-1)[len(e.context) - 1:]
        ref = log_probs.gather(1, torch.tensor(e.continuation)[:, None])[:, 0]
        assert r.token_logprobs == pytest.approx(ref.tolist(), abs=1e-4)


@pytest.mark.parametrize("max_length", [None, 20])
def test_engine_matches_lm_eval_hflm(tiny_dir, max_length):
    """lm-eval's own tokenization split, truncation and scoring (its HF model class) on the same files."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=4, max_length=max_length)
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    expected = lm.loglikelihood(instances, disable_tqdm=True)
    model = load_gpt(tiny_dir, dtype=torch.float32)
    # lm-eval's HF default adds the tokenizer's special tokens, here <s>.
    engine = LoglikelihoodEngine(model, TinyEncoder(tiny_dir), add_bos=True, batch_size=4, max_length=max_length)
    for r, (ll, greedy) in zip(engine.loglikelihood(PAIRS), expected, strict=True):
        assert r.logprob == pytest.approx(ll, abs=1e-4)
        assert r.is_greedy == greedy


def test_empty_continuation_is_an_input_error(tiny_dir):
    from llamaherd.errors import InputError

    engine = LoglikelihoodEngine(load_gpt(tiny_dir), TinyEncoder(tiny_dir), add_bos=False)
    with pytest.raises(InputError, match="encodes to no tokens"):
        engine.loglikelihood([("Question:", "")])


def test_many_continuations_of_one_context_split_over_rows(tiny_dir):
    """More continuation tokens than max_length after one context: packed over several rows, same numbers."""
    model = load_gpt(tiny_dir, dtype=torch.float64)
    pairs = [("Question:", f" water boils at {w} degrees and the fox jumps") for w in ("one", "zero", "a", "the")] * 3
    engine = LoglikelihoodEngine(model, TinyEncoder(tiny_dir), add_bos=False, batch_size=2, max_length=24)
    encoded = engine.encode(pairs)
    assert sum(len(e.continuation) - 1 for e in encoded) > 2 * 24
    for r, (ref_lps, ref_greedy) in zip(engine.loglikelihood(pairs), brute_force(model, encoded), strict=True):
        assert r.token_logprobs == pytest.approx(ref_lps, abs=1e-9)
        assert r.is_greedy == ref_greedy
