"""MinHash signatures on word 5-grams and their LSH bands, as RefinedWeb's fuzzy deduplication uses them.

RefinedWeb (Penedo et al. 2023, §3.3 and appendix G) computes 9,000 MinHash values per document over word
5-grams. Its main text says they are "divided into 20 buckets of 450 hashes"; read literally (20 bands of 450
rows) a pair is only caught when nearly identical: P(Jaccard 0.8) = 1-(1-0.8^450)^20 ~ 5e-43. The appendix's
setting and the maths for its stated goal (catching Jaccard >= 0.8) give the other reading, 450 bands of 20 rows:
P(0.8) = 1-(1-0.8^20)^450 ~ 0.996. That is the default here; `s_curve_table` prints any setting's curve.
FineWeb (Penedo et al. 2024) uses 14 bands of 8 rows (`PRESETS["fineweb"]`).

Normalization (`normalize_text`, shared with exact deduplication): lowercase, remove every character that is
neither a word character nor whitespace (Python's Unicode `\\w`: punctuation and symbols go, so "don't" -> "dont"),
collapse whitespace runs. A shingle is n consecutive normalized words joined by one space; a text of fewer than n
words is one shingle of all its words; a text without words has no shingles.

Hash family: each shingle's 32-bit xxHash x, then h_i(x) = (a_i * x + b_i) mod 2^32 with odd a_i and b_i drawn from
`seed` (multiply-add hashing); signature[i] = min over the document's shingles of h_i. Measured on random sets:
estimates are unbiased with the binomial spread sqrt(J(1-J)/K), and a band of r rows agrees with probability J^r
(tests/test_curate_dedup.py), which is all the S-curve assumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xxhash

_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")
_SIGNATURE_CHUNK = 8  # shingles hashed at once: a small (8, bands*rows) block stays in L1/L2 (2x faster than 64)


@dataclass(frozen=True)
class MinHashParams:
    """A MinHash-LSH setting: `bands` x `rows` hashes over word `ngram`-grams, hash coefficients drawn from `seed`.

    Two documents become duplicate candidates when all `rows` values of at least one band agree; the chance of that
    at Jaccard s is `detection_probability(s, bands, rows)`.
    """

    bands: int = 450
    rows: int = 20
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("bands", "rows", "ngram"):
            if getattr(self, name) < 1:
                raise ValueError(f"MinHashParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.bands >= 2**16:
            raise ValueError(f"MinHashParams.bands must be < 65536 (a band key stores it in 2 bytes), got {self.bands}")

    @property
    def num_hashes(self) -> int:
        """Signature length: bands * rows."""
        return self.bands * self.rows


REFINEDWEB = MinHashParams(bands=450, rows=20)  # 9,000 hashes; RefinedWeb appendix G reading, the default
PRESETS: dict[str, MinHashParams] = {
    "refinedweb": REFINEDWEB,
    "fineweb": MinHashParams(bands=14, rows=8),  # 112 hashes; FineWeb / datatrove's default
}


def normalize_text(text: str) -> str:
    """Lowercased text without punctuation or symbols, words separated by single spaces (see the module doc)."""
    return " ".join(_NOT_WORD_OR_SPACE.sub("", text.lower()).split())


def word_ngrams(text: str, n: int = 5) -> list[str]:
    """The word n-gram shingles of `text` after `normalize_text`, in order (repeats kept); [] when it has no words."""
    words = normalize_text(text).split()
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def jaccard(text_a: str, text_b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of the two texts' word n-gram sets (1.0 when both have none)."""
    a, b = set(word_ngrams(text_a, n)), set(word_ngrams(text_b, n))
    return len(a & b) / len(a | b) if a or b else 1.0


