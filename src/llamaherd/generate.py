"""Text generation: greedy and sampled decoding with a KV cache, batches, stop strings and streaming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llamaherd.errors import InputError
from llamaherd.model import GPT


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row (prompt or output): shrink its logit."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus): removed tokens get -inf. logits (B, V)."""
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = warp_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_fits(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    limit = model.config.block_size
    if prompt_len >= limit:
        raise InputError(
            f"prompt of {prompt_len} tokens does not fit the context window of {limit} tokens; shorten it"
        )
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
    decoder = tokenizer.stream_decoder()
    text, emitted = "", 0
    hold = max((len(s) for s in params.stop_strings), default=1) - 1
    for step in generate_tokens(model, [prompt], params, stop_ids):
        token = int(step[0])
        if token in stop_ids:
            break
        text += decoder.push(token)
        cut = min((i for s in params.stop_strings if (i := text.find(s)) != -1), default=-1)
        if cut != -1:
            yield text[emitted:cut]
            return
        safe = len(text) - hold  # text that cannot be the start of a stop string yet
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]
