"""Logit and greedy-generation parity against Hugging Face transformers on tiny random models."""

import pytest
import torch
from hf_tiny import KINDS, VOCAB, save_hf_model

from llamaherd.load import load_gpt


def _padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, :9] = False
    idx[~mask] = 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return idx, mask, positions


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_transformers(kind, tmp_path):
    hf = save_hf_model(kind, tmp_path)
    ours = load_gpt(tmp_path)
    idx, mask, positions = _padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=idx, attention_mask=mask.long(), position_ids=positions).logits
        got = ours(idx, positions=positions, attn_mask=mask)
    real = mask  # padded positions carry no meaning in either implementation
    err = (got[real] - expected[real]).abs().max().item()
    assert err <= 1e-4, f"{kind}: max |logit diff| {err:.2e}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_generation_matches_transformers(kind, tmp_path):
    from llamaherd.generate import generate_ids

    hf = save_hf_model(kind, tmp_path)
    ours = load_gpt(tmp_path)
    prompt = torch.tensor([[5, 17, 33, 9, 60, 71, 23]])
    with torch.no_grad():
        expected = hf.generate(
            prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, prompt.shape[1]:].tolist()
    assert generate_ids(ours, prompt[0].tolist(), max_new_tokens=32, stop_ids=set()) == expected, kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_linear_agrees_with_the_native_kernel(dtype):
    """`model.linear` may compute a half-precision product in fp32 (CPUs without half matrix units);
    its result must agree with ATen's own half kernel to half-precision rounding, for one row and many."""
    from llamaherd.model import linear

    torch.manual_seed(0)
    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    for x in (torch.randn(1, 1, 64).to(dtype), torch.randn(3, 17, 64).to(dtype)):
        ours, native = linear(x, w, b), torch.nn.functional.linear(x, w, b)
        assert ours.dtype == dtype and ours.shape == native.shape
        torch.testing.assert_close(ours.float(), native.float(), rtol=2e-2, atol=2e-2)
