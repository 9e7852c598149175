"""Text generation: greedy and sampled decoding with a KV cache, batches, stop strings and streaming."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from llamaherd.engine.sampling import SamplingParams, apply_repetition_penalty, sample_next, warp_logits
from llamaherd.engine.text import StopText
from llamaherd.errors import InputError
from llamaherd.model import GPT

__all__ = ["SamplingParams", "apply_repetition_penalty", "generate_batch", "generate_ids", "generate_tokens",
           "sample_next", "stream_text", "warp_logits"]


def _check_fits(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """How many new tokens fit: dynamic NTK RoPE scaling exists for sequences past block_size (no cap, as in
    transformers' generate); otherwise up to the context window, with a warning when that cuts the request."""
    if model.rope.dynamic:
        return max_new_tokens
    limit = model.config.block_size
    if prompt_len >= limit:
        raise InputError(
            f"prompt of {prompt_len} tokens does not fit the context window of {limit} tokens; shorten it"
        )
    if prompt_len + max_new_tokens > limit:
        warnings.warn(f"generation stops at the context window of {limit} tokens: at most {limit - prompt_len} "
                      f"new tokens after a {prompt_len}-token prompt, not {max_new_tokens}", stacklevel=3)
    return min(max_new_tokens, limit - prompt_len)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) each step; finished rows repeat their last stop token.

    Prompts of different lengths are left-padded; the mask hides the padding, and positions count
    real tokens only, so each row decodes exactly as it would alone.
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    max_new = _check_fits(model, longest, params.max_new_tokens)
    device = model.output_weight.device
    B = len(prompts)
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.tensor(p, device=device)
        mask[i, longest - len(p):] = True
    padded = not bool(mask.all())
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Tokens seen per row, for the repetition penalty; padding repeats the row's first real token.
    seen = idx.clone()
    for i, p in enumerate(prompts):
        seen[i, : longest - len(p)] = p[0]

    cache = model.new_cache(B, longest + max_new) if use_cache else None
    tokens, step_mask = idx, mask
    for _ in range(max_new):
        logits = model(tokens, attn_mask=step_mask if padded or not use_cache else None, cache=cache, last_only=True)
        logits = apply_repetition_penalty(logits[:, -1].float(), seen, params.repetition_penalty)
        nxt = sample_next(logits, params, generator)
        if finished.any():
            nxt = torch.where(finished, seen[:, -1], nxt)
        yield nxt
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()):
            return
        seen = torch.cat((seen, nxt[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones(B, 1, dtype=torch.bool, device=device)), dim=1)
        if use_cache:
            tokens, step_mask = nxt[:, None], mask
        else:
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            tokens, step_mask = idx, mask


def generate_batch(
    model: GPT, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int] = frozenset(),
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids per prompt; each row ends at (and includes) its first stop token."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in generate_tokens(model, prompts, params, stop_ids, use_cache):
        for i, t in enumerate(step.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_ids
    return out


def generate_ids(
    model: GPT, prompt: list[int], max_new_tokens: int = 256, stop_ids: set[int] = frozenset(),
    use_cache: bool = True, **sampling,
) -> list[int]:
    """New token ids for one prompt (greedy unless sampling options are given)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    return generate_batch(model, [prompt], params, stop_ids, use_cache)[0]


def stream_text(
    model: GPT, tokenizer, prompt: list[int], params: SamplingParams, stop_ids: set[int] | None = None,
) -> Iterator[str]:
    """Yield text as it is generated; stops at a stop token or stop string (neither is yielded)."""
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    text = StopText(tokenizer.stream_decoder(), params.stop_strings)
    for step in generate_tokens(model, [prompt], params, stop_ids):
        token = int(step[0])
        if token in stop_ids:
            break
        if piece := text.push(token):
            yield piece
        if text.stopped:
            return
    if piece := text.flush():
        yield piece
