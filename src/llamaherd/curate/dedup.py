"""Document deduplication across all shards: exact (normalized-text hash) and fuzzy (MinHash-LSH), RefinedWeb §3.3.

Both are one shuffle on 64-bit keys, in three phases that any executor can run, each reading and writing files
under a work directory `dedup_dir` that belongs to one deduplication:

1. `dedup_map(dedup_dir, shard, docs, ...)`, once per shard, in any process: each document's keys (exact: one hash
   of its normalized text; fuzzy: one hash per MinHash band) as (key, document) records, partitioned by key into
   `n_buckets` files, then the shard's marker (its document ids and settings).
2. `dedup_reduce(dedup_dir, bucket, n_shards)`, once per bucket, after every map: records grouped by key; each
   document is linked to the first document of each group it is in (candidate edges).
3. `dedup_resolve(dedup_dir, n_shards, n_buckets)`, once: union-find over all edges gives clusters; each cluster
   keeps its document with the smallest id (ties by shard, then position), all others are removed. Then
   `dedup_decisions(dedup_dir, shard, docs)` marks each shard's removed documents.

Every output is written atomically (temp file + rename), skipped when already there (a killed run redoes only the
unfinished pieces), sorted, and a function of the inputs alone, so it is byte-identical whatever order or process
the tasks ran in. `dedup_shard(docs, ...)` does the same within one shard (`--per-shard`, as RefinedWeb
deduplicated each CommonCrawl part separately), through `find_duplicates`, the in-memory form.

Exact key: xxHash3-64 of `minhash.normalize_text(text)` (lowercased, punctuation and symbols removed, whitespace
collapsed), so texts that differ only in case, punctuation or layout are exact duplicates. Fuzzy keys:
`minhash.band_hashes`; a document without words has none (it can only be an exact duplicate). Candidates are not
verified: with 450 bands of 20 rows, sharing a band means Jaccard >= ~0.7 with near certainty (the S-curve).
Keys are 64-bit: distinct texts share an exact key with probability N^2/2^65 over N documents (0.03 at 10^9).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from llamaherd.curate.document import Document
from llamaherd.files import atomic_write
from llamaherd.curate.minhash import REFINEDWEB, MinHashParams, band_hashes, normalize_text, signature

Method = Literal["exact", "fuzzy"]
METHODS: tuple[Method, ...] = ("exact", "fuzzy")
RECORD = np.dtype([("key", "<u8"), ("doc", "<u4")])  # a map record: key, position of the document in its shard
EDGE = np.dtype([("a", "<u8"), ("b", "<u8")])  # a candidate pair, each side as shard << 32 | position


def exact_key(text: str) -> int:
    """The exact-duplicate key of `text`: xxHash3-64 of its normalized form (see the module doc)."""
    return xxhash.xxh3_64_intdigest(normalize_text(text).encode())


def document_keys(text: str, method: Method, params: MinHashParams = REFINEDWEB) -> np.ndarray:
    """The shuffle keys of one text, uint64: (1,) for exact, (bands,) for fuzzy, (0,) for fuzzy without words."""
    if method == "exact":
        return np.array([exact_key(text)], dtype=np.uint64)
    if method != "fuzzy":
        raise ValueError(f"dedup method must be one of {METHODS}, got {method!r}")
    if not normalize_text(text):
        return np.empty(0, dtype=np.uint64)
    return band_hashes(signature(text, params), params)


# ---- the phases --------------------------------------------------------------------------------------------------


def dedup_map(dedup_dir: str | Path, shard: int, docs: Sequence[Document], *, method: Method,
              params: MinHashParams = REFINEDWEB, n_buckets: int = 16) -> None:
    """Phase 1 for one shard: write its (key, position) records into `n_buckets` files, then its marker.

    Done already (marker present with the same settings): returns at once. ValueError if the marker was written
    with other settings (use a fresh `dedup_dir`).
    """
    root = Path(dedup_dir)
    settings = _settings(method, params, n_buckets)
    marker = root / "map" / f"s{shard:05d}.json"
    if marker.exists():
        _check_settings(marker, settings)
        return
    keys, positions = [], []
    for i, doc in enumerate(docs):
        k = document_keys(doc.text, method, params)
        keys.append(k)
        positions.append(np.full(len(k), i, dtype=np.uint32))
    records = np.empty(sum(len(k) for k in keys), dtype=RECORD)
    records["key"] = np.concatenate(keys) if keys else []
    records["doc"] = np.concatenate(positions) if positions else []
    records = records[np.lexsort((records["doc"], records["key"]))]
    bucket_of = records["key"] % np.uint64(n_buckets)
    for bucket in range(n_buckets):
        write_npy(root / "map" / f"s{shard:05d}-b{bucket:04d}.npy", records[bucket_of == bucket])
    write_json(marker, {**settings, "shard": shard, "ids": [d.id for d in docs]})


def dedup_reduce(dedup_dir: str | Path, bucket: int, n_shards: int) -> None:
    """Phase 2 for one bucket: group every shard's records of this bucket by key into candidate edges.

    ValueError if a shard's map is missing or was run with other settings.
    """
    root = Path(dedup_dir)
    out = root / "reduce" / f"b{bucket:04d}.npy"
    if out.exists():
        return
    _map_settings(root, n_shards)
    keys, refs = [], []
    for shard in range(n_shards):
        records = np.load(root / "map" / f"s{shard:05d}-b{bucket:04d}.npy")
        keys.append(records["key"])
        refs.append((np.uint64(shard) << np.uint64(32)) | records["doc"].astype(np.uint64))
    write_npy(out, _edges(np.concatenate(keys), np.concatenate(refs)))


@dataclass(frozen=True)
class DedupSummary:
    """What a deduplication did: documents seen, clusters of more than one, documents removed."""

    method: str
    documents: int
    clusters: int
    removed: int


def dedup_resolve(dedup_dir: str | Path, n_shards: int, n_buckets: int) -> DedupSummary:
    """Phase 3, once: clusters from all edges; writes each shard's removals, then summary.json (the marker)."""
    root = Path(dedup_dir)
    summary_path = root / "resolve" / "summary.json"
    if summary_path.exists():
        return DedupSummary(**json.loads(summary_path.read_text()))
    settings = _map_settings(root, n_shards)
    if settings["buckets"] != n_buckets:
        raise ValueError(f"{root}: the map phase used {settings['buckets']} buckets, not {n_buckets}")
    ids = [json.loads((root / "map" / f"s{s:05d}.json").read_text())["ids"] for s in range(n_shards)]
    missing = [b for b in range(n_buckets) if not (root / "reduce" / f"b{b:04d}.npy").exists()]
    if missing:
        raise ValueError(f"{root}: dedup_reduce has not run for buckets {missing}; run it first")
    edges = np.concatenate([np.load(root / "reduce" / f"b{b:04d}.npy") for b in range(n_buckets)])
    removals: list[list[list]] = [[] for _ in range(n_shards)]
    clusters = 0
    for members in _clusters(edges["a"], edges["b"]):
        clusters += 1
        named = sorted((ids[m >> 32][m & 0xFFFFFFFF], m >> 32, m & 0xFFFFFFFF) for m in members)
        kept_id, kept_shard, _ = named[0]
        for doc_id, shard, pos in named[1:]:
            removals[shard].append([pos, doc_id, kept_id, kept_shard])
    for shard in range(n_shards):
        write_json(root / "resolve" / f"s{shard:05d}.json", sorted(removals[shard]))
    summary = DedupSummary(method=settings["method"], documents=sum(len(i) for i in ids), clusters=clusters,
                           removed=sum(len(r) for r in removals))
    write_json(summary_path, asdict(summary))
    return summary


