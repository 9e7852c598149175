"""Exact substring deduplication (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"),
the last deduplication of RefinedWeb (§3.3): spans of >= 50 tokens that occur more than once in the corpus are cut.

What is removed: Lee et al.'s tool (google-research/deduplicate-text-datasets, README "Collecting the duplicates
together") marks every occurrence of a repeated span, the first one included, and strikes them all; that is the
default here. `keep_first=True` keeps each span's earliest occurrence (in shard, then document order) and cuts
only the later ones.

Tokens: words and punctuation runs, the regex `\\w+|[^\\w\\s]+` (Python's Unicode `\\w`), compared exactly (case
kept). This is GPT-2's pre-tokenization without its subword split, so a token is a word or a punctuation run: no
model or vocabulary is needed (the hub is offline, and a data engine's workers should not load a model), and
every token maps back to exact character offsets for the cut. Measured on the 147 English pages of
../shared/benchmarks/web: one such token is 1.16 tokens of a GPT-2-style byte-level BPE (SmolLM2's) and 4.9 bytes,
so 50 of them are about 58 BPE tokens: the default cuts slightly less than Lee et al.'s 50 GPT-2 tokens.

Method: all shards' documents concatenated, each followed by a separator token of its own (so no span crosses a
document), as integer ids; a suffix array (libdivsufsort through `pydivsufsort`) and its LCP array (Kasai et al.)
group the suffixes sharing their first `min_tokens` tokens; every member of a group of two or more (or every member
but the earliest, with keep_first) starts a `min_tokens` window to cut; the union of the windows is removed. A cut
runs from its first token to the start of the next kept token (so it takes the whitespace after it).

Phases, each atomic and skipped when done (see dedup.py): `substring_map` per shard (token hashes), `substring_find`
once (suffix array, in one process), `substring_apply` per shard (the cut). Memory of `substring_find` at its peak,
measured on 10M tokens in 20,000 documents: 32 bytes per token (int32 suffix array, up to ~500M tokens; about 50
beyond, where libdivsufsort needs 64-bit offsets). At 4.9 bytes of English text per token, a machine of M GB handles
about M/6.5 GB of text (~20 GB on 128 GB); beyond that, run it on groups of shards or use Lee et al.'s disk-based
tool. Time: 6 s for those 10M tokens on one core.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xxhash

from llamaherd.curate.dedup import write_json, write_npy
from llamaherd.curate.document import Document

MIN_TOKENS = 50  # Lee et al. 2022 and RefinedWeb: spans of at least 50 tokens
SUBSTRING_PARAMETERS = ("min_tokens", "keep_first")  # what a recipe may set (substring_find's keywords)
_TOKEN = re.compile(r"\w+|[^\w\s]+")


def token_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token of `text` (see the module doc for what a token is)."""
    return [m.span() for m in _TOKEN.finditer(text)]


def _token_hashes(text: str) -> np.ndarray:
    return np.fromiter((xxhash.xxh3_64_intdigest(m.group().encode()) for m in _TOKEN.finditer(text)), np.uint64)


def substring_map(work_dir: str | Path, shard: int, docs: Sequence[Document]) -> None:
    """Phase 1 for one shard: the 64-bit hash of every token of every document, and the shard's marker."""
    root = Path(work_dir)
    marker = root / "map" / f"s{shard:05d}.json"
    if marker.exists():
        return
    hashes = [_token_hashes(d.text) for d in docs]
    write_npy(root / "map" / f"s{shard:05d}.npy", np.concatenate(hashes) if hashes else np.empty(0, np.uint64))
    write_json(marker, {"shard": shard, "ids": [d.id for d in docs], "tokens": [len(h) for h in hashes]})


@dataclass(frozen=True)
class SubstringSummary:
    """What substring deduplication did: documents and tokens seen, tokens removed, documents that lost some."""

    documents: int
    tokens: int
    removed_tokens: int
    documents_cut: int
    min_tokens: int
    keep_first: bool


