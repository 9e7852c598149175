"""Weight-only int8 (`quantize="int8"`): every linear layer and the output head, against a hand quantization."""

import pytest
import torch
from hf_tiny import save_hf_model

from llamaherd.engine import Engine, SamplingParams
from llamaherd.load import load_gpt
from llamaherd.quantize import Int8Linear


def per_row_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-row int8 and back: scale = max |w| / 127, round to nearest, clamp to +-127."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied"])
def test_int8_model_equals_a_float_model_holding_hand_quantized_weights(tmp_path, kind):
    """The head is int8 too (as llama.cpp's Q8_0): for a tied model an int8 copy of the embedding, whose lookup
    stays in float. Logits of prefill and of engine decode steps (the native kernels) against the float model
    whose linear weights and head are quantized here by hand."""
    save_hf_model(kind, tmp_path)
    q = load_gpt(tmp_path, quantize="int8")
    ref = load_gpt(tmp_path)
    tied = ref.config.tie_embeddings
    assert isinstance(q.lm_head, Int8Linear)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(per_row_int8(module.weight))
        head = ref.model.embed_tokens.weight if tied else ref.lm_head.weight
        if tied:  # the reference's lookup keeps the float embedding; only its head is quantized
            table = head.detach().clone()
            ref.lm_head = torch.nn.Linear(ref.config.n_embd, ref.config.vocab_size, bias=False)
            ref.lm_head.weight.copy_(per_row_int8(table))
        else:
            head.copy_(per_row_int8(head))
        assert torch.equal(q.model.embed_tokens.weight, ref.model.embed_tokens.weight)
        ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
        torch.testing.assert_close(q(ids), ref(ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(q.output_weight, ref.lm_head.weight, atol=1e-6, rtol=0)

    def decode(model):
        engine = Engine(model, max_batch=1)
        request = engine.add_request([1, 4, 9, 3], SamplingParams(max_new_tokens=8, stop_ids=frozenset(), logprobs=1))
        while engine.has_work:
            engine.step()
        return request.completions[0]

    ours, theirs = decode(q), decode(ref)
    assert ours.token_ids == theirs.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
