"""The one generation engine shared by generation, serving, rejection sampling, PPO rollouts and synthetic data.

    engine = Engine(model, tokenizer, max_batch=8)
    request = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7, seed=1))
    for event in engine.stream():   # or call engine.step() from a server's loop
        print(event.text, end="")

Modules: sampling (SamplingParams and logits processors), text (stop strings over streamed text), slots
(free rows and the prefixes they hold), request (handles, completions, events, logprobs), engine (the loop).
"""

from llamaherd.engine.engine import Engine
from llamaherd.engine.request import Completion, Event, Request, TokenLogprob
from llamaherd.engine.sampling import SamplingParams, apply_repetition_penalty, sample_next, warp_logits
from llamaherd.engine.text import StopText

__all__ = ["Completion", "Engine", "Event", "Request", "SamplingParams", "StopText", "TokenLogprob",
           "apply_repetition_penalty", "sample_next", "warp_logits"]
