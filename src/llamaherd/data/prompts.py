"""Prompts for rejection sampling and PPO: the conversation a sampled response answers.

Record layouts (JSON array or JSON Lines, `.gz` allowed; detected per record):
  prompt          {"prompt": str | [{role, content}, ...], "system"?}: a prompt-only file
  pairs           any preference-pair layout of data.preference ({prompt, chosen, rejected}, HH-RLHF transcripts,
                  LLaMA-Factory pairs): the pair's shared prompt (Llama 2 sampled from its preference prompts)
  sft             an SFT record (alpaca, sharegpt, messages): the conversation before its last assistant turn, so an
                  SFT file serves as prompts; alpaca's `input` joins the instruction after a blank line
Every prompt must end with a user message. A transcript pair whose sides differ before their last answer has no
shared prompt and is dropped (counted); bad fields are one-line errors naming `file:line` and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamaherd.data.sft import Record, read_records, record_to_messages
from llamaherd.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One prompt: its messages (ending with the user's), where it came from ("file:line") and a stable id (its
    position and a hash of its messages), which keys resumable runs."""

    id: str
    messages: list[dict]
    source: str


@dataclass
class PromptStats:
    """What reading did: records read, prompts kept, records dropped per reason."""

    records: int = 0
    prompts: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"
        return f"{self.records} records -> {self.prompts} prompts; dropped: {dropped}"


def prompt_messages(rec: Record) -> list[dict] | None:
    """A record's prompt as messages ending with the user's, or None for a pair without a shared prompt."""
    from llamaherd.data.preference import _prompt_messages, pair_messages

    d = rec.data
    if not isinstance(d, dict):
        raise InputError(f"{rec.where}: expected a JSON object per record, got {type(d).__name__}")
    if "chosen" in d or "rejected" in d:
        pair = pair_messages(rec)
        return None if pair is None else pair.prompt
    if "prompt" in d:
        messages = _prompt_messages(rec, d)
    elif "instruction" in d:  # an Alpaca prompt needs no output; an SFT row's output is the answer left out
        messages = record_to_messages(Record(rec.file, rec.line, {"output": "", **d}), "alpaca")
    elif "messages" in d or "conversations" in d:
        messages = record_to_messages(rec)
    else:
        raise InputError(f"{rec.where}: no prompt in this record (keys {sorted(d)}); give a 'prompt' field, an SFT "
                         "record (instruction / messages / conversations) or a preference pair")
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise InputError(f"{rec.where}: the prompt must end with a user message (the response answers it)")
    return messages


def prompt_id(index: int, messages: Sequence[dict]) -> str:
    """`index-<12 hex of the messages' sha256>`: stable while the file is, and different for another prompt."""
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{index}-{digest[:12]}"


def load_prompts(paths: str | Path | Sequence[str | Path]) -> tuple[list[Prompt], PromptStats]:
    """Every prompt of the files, in file order, and the reading stats. Raises InputError when none is left."""
    prompts: list[Prompt] = []
    stats = PromptStats()
    files = [paths] if isinstance(paths, str | Path) else list(paths)
    if not files:
        raise InputError("no prompts: pass --prompts FILE")
    for path in files:
        for rec in read_records(path):
            stats.records += 1
            messages = prompt_messages(rec)
            if messages is None:
                stats.dropped["diverged"] += 1
                continue
            prompts.append(Prompt(prompt_id(len(prompts), messages), messages, rec.where))
    stats.prompts = len(prompts)
    if not prompts:
        raise InputError(f"{', '.join(map(str, files))}: no prompts ({stats.summary()})")
    return prompts, stats
