"""herd curate's deduplication: MinHash against exact set Jaccard, the LSH S-curve against hand-computed values,
exact / fuzzy dedup across shards (and per shard), order-independent phases, and exact substring dedup."""

import math
import random
from pathlib import Path

import numpy as np
import pytest

from llamaherd.curate.dedup import dedup_decisions, dedup_map, dedup_reduce, dedup_resolve, dedup_shard
from llamaherd.curate.document import Document
from llamaherd.curate.minhash import (
    PRESETS,
    REFINEDWEB,
    MinHashIndex,
    MinHashParams,
    band_keys,
    detection_probability,
    jaccard,
    s_curve_table,
    signature,
)
from llamaherd.curate.substring import substring_apply, substring_find, substring_map


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(10**9)}" for _ in range(n)]


def _shingles(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    """The reference: a word list's n-gram set, computed here without the code under test."""
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _set_jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _edited(rng: random.Random, words: list[str], n_replaced: int) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(words)), n_replaced):
        out[i] = f"x{rng.randrange(10**9)}"
    return out


def _pair_at(rng: random.Random, target: float, n: int = 400) -> tuple[list[str], list[str], float]:
    """Two word lists whose 5-gram Jaccard is just above `target` (edits added one at a time)."""
    a = _words(rng, n)
    for k in range(1, n):
        b = _edited(random.Random(k), a, k)
        j = _set_jaccard(a, b)
        if j < target:
            b = _edited(random.Random(k - 1), a, k - 1)
            return a, b, _set_jaccard(a, b)
    raise AssertionError("unreachable")


def test_jaccard_helper_matches_the_set_reference_and_normalizes() -> None:
    rng = random.Random(0)
    a = _words(rng, 200)
    b = _edited(rng, a, 7)
    assert jaccard(" ".join(a), " ".join(b)) == pytest.approx(_set_jaccard(a, b))
    # lowercase, punctuation removed, whitespace collapsed
    assert jaccard("The cat, the HAT!\n and  the bat sat.", "the cat the hat and the bat sat") == 1.0
    assert jaccard("one two three four five six", "one two three four five seven") == pytest.approx(1 / 3)


def test_minhash_estimate_tracks_exact_jaccard() -> None:
    """The share of equal signature values is within 4 binomial standard deviations of the exact set Jaccard."""
    rng = random.Random(1)
    a = _words(rng, 500)
    for n_replaced in (0, 2, 6, 15, 30, 60):
        b = _edited(rng, a, n_replaced)
        exact = _set_jaccard(a, b)
        estimate = float(np.mean(signature(" ".join(a)) == signature(" ".join(b))))
        sd = math.sqrt(exact * (1 - exact) / REFINEDWEB.num_hashes)
        assert abs(estimate - exact) <= 4 * sd + 1e-9, (n_replaced, exact, estimate)


def test_band_agreement_is_jaccard_to_the_rows() -> None:
    """Rows within a band behave as independent hashes: a band agrees with probability J^r (what the S-curve
    assumes); 30 pairs x 2,000 bands of 4 rows at J ~ 0.6 give 60,000 band trials."""
    params = MinHashParams(bands=2000, rows=4)
    rng = random.Random(2)
    agree, expected = [], []
    for _ in range(30):
        a = _words(rng, 300)
        b = _edited(rng, a, 15)
        j = _set_jaccard(a, b)
        sa, sb = signature(" ".join(a), params), signature(" ".join(b), params)
        agree.append(np.mean(np.all((sa == sb).reshape(params.bands, params.rows), axis=1)))
        expected.append(j**params.rows)
    sd = math.sqrt(np.mean(expected) * (1 - np.mean(expected)) / (30 * params.bands))
    assert abs(np.mean(agree) - np.mean(expected)) < 4 * sd