@lru_cache(maxsize=8)
def _coefficients(params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(params.seed)
    a = rng.integers(0, 2**32, size=params.num_hashes, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=params.num_hashes, dtype=np.uint64).astype(np.uint32)
    return a, b


def signature(text: str, params: MinHashParams = REFINEDWEB) -> np.ndarray:
    """MinHash signature of `text`: shape (bands*rows,), uint32. A text without words gets all 0xFFFFFFFF."""
    shingles = word_ngrams(text, params.ngram)
    a, b = _coefficients(params)
    sig = np.full(params.num_hashes, np.iinfo(np.uint32).max, dtype=np.uint32)
    x = np.unique(np.fromiter((xxhash.xxh32_intdigest(s.encode()) for s in shingles), np.uint32, len(shingles)))
    block = np.empty((min(len(x), _SIGNATURE_CHUNK), params.num_hashes), dtype=np.uint32)
    for start in range(0, len(x), _SIGNATURE_CHUNK):
        chunk = x[start : start + _SIGNATURE_CHUNK, None]
        out = block[: len(chunk)]
        np.multiply(chunk, a, out=out)  # wraps mod 2^32
        np.add(out, b, out=out)
        np.minimum(sig, out.min(axis=0), out=sig)
    return sig


def band_keys(sig: np.ndarray, params: MinHashParams = REFINEDWEB) -> list[bytes]:
    """One key per band: the band index (2 bytes, big-endian) then its `rows` values (little-endian uint32 each).

    Two signatures share a key exactly when they agree on every row of that band.
    """
    if sig.shape != (params.num_hashes,):
        raise ValueError(f"signature has shape {sig.shape}, expected ({params.num_hashes},) for {params}")
    raw = sig.astype("<u4", copy=False).tobytes()
    width = 4 * params.rows
    return [band.to_bytes(2, "big") + raw[band * width : (band + 1) * width] for band in range(params.bands)]


def band_hashes(sig: np.ndarray, params: MinHashParams = REFINEDWEB) -> np.ndarray:
    """The 64-bit xxHash of each band key, shape (bands,), uint64: compact keys for indexes and shuffles.

    Two different band keys share a hash with probability 2^-64; over N documents that adds about
    bands * N^2 / 2^65 false candidate pairs (0.1 at N = 10^8 with 450 bands).
    """
    return np.fromiter((xxhash.xxh3_64_intdigest(k) for k in band_keys(sig, params)), np.uint64, params.bands)


def detection_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard similarity `jaccard` share at least one band: 1-(1-s^r)^b."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


S_CURVE_POINTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def s_curve(params: MinHashParams, points: tuple[float, ...] = S_CURVE_POINTS) -> list[tuple[float, float]]:
    """(Jaccard, detection probability) at each of `points` for the setting `params`."""
    return [(s, detection_probability(s, params.bands, params.rows)) for s in points]


def s_curve_table(params: MinHashParams, points: tuple[float, ...] = S_CURVE_POINTS) -> str:
    """The S-curve of `params` as a small text table, with the Jaccard where detection is 50% ((1/b)^(1/r))."""
    half = (1.0 / params.bands) ** (1.0 / params.rows)
    lines = [
        f"MinHash {params.bands} bands x {params.rows} rows = {params.num_hashes} hashes on word {params.ngram}-grams;"
        f" 50% detection at Jaccard {half:.3f}",
        "Jaccard  P(candidate)",
    ]
    lines += [f"{s:7.2f}  {p:12.4f}" for s, p in s_curve(params, points)]
    return "\n".join(lines)


class MinHashIndex:
    """An incremental near-duplicate index: `add` answers whether an earlier text is a near-duplicate.

    A text's candidates are the earlier texts sharing a band with it (LSH); the earliest candidate whose estimated
    Jaccard (share of equal signature values) is >= `threshold` is returned and the new text is not indexed (it is
    meant to be dropped). Memory: 4*bands*rows bytes of signature plus bands dict entries per indexed text.
    Candidates come from LSH, so pairs left of the setting's S-curve are rarely seen whatever the threshold: choose
    bands and rows whose 50% point ((1/b)^(1/r), 0.737 for 450x20) lies below `threshold`.
    """

    def __init__(self, params: MinHashParams = REFINEDWEB, threshold: float = 0.8) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"MinHashIndex threshold must be in (0, 1], got {threshold}")
        self.params, self.threshold = params, threshold
        self._buckets: dict[int, list[int]] = {}  # band hash -> positions in _keys
        self._keys: list[str] = []
        self._signatures: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, text: str) -> str | None:
        """Index `text` under `key` and return None, or return the key of an earlier near-duplicate."""
        sig = signature(text, self.params)
        hashes = band_hashes(sig, self.params).tolist()
        candidates = sorted({pos for h in hashes for pos in self._buckets.get(h, ())})
        for pos in candidates:
            if np.count_nonzero(self._signatures[pos] == sig) >= self.threshold * self.params.num_hashes:
                return self._keys[pos]
        pos = len(self._keys)
        self._keys.append(key)
        self._signatures.append(sig)
        for h in hashes:
            self._buckets.setdefault(h, []).append(pos)
        return None
