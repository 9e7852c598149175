"""What the engine hands back: a request's handle, its completions, streamed events and log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamaherd.engine.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of its raw logits, before any warping), and the
    `top` most likely tokens at that position as (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One of a request's n samples. token_ids end with the stop id that ended it, if any; text never holds it.

    finish_reason: None while running, "stop" (stop id or stop string), "length" (max_new_tokens), "cancelled",
    or "error" (its work raised in an engine made with isolate_faults; the exception is in `error`).
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass
class Request:
    """The handle `Engine.add_request` returns; the engine fills it as it decodes.

    prompt_logprobs: with params.prompt_logprobs, one entry per prompt token, None for the first (nothing
    precedes it), as OpenAI's echo + logprobs reports it.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    completions: list[Completion]
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


@dataclass
class Event:
    """What one engine step added to one completion: new token ids, the text they released (stop strings held
    back until they cannot match), their logprobs (with params.logprobs), and the finish reason on the last."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
