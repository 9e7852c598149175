"""The per-document stages by recipe name, in RefinedWeb's order (Penedo et al. 2023, Figure 2): URL filtering, text
extraction, language identification, repetition removal, document-wise filtering, line-wise corrections.

Each is a class whose keyword parameters default to the paper's values; `build_stage(name, params)` makes one from a
recipe entry, with a one-line InputError for an unknown stage, an unknown parameter or a bad value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamaherd.curate.base import Stage
from llamaherd.curate.extract import Extractor
from llamaherd.curate.gopher import GopherQuality, GopherRepetition
from llamaherd.curate.langid import LanguageFilter
from llamaherd.curate.lines import LineCorrections
from llamaherd.curate.url_filter import URLFilter
from llamaherd.errors import InputError

STAGES: dict[str, type[Stage]] = {
    "url_filter": URLFilter,
    "extract": Extractor,
    "language": LanguageFilter,
    "gopher_repetition": GopherRepetition,
    "gopher_quality": GopherQuality,
    "line_corrections": LineCorrections,
}


def build_stage(name: str, params: Mapping[str, Any] | None = None) -> Stage:
    """The stage `name` built with the recipe's `params` (None or {}: the paper's defaults)."""
    if name not in STAGES:
        raise InputError(f"unknown curation stage {name!r} (known: {', '.join(STAGES)}); fix the recipe")
    return STAGES[name].from_params(params or {})