def test_detection_probability_hand_computed() -> None:
    assert detection_probability(0.5, bands=2, rows=1) == pytest.approx(0.75)  # 1 - 0.5^2
    assert detection_probability(0.5, bands=1, rows=2) == pytest.approx(0.25)  # 0.5^2
    # 0.8^20 = 0.1073741824^2 = 0.0115292150; ln(1 - 0.0115292150) = -0.0115962586; x450 = -5.2183164;
    # exp(-5.2183164) = 0.0054166 -> 1 - 0.0054166 = 0.9945834
    assert detection_probability(0.8, bands=450, rows=20) == pytest.approx(0.9945834, abs=1e-6)
    # the swapped reading: 20 * 0.8^450 = 20 * 2.5e-44
    assert detection_probability(0.8, bands=20, rows=450) < 1e-40
    assert detection_probability(1.0, bands=20, rows=450) == 1.0
    assert "450 bands x 20 rows = 9000 hashes" in s_curve_table(REFINEDWEB)
    assert "0.80        0.9946" in s_curve_table(REFINEDWEB)


def test_presets_and_defaults_are_not_swapped() -> None:
    assert (REFINEDWEB.bands, REFINEDWEB.rows, REFINEDWEB.ngram) == (450, 20, 5)
    assert MinHashParams() == REFINEDWEB == PRESETS["refinedweb"]
    assert (PRESETS["fineweb"].bands, PRESETS["fineweb"].rows) == (14, 8)


def test_pair_at_jaccard_08_is_a_candidate_at_450x20_not_at_20x450() -> None:
    a, b, j = _pair_at(random.Random(3), 0.8)
    assert 0.8 <= j < 0.83
    for params, caught in ((REFINEDWEB, True), (MinHashParams(bands=20, rows=450), False)):
        ka = set(band_keys(signature(" ".join(a), params), params))
        kb = set(band_keys(signature(" ".join(b), params), params))
        assert bool(ka & kb) is caught, params


def test_band_keys_carry_the_band_index() -> None:
    """The same values in two different bands are different keys."""
    params = MinHashParams(bands=2, rows=3)
    sig = np.array([7, 8, 9, 7, 8, 9], dtype=np.uint32)
    k0, k1 = band_keys(sig, params)
    assert k0 != k1 and k0[2:] == k1[2:]


def test_minhash_index_threshold() -> None:
    rng = random.Random(4)
    a, b, j = _pair_at(rng, 0.85)
    assert j < 0.9
    unrelated = " ".join(_words(rng, 400))
    for threshold, expected in ((0.8, "a"), (0.95, None)):
        index = MinHashIndex(REFINEDWEB, threshold=threshold)
        assert index.add("a", " ".join(a)) is None
        assert index.add("u", unrelated) is None
        assert index.add("b", " ".join(b)) == expected
    with pytest.raises(ValueError, match="threshold"):
        MinHashIndex(threshold=0)


# ---- document dedup across shards ---------------------------------------------------------------------------------


def _corpus() -> list[list[Document]]:
    """Three shards: a cross-shard near-duplicate chain (d05 ~ d12 ~ d21), an exact duplicate across shards
    (d03 / d24, differing in case and punctuation), a near-duplicate inside shard 1, and unrelated pages."""
    rng = random.Random(5)
    base = _words(rng, 300)
    near1 = _edited(random.Random(6), base, 3)
    near2 = _edited(random.Random(7), near1, 3)
    other = _words(rng, 300)
    exact = " ".join(_words(rng, 120))
    inside = _words(rng, 300)
    return [
        [Document("d05", " ".join(base)), Document("d03", exact), Document("d01", " ".join(_words(rng, 300)))],
        [Document("d12", " ".join(near1)), Document("d11", " ".join(inside)),
         Document("d13", " ".join(_edited(random.Random(8), inside, 2))), Document("d14", " ".join(other))],
        [Document("d21", " ".join(near2)), Document("d24", exact.upper().replace(" ", ",  ")),
         Document("d22", "")],
    ]