def dedup_decisions(dedup_dir: str | Path, shard: int, docs: Sequence[Document]) -> list[str | None]:
    """Per document of `shard` (the same list given to `dedup_map`): None to keep it, or the removal reason.

    A removed document gets `metadata["<method>_dedup"] = {"duplicate_of": kept id, "duplicate_of_shard": shard}`.
    """
    root = Path(dedup_dir)
    method = json.loads((root / "resolve" / "summary.json").read_text())["method"]
    removals = json.loads((root / "resolve" / f"s{shard:05d}.json").read_text())
    return _decide(docs, method, {pos: (doc_id, kept_id, kept_shard)
                                  for pos, doc_id, kept_id, kept_shard in removals})


def dedup_shard(docs: Sequence[Document], *, method: Method,
                params: MinHashParams = REFINEDWEB) -> list[str | None]:
    """The per-shard variant: deduplicate `docs` among themselves only; decisions as `dedup_decisions` gives them."""
    removed = find_duplicates([d.id for d in docs], [document_keys(d.text, method, params) for d in docs])
    return _decide(docs, method, {pos: (docs[pos].id, docs[kept].id, None) for pos, kept in removed.items()})


def find_duplicates(ids: Sequence[str], keys: Sequence[np.ndarray]) -> dict[int, int]:
    """In memory: documents linked by a shared key (`keys[i]`: document i's `document_keys`) form clusters; returns
    {position removed: position kept} with the smallest id kept in each cluster (ties: the smaller position)."""
    refs = [np.full(len(k), i, dtype=np.uint64) for i, k in enumerate(keys)]
    flat_keys = np.concatenate(keys) if len(keys) else np.empty(0, np.uint64)
    edges = _edges(flat_keys.astype(np.uint64), np.concatenate(refs) if refs else np.empty(0, np.uint64))
    removed = {}
    for members in _clusters(edges["a"], edges["b"]):
        kept = min(members, key=lambda m: (ids[m], m))
        removed.update({m: kept for m in members if m != kept})
    return removed


