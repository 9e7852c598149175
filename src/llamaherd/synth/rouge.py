"""Self-Instruct's novelty filter: keep a new instruction only if its ROUGE-L F-measure against every instruction
already in the pool is <= 0.7 (Wang et al. 2022, §2.3; the `rouge-score` package, no stemming, as
self_instruct/bootstrap_instructions.py scores it).

Exact and fast at tens of thousands of instructions: ROUGE-L F = 2·LCS / (|a| + |b|) and LCS <= the size of
the multiset intersection of the two token lists, so a pool instruction whose token overlap bound is <= the
threshold cannot exceed it. An inverted index over tagged tokens ("the#2" = the second "the") gives every pool
instruction's overlap with the new one in one numpy bincount; only those above the bound are scored exactly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from rouge_score import rouge_scorer, tokenizers


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts as `rouge-score` computes it (no stemming)."""
    return _SCORER.score(a, b)["rougeL"].fmeasure


_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)


class _Postings:
    """A growable int32 array (amortized doubling), so queries read a numpy view without copying lists."""

    def __init__(self) -> None:
        self.data, self.size = np.empty(8, dtype=np.int32), 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class NoveltyPool:
    """The instructions seen so far; `add(text)` keeps text only when no pool member has ROUGE-L F > threshold.

    Returns of add: (kept, best score, the most similar pool instruction or None).
    """

    def __init__(self, threshold: float = 0.7) -> None:
        self.threshold = threshold
        self.texts: list[str] = []
        self.lengths = _Postings()
        self.index: dict[str, _Postings] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def insert(self, text: str) -> None:
        """Add to the pool unconditionally (the seed tasks)."""
        tokens = _TOKENIZER.tokenize(text)
        position = len(self.texts)
        self.texts.append(text)
        self.lengths.append(len(tokens))
        for tagged in _tagged(tokens):
            self.index.setdefault(tagged, _Postings()).append(position)

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """The highest ROUGE-L F against the pool and that instruction (0.0, None for an empty pool)."""
        tokens = _TOKENIZER.tokenize(text)
        lists = [self.index[t].view() for t in _tagged(tokens) if t in self.index]
        if not lists or not tokens:
            return 0.0, None
        overlap = np.bincount(np.concatenate(lists), minlength=len(self.texts))
        bound = 2.0 * overlap / (len(tokens) + self.lengths.view())
        best, best_text = 0.0, None
        for j in np.flatnonzero(bound > self.threshold - 1e-9):  # margin: rouge-score rounds 2PR/(P+R)
            score = rouge_l(self.texts[j], text)
            if score > best:
                best, best_text = score, self.texts[j]
        return best, best_text

    def add(self, text: str) -> tuple[bool, float, str | None]:
        """Insert text if it is novel (best score <= threshold); what was decided and why."""
        best, similar = self.most_similar(text)
        if best > self.threshold:
            return False, best, similar
        self.insert(text)
        return True, best, similar


def _tagged(tokens: list[str]) -> list[str]:
    """Each token tagged with its occurrence number, so set intersection = multiset intersection."""
    seen: Counter = Counter()
    out = []
    for t in tokens:
        seen[t] += 1
        out.append(f"{t}#{seen[t]}")
    return out
