"""URL filtering, RefinedWeb's first stage (Penedo et al. 2023, §3.1 and appendix G.1): drop a page on its URL alone.

Two rules, as the paper's G.1 describes them:

1. A blocklist of domains and URLs (G.1.1). RefinedWeb aggregated 4.6M domains from the blocklist of Université
   Toulouse 1 Capitole (UT1, https://dsi.ut-capitole.fr/blacklists/, CC BY-SA), keeping the categories that hold
   adult, fraudulent or spam pages (its Table 11: adult, phishing, dating, gambling, filehosting, ddos, agressif,
   chat, mixed_adult, arjel; adult is nearly all of it). We read the UT1 aggregate that the `datatrove` wheel ships
   for FineWeb (`datatrove/assets/url_filterblacklistsv0_3_0.tar.gz`: 4,558,939 domains, the paper's size, and
   19,586 URLs). A page is dropped when its host or any parent domain of it is listed (`a.b.example.xxx` matches
   `example.xxx` and the TLD `xxx`, which UT1 lists whole), or when its URL or a parent path of it (`site.com/a/b`
   matches `site.com/a`) is listed. UT1 files some news and community sites under adult (three of the 851 shared
   pages, gay.ch among them); no allowlist is applied here.
2. A URL word score (G.1.2) with three word lists of increasing tolerance: *strict* subwords, matched anywhere in the
   URL once its separators are removed (`foo.bann-ed.com` matches "banned"), *hard* words, matched as whole words of
   the URL, and *soft* words, which only count when at least `soft_word_threshold` distinct ones appear. RefinedWeb
   did not publish its lists; we read the curated lists the same datatrove wheel ships (`banned_subwords.txt`,
   `banned_words.txt`, `soft_banned_words.txt`; entries commented out there with `#` stay out). The threshold default
   2 is datatrove's; the soft list's example words in G.1.2 (sex, webcam, escort) are each harmless alone.

Domain and URL lookups go through a sorted array of 64-bit BLAKE2b hashes (37 MB, memory-mapped and shared by worker
processes; a false match has probability ~1e-13 per lookup) built once from the wheel's archive and cached under
`$XDG_CACHE_HOME/llamaherd/curate/`; Python sets of the 4.6M names would take ~600 MB in every worker.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from llamaherd.curate.base import Stage, package_file
from llamaherd.curate.document import Document

ASSETS = ("assets",)
BLOCKLIST = "url_filterblacklistsv0_3_0.tar.gz"
NON_ALNUM = re.compile(r"[^a-z0-9]+")
IPV4 = re.compile(r"^[0-9.]+$")


def _hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _hashes(names: list[bytes]) -> np.ndarray:
    digest = hashlib.blake2b
    out = np.fromiter((int.from_bytes(digest(n, digest_size=8).digest(), "little") for n in names),
                      dtype=np.uint64, count=len(names))
    out.sort()
    return out


def _cache_directory() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamaherd" / "curate"


def blocklist_hashes() -> np.ndarray:
    """The sorted hashes of every UT1 domain and URL in datatrove's archive, cached on disk after the first build.

    Building reads the 18 MB archive (124 MB of names) and hashes 4.6M names: ~4 s once. An unwritable cache
    directory only means the array is rebuilt in each process.
    """
    archive = package_file("datatrove", *ASSETS, BLOCKLIST, purpose="The UT1 URL blocklist")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_directory() / f"ut1-blocklist-{key}.npy"
    try:
        return np.load(cached, mmap_mode="r")
    except (OSError, ValueError):
        pass
    names: list[bytes] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in ("domains", "urls"):
            names.extend(n.lower() for n in tar.extractfile(member).read().split())
    table = _hashes(names)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".tmp", delete=False) as f:
            np.save(f, table)
        os.replace(f.name, cached)
    except OSError:
        pass
    return table


def _word_list(name: str) -> tuple[str, ...]:
    text = package_file("datatrove", *ASSETS, name, purpose="The URL word list").read_text("utf-8")
    return tuple(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def url_words(url: str) -> set[str]:
    """The URL's words: lower-cased runs of letters and digits (every other character separates words)."""
    return set(NON_ALNUM.split(url.lower())) - {""}


