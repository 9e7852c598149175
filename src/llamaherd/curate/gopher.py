"""Gopher's repetition and quality filters (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
from Training Gopher", appendix A.1.1 and Table A1), which RefinedWeb applies as its §3.2 "Repetition removal" and
"Document-wise filtering".

The paper states the rules, not their tokenization; the readings taken here, each a choice where the text is silent:
words are whitespace-separated tokens (punctuation stays attached); lines are the text's non-empty lines and
paragraphs its blocks separated by blank lines, both stripped of surrounding whitespace; the characters of a line or
paragraph are its length, those of an n-gram the lengths of its words (the whitespace between words not counted).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

from llamaherd.curate.base import Stage
from llamaherd.curate.document import Document

# Table A1 of Rae et al. 2021: the most frequent n-gram may cover at most this fraction of the characters ...
TOP_NGRAM_CHARS = {2: 0.20, 3: 0.18, 4: 0.16}
# ... and all duplicated n-grams together at most this fraction.
DUP_NGRAM_CHARS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# Lines "starting with a bullet point": the bullet characters of Unicode's General Punctuation and Geometric Shapes
# blocks that pages use for lists, plus the ASCII and dash forms that text extraction leaves for <li> items.
BULLETS = ("•", "‣", "⁃", "◦", "●", "○", "■", "□", "▪", "▫", "►", "▶", "➢", "·", "-", "–", "—", "*")
ELLIPSES = ("...", "…")
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
ALPHA = re.compile(r"[^\W\d_]")
EDGE_PUNCTUATION = "\"'“”‘’«»()[]{}<>.,;:!?¡¿-–—…*"


def _keep(scores: dict[str, float], key: str, value: float) -> float:
    """Record a score (rounded, for the metadata) and return it unrounded, for the comparison."""
    scores[key] = round(value, 4)
    return value


def _duplicates(elements: list[str]) -> tuple[float, float]:
    """(fraction of elements equal to an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup = dup_chars = chars = 0
    for element in elements:
        chars += len(element)
        if element in seen:
            dup += 1
            dup_chars += len(element)
        else:
            seen.add(element)
    return (dup / len(elements), dup_chars / chars) if elements else (0.0, 0.0)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


def top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters in all occurrences of the most frequent n-gram (A.1.1), as a fraction of `total_chars`.

    An n-gram seen once is no repetition: 0.0. Among n-grams tied for most frequent, the one with the most characters.
    """
    counts = Counter(_ngrams(words, n))
    if not counts or total_chars == 0:
        return 0.0
    top = max(counts.values())
    if top < 2:
        return 0.0
    longest = max(sum(map(len, gram)) for gram, count in counts.items() if count == top)
    return top * longest / total_chars


def dup_ngram_char_fraction(words: list[str], n: int, lengths: list[int], total_chars: int) -> float:
    """Characters of the words covered by any n-gram that occurs more than once, as a fraction of `total_chars`.

    A word inside several repeated n-grams (overlapping occurrences) is counted once, as A.1.1 asks.
    """
    grams = _ngrams(words, n)
    counts = Counter(grams)
    if total_chars == 0 or len(counts) == len(grams):
        return 0.0
    prefix = [0, *accumulate(lengths)]  # prefix[i]: characters of words[:i]
    covered = end = 0
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            first = max(start, end)
            end = start + n
            covered += prefix[end] - prefix[first]
    return covered / total_chars


class GopherRepetition(Stage):
    """Drop documents with too much repeated text (Gopher A.1.1, thresholds of Table A1).

    A document is removed when the fraction of duplicate lines exceeds max_dup_lines (0.30), of duplicate paragraphs
    max_dup_paragraphs (0.30), of characters in duplicate lines max_dup_line_chars (0.20), of characters in duplicate
    paragraphs max_dup_paragraph_chars (0.20), when for n in 2..4 the most frequent n-gram covers more than
    max_top_ngram_chars[n] of the characters (0.20, 0.18, 0.16), or when for n in 5..10 the duplicated n-grams cover
    more than max_dup_ngram_chars[n] (0.15 ... 0.10). A duplicate line or paragraph is one equal to an earlier one.
    Reasons: "gopher_repetition:<rule>" with rule dup_lines, dup_paragraphs, dup_line_chars, dup_paragraph_chars,
    top_<n>gram, dup_<n>gram; doc.metadata[name] holds the fractions computed up to the first failing rule.
    """

    name = "gopher_repetition"

    def __init__(self, max_dup_lines: float = 0.30, max_dup_paragraphs: float = 0.30, max_dup_line_chars: float = 0.20,
                 max_dup_paragraph_chars: float = 0.20, max_top_ngram_chars: Mapping[int, float] = TOP_NGRAM_CHARS,
                 max_dup_ngram_chars: Mapping[int, float] = DUP_NGRAM_CHARS):
        self.max_dup_lines = self.number("max_dup_lines", max_dup_lines, 0.0, 1.0)
        self.max_dup_paragraphs = self.number("max_dup_paragraphs", max_dup_paragraphs, 0.0, 1.0)
        self.max_dup_line_chars = self.number("max_dup_line_chars", max_dup_line_chars, 0.0, 1.0)
        self.max_dup_paragraph_chars = self.number("max_dup_paragraph_chars", max_dup_paragraph_chars, 0.0, 1.0)
        self.max_top_ngram_chars = self.ngram_limits("max_top_ngram_chars", max_top_ngram_chars)
        self.max_dup_ngram_chars = self.ngram_limits("max_dup_ngram_chars", max_dup_ngram_chars)

    def ngram_limits(self, key: str, value: Any) -> dict[int, float]:
        """A recipe's {n: fraction} mapping, checked, in increasing n."""
        if not isinstance(value, Mapping):
            raise self._bad(key, "a mapping from n-gram size to a fraction, e.g. {2: 0.2}", value)
        limits = {}
        for n, fraction in value.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise self._bad(key, "keyed by n-gram sizes of at least 1", n)
            limits[n] = self.number(f"{key}[{n}]", fraction, 0.0, 1.0)
        return dict(sorted(limits.items()))

    def __call__(self, doc: Document) -> str | None:
        scores: dict[str, float] = {}
        doc.metadata[self.name] = scores
        text = doc.text
        lines = [line for line in (raw.strip() for raw in text.split("\n")) if line]
        paragraphs = [p for p in (raw.strip() for raw in PARAGRAPH_BREAK.split(text)) if p]
        for unit, elements, max_dup, max_chars in (
                ("lines", lines, self.max_dup_lines, self.max_dup_line_chars),
                ("paragraphs", paragraphs, self.max_dup_paragraphs, self.max_dup_paragraph_chars)):
            dup, dup_chars = _duplicates(elements)
            singular = unit[:-1]
            if _keep(scores, f"dup_{unit}", dup) > max_dup:
                return f"{self.name}:dup_{unit}"
            if _keep(scores, f"dup_{singular}_chars", dup_chars) > max_chars:
                return f"{self.name}:dup_{singular}_chars"
        words = text.split()
        lengths = [len(w) for w in words]
        total = sum(lengths)
        for n, limit in self.max_top_ngram_chars.items():
            if _keep(scores, f"top_{n}gram", top_ngram_char_fraction(words, n, total)) > limit:
                return f"{self.name}:top_{n}gram"
        for n, limit in self.max_dup_ngram_chars.items():
            if _keep(scores, f"dup_{n}gram", dup_ngram_char_fraction(words, n, lengths, total)) > limit:
                return f"{self.name}:dup_{n}gram"
        return None


class GopherQuality(Stage):
    """Drop documents that do not read as natural language (Gopher A.1.1 "quality filters"; RefinedWeb §3.2).

    The paper: "we remove any document that does not contain between 50 and 100,000 words, or whose mean word length
    is outside the range of 3 to 10 characters; we remove any document with a symbol-to-word ratio greater than 0.1
    for either the hash symbol or the ellipsis; and we remove any document with more than 90% of lines starting with a
    bullet point, or more than 30% ending with an ellipsis. We also require that 80% of words in a document contain at
    least one alphabetic character, and apply a 'stop word' filter, to remove documents that do not contain at least
    two of the following English words: the, be, to, of, and, that, have, with". Bounds are inclusive (50 and 100,000
    words are kept; a ratio of exactly 0.1 is kept). Symbols are counted as occurrences in the text ('#'; '...' or
    '…'); stop words are distinct list words found among the lower-cased words stripped of edge punctuation.
    Reasons: "gopher_quality:<rule>" with rule word_count, mean_word_length, hash_ratio, ellipsis_ratio,
    bullet_lines, ellipsis_lines, alpha_words, stop_words.
    """

    name = "gopher_quality"

    def __init__(self, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3,
                 max_mean_word_length: float = 10, max_symbol_word_ratio: float = 0.1, max_bullet_lines: float = 0.9,
                 max_ellipsis_lines: float = 0.3, min_alpha_words: float = 0.8, min_stop_words: int = 2,
                 stop_words: Sequence[str] = STOP_WORDS):
        self.min_words = self.count("min_words", min_words)
        self.max_words = self.count("max_words", max_words, low=self.min_words)
        self.min_mean_word_length = self.number("min_mean_word_length", min_mean_word_length)
        self.max_mean_word_length = self.number("max_mean_word_length", max_mean_word_length,
                                                low=self.min_mean_word_length)
        self.max_symbol_word_ratio = self.number("max_symbol_word_ratio", max_symbol_word_ratio)
        self.max_bullet_lines = self.number("max_bullet_lines", max_bullet_lines, 0.0, 1.0)
        self.max_ellipsis_lines = self.number("max_ellipsis_lines", max_ellipsis_lines, 0.0, 1.0)
        self.min_alpha_words = self.number("min_alpha_words", min_alpha_words, 0.0, 1.0)
        self.min_stop_words = self.count("min_stop_words", min_stop_words)
        self.stop_words = frozenset(w.lower() for w in self.words("stop_words", stop_words))

    def __call__(self, doc: Document) -> str | None:
        scores: dict[str, float] = {}
        doc.metadata[self.name] = scores
        text = doc.text
        words = text.split()
        n_words = scores["words"] = len(words)
        if not self.min_words <= n_words <= self.max_words:
            return f"{self.name}:word_count"
        word_total = max(n_words, 1)  # divide (not multiply by 1/n): a ratio exactly at a bound stays exact
        mean_length = _keep(scores, "mean_word_length", sum(map(len, words)) / word_total)
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return f"{self.name}:mean_word_length"
        if _keep(scores, "hash_ratio", text.count("#") / word_total) > self.max_symbol_word_ratio:
            return f"{self.name}:hash_ratio"
        if _keep(scores, "ellipsis_ratio", sum(map(text.count, ELLIPSES)) / word_total) > self.max_symbol_word_ratio:
            return f"{self.name}:ellipsis_ratio"
        lines = [line for line in (raw.strip() for raw in text.split("\n")) if line]
        line_total = max(len(lines), 1)
        if _keep(scores, "bullet_lines", sum(line.startswith(BULLETS) for line in lines) / line_total) > \
                self.max_bullet_lines:
            return f"{self.name}:bullet_lines"
        if _keep(scores, "ellipsis_lines", sum(line.endswith(ELLIPSES) for line in lines) / line_total) > \
                self.max_ellipsis_lines:
            return f"{self.name}:ellipsis_lines"
        if _keep(scores, "alpha_words", sum(ALPHA.search(w) is not None for w in words) / word_total) < \
                self.min_alpha_words:
            return f"{self.name}:alpha_words"
        found = self.stop_words.intersection(w.strip(EDGE_PUNCTUATION).lower() for w in words)
        scores["stop_words"] = len(found)
        if len(found) < self.min_stop_words:
            return f"{self.name}:stop_words"
        return None
