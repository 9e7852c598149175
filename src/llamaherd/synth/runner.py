"""Crash-safe execution of a recipe: items of work, a request cache, an append-only journal, the final file.

A recipe is a list of `Item`s, each a generator that yields lists of TeacherRequests (one step of its
conversation with the teacher), receives their replies, and returns an `Outcome` (a kept row, or a drop or
failure with its reason). The runner keeps every unfinished item moving: each wave sends the pending requests
of all of them through the teacher at once (the local engine batches them), and an item's outcome goes to
`journal.jsonl` (one line, flushed and fsynced) the moment it is known.

Nothing lost, nothing doubled: a rerun of the same command skips the items in the journal (but retries those that
failed), and the requests of
items that were half-way are answered from `cache.jsonl` (keyed by teacher and request content), so nothing is
paid twice. `data.jsonl` is rewritten atomically from the journal at the end of every run, in item order, after
the output filters (exact and near duplicates, refusals): the same file whatever the kills in between.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llamaherd.files import atomic_write, complete_lines
from llamaherd.synth.cache import RequestCache
from llamaherd.synth.teacher import Teacher, TeacherReply, TeacherRequest

JOURNAL_FILE, CACHE_FILE, DATA_FILE, MANIFEST_FILE = "journal.jsonl", "cache.jsonl", "data.jsonl", "manifest.json"


@dataclass
class Outcome:
    """How an item ended: status "kept" (with its row), "dropped" (the recipe's rule, in reason) or "failed"
    (the teacher gave no usable reply after its retries; reason says why)."""

    status: str
    reason: str | None = None
    row: dict[str, Any] | None = None


Steps = Generator[list[TeacherRequest], list[TeacherReply], Outcome]


@dataclass
class Item:
    """One unit of work with an id that is stable across runs (it keys the journal); steps() starts it, or
    returns the Outcome at once when the item needs no request."""

    id: str
    steps: Callable[[], Steps | Outcome]


@dataclass
class Usage:
    """Requests and tokens of this run; `paid` excludes replies served from the cache."""

    requests: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    paid_prompt_tokens: int = 0
    paid_completion_tokens: int = 0
    failures: Counter = field(default_factory=Counter)

    def add(self, reply: TeacherReply) -> None:
        self.requests += 1
        self.cached += reply.cached
        if not reply.ok:
            self.failed += 1
            self.failures[_reason_class(reply.error)] += 1
            return
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        if not reply.cached:
            self.paid_prompt_tokens += reply.prompt_tokens
            self.paid_completion_tokens += reply.completion_tokens


def _reason_class(error: str | None) -> str:
    """The head of an error message ("HTTP 500", "timeout", ...) for per-reason counts."""
    return (error or "unknown").split(":")[0][:60]


class Asker:
    """Sends requests through the cache and the teacher, counting usage."""

    def __init__(self, teacher: Teacher, cache: RequestCache) -> None:
        self.teacher, self.cache, self.usage = teacher, cache, Usage()

    def stream(self, requests: list[TeacherRequest]) -> Iterable[tuple[int, TeacherReply]]:
        """(index into requests, reply) as each reply is known: cache hits first, then the teacher's."""
        keys = [r.content_hash(self.teacher.teacher_id) for r in requests]
        todo = []
        for i, (request, key) in enumerate(zip(requests, keys)):
            hit = self.cache.get(key)
            if hit is None:
                todo.append(i)
                continue
            reply = TeacherReply(request, hit["text"], hit.get("finish_reason"), hit.get("prompt_tokens", 0),
                                 hit.get("completion_tokens", 0), cached=True)
            self.usage.add(reply)
            yield i, reply
        position = {requests[i].key: i for i in todo}  # keys are unique within a call (item/step/j)
        for reply in self.teacher.run([requests[i] for i in todo]):
            i = position[reply.request.key]
            if reply.ok:
                self.cache.put(keys[i], reply)
            self.usage.add(reply)
            yield i, reply

    def ask(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        """Every reply, in the order of requests."""
        replies: list[TeacherReply | None] = [None] * len(requests)
        for i, reply in self.stream(requests):
            replies[i] = reply
        return replies  # type: ignore[return-value]


class Journal:
    """`journal.jsonl`: one JSON line per finished item, appended, flushed and fsynced as it is known.

    A line torn by a kill (the last one, without its newline) is cut off on open, so the next append is whole.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.entries = path, {}
        if path.is_file():
            for line in complete_lines(path):
                entry = json.loads(line)
                self.entries[entry["item"]] = entry
        self._file = path.open("a", encoding="utf-8")

    def append(self, item_id: str, outcome: Outcome) -> None:
        entry = {"item": item_id, **asdict(outcome)}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[item_id] = entry

    def close(self) -> None:
        self._file.close()


def run_items(items: list[Item], asker: Asker, journal: Journal, desc: str = "synth",
              max_wave: int = 1024) -> None:
    """Drive every item not yet in the journal (or failed there: a rerun retries it) to its outcome, sending all
    pending requests of a wave together.

    max_wave: requests per wave at most (bounds memory; items beyond it wait for the next wave).
    """
    todo = [item for item in items if journal.entries.get(item.id, {}).get("status") in (None, "failed")]
    pending: dict[str, tuple[Steps, list[TeacherRequest]]] = {}
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="row", dynamic_ncols=True)
    queue = iter(todo)

    def start(item: Item) -> None:
        steps = item.steps()
        if isinstance(steps, Outcome):
            journal.append(item.id, steps)
            bar.update(1)
        else:
            _advance(item.id, steps, None, pending, journal, bar)

    try:
        while True:
            while sum(len(r) for _, r in pending.values()) < max_wave and (item := next(queue, None)) is not None:
                start(item)
            if not pending:
                break
            wave = [(item_id, request) for item_id, (_, requests) in pending.items() for request in requests]
            got: dict[str, list[TeacherReply | None]] = {i: [None] * len(r) for i, (_, r) in pending.items()}
            offsets, seen = [], Counter()
            for item_id, _ in wave:
                offsets.append(seen[item_id])
                seen[item_id] += 1
            for k, reply in asker.stream([request for _, request in wave]):
                item_id = wave[k][0]
                got[item_id][offsets[k]] = reply
                if all(r is not None for r in got[item_id]):
                    steps, _ = pending.pop(item_id)
                    _advance(item_id, steps, got.pop(item_id), pending, journal, bar)
    finally:
        bar.close()


def _advance(item_id: str, steps: Steps, replies: list[TeacherReply] | None,
             pending: dict, journal: Journal, bar: tqdm) -> None:
    """Send an item its replies (None to start it); journal its outcome or keep its next requests pending."""
    try:
        requests = next(steps) if replies is None else steps.send(replies)
    except StopIteration as stop:
        journal.append(item_id, stop.value)
        bar.update(1)
        return
    pending[item_id] = steps, requests


# ---- the output filters (run in item order when data.jsonl is written) ----------------------------------------
# Refusal boilerplate: a teacher's canned disclaimers, which teach a student to refuse. The phrases follow the
# ones the community's "unfiltered" re-releases of Vicuna/WizardLM data removed (e.g. "As an AI language model");
# a row whose assistant text matches any is dropped as "refusal". Case-insensitive.
REFUSAL_PATTERNS = (
    r"\bas an ai (language )?model\b",
    r"\bas an ai assistant\b",
    r"\bas a language model\b",
    r"\bI(?:'m| am) (?:sorry|afraid),? but (?:as an ai|I (?:cannot|can't|am unable|am not able))",
    r"\bI (?:cannot|can't|am unable to) (?:fulfill|comply with|assist with) (?:this|that|your) request\b",
    r"\bmy (?:knowledge )?cutoff date\b",
    r"\bOpenAI\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """True when text contains refusal boilerplate (REFUSAL_PATTERNS)."""
    return _REFUSAL.search(text) is not None


def row_text(row: dict[str, Any]) -> str:
    """What the duplicate and refusal filters read: the assistant turns of a dialogue, or an Alpaca row's
    instruction, input and output."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
    return "\n".join(row.get(k, "") for k in ("instruction", "input", "output"))


@dataclass
class OutputFilters:
    """Drop exact duplicate outputs, near duplicates (word 5-gram MinHash, estimated Jaccard >= near_dup) and
    refusals; near_dup None keeps near duplicates, refusals True keeps refusals."""

    near_dup: float | None = 0.8
    refusals: bool = False

    def apply(self, rows: list[dict[str, Any]], counts: Counter) -> list[dict[str, Any]]:
        from llamaherd.curate.minhash import MinHashIndex, MinHashParams

        kept, exact = [], set()
        # 32 bands x 4 rows: candidates from Jaccard ~0.4 up (RefinedWeb's 450x20 rarely offers pairs below 0.75,
        # whatever the threshold), then the threshold decides on the signatures' estimate (128 hashes, sd <= 0.045)
        index = None if self.near_dup is None else MinHashIndex(MinHashParams(bands=32, rows=4), self.near_dup)
        for row in rows:
            text = row_text(row)
            key = " ".join(text.split()).lower()
            if key in exact:
                counts["duplicate"] += 1
                continue
            exact.add(key)
            if not self.refusals and is_refusal(text):
                counts["refusal"] += 1
                continue
            if index is not None and index.add(row["id"], text) is not None:
                counts["near_duplicate"] += 1
                continue
            kept.append(row)
        return kept


def write_data(out_dir: Path, items: list[Item], journal: Journal, filters: OutputFilters) -> dict[str, Any]:
    """Rewrite data.jsonl from the journal, in item order, through the filters; the counts per status/reason."""
    kept_rows, dropped, failed = [], Counter(), Counter()
    for item in items:
        entry = journal.entries.get(item.id)
        if entry is None:
            continue
        if entry["status"] == "kept":
            kept_rows.append(entry["row"])
        elif entry["status"] == "dropped":
            dropped[entry["reason"]] += 1
        else:
            failed[_reason_class(entry["reason"])] += 1
    rows = filters.apply(kept_rows, dropped)
    atomic_write(out_dir / DATA_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"items": len(items), "finished": len(journal.entries), "kept": len(rows),
            "dropped": dict(sorted(dropped.items())), "failed": dict(sorted(failed.items()))}


