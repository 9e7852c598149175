"""The unit every curation stage reads and writes, and the contract a per-document stage follows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One web page or text record on its way through the pipeline.

    id: stable across runs (from the input: WARC-Record-ID, JSONL `id`, or file path), used to order output and
    to pick the kept document of a duplicate cluster. html: the raw page, decoded, until extraction fills `text`.
    source: where it was read ("file" or "file:record-offset"). metadata: each stage's scores under its name,
    written out with `--keep-metadata`.
    """

    id: str
    text: str = ""
    url: str | None = None
    html: str | None = None
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


# A per-document stage: returns None to keep the document (it may rewrite doc.text and add doc.metadata[name]),
# or the removal reason as "stage:rule" (e.g. "gopher_quality:word_count") to drop it.
DocumentStage = Callable[[Document], str | None]
