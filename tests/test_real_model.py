"""The embedded SmolLM2-135M-Instruct: logits vs transformers, int8 perplexity, chat end to end."""

import math

import pytest
import torch

from llamaherd.embedded import embedded_model_path
from llamaherd.load import load_gpt, load_model

pytestmark = pytest.mark.slow

TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. Their "
    "wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few "
    "repetitions. When using a pack, they can carry about 25 to 30% of their body weight for 8 to 13 km."
)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="module")
def ours():
    return load_model()


def _perplexity(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
    return math.exp(nll.item())


def test_embedded_gguf_logits_match_transformers(reference, ours):
    hf, tok = reference
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert ours.tokenizer.encode(TEXT) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        err = (ours.model(x) - hf(x).logits).abs().max().item()
    assert err <= 1e-3, f"max |logit diff| {err:.2e}"


def test_int8_perplexity_within_two_percent(ours):
    ids = ours.tokenizer.encode(TEXT)
    fp32 = _perplexity(ours.model, ids)
    int8 = _perplexity(load_gpt(embedded_model_path(), quantize="int8"), ids)
    assert abs(int8 - fp32) / fp32 < 0.02, f"fp32 ppl {fp32:.3f}, int8 ppl {int8:.3f}"


def test_bf16_load_halves_weight_memory():
    fp32 = load_gpt(embedded_model_path())
    bf16 = load_gpt(embedded_model_path(), dtype="bf16")
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(bf16) * 2 == size(fp32)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_chat_reply_matches_transformers_greedy(reference, ours):
    """The chat path (template render, tokenize, greedy decode) gives the reply transformers gives."""
    from llamaherd.chat import get_chat_format
    from llamaherd.generate import SamplingParams, stream_text

    hf, tok = reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    hf_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = hf.generate(torch.tensor([hf_ids]), max_new_tokens=24, do_sample=False)
    expected = tok.decode(out[0, len(hf_ids):], skip_special_tokens=True)

    fmt = get_chat_format(ours.chat_format, bos_token=ours.tokenizer.bos_token, eos_token=ours.tokenizer.eos_token)
    ids = ours.tokenizer.encode(fmt.render(messages, add_generation_prompt=True))
    assert ids == list(hf_ids)
    reply = "".join(stream_text(ours.model, ours.tokenizer, ids, SamplingParams(max_new_tokens=24)))
    assert reply == expected.strip() or reply == expected
