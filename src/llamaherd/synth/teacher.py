"""The one interface every synthetic-data recipe generates through: a batch of requests in, replies out as they
finish. Implementations: the local generation engine (teacher_local.py) and an OpenAI-compatible HTTP endpoint
(teacher_http.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TeacherRequest:
    """One generation: a chat (`messages`, OpenAI roles) or a raw completion (`prompt`), never both.

    key: the caller's id for the row it belongs to (not part of the content hash). stop: strings that end the
    output (not included in it). seed: per-request sampling seed (the local engine honours it exactly; an HTTP
    endpoint as far as it supports `seed`).
    """

    key: str
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a TeacherRequest has either messages (chat) or prompt (completion), not both")

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "completion"

    def content(self) -> dict[str, Any]:
        """Everything that decides the reply (all fields but `key`), as plain JSON values."""
        data = asdict(self)
        del data["key"]
        data["messages"] = None if self.messages is None else [list(m) for m in self.messages]
        data["stop"] = list(self.stop)
        return data

    def content_hash(self, teacher_id: str) -> str:
        """sha256 of the teacher's identity and the request content: the request cache's key."""
        blob = json.dumps({"teacher": teacher_id, **self.content()}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class TeacherReply:
    """What came back for one request. text is None when every attempt failed; error then says why.

    finish_reason: "stop" (EOS or a stop string) or "length". Token counts come from the endpoint's `usage`
    (HTTP) or the engine (local); 0 when unknown.
    """

    request: TeacherRequest
    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    attempts: int = 1
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.text is not None


class Teacher(Protocol):
    """A model that answers TeacherRequests.

    identity: what the manifest records (name and fingerprint of a local model; base URL and model id of an
    endpoint; never an API key). teacher_id: a short stable string for cache keys and lineage.
    """

    identity: dict[str, Any]
    teacher_id: str

    def run(self, requests: Iterable[TeacherRequest]) -> Iterator[TeacherReply]:
        """Answer every request, yielding replies in the order they finish; a request that fails after its
        retries yields a reply with text None and the reason in error, never an exception."""
        ...
