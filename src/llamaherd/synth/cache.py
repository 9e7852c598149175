"""The request cache: what a teacher answered, keyed by `TeacherRequest.content_hash(teacher_id)`, so a rerun (after
a kill, or with more rows) never pays twice for the same request.

One JSON line per answer, appended, flushed and fsynced before put() returns. A kill mid-write leaves at most a
torn last line (one without its newline); opening the cache cuts it off, with no error, and that request is asked
again. Failed replies are not cached: the next run retries them.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from llamaherd.errors import InputError
from llamaherd.files import complete_lines
from llamaherd.synth.teacher import TeacherReply

FIELDS = ("text", "finish_reason", "prompt_tokens", "completion_tokens")


class RequestCache:
    """A persistent map from a request's content hash to its reply's FIELDS, in an append-only JSONL file.

    Raises InputError when a complete line of the file is not a cache entry (the file was edited or is another
    file); safe to share between threads of one process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> dict[str, Any] | None:
        """The cached reply's fields ({"text", "finish_reason", "prompt_tokens", "completion_tokens"}) or None."""
        entry = self._entries.get(content_hash)
        return None if entry is None else dict(entry)

    def put(self, content_hash: str, reply: TeacherReply) -> None:
        """Record a successful reply, durably, before returning; a failed reply or a hash already held is a no-op."""
        if not reply.ok:
            return
        entry = {name: getattr(reply, name) for name in FIELDS}
        line = json.dumps({"hash": content_hash, **entry}) + "\n"  # ASCII: any text, lone surrogates too, fits
        with self._lock:
            if content_hash in self._entries:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="ascii") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._entries[content_hash] = entry

    def _load(self) -> None:
        for number, line in enumerate(complete_lines(self.path), 1):  # a torn last line is cut off
            try:
                record = json.loads(line)
                self._entries[record["hash"]] = {name: record[name] for name in FIELDS}
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{self.path}: line {number} is not a request-cache entry; delete that line or "
                                 "the file (it only saves paying twice for a request)") from None
