"""Baize self-chat (Xu et al. 2023, §2): the teacher writes a dialogue about a seed topic, playing both sides.

Two modes. Transcript (default): one request with Baize's prompt; the teacher continues the [Human]/[AI]
transcript and the reply is parsed into turns. Turn by turn (`max_turns`): a user-simulator call on the
transcript so far, stopped at the AI marker, then an assistant call on the dialogue as chat messages, until
the simulated human has nothing to ask (an empty turn) or max_turns exchanges. The transcript prompts go as a
chat user message (Baize asked ChatGPT so) or, with `completion`, as a raw completion that a local model simply
continues. Dialogues with fewer than two exchanges, broken markers or a role switch are dropped and counted
(templates.parse_baize_transcript).
"""

from __future__ import annotations

from llamaherd.synth.runner import Item, Outcome, Steps
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import Seed
from llamaherd.synth.teacher import TeacherRequest
from llamaherd.synth.templates import BAIZE_AI_MARKER, baize_prompt, baize_turn_prompt, parse_baize_transcript

RECIPE = "self-chat"


def self_chat_items(seeds: list[Seed], n: int, sampling: Sampling, max_turns: int | None = None,
                    completion: bool = False) -> list[Item]:
    """n dialogues; dialogue i starts from seeds[i % len(seeds)]. completion: send Baize's transcript prompts as raw
    completions (a model continues the transcript) instead of a chat user message (Baize's ChatGPT usage)."""
    return [Item(f"{RECIPE}-{i:06d}", _steps(i, seeds[i % len(seeds)], sampling, max_turns, completion))
            for i in range(n)]


def _request(key: str, messages: list[tuple[str, str]], sampling: Sampling, seed: int,
             stop: tuple[str, ...] = ()) -> TeacherRequest:
    return TeacherRequest(key, messages=tuple(messages), max_tokens=sampling.max_tokens,
                          temperature=sampling.temperature, top_p=sampling.top_p, stop=stop, seed=seed)


def _steps(i: int, seed: Seed, sampling: Sampling, max_turns: int | None, completion: bool):
    item_id = f"{RECIPE}-{i:06d}"

    def transcript_request(key: str, prompt: str, seed: int, stop: tuple[str, ...] = ()) -> TeacherRequest:
        if completion:
            return TeacherRequest(key, prompt=prompt, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, stop=stop, seed=seed)
        return _request(key, [("user", prompt)], sampling, seed, stop)

    def transcript() -> Steps:
        request = transcript_request(f"{item_id}/0", baize_prompt(seed.text), sampling.request_seed(i))
        (reply,) = yield [request]
        if not reply.ok:
            return Outcome("failed", reply.error)
        turns, reason = parse_baize_transcript(reply.text)
        if reason is not None:
            return Outcome("dropped", reason)
        return Outcome("kept", row={"messages": turns, "id": item_id, "seed": seed.text})

    def turn_by_turn() -> Steps:
        turns: list[dict] = []
        for t in range(max_turns):
            prompt = baize_turn_prompt(seed.text, turns, "user")
            (human,) = yield [transcript_request(f"{item_id}/{2 * t}", prompt, sampling.request_seed(i, 2 * t),
                                                 stop=(BAIZE_AI_MARKER,))]
            if not human.ok:
                return Outcome("failed", human.error)
            if not human.text.strip():
                break  # the simulated human has no more questions
            turns.append({"role": "user", "content": human.text.strip()})
            (ai,) = yield [_request(f"{item_id}/{2 * t + 1}", [(m["role"], m["content"]) for m in turns],
                                    sampling, sampling.request_seed(i, 2 * t + 1))]
            if not ai.ok:
                return Outcome("failed", ai.error)
            if not ai.text.strip():
                return Outcome("dropped", "empty_reply")
            turns.append({"role": "assistant", "content": ai.text.strip()})
        if len(turns) < 4:
            return Outcome("dropped", "too_few_exchanges")
        return Outcome("kept", row={"messages": turns, "id": item_id, "seed": seed.text})

    return transcript if max_turns is None else turn_by_turn
