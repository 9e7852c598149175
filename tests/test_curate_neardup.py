"""Fuzzy dedup on planted near-duplicates of the 851 real pages of ../shared/benchmarks/web (issue 15, "Quality,
measured"): recall >= 0.95 at word 5-gram Jaccard >= 0.8, <= 1% of the distinct pages flagged as duplicates of
each other, and the measured detection rate per Jaccard bin within binomial noise of the S-curve."""

import math

import numpy as np
import pytest

from llamaherd.curate.minhash import REFINEDWEB, detection_probability
from llamaherd.curate.neardup_eval import BINS, evaluate_near_duplicates, format_table, shared_page_texts


@pytest.mark.slow
def test_planted_near_duplicates_of_real_pages(shared_dir) -> None:
    texts = shared_page_texts(shared_dir / "benchmarks" / "web" / "pages")
    result = evaluate_near_duplicates(texts, REFINEDWEB)
    print(format_table(result))
    assert result.pages >= 700
    high = [p for p in result.pairs if p.jaccard >= 0.8]
    assert len(high) >= 500
    assert result.recall(0.8) >= 0.95
    assert result.false_positive_rate <= 0.01
    # copies far below the curve's knee stay: the dedup does not remove merely related pages
    low = [p.removed for p in result.pairs if p.jaccard < 0.6]
    assert len(low) >= 200 and np.mean(low) < 0.05
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inside = [p for p in result.pairs if lo <= p.jaccard < hi]
        if len(inside) < 50:
            continue
        theory = float(np.mean([detection_probability(p.jaccard, REFINEDWEB.bands, REFINEDWEB.rows) for p in inside]))
        measured = float(np.mean([p.candidate for p in inside]))
        assert abs(measured - theory) <= 4 * math.sqrt(theory * (1 - theory) / len(inside)) + 0.01, (lo, hi)