def _run_phases(root: Path, shards: list[list[Document]], method: str, n_buckets: int, order: list[int]) -> None:
    for s in order:
        dedup_map(root, s, shards[s], method=method, n_buckets=n_buckets)
    for b in sorted(range(n_buckets), reverse=order[0] != 0):
        dedup_reduce(root, b, len(shards))
    dedup_resolve(root, len(shards), n_buckets)


def _removed(root: Path, shards: list[list[Document]]) -> dict[str, str]:
    out = {}
    for s, docs in enumerate(shards):
        for doc, reason in zip(docs, dedup_decisions(root, s, docs)):
            if reason is not None:
                out[doc.id] = doc.metadata[reason.split(":")[0]]["duplicate_of"]
    return out


def test_global_fuzzy_dedup_finds_cross_shard_duplicates_that_per_shard_misses(tmp_path: Path) -> None:
    shards = _corpus()
    _run_phases(tmp_path, shards, "fuzzy", 4, [0, 1, 2])
    # one kept per cluster, the smallest id: d05 for the chain (d12, d21), d03 for the exact pair, d11 for d13
    assert _removed(tmp_path, shards) == {"d12": "d05", "d21": "d05", "d24": "d03", "d13": "d11"}
    per_shard = {doc.id: reason for docs in _corpus() for doc, reason in zip(docs, dedup_shard(docs, method="fuzzy"))
                 if reason is not None}
    assert per_shard == {"d13": "fuzzy_dedup:duplicate"}


def test_exact_dedup_is_global_and_keeps_the_smallest_id(tmp_path: Path) -> None:
    shards = _corpus()
    _run_phases(tmp_path, shards, "exact", 3, [0, 1, 2])
    assert _removed(tmp_path, shards) == {"d24": "d03"}  # near-duplicates are not exact duplicates
    shards = [[Document("b", "Same text here."), Document("a", "same  TEXT, here"), Document("c", "same text there")]]
    assert dedup_shard(shards[0], method="exact") == ["exact_dedup:duplicate", None, None]
    assert shards[0][0].metadata["exact_dedup"]["duplicate_of"] == "a"


def test_phases_give_identical_files_in_any_order(tmp_path: Path) -> None:
    """Shards mapped and buckets reduced in opposite orders (as parallel tasks may finish) write the same bytes;
    a killed run's missing outputs are redone to the same bytes; a reduce before every map is refused."""
    for method in ("exact", "fuzzy"):
        one, two = tmp_path / method / "one", tmp_path / method / "two"
        _run_phases(one, _corpus(), method, 5, [0, 1, 2])
        _run_phases(two, _corpus(), method, 5, [2, 1, 0])
        files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
        assert len(files) == 3 * 5 + 3 + 5 + 3 + 1  # map buckets and markers, reduce, resolve per shard and summary
        for f in files:
            assert (one / f).read_bytes() == (two / f).read_bytes(), f
        # a killed run: one shard's marker, a reduce and the summary lost; rerunning redoes them identically
        for f in ("map/s00001.json", "reduce/b0002.npy", "resolve/summary.json"):
            (two / f).unlink()
        _run_phases(two, _corpus(), method, 5, [0, 1, 2])
        for f in files:
            assert (one / f).read_bytes() == (two / f).read_bytes(), f
    fresh = tmp_path / "fresh"
    dedup_map(fresh, 0, _corpus()[0], method="fuzzy", n_buckets=2)
    with pytest.raises(ValueError, match=r"shards \[1\]"):
        dedup_reduce(fresh, 0, n_shards=2)
    with pytest.raises(ValueError, match="other settings"):
        dedup_map(fresh, 0, _corpus()[0], method="fuzzy", n_buckets=3)


# ---- exact substring dedup ---------------------------------------------------------------------------------------


def _substring_run(root: Path, shards: list[list[Document]], **kwargs) -> list[list[str | None]]:
    for s, docs in enumerate(shards):
        substring_map(root, s, docs)
    substring_find(root, len(shards), **kwargs)
    return [substring_apply(root, s, docs) for s, docs in enumerate(shards)]