class URLFilter(Stage):
    """Drop pages whose URL is blocklisted or scores as adult/fraudulent (RefinedWeb G.1); metadata: the matches.

    blocklist: use the UT1 domain/URL blocklist (G.1.1). extra_domains: more domains to block (subdomains too).
    hard_words / soft_words / strict_subwords: the word lists (None: datatrove's curated lists). soft_word_threshold:
    how many distinct soft words drop a page (2). Reasons: "url_filter:domain", "url_filter:url",
    "url_filter:strict_subword", "url_filter:hard_word", "url_filter:soft_words". A document without a URL is kept.
    """

    name = "url_filter"

    def __init__(self, blocklist: bool = True, extra_domains: Sequence[str] = (), soft_word_threshold: int = 2,
                 hard_words: Sequence[str] | None = None, soft_words: Sequence[str] | None = None,
                 strict_subwords: Sequence[str] | None = None):
        self.blocklist = self.flag("blocklist", blocklist)
        self.extra_domains = frozenset(d.lower().strip(".") for d in self.words("extra_domains", extra_domains))
        self.soft_word_threshold = self.count("soft_word_threshold", soft_word_threshold, low=1)
        lists = {}
        for key, value, default in (("hard_words", hard_words, "banned_words.txt"),
                                    ("soft_words", soft_words, "soft_banned_words.txt"),
                                    ("strict_subwords", strict_subwords, "banned_subwords.txt")):
            lists[key] = _word_list(default) if value is None else tuple(w.lower() for w in self.words(key, value))
        self.hard_words = frozenset(lists["hard_words"])
        self.soft_words = frozenset(lists["soft_words"])
        # strict subwords are matched with their own separators removed too ("2 girls 1 cup" -> "2girls1cup")
        subwords = sorted({NON_ALNUM.sub("", w) for w in lists["strict_subwords"]} - {""}, key=len, reverse=True)
        self.strict_pattern = re.compile("|".join(map(re.escape, subwords))) if subwords else None
        self._table: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}  # workers map the cached file themselves

    def _listed(self, candidates: list[str]) -> str | None:
        if self._table is None:
            self._table = blocklist_hashes()
        keys = np.fromiter((_hash(c) for c in candidates), dtype=np.uint64, count=len(candidates))
        where = np.searchsorted(self._table, keys)
        where[where == len(self._table)] = 0
        hits = np.flatnonzero(self._table[where] == keys)
        return candidates[hits[0]] if len(hits) else None

    def __call__(self, doc: Document) -> str | None:
        if not doc.url:
            return None
        parts = urlsplit(doc.url.strip())
        host = (parts.hostname or "").rstrip(".")
        if not host.isascii():  # the lists hold internationalized names in their ASCII (punycode) form
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                pass
        path = parts.path.rstrip("/").lower()
        tail = NON_ALNUM.sub("", (parts.netloc + parts.path + "?" + parts.query).lower())
        words = url_words(parts.netloc + " " + parts.path + " " + parts.query)
        if host:
            labels = host.split(".")
            domains = [host] if IPV4.match(host) else [".".join(labels[i:]) for i in range(len(labels))]
            if self.extra_domains.intersection(domains):
                doc.metadata[self.name] = {"domain": next(d for d in domains if d in self.extra_domains)}
                return f"{self.name}:domain"
            if self.blocklist:
                site = host.removeprefix("www.")
                segments = path.split("/")
                urls = [site + "/".join(segments[:i]) for i in range(len(segments), 1, -1)]
                hit = self._listed(domains + urls)
                if hit is not None:
                    kind = "url" if "/" in hit else "domain"
                    doc.metadata[self.name] = {kind: hit}
                    return f"{self.name}:{kind}"
        if self.strict_pattern is not None and (match := self.strict_pattern.search(tail)):
            doc.metadata[self.name] = {"strict_subword": match.group()}
            return f"{self.name}:strict_subword"
        hard = sorted(words & self.hard_words)
        if hard:
            doc.metadata[self.name] = {"hard_words": hard}
            return f"{self.name}:hard_word"
        soft = sorted(words & self.soft_words)
        doc.metadata[self.name] = {"soft_words": soft}
        if len(soft) >= self.soft_word_threshold:
            return f"{self.name}:soft_words"
        return None