# ---- the shared core ---------------------------------------------------------------------------------------------


def _edges(keys: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Candidate edges (EDGE records, sorted, unique): each document to the smallest document sharing a key with it."""
    order = np.lexsort((refs, keys))
    keys, refs = keys[order], refs[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    first = refs[starts][np.cumsum(starts) - 1]
    linked = first != refs
    pairs = np.unique(np.stack([first[linked], refs[linked]], axis=1), axis=0)
    edges = np.empty(len(pairs), dtype=EDGE)
    edges["a"], edges["b"] = pairs[:, 0], pairs[:, 1]
    return edges


def _clusters(a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Connected components of the graph with edges a[i]-b[i] (union-find), each sorted; only nodes with edges."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    parent = list(range(len(nodes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    n = len(a)
    for x, y in zip(inverse[:n].tolist(), inverse[n:].tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for i, node in enumerate(nodes.tolist()):
        groups.setdefault(find(i), []).append(node)
    return [groups[root] for root in sorted(groups)]


def _decide(docs: Sequence[Document], method: str, removals: dict) -> list[str | None]:
    decisions: list[str | None] = [None] * len(docs)
    for pos, (doc_id, kept_id, kept_shard) in removals.items():
        if pos >= len(docs) or docs[pos].id != doc_id:
            raise ValueError(f"dedup: document {pos} of this shard is not {doc_id!r}; pass the same documents, in "
                             "the same order, as to dedup_map")
        docs[pos].metadata[f"{method}_dedup"] = {"duplicate_of": kept_id, "duplicate_of_shard": kept_shard}
        decisions[pos] = f"{method}_dedup:duplicate"
    return decisions


def _settings(method: Method, params: MinHashParams, n_buckets: int) -> dict:
    if method not in METHODS:
        raise ValueError(f"dedup method must be one of {METHODS}, got {method!r}")
    if n_buckets < 1:
        raise ValueError(f"dedup n_buckets must be >= 1, got {n_buckets}")
    return {"method": method, "params": asdict(params) if method == "fuzzy" else None, "buckets": n_buckets}


def _check_settings(marker: Path, settings: dict) -> dict:
    found = json.loads(marker.read_text())
    if {k: found.get(k) for k in settings} != settings:
        raise ValueError(f"{marker} was written with other settings ({ {k: found.get(k) for k in settings} }, now "
                         f"{settings}); use a fresh work directory")
    return found


def _map_settings(root: Path, n_shards: int) -> dict:
    """The settings every shard's map ran with; ValueError if one is missing or they differ."""
    markers = [root / "map" / f"s{s:05d}.json" for s in range(n_shards)]
    missing = [s for s, m in enumerate(markers) if not m.exists()]
    if missing:
        raise ValueError(f"{root}: dedup_map has not finished for shards {missing}; run it first")
    first = json.loads(markers[0].read_text())
    settings = {k: first[k] for k in ("method", "params", "buckets")}
    for m in markers[1:]:
        _check_settings(m, settings)
    return settings


def write_json(path: Path, obj: object) -> None:
    """`obj` as compact JSON with sorted keys, written atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, sort_keys=True))


def write_npy(path: Path, array: np.ndarray) -> None:
    """`array` in NumPy's .npy format (no pickles), written atomically."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getvalue())