def test_substring_dedup_cuts_a_60_token_repeat_and_keeps_a_40_token_one(tmp_path: Path) -> None:
    rng = random.Random(9)
    span60, span40 = " ".join(_words(rng, 60)), " ".join(_words(rng, 40))
    head, tail, mid = (" ".join(_words(rng, 20)) for _ in range(3))

    def shards() -> list[list[Document]]:
        return [[Document("a", f"{head} {span60} {tail}"), Document("b", f"{span40} {mid}")],
                [Document("c", f"Intro: {span60}. Bye."), Document("d", f"{mid} {span40}")]]

    cut = shards()
    assert _substring_run(tmp_path / "all", cut) == [[None, None], [None, None]]
    # Lee et al.'s tool strikes every occurrence of the repeated span, the first one included
    assert cut[0][0].text == f"{head} {tail}"
    assert cut[1][0].text == "Intro: . Bye."
    assert cut[0][0].metadata["substring_dedup"] == {"removed_tokens": 60, "tokens": 100}
    assert [d.text for d in (cut[0][1], cut[1][1])] == [f"{span40} {mid}", f"{mid} {span40}"]  # 40 < 50: kept
    first = shards()
    _substring_run(tmp_path / "first", first, keep_first=True)
    assert first[0][0].text == f"{head} {span60} {tail}" and first[1][0].text == "Intro: . Bye."


def test_substring_spans_never_cross_documents(tmp_path: Path) -> None:
    """X (30 tokens) ends a document and Y (30) starts the next, twice: X then Y is no 60-token repeat, as each
    document has a separator of its own; a document that is nothing but a repeat is reported as emptied."""
    rng = random.Random(10)
    x, y, rep = (" ".join(_words(rng, n)) for n in (30, 30, 55))
    texts = [[f"one {x}", f"{y} two", f"three {x} {y}"], [f"four {x}", f"{y} five", rep, f"six {rep}"]]
    docs = [[Document(f"{s}{i}", t) for i, t in enumerate(shard)] for s, shard in enumerate(texts)]
    decisions = _substring_run(tmp_path, docs)
    assert [[d.text for d in shard] for shard in docs][0] == texts[0]
    assert [d.text for d in docs[1][:2]] == texts[1][:2]
    assert decisions[1][2:] == ["substring_dedup:all_removed", None] and docs[1][3].text == "six "


def _brute_force_kept(docs: list[list[str]], window: int, keep_first: bool) -> list[list[str]]:
    """The reference: every window of `window` tokens that occurs twice is cut (all copies, or all but the first)."""
    where: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for d, tokens in enumerate(docs):
        for i in range(len(tokens) - window + 1):
            where.setdefault(tuple(tokens[i : i + window]), []).append((d, i))
    cut = [[False] * len(tokens) for tokens in docs]
    for places in where.values():
        for d, i in places[1:] if keep_first else places if len(places) > 1 else []:
            cut[d][i : i + window] = [True] * window
    return [[t for t, c in zip(tokens, flags) if not c] for tokens, flags in zip(docs, cut)]


@pytest.mark.parametrize("keep_first", [False, True])
def test_substring_dedup_matches_a_brute_force_reference(tmp_path: Path, keep_first: bool) -> None:
    """Random documents over a 3-word vocabulary (many overlapping repeats), in 3 shards, with 4-token windows."""
    rng = random.Random(11)
    tokens = [[rng.choice("abc") for _ in range(rng.randrange(0, 25))] for _ in range(40)]
    shards = [[Document(f"{i:02d}", " ".join(t)) for i, t in enumerate(tokens[s::3], start=s * 100)]
              for s in range(3)]
    _substring_run(tmp_path, shards, min_tokens=4, keep_first=keep_first)
    ordered = [t for s in range(3) for t in tokens[s::3]]  # shard order, then document order
    expected = _brute_force_kept(ordered, 4, keep_first)
    assert [d.text.split() for shard in shards for d in shard] == expected
