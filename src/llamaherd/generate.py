"""One-off generation (a prompt or a batch, ids or streamed text): a thin layer over the generation engine.

Each call runs a fresh `llamaherd.engine.Engine` sized to the request (one cache row per prompt, prompt +
max_new_tokens positions), so there is one decode loop in llamaherd; long-lived users (a server, rejection
sampling) keep an Engine of their own instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

from llamaherd.engine import Engine, SamplingParams
from llamaherd.errors import InputError
from llamaherd.model import GPT

__all__ = ["Conversation", "SamplingParams", "generate_batch", "generate_ids", "stream_text"]


def _check_fits(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """How many new tokens fit: dynamic NTK RoPE scaling exists for sequences past block_size (no cap, as in
    transformers' generate); otherwise up to the context window, with a warning (at the caller of
    generate_batch / stream_text) when that cuts the request."""
    if model.rope.dynamic:
        return max_new_tokens
    limit = model.config.block_size
    if prompt_len >= limit:
        raise InputError(
            f"prompt of {prompt_len} tokens does not fit the context window of {limit} tokens; shorten it"
        )
    if prompt_len + max_new_tokens > limit:
        warnings.warn(f"generation stops at the context window of {limit} tokens: at most {limit - prompt_len} "
                      f"new tokens after a {prompt_len}-token prompt, not {max_new_tokens}", stacklevel=4)
    return min(max_new_tokens, limit - prompt_len)


def _sized_engine(model: GPT, tokenizer, prompts: list[list[int]],
                  params: SamplingParams) -> tuple[Engine, list[SamplingParams]]:
    """An engine with one row per prompt and just enough positions, and each prompt's params with max_new_tokens
    cut to what fits its own context (so a row decodes as it would alone)."""
    params.validate()
    fitted = []
    for prompt in prompts:  # not a comprehension (its own frame on 3.11): the warning's stacklevel counts frames
        cap = _check_fits(model, len(prompt), params.max_new_tokens)
        fitted.append(dataclasses.replace(params, max_new_tokens=cap))
    max_len = max((len(p) + f.max_new_tokens for p, f in zip(prompts, fitted)), default=1)
    return Engine(model, tokenizer, max_batch=max(len(prompts), 1), max_len=max_len), fitted


def generate_batch(model: GPT, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """New token ids per prompt, each exactly as `generate_ids` gives it alone; a row ends at (and includes) its
    first id in params.stop_ids (none when None: there is no tokenizer here).

    With a seed, every prompt samples from its own generator seeded with params.seed, whatever else is in the
    batch (before the engine, one generator was shared by the batch's rows). Raises InputError for bad params,
    an empty or out-of-vocabulary prompt, or one that fills the context window; warns when the window cuts one.
    """
    engine, fitted = _sized_engine(model, None, prompts, params)
    return [r.completions[0].token_ids for r in engine.generate_many(prompts, fitted)]


def generate_ids(model: GPT, prompt: list[int], max_new_tokens: int = 256, **sampling) -> list[int]:
    """New token ids for one prompt; greedy unless sampling options (SamplingParams fields) are given."""
    return generate_batch(model, [prompt], SamplingParams(max_new_tokens=max_new_tokens, **sampling))[0]


def stream_text(model: GPT, tokenizer, prompt: list[int], params: SamplingParams) -> Iterator[str]:
    """Yield text as it is generated; stops at a stop id (params.stop_ids, or the tokenizer's when None) or a
    stop string, neither of which is yielded. The pieces join to decode() of the ids before the stop."""
    yield from Conversation(model, tokenizer, room=1).stream(prompt, params)


class Conversation:
    """Prompts that extend one another (a chat's turns) streamed through one engine of one cache row, so that a
    turn computes only the positions the row does not already hold: the engine's prefix reuse keeps every id the
    last turn's prompt and reply share with the new prompt (a 10-turn chat no longer prefills its whole history
    each turn). When a turn does not fit the row, a new row of `room` times the positions that turn needs
    (within the context window) starts empty: with the default 2 the next turns of a chat mostly fit."""

    def __init__(self, model: GPT, tokenizer, room: float = 2.0) -> None:
        if room < 1:
            raise InputError(f"room must be >= 1 (a multiple of the positions a turn needs), got {room}")
        self.model, self.tokenizer, self.room = model, tokenizer, room
        self.engine: Engine | None = None

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """`stream_text` for this prompt; raises InputError as it does. Stopping early cancels the request."""
        params.validate()
        fitted = dataclasses.replace(params, max_new_tokens=_check_fits(self.model, len(prompt), params.max_new_tokens))
        need = len(prompt) + fitted.max_new_tokens
        if self.engine is None or self.engine.max_len < need:
            size = int(need * self.room)
            if not self.model.rope.dynamic:
                size = min(size, self.model.config.block_size)  # need fits it (_check_fits)
            self.engine = Engine(self.model, self.tokenizer, max_batch=1, max_len=size)
        request = self.engine.add_request(prompt, fitted)
        try:
            for event in self.engine.stream():
                if event.text:
                    yield event.text
        finally:
            if not request.done:
                self.engine.cancel(request.request_id)
                while self.engine.has_work:
                    self.engine.step()