def substring_find(work_dir: str | Path, n_shards: int, *, min_tokens: int = MIN_TOKENS,
                   keep_first: bool = False) -> SubstringSummary:
    """Phase 2, once, after every shard's map: the token ranges to cut in each document, per shard, then summary.json.

    ValueError if a shard's map is missing or min_tokens < 1.
    """
    if min_tokens < 1:
        raise ValueError(f"substring dedup min_tokens must be >= 1, got {min_tokens}")
    root = Path(work_dir)
    summary_path = root / "find" / "summary.json"
    if summary_path.exists():
        return SubstringSummary(**json.loads(summary_path.read_text()))
    missing = [s for s in range(n_shards) if not (root / "map" / f"s{s:05d}.json").exists()]
    if missing:
        raise ValueError(f"{root}: substring_map has not finished for shards {missing}; run it first")
    lengths = [json.loads((root / "map" / f"s{s:05d}.json").read_text())["tokens"] for s in range(n_shards)]
    doc_tokens = np.array([n for shard in lengths for n in shard], dtype=np.int64)
    seq, doc_starts = _sequence([root / "map" / f"s{s:05d}.npy" for s in range(n_shards)], lengths)
    runs = _runs(_covered(seq, min_tokens, keep_first))  # (start, end) in the sequence, never across a separator
    del seq
    ranges: dict[int, list[list[int]]] = {}
    for doc, start, end in zip((np.searchsorted(doc_starts, runs[:, 0], side="right") - 1).tolist(),
                               runs[:, 0].tolist(), runs[:, 1].tolist()):
        ranges.setdefault(doc, []).append([start - int(doc_starts[doc]), end - int(doc_starts[doc])])
    first_doc = 0
    for shard, shard_lengths in enumerate(lengths):
        per_doc = {str(i): ranges[first_doc + i] for i in range(len(shard_lengths)) if first_doc + i in ranges}
        write_json(root / "find" / f"s{shard:05d}.json", per_doc)
        first_doc += len(shard_lengths)
    summary = SubstringSummary(documents=len(doc_tokens), tokens=int(doc_tokens.sum()),
                               removed_tokens=int(sum(e - s for s, e in runs.tolist())), documents_cut=len(ranges),
                               min_tokens=min_tokens, keep_first=keep_first)
    write_json(summary_path, asdict(summary))
    return summary


def substring_apply(work_dir: str | Path, shard: int, docs: Sequence[Document]) -> list[str | None]:
    """Phase 3 for one shard (the same documents as given to `substring_map`): cut each document's repeated spans.

    Returns per document None (kept, perhaps shortened) or "substring_dedup:all_removed" when nothing but
    whitespace is left. A cut document's text is rewritten and gets metadata["substring_dedup"] =
    {"removed_tokens", "tokens"}. ValueError if a document's tokens differ from the map phase's.
    """
    root = Path(work_dir)
    marker = json.loads((root / "map" / f"s{shard:05d}.json").read_text())
    ranges = json.loads((root / "find" / f"s{shard:05d}.json").read_text())
    if [d.id for d in docs] != marker["ids"]:
        raise ValueError(f"substring dedup: shard {shard}'s documents differ from those given to substring_map; "
                         "pass the same documents in the same order")
    decisions: list[str | None] = [None] * len(docs)
    for key, doc_ranges in ranges.items():
        doc = docs[int(key)]
        spans = token_spans(doc.text)
        if len(spans) != marker["tokens"][int(key)]:
            raise ValueError(f"substring dedup: document {doc.id!r} changed since substring_map; rerun the map")
        pieces, kept_from = [], 0
        for start, end in doc_ranges:
            pieces.append(doc.text[kept_from : spans[start][0]])
            kept_from = spans[end][0] if end < len(spans) else len(doc.text)
        pieces.append(doc.text[kept_from:])
        doc.text = "".join(pieces)
        doc.metadata["substring_dedup"] = {"removed_tokens": sum(e - s for s, e in doc_ranges), "tokens": len(spans)}
        if not doc.text.strip():
            decisions[int(key)] = "substring_dedup:all_removed"
    return decisions


