"""Extraction and language-ID quality on the 851 annotated real pages of ../shared/benchmarks/web.

Extraction is scored as trafilatura's own benchmark scores it (llamaherd.curate.quality), for our Extractor and for
plain trafilatura.extract with the same settings: ours must not be below. One extraction pass serves both: each call
to trafilatura.extract is recorded (plain trafilatura) while our Extractor post-processes it (ours).
"""

import json

import pytest

import llamaherd.curate.extract as extract_module
from llamaherd.curate.document import Document
from llamaherd.curate.extract import Extractor
from llamaherd.curate.langid import LanguageFilter
from llamaherd.curate.quality import extraction_scores, language_counts, load_eval_pages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pages(shared_dir):
    return load_eval_pages(shared_dir / "benchmarks" / "web")


@pytest.fixture(scope="module")
def extracted(pages):
    """(our scores, plain trafilatura's scores, our texts by URL) from one pass of trafilatura over the pages."""
    real_extract = extract_module.trafilatura.extract
    plain: dict[str, str | None] = {}

    def recording(html, url=None, **settings):
        plain[url] = real_extract(html, url=url, **settings)
        return plain[url]

    ours = Extractor()
    texts: dict[str, str] = {}

    def ours_recorded(doc: Document):
        reason = ours(doc)
        texts[doc.url] = doc.text if reason is None else ""
        return reason

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract_module.trafilatura, "extract", recording)
        our_scores = extraction_scores(pages, ours_recorded)

    def replay(doc: Document):
        doc.text = plain[doc.url] or ""
        return None if doc.text else "extract:empty"

    return our_scores, extraction_scores(pages, replay), texts


def test_extraction_not_below_trafilatura(pages, extracted):
    ours, plain, _ = extracted
    print("\nextraction on", ours["pages"], "pages (trafilatura's benchmark scoring)")
    for name, scores in (("ours", ours), ("trafilatura", plain)):
        print(f"  {name:12s} precision {scores['precision']:.4f} recall {scores['recall']:.4f} "
              f"accuracy {scores['accuracy']:.4f} F1 {scores['f1']:.4f}")
    assert ours["pages"] == plain["pages"] == len(pages) == 851
    assert ours["f1"] >= plain["f1"]
    assert ours["accuracy"] >= plain["accuracy"]
    assert ours["f1"] > 0.85  # trafilatura's published F1 on its benchmark is about 0.9


def test_language_id_counts(extracted):
    _, _, texts = extracted
    counts = language_counts(texts.values(), LanguageFilter())
    languages = counts["languages"]
    english = languages["en"]
    keep_rate = english["above_min_score"] / english["documents"]
    print("\nlanguage ID (lid.176.ftz) on the extracted pages:", json.dumps(
        {code: c["documents"] for code, c in languages.items()}))
    print(f"English: {english['documents']} pages, {english['above_min_score']} kept at min_score 0.65 "
          f"(keep rate {keep_rate:.3f}); all languages above 0.65: "
          f"{sum(c['above_min_score'] for c in languages.values())} of {counts['documents']}")
    assert counts["documents"] == 851
    # SOURCES.md: "mostly German, about a fifth English, some French, Chinese and others"
    assert languages["de"]["documents"] > english["documents"] > languages["fr"]["documents"] > 0
    assert 0.1 < english["documents"] / counts["documents"] < 0.3
    assert keep_rate > 0.9
