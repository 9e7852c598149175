"""Scoring parity with lm-eval --model hf on the embedded model: a small sample of what
benchmarks/eval_parity.py checks at 100+ docs per task."""

from __future__ import annotations

import pytest

from llamaherd.evaluate.reference import side_by_side

TASKS = "arc_challenge,hellaswag,truthfulqa_mc2,mmlu_abstract_algebra,mmlu_anatomy,mmlu_marketing"


@pytest.mark.slow
def test_scores_match_lm_eval_hf(shared_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = side_by_side(tmp_path, shared_dir / "benchmarks", [(TASKS, 3)], batch_size=4, device="cpu")
    assert set(run.comparisons) == {"arc_challenge", "hellaswag", "truthfulqa_mc2", "mmlu"}
    assert run.n_requests == run.peer_requests
    for group, c in run.comparisons.items():
        assert c.n_docs == (9 if group == "mmlu" else 3)
        assert c.same_prediction == c.n_docs and c.same_metrics == c.n_docs, group
        assert c.max_logprob_diff <= 1e-3, (group, c.max_logprob_diff)
        assert all(d <= 0.1 for d in c.metric_diff_points.values()), (group, c.metric_diff_points)