def _sequence(paths: list[Path], lengths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens as dense ids, each document followed by its own separator id; and each doc's start.

    Built one shard at a time (the vocabulary first, then each shard's ids), so memory stays at the 4-byte sequence
    plus one shard's hashes.
    """
    vocab = np.unique(np.concatenate([np.unique(np.load(p)) for p in paths] or [np.empty(0, np.uint64)]))
    doc_tokens = np.array([n for shard in lengths for n in shard], dtype=np.int64)
    n_docs = len(doc_tokens)
    doc_starts = np.zeros(n_docs, dtype=np.int64)
    doc_starts[1:] = np.cumsum(doc_tokens + 1)[:-1]
    dtype = np.uint32 if len(vocab) + n_docs < 2**32 else np.uint64
    seq = np.empty(int(doc_tokens.sum()) + n_docs, dtype=dtype)
    first_doc = 0
    for path, shard_lengths in zip(paths, lengths):
        docs = slice(first_doc, first_doc + len(shard_lengths))
        first_doc += len(shard_lengths)
        if not shard_lengths:
            continue
        begin = int(doc_starts[docs][0])
        region = seq[begin : begin + sum(shard_lengths) + len(shard_lengths)]
        is_token = np.ones(len(region), dtype=bool)
        is_token[doc_starts[docs] + doc_tokens[docs] - begin] = False
        region[is_token] = np.searchsorted(vocab, np.load(path))
        region[~is_token] = len(vocab) + np.arange(docs.start, docs.stop, dtype=dtype)
    return seq, doc_starts


def _covered(seq: np.ndarray, min_tokens: int, keep_first: bool) -> np.ndarray:
    """Boolean mask over `seq`: the tokens inside a window of `min_tokens` that occurs more than once."""
    from pydivsufsort import kasai

    n = len(seq)
    if n == 0:
        return np.zeros(0, dtype=bool)
    sa = _suffix_array(seq)
    lcp = kasai(seq, sa)  # lcp[i] = common prefix length of suffixes sa[i] and sa[i+1]
    linked = lcp[:-1] >= min_tokens  # suffixes sa[i] and sa[i+1] share their first min_tokens tokens
    del lcp
    repeated = np.zeros(n, dtype=bool)  # in suffix-array order: the suffix's first min_tokens tokens occur twice
    repeated[:-1] |= linked
    repeated[1:] |= linked
    if keep_first:  # a group is a run of linked neighbours (one repeated window); its earliest position stays
        members = np.flatnonzero(repeated)
        new_group = np.ones(len(members), dtype=bool)
        new_group[1:] = ~linked[members[1:] - 1]
        first = np.flatnonzero(new_group)
        earliest = np.minimum.reduceat(sa[members], first)
        repeated[members] = sa[members] != np.repeat(earliest, np.diff(np.append(first, len(members))))
    is_start = np.zeros(n, dtype=bool)
    is_start[sa[repeated]] = True  # a window of min_tokens to cut starts here
    started = np.cumsum(is_start, dtype=np.int64 if n >= 2**31 else np.int32)
    started[min_tokens:] -= started[:-min_tokens].copy()  # windows started in (i - min_tokens, i]
    return started > 0


def _suffix_array(seq: np.ndarray) -> np.ndarray:
    """Suffix array of an integer sequence: libdivsufsort on its big-endian bytes (byte order = token order), kept
    at the token boundaries. pydivsufsort's `divsufsort(int array)` does the same with full-size temporaries; the
    filter here goes by chunks (peak measured on 10M tokens: 45 -> 29 bytes per token)."""
    from pydivsufsort import divsufsort

    width = 2 if int(seq.max()) < 2**16 else seq.dtype.itemsize
    big_endian = seq.astype(f">u{width}")
    byte_sa = divsufsort(big_endian.view(np.uint8))
    del big_endian
    chunks = np.array_split(byte_sa, max(1, len(byte_sa) // 2**22))
    return np.concatenate([c[c % width == 0] // width for c in chunks])


def _runs(mask: np.ndarray) -> np.ndarray:
    """(start, end) of each run of True in `mask`, shape (R, 2)."""
    padded = np.concatenate([[False], mask, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return change.reshape(-1, 2)

