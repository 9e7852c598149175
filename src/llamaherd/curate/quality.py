"""The stages' quality, measured on annotated real pages (../shared/benchmarks/web, see its SOURCES.md).

Extraction is scored the way trafilatura's own benchmark scores extractors (its tests/comparison_small.py): each page
lists snippets of main text (`with`) and of boilerplate (`without`); a `with` snippet found verbatim in the extracted
text is a true positive, else a false negative; a `without` snippet found is a false positive, else a true negative;
a page with no text counts all its `with` snippets as false negatives and all its `without` as true negatives. The
counts are summed over pages, then precision = tp/(tp+fp), recall = tp/(tp+fn), accuracy = (tp+tn)/all and
F1 = 2tp/(2tp+fp+fn).
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaherd.curate.document import Document, DocumentStage
from llamaherd.curate.langid import LanguageFilter
from llamaherd.curate.read import decode_html
from llamaherd.errors import InputError


@dataclass(frozen=True)
class EvalPage:
    """One annotated page: its URL, its HTML as the reader decodes it, and its main-text / boilerplate snippets."""

    url: str
    html: str
    with_snippets: tuple[str, ...]
    without_snippets: tuple[str, ...]


def load_eval_pages(web_dir: str | Path) -> list[EvalPage]:
    """The pages of `web_dir` (evaldata.json + pages/*.html.gz), one per annotated URL as trafilatura iterates them.

    Raises InputError when evaldata.json is missing; a page that does not decode is left out.
    """
    web_dir = Path(web_dir)
    index = web_dir / "evaldata.json"
    if not index.is_file():
        raise InputError(f"{index}: no such file; pass the folder of the shared web pages (../shared/benchmarks/web)")
    pages = []
    for url, item in json.loads(index.read_text("utf-8")).items():
        html = decode_html(gzip.decompress((web_dir / item["file"]).read_bytes()))
        if html is not None:
            pages.append(EvalPage(url, html, tuple(item["with"]), tuple(item["without"])))
    return pages


def extraction_scores(pages: Iterable[EvalPage], extractor: DocumentStage) -> dict[str, Any]:
    """Precision, recall, accuracy and F1 of `extractor` (a stage that fills doc.text from doc.html) on `pages`.

    Returns the four scores, the summed counts, the number of pages and the seconds spent inside `extractor`.
    """
    tp = fn = fp = tn = n_pages = 0
    seconds = 0.0
    for page in pages:
        doc = Document(id=page.url, url=page.url, html=page.html)
        start = time.perf_counter()
        reason = extractor(doc)
        seconds += time.perf_counter() - start
        n_pages += 1
        if reason is None and doc.text:
            found = sum(snippet in doc.text for snippet in page.with_snippets)
            leaked = sum(snippet in doc.text for snippet in page.without_snippets)
        else:
            found = leaked = 0
        tp += found
        fn += len(page.with_snippets) - found
        fp += leaked
        tn += len(page.without_snippets) - leaked
    total = tp + fn + fp + tn
    return {
        "pages": n_pages,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / total if total else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "true_positives": tp, "false_negatives": fn, "false_positives": fp, "true_negatives": tn,
        "seconds": seconds,
    }


def language_counts(texts: Iterable[str], language: LanguageFilter) -> dict[str, Any]:
    """Per top language: how many texts fastText gives it, and how many of those score >= language.min_score.

    Empty texts are counted under "empty". The keep rate of a language is its "above_min_score" over "documents".
    """
    documents: Counter[str] = Counter()
    above: Counter[str] = Counter()
    for text in texts:
        if not text.strip():
            documents["empty"] += 1
            continue
        code, score = language.predict(text)
        documents[code] += 1
        above[code] += score >= language.min_score
    return {
        "min_score": language.min_score,
        "documents": sum(documents.values()),
        "languages": {code: {"documents": n, "above_min_score": above[code]} for code, n in documents.most_common()},
    }
