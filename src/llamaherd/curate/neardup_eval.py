"""Fuzzy deduplication measured on planted near-duplicates of real pages (issue 15, "Quality, measured").

Each page (text of at least `min_words` words) gets one edited copy per edit kind: `replace`, `delete` or
`insert` a share k of its words at random positions (inserted and replacing words are drawn from the whole
corpus' words), k cycling through `rates` page by page. Every pair's exact word 5-gram Jaccard (`minhash.jaccard`)
is computed, then:

- candidate: the copy shares a MinHash band with its original (the event the S-curve gives the probability of);
- removed: deduplicating originals and copies together (`dedup.find_duplicates`), the copy falls in its
  original's cluster;
- originals flagged: originals in a cluster with another original (false positives: no two pages of the shared
  set are duplicates, see ../shared/benchmarks/SOURCES.md).

`format_table` prints, per Jaccard bin, the measured candidate rate beside the theoretical one (the mean of
`detection_probability` over the bin's pairs).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamaherd.curate.dedup import document_keys, find_duplicates
from llamaherd.curate.minhash import REFINEDWEB, MinHashParams, detection_probability, jaccard

EDITS = ("replace", "delete", "insert")
RATES = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08)
BINS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class PlantedPair:
    """One original page and its edited copy."""

    page: int
    edit: str
    rate: float
    jaccard: float
    candidate: bool
    removed: bool


@dataclass(frozen=True)
class NearDupResult:
    """All planted pairs, and how many of the distinct original pages were flagged as duplicates of each other."""

    params: MinHashParams
    pages: int
    originals_flagged: int
    pairs: list[PlantedPair]

    def recall(self, min_jaccard: float = 0.8) -> float:
        """Share of pairs with Jaccard >= min_jaccard whose copy is removed as a duplicate of its original."""
        hits = [p.removed for p in self.pairs if p.jaccard >= min_jaccard]
        return float(np.mean(hits)) if hits else float("nan")

    @property
    def false_positive_rate(self) -> float:
        """Share of distinct original pages put in a cluster with another original."""
        return self.originals_flagged / self.pages if self.pages else 0.0


def edit_words(words: Sequence[str], edit: str, rate: float, rng: random.Random,
               vocabulary: Sequence[str]) -> list[str]:
    """`words` with max(1, round(rate * len)) of them replaced, deleted, or new ones inserted at random places."""
    k = max(1, round(rate * len(words)))
    out = list(words)
    if edit == "replace":
        for i in rng.sample(range(len(out)), k):
            out[i] = rng.choice(vocabulary)
    elif edit == "delete":
        gone = set(rng.sample(range(len(out)), k))
        out = [w for i, w in enumerate(out) if i not in gone]
    elif edit == "insert":
        for _ in range(k):
            out.insert(rng.randrange(len(out) + 1), rng.choice(vocabulary))
    else:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    return out


def evaluate_near_duplicates(texts: Sequence[str], params: MinHashParams = REFINEDWEB, *, min_words: int = 100,
                             rates: Sequence[float] = RATES, seed: int = 0) -> NearDupResult:
    """Plant one copy per edit kind of every text of >= min_words words, deduplicate all, and count (module doc)."""
    pages = [t.split() for t in texts if len(t.split()) >= min_words]
    vocabulary = sorted({w for words in pages for w in words})
    rng = random.Random(seed)
    planted: list[tuple[int, str, float, list[str]]] = []
    for page, words in enumerate(pages):
        for e, edit in enumerate(EDITS):
            rate = rates[(page + e) % len(rates)]
            planted.append((page, edit, rate, edit_words(words, edit, rate, rng, vocabulary)))
    corpus = [" ".join(words) for words in pages] + [" ".join(copy) for *_, copy in planted]
    keys = [document_keys(text, "fuzzy", params) for text in corpus]
    ids = [f"{i:07d}" for i in range(len(corpus))]  # originals first: a cluster keeps its original
    removed = find_duplicates(ids, keys)

    def root(i: int) -> int:
        return removed.get(i, i)

    cluster_originals = Counter(root(i) for i in range(len(pages)))
    pairs = []
    for c, (page, edit, rate, _) in enumerate(planted):
        copy = len(pages) + c
        pairs.append(PlantedPair(page=page, edit=edit, rate=rate, jaccard=jaccard(corpus[page], corpus[copy],
                                                                                   params.ngram),
                                 candidate=bool(np.intersect1d(keys[page], keys[copy]).size),
                                 removed=root(copy) == root(page)))
    flagged = sum(n for n in cluster_originals.values() if n > 1)
    return NearDupResult(params=params, pages=len(pages), originals_flagged=flagged, pairs=pairs)


def format_table(result: NearDupResult, bins: Sequence[float] = BINS) -> str:
    """Markdown table: per Jaccard bin, pairs, measured candidate rate, theoretical rate, removed rate."""
    p = result.params
    lines = [
        f"MinHash {p.bands} bands x {p.rows} rows, word {p.ngram}-grams: {result.pages} pages, "
        f"{len(result.pairs)} planted pairs; recall at Jaccard >= 0.8: {result.recall(0.8):.4f}; "
        f"originals flagged as duplicates of each other: {result.originals_flagged} "
        f"({100 * result.false_positive_rate:.2f}%)",
        "",
        "| Jaccard | pairs | candidate (measured) | candidate (theory) | removed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for low, high in zip(bins[:-1], bins[1:]):
        inside = [q for q in result.pairs if low <= q.jaccard < high or (high == bins[-1] and q.jaccard == high)]
        if not inside:
            continue
        theory = np.mean([detection_probability(q.jaccard, p.bands, p.rows) for q in inside])
        lines.append(f"| {low:.2f}-{high:.2f} | {len(inside)} | {np.mean([q.candidate for q in inside]):.3f} | "
                     f"{theory:.3f} | {np.mean([q.removed for q in inside]):.3f} |")
    return "\n".join(lines)


def shared_page_texts(pages_dir: str | Path) -> list[str]:
    """Main text of every `.html.gz` page in `pages_dir` (in name order), read and extracted as `herd curate` does."""
    from llamaherd.curate.extract import Extractor
    from llamaherd.curate.read import read_html_file

    extractor, bad, texts = Extractor(), Counter(), []
    for path in sorted(Path(pages_dir).glob("*.html.gz")):
        doc = read_html_file(str(path), path.name, bad)
        if doc is not None and extractor(doc) is None:
            texts.append(doc.text)
    return texts
