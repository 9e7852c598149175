"""The per-document curation stages on hand-made documents, at both sides of every Gopher and RefinedWeb threshold.

Expected fractions are computed by hand in the comments (words of 5 letters unless said otherwise), never read back
from the code under test.
"""

import itertools
import pickle
import string
import tarfile

import pytest

import llamaherd.curate.extract as extract_module
from llamaherd.curate.base import package_file
from llamaherd.curate.document import Document
from llamaherd.curate.extract import Extractor, clean_text
from llamaherd.curate.gopher import (DUP_NGRAM_CHARS, TOP_NGRAM_CHARS, GopherQuality, GopherRepetition,
                                     dup_ngram_char_fraction)
from llamaherd.curate.langid import LanguageFilter
from llamaherd.curate.lines import LineCorrections
from llamaherd.curate.stages import STAGES, build_stage
from llamaherd.curate.url_filter import URLFilter
from llamaherd.errors import HerdError, InputError

_fresh = ("".join(t) for t in itertools.product(string.ascii_lowercase, repeat=5))


def uniq(n: int, length: int = 5) -> list[str]:
    """n words of `length` letters, never seen before in this test session when length >= 5 (shorter ones may
    repeat: they only serve where repetition does not matter)."""
    return [(next(_fresh) * 5)[:length] if length > 5 else next(_fresh)[:length] for _ in range(n)]


