"""Orca explanation traces (Mukherjee et al. 2023, §3.1; FreeWilly / Stable Beluga): each instruction answered
under one of the paper's 16 system messages (Table 2), drawn per item from a seeded generator; the row keeps the
system message, so a student learns to follow it.

Which messages an item may draw from: all 16 by default (uniform), or a per-source mapping (the seed record's
`source` field -> 1-based message numbers), as Orca assigned messages per FLAN collection.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llamaherd.errors import InputError
from llamaherd.synth.runner import Item, Outcome, Steps
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import Seed
from llamaherd.synth.teacher import TeacherRequest
from llamaherd.synth.templates import ORCA_SYSTEM_MESSAGES

RECIPE = "explain"


def read_system_map(path: str | Path) -> dict[str, list[int]]:
    """A JSON object {source: [message numbers 1..16]}; "*" is the default for sources it does not name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the system-message map ({e}); give a JSON object "
                         '{"source": [1, 5, 16], "*": [...]}') from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object mapping a source name to system-message numbers")
    n = len(ORCA_SYSTEM_MESSAGES)
    for source, numbers in data.items():
        if not (isinstance(numbers, list) and numbers and all(isinstance(k, int) and 1 <= k <= n for k in numbers)):
            raise InputError(f"{path}: field '{source}' must be a non-empty list of message numbers 1..{n}")
    return data


def system_choices(seed: Seed, system_map: dict[str, list[int]] | None) -> list[int]:
    """The 0-based message indices this seed may draw from."""
    if system_map is None:
        return list(range(len(ORCA_SYSTEM_MESSAGES)))
    numbers = system_map.get(seed.source) or system_map.get("*")
    if numbers is None:
        raise InputError(f"{seed.where}: source {seed.source!r} is not in the system-message map and it has no "
                         "'*' entry; add one")
    return [k - 1 for k in numbers]


def explain_items(seeds: list[Seed], n: int | None, sampling: Sampling,
                  system_map: dict[str, list[int]] | None = None) -> list[Item]:
    """One answer per instruction (n: the first n, cycling when n exceeds the file)."""
    count = len(seeds) if n is None else n
    return [Item(f"{RECIPE}-{i:06d}", _steps(i, seeds[i % len(seeds)], sampling, system_map)) for i in range(count)]


def _steps(i: int, seed: Seed, sampling: Sampling, system_map: dict[str, list[int]] | None):
    item_id = f"{RECIPE}-{i:06d}"

    def steps() -> Steps:
        index = random.Random(f"{sampling.seed}:{i}").choice(system_choices(seed, system_map))
        system = ORCA_SYSTEM_MESSAGES[index]
        user = f"{seed.text}\n\n{seed.input}" if seed.input else seed.text
        messages = ([("system", system)] if system else []) + [("user", user)]
        request = TeacherRequest(f"{item_id}/0", messages=tuple(messages), max_tokens=sampling.max_tokens,
                                 temperature=sampling.temperature, top_p=sampling.top_p,
                                 seed=sampling.request_seed(i))
        (reply,) = yield [request]
        if not reply.ok:
            return Outcome("failed", reply.error)
        if not reply.text.strip():
            return Outcome("dropped", "empty_reply")
        row_messages = [{"role": r, "content": c} for r, c in messages]
        row_messages.append({"role": "assistant", "content": reply.text.strip()})
        return Outcome("kept", row={"messages": row_messages, "system_message": index + 1, "id": item_id})

    return steps