def line_of(chars: int) -> str:
    """A line of fresh words, exactly `chars` characters long (chars >= 5)."""
    words = uniq(max(1, (chars + 1) // 6))
    line = " ".join(words)
    return line + "z" * (chars - len(line)) if len(line) <= chars else line[:chars]


def run(stage, text="", **fields):
    doc = Document(id="d", text=text, **fields)
    return stage(doc), doc


# ---------------------------------------------------------------- Gopher repetition (Rae et al. 2021, Table A1)

RELAXED = {"max_dup_lines": 1.0, "max_dup_paragraphs": 1.0, "max_dup_line_chars": 1.0,
           "max_dup_paragraph_chars": 1.0, "max_top_ngram_chars": {n: 1.0 for n in TOP_NGRAM_CHARS},
           "max_dup_ngram_chars": {n: 1.0 for n in DUP_NGRAM_CHARS}}


def only(rule: str, default) -> GopherRepetition:
    """GopherRepetition with `rule` at the paper's value and every other rule off, so one threshold is tested."""
    return GopherRepetition(**{**RELAXED, rule: default})


def test_repetition_defaults_are_table_a1():
    stage = GopherRepetition()
    assert (stage.max_dup_lines, stage.max_dup_paragraphs) == (0.30, 0.30)
    assert (stage.max_dup_line_chars, stage.max_dup_paragraph_chars) == (0.20, 0.20)
    assert stage.max_top_ngram_chars == {2: 0.20, 3: 0.18, 4: 0.16}
    assert stage.max_dup_ngram_chars == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@pytest.mark.parametrize("sep,unit", [("\n", "lines"), ("\n\n", "paragraphs")])
@pytest.mark.parametrize("dups,dropped", [(30, False), (31, True)])
def test_duplicate_line_and_paragraph_fraction(sep, unit, dups, dropped):
    # (100 - 1 - dups) distinct lines, one line "ok go" and dups more copies of it: dups / 100 duplicates
    elements = [line_of(30) for _ in range(99 - dups)] + ["ok go"] * (1 + dups)
    stage = only(f"max_dup_{unit}", 0.30)
    reason, doc = run(stage, sep.join(elements))
    assert doc.metadata["gopher_repetition"][f"dup_{unit}"] == pytest.approx(dups / 100, abs=1e-4)
    assert reason == (f"gopher_repetition:dup_{unit}" if dropped else None)


@pytest.mark.parametrize("sep,unit", [("\n", "line"), ("\n\n", "paragraph")])
@pytest.mark.parametrize("length,dropped", [(100, False), (101, True)])
def test_duplicate_line_and_paragraph_characters(sep, unit, length, dropped):
    # 6 distinct lines of 50 chars (300) and one of `length` chars twice: length / (300 + 2 length):
    # 100 / 500 = 0.2 exactly (kept), 101 / 503 = 0.2008 (dropped)
    repeated = "x" * length
    text = sep.join([line_of(50) for _ in range(6)] + [repeated, repeated])
    reason, doc = run(only(f"max_dup_{unit}_chars", 0.20), text)
    assert doc.metadata["gopher_repetition"][f"dup_{unit}_chars"] == pytest.approx(length / (300 + 2 * length),
                                                                                   abs=1e-4)
    assert reason == (f"gopher_repetition:dup_{unit}_chars" if dropped else None)


def spaced(gram: list[str], copies: int, total_words: int) -> str:
    """`copies` of the n-gram, each after a run of fresh words, padded with fresh words to `total_words` words."""
    fillers = total_words - copies * len(gram)
    per_gap = fillers // copies
    words: list[str] = []
    for _ in range(copies):
        words += uniq(per_gap) + gram
    return " ".join(words + uniq(total_words - len(words)))


# top n-gram: copies c of an n-gram of 5-letter words among W words: c*n*5 / (W*5) = c*n / W
TOP_CASES = [(2, 5, 50), (3, 3, 50), (4, 2, 50)]  # 10/50 = 0.20, 9/50 = 0.18, 8/50 = 0.16: exactly the bound


@pytest.mark.parametrize("n,copies,words", TOP_CASES)
@pytest.mark.parametrize("dropped", [False, True])
def test_top_ngram_character_fraction(n, copies, words, dropped):
    total = words - 1 if dropped else words  # one word fewer: 10/49, 9/49, 8/49, just over
    text = spaced(uniq(n), copies, total)
    reason, doc = run(GopherRepetition(), text)
    assert doc.metadata["gopher_repetition"][f"top_{n}gram"] == pytest.approx(copies * n / total, abs=1e-4)
    assert reason == (f"gopher_repetition:top_{n}gram" if dropped else None)


# duplicated n-grams: c copies of an n-gram among W words cover c*n/W of the characters, exactly the bound:
# 15/100 = .15, 42/300 = .14, 91/700 = .13, 24/200 = .12, 99/900 = .11, 20/200 = .10; with one word fewer each is
# just over its own bound and still under the bounds of smaller n (checked first)
DUP_CASES = [(5, 3, 100), (6, 7, 300), (7, 13, 700), (8, 3, 200), (9, 11, 900), (10, 2, 200)]


@pytest.mark.parametrize("n,copies,words", DUP_CASES)
@pytest.mark.parametrize("dropped", [False, True])
def test_duplicated_ngram_character_fraction(n, copies, words, dropped):
    total = words - 1 if dropped else words
    reason, doc = run(GopherRepetition(), spaced(uniq(n), copies, total))
    scores = doc.metadata["gopher_repetition"]
    assert scores[f"dup_{n}gram"] == pytest.approx(copies * n / total, abs=1e-4)
    assert reason == (f"gopher_repetition:dup_{n}gram" if dropped else None)


def test_overlapping_duplicate_ngrams_count_each_word_once():
    # 7 equal words: the three 5-grams are all the same n-gram; its occurrences overlap and cover 7 words, not 15
    words = ["aaaaa"] * 7
    assert dup_ngram_char_fraction(words, 5, [5] * 7, 35) == pytest.approx(1.0)
    # a b c d e a b c d e x: the 5-gram "a b c d e" twice covers 10 of 11 words
    words = list("abcdeabcdex")
    assert dup_ngram_char_fraction(words, 5, [1] * 11, 11) == pytest.approx(10 / 11)


def test_repetition_keeps_ordinary_prose():
    text = ("The committee met on Tuesday to discuss the budget.\nMembers raised concerns about rising costs, and "
            "the chair promised a revised plan.\n\nA vote is expected next month.")
    assert GopherRepetition()(Document(id="p", text=text)) is None


# ---------------------------------------------------------------- Gopher quality (Rae et al. 2021, A.1.1)

def prose(n_words: int) -> str:
    """n_words words (n_words >= 4) with two stop words; mean length (3 + 3 + 5 (n - 2)) / n."""
    return " ".join(["the", "and"] + uniq(n_words - 2))


def test_quality_defaults_are_the_papers():
    q = GopherQuality()
    assert (q.min_words, q.max_words, q.min_mean_word_length, q.max_mean_word_length) == (50, 100_000, 3, 10)
    assert (q.max_symbol_word_ratio, q.max_bullet_lines, q.max_ellipsis_lines) == (0.1, 0.9, 0.3)
    assert (q.min_alpha_words, q.min_stop_words) == (0.8, 2)
    assert q.stop_words == {"the", "be", "to", "of", "and", "that", "have", "with"}


@pytest.mark.parametrize("n,dropped", [(49, True), (50, False), (100_000, False), (100_001, True)])
def test_word_count(n, dropped):
    text = " ".join(["the", "and"] + ["words"] * (n - 2))
    reason, doc = run(GopherQuality(), text)
    assert doc.metadata["gopher_quality"]["words"] == n
    assert reason == ("gopher_quality:word_count" if dropped else None)


@pytest.mark.parametrize("last,mean,dropped", [
    ("ab", 149 / 50, True), ("abc", 3.0, False),  # "the" "and" + 47 three-letter words + last: (147 + len) / 50
])
def test_mean_word_length_lower_bound(last, mean, dropped):
    text = " ".join(["the", "and"] + uniq(47, 3) + [last])
    reason, doc = run(GopherQuality(), text)
    assert doc.metadata["gopher_quality"]["mean_word_length"] == pytest.approx(mean)
    assert reason == ("gopher_quality:mean_word_length" if dropped else None)


@pytest.mark.parametrize("last,dropped", [(24, False), (25, True)])
def test_mean_word_length_upper_bound(last, dropped):
    # "the" "and" + 47 ten-letter words + one of `last` letters: (6 + 470 + last) / 50 = 10.0 or 10.02
    text = " ".join(["the", "and"] + uniq(47, 10) + ["q" * last])
    reason, doc = run(GopherQuality(), text)
    assert doc.metadata["gopher_quality"]["mean_word_length"] == pytest.approx((476 + last) / 50)
    assert reason == ("gopher_quality:mean_word_length" if dropped else None)


@pytest.mark.parametrize("symbol,rule", [("#", "hash_ratio"), ("...", "ellipsis_ratio"), ("…", "ellipsis_ratio")])
@pytest.mark.parametrize("count,dropped", [(10, False), (11, True)])
def test_symbol_to_word_ratio(symbol, rule, count, dropped):
    # 100 words, `count` of them carrying the symbol once: 10/100 = 0.1 kept, 11/100 dropped
    words = prose(100).split()
    for i in range(count):
        words[10 + i] = ("tag" + symbol + "x") if symbol != "#" else "#" + words[10 + i]
    reason, doc = run(GopherQuality(), " ".join(words))
    assert doc.metadata["gopher_quality"][rule] == pytest.approx(count / 100)
    assert reason == (f"gopher_quality:{rule}" if dropped else None)


@pytest.mark.parametrize("bullet", ["•", "-", "*", "–"])
@pytest.mark.parametrize("bullets,dropped", [(90, False), (91, True)])
def test_bullet_lines(bullet, bullets, dropped):
    # 100 lines of 3 words (the last one ends with the stop words), `bullets` of them starting with a bullet glued
    # to the first word: 0.90 kept, 0.91 dropped
    lines = [" ".join(uniq(3)) for _ in range(99)] + [" ".join(uniq(3) + ["the", "and"])]
    lines = [bullet + line if i < bullets else line for i, line in enumerate(lines)]
    reason, doc = run(GopherQuality(), "\n".join(lines))
    assert doc.metadata["gopher_quality"]["bullet_lines"] == pytest.approx(bullets / 100)
    assert reason == ("gopher_quality:bullet_lines" if dropped else None)


@pytest.mark.parametrize("ending", ["...", "…"])
@pytest.mark.parametrize("count,dropped", [(30, False), (31, True)])
def test_ellipsis_lines(ending, count, dropped):
    # 100 lines of 5 words (500 words, so the ellipsis-per-word ratio stays at 0.06), `count` ending with an ellipsis
    lines = [" ".join(["the", "and"] + uniq(3)) + (ending if i < count else ".") for i in range(100)]
    reason, doc = run(GopherQuality(), "\n".join(lines))
    assert doc.metadata["gopher_quality"]["ellipsis_lines"] == pytest.approx(count / 100)
    assert reason == ("gopher_quality:ellipsis_lines" if dropped else None)


@pytest.mark.parametrize("numbers,dropped", [(20, False), (21, True)])
def test_alphabetic_words(numbers, dropped):
    # 100 words, `numbers` of them without a letter ("1234", "56.7%"): 0.80 kept, 0.79 dropped
    words = prose(100).split()
    for i in range(numbers):
        words[5 + i] = "1234" if i % 2 else "56.7%"
    reason, doc = run(GopherQuality(), " ".join(words))
    assert doc.metadata["gopher_quality"]["alpha_words"] == pytest.approx((100 - numbers) / 100)
    assert reason == ("gopher_quality:alpha_words" if dropped else None)


@pytest.mark.parametrize("stop,found,dropped", [
    (["The,", "the", "THE"], 1, True),  # one distinct stop word, however often and however written
    (["The,", "(with"], 2, False),  # two distinct ones, edge punctuation and case ignored
])
def test_stop_words(stop, found, dropped):
    text = " ".join(stop + uniq(60))
    reason, doc = run(GopherQuality(), text)
    assert doc.metadata["gopher_quality"]["stop_words"] == found
    assert reason == ("gopher_quality:stop_words" if dropped else None)


# ---------------------------------------------------------------- RefinedWeb line-wise corrections (G.2)

def body(lines: int) -> list[str]:
    """Ordinary 5-word lines that no rule touches."""
    return [" ".join(["the"] + uniq(3) + ["and"]) for _ in range(lines)]


@pytest.mark.parametrize("line,rule", [
    ("3 likes", "counter"), ("Comments (12)", "counter"), ("1.2K shares · 40 views", "counter"),
    ("12.03.2021", "numeric"), ("+44 1234 567 890", "numeric"),
    ("Menu", "one_word"),
    ("BREAKING NEWS TODAY", "uppercase"), ("NASA SAYS hi", "uppercase"),
    ("Sign in to comment", "edited"), ("Sign-in", "one_word"), ("Read more...", "edited"),
    ("Share on Facebook", "edited"), ("Tags: politics, economy", "edited"),
])
def test_lines_dropped_by_each_rule(line, rule):
    stage = LineCorrections(max_removed_words=1.0)
    kept = body(3)
    reason, doc = run(stage, "\n".join([kept[0], line, *kept[1:]]))
    assert reason is None
    assert doc.text == "\n".join(kept)
    assert doc.metadata["line_corrections"]["lines"] == {rule: 1}


@pytest.mark.parametrize("line,after", [
    ("Great cake for a summer party. Read more...", "Great cake for a summer party."),
    ("A classic recipe [...] Continue reading »", "A classic recipe [...]"),
    ("You have 3 items in cart right now", "You have right now"),
    ("Sign in to post comments", None),
    ("© 2021 Example Media. All rights reserved.", "Example Media."),
])
def test_short_lines_are_edited(line, after):
    _, rule = LineCorrections().correct(line)
    assert rule == "edited"
    assert LineCorrections().correct(line)[0] == after


def test_uppercase_means_more_than_half_of_the_letters():
    assert LineCorrections().correct("NASA says")[1] == ""  # 4 of 8 letters: not more than half
    assert LineCorrections().correct("NASA sayS")[1] == "uppercase"  # 5 of 8
    assert LineCorrections().correct("北京 欢迎 你")[1] == ""  # letters without case


@pytest.mark.parametrize("n_words,edited", [(10, True), (11, False)])
def test_patterns_only_edit_short_lines(n_words, edited):
    line = " ".join(uniq(n_words - 2) + ["read", "more"])
    corrected, rule = LineCorrections().correct(line)
    assert (rule == "edited") == edited
    assert corrected == (" ".join(line.split()[:-2]) if edited else line)


@pytest.mark.parametrize("removed,dropped", [(5, False), (6, True)])
def test_document_dropped_past_five_percent_of_words(removed, dropped):
    # 100 words: (100 - removed) in ordinary 5-word lines... plus `removed` one-word lines: 5% kept, 6% dropped
    ordinary = body(19)  # 95 words
    words = " ".join(ordinary).split()
    if removed == 6:
        ordinary[-1] = " ".join(ordinary[-1].split()[:4])  # 94 words
    lines = ordinary + [w.capitalize() for w in uniq(removed)]
    reason, doc = run(LineCorrections(), "\n".join(lines))
    meta = doc.metadata["line_corrections"]
    assert (meta["words"], meta["removed_words"]) == (100, removed)
    assert meta["fraction"] == pytest.approx(removed / 100)
    if dropped:
        assert reason == "line_corrections:too_many_removed"
    else:
        assert reason is None and doc.text.split() == words


# ---------------------------------------------------------------- URL filter (RefinedWeb G.1)

@pytest.fixture(scope="module")
def url_filter():
    return URLFilter()


@pytest.fixture(scope="module")
def ut1_entries():
    """The first domain of the UT1 archive in datatrove's wheel, and its first URL on tumblr.com (a site that is
    not blocked as a whole, so only the URL list can match), read here with tarfile."""
    archive = package_file("datatrove", "assets", "url_filterblacklistsv0_3_0.tar.gz", purpose="test")
    entries = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            lines = tar.extractfile(member)
            if member.name == "domains":
                entries["domains"] = lines.readline().decode().strip()
            else:
                entries["urls"] = next(u.decode().strip() for u in lines if u.startswith(b"tumblr.com/"))
            if len(entries) == 2:
                break
    return entries


def test_blocklisted_domain_subdomain_and_url(url_filter, ut1_entries):
    domain, url = ut1_entries["domains"], ut1_entries["urls"]
    assert run(url_filter, url="https://tumblr.com/")[0] is None
    for address, kind in [(f"http://{domain}/", "domain"), (f"https://www.shop.{domain}/a?b=c", "domain"),
                          (f"https://{url}", "url"), (f"http://www.{url}/deeper/page.html", "url")]:
        reason, doc = run(url_filter, url=address)
        assert reason == f"url_filter:{kind}", address
    assert run(url_filter, url=f"https://not{domain}/")[0] is None  # a different domain, not a parent of it


def test_word_lists(url_filter):
    assert url_filter.soft_word_threshold == 2
    assert run(url_filter, url="https://en.wikipedia.org/wiki/Cat")[0] is None
    assert run(url_filter, url="https://example.com/free-porn-clips")[0] == "url_filter:hard_word"
    assert run(url_filter, url="https://example.com/x-videos.html")[0] == "url_filter:strict_subword"
    reason, doc = run(url_filter, url="https://example.com/sexy-summer-dress")  # one soft word: below 2
    assert reason is None and doc.metadata["url_filter"]["soft_words"] == ["sexy"]
    reason, doc = run(url_filter, url="https://example.com/sexy-webcam-chat")  # two: at the threshold
    assert reason == "url_filter:soft_words" and doc.metadata["url_filter"]["soft_words"] == ["sexy", "webcam"]
    assert run(URLFilter(soft_word_threshold=3), url="https://example.com/sexy-webcam-chat")[0] is None


def test_extra_domains_and_no_url():
    stage = URLFilter(blocklist=False, extra_domains=["blocked.example"])
    assert run(stage, url="https://a.b.blocked.example/x")[0] == "url_filter:domain"
    assert run(stage, url="https://blocked.example.org/")[0] is None
    assert run(stage)[0] is None  # a JSONL record without a URL


def test_stages_pickle_without_their_loaded_resources(url_filter):
    url_filter(Document(id="x", url="https://example.com/"))
    language = LanguageFilter()
    language(Document(id="x", text="Hello there, how are you?"))
    for stage in (url_filter, language):
        clone = pickle.loads(pickle.dumps(stage))
        assert getattr(clone, "_table", None) is None and getattr(clone, "_model", None) is None
    assert pickle.loads(pickle.dumps(url_filter))(Document(id="x", url="https://example.com/free-porn")) is not None


# ---------------------------------------------------------------- language ID (RefinedWeb §3.1)

TEXTS = {
    "en": "The weather was lovely this morning.\nWe walked along the river and had breakfast in the old town.",
    "fr": "Il faisait beau ce matin.\nNous avons marché le long de la rivière et pris le petit déjeuner.",
    "de": "Heute Morgen war das Wetter schön.\nWir sind am Fluss entlang gegangen und haben in der Altstadt "
          "gefrühstückt.",
}


@pytest.mark.parametrize("language", ["en", "fr", "de"])
def test_language_id_on_short_texts(language):
    reason, doc = run(LanguageFilter(), TEXTS[language])  # multi-line: newlines must be replaced before predict
    assert doc.metadata["language"]["language"] == language
    assert doc.metadata["language"]["score"] > 0.65
    assert reason == (None if language == "en" else "language:other")
    assert run(LanguageFilter(languages=["fr", "de"]), TEXTS[language])[0] == (
        "language:other" if language == "en" else None)


def test_language_min_score_both_sides():
    stage = LanguageFilter()
    code, score = stage.predict(TEXTS["en"])
    assert LanguageFilter(min_score=score)(Document(id="x", text=TEXTS["en"])) is None
    assert LanguageFilter(min_score=min(1.0, score + 1e-3))(Document(id="x", text=TEXTS["en"])) == "language:low_score"
    assert stage(Document(id="x", text=" \n ")) == "language:empty"


def test_missing_packaged_file_is_one_line_error():
    with pytest.raises(HerdError, match="pip install no-such-wheel") as err:
        package_file("no_such_wheel", "resources", "lid.176.ftz", purpose="The fastText language-ID model")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- extraction (RefinedWeb §3.1)

PAGE = """<html><head><title>Test</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li><li><a href="/about">About us</a></li></ul></nav>
<article><h1>Rivers of the north</h1>
<p>The northern rivers freeze every winter, and the ice is thick enough to carry trucks for several weeks.</p>
<p>Local fishermen cut holes in the ice and wait for hours; see https://example.org/fishing for the rules.</p>
<p>In spring the ice breaks up within days, and the rivers flood the low meadows along their banks.</p>
</article>
<footer>Copyright 2021 Example Media. All rights reserved. Privacy policy | Imprint</footer>
</body></html>"""


def test_extractor_keeps_main_text_and_clears_html():
    reason, doc = run(Extractor(), html=PAGE, url="https://example.org/rivers")
    assert reason is None and doc.html is None
    assert "thick enough to carry trucks" in doc.text and "flood the low meadows" in doc.text
    assert "About us" not in doc.text and "Privacy policy" not in doc.text
    assert "https://example.org" not in doc.text and "see for the rules" in doc.text  # RefinedWeb: URLs removed


def test_clean_text_formatting():
    assert clean_text("a\n\n\n\nb  http://x.org/y?z=1 c\n\n\n") == "a\n\nb c"
    assert clean_text("details at www.example.org.") == "details at www.example.org."


@pytest.mark.parametrize("html", ["", "<html></html>", "<html><body><div></div></body></html>",
                                  "\x00\x01<<<>>>&&&;;", "<p>" * 5000])
def test_extractor_never_raises_on_odd_html(html):
    reason, doc = run(Extractor(), html=html)
    assert reason in ("extract:empty", "extract:error", None)
    assert doc.html is None


def test_extractor_error_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("lxml said no")

    monkeypatch.setattr(extract_module.trafilatura, "extract", broken)
    reason, doc = run(Extractor(), html=PAGE)
    assert reason == "extract:error" and "lxml said no" in doc.metadata["extract"]["error"]


def test_extractor_passes_text_records_through():
    assert run(Extractor(), text="already text")[0] is None
    assert run(Extractor())[0] == "extract:empty"


# ---------------------------------------------------------------- the registry and its parameters

def test_registry_names_and_defaults():
    assert list(STAGES) == ["url_filter", "extract", "language", "gopher_repetition", "gopher_quality",
                            "line_corrections"]
    for name, cls in STAGES.items():
        assert cls.name == name
    assert build_stage("language").min_score == 0.65 and build_stage("language").languages == {"en"}
    assert build_stage("line_corrections").max_removed_words == 0.05
    assert build_stage("extract").settings["favor_precision"] is True


@pytest.mark.parametrize("name,params,named", [
    ("gopher_quality", {"min_wordz": 3}, "min_wordz"),
    ("gopher_quality", {"min_words": -1}, "min_words"),
    ("gopher_quality", {"max_symbol_word_ratio": "0.1"}, "max_symbol_word_ratio"),
    ("gopher_repetition", {"max_dup_lines": 1.5}, "max_dup_lines"),
    ("gopher_repetition", {"max_top_ngram_chars": {2: 2.0}}, "max_top_ngram_chars[2]"),
    ("language", {"languages": "en"}, "languages"),
    ("language", {"min_score": True}, "min_score"),
    ("url_filter", {"soft_word_threshold": 0}, "soft_word_threshold"),
    ("extract", {"favor_recall": True}, "favor_recall"),
    ("line_corrections", {"max_removed_words": -0.1}, "max_removed_words"),
])
def test_bad_parameters_name_the_parameter(name, params, named):
    with pytest.raises(InputError, match=f"'{name}'.*'{named}'".replace("[", r"\[").replace("]", r"\]")):
        build_stage(name, params)


def test_unknown_stage():
    with pytest.raises(InputError, match="unknown curation stage 'dedupe'"):
        build_stage("dedupe")
