"""Scoring: hand-computed acc / acc_norm / mc2 / standard errors on made-up numbers, then the same
functions against lm-eval's own on random ones."""

from __future__ import annotations

import json
import math
import random

import pytest

from llamaherd.errors import InputError
from llamaherd.evaluate.metrics import (
    Score,
    group_score,
    leaderboard_average,
    mc2,
    mean_score,
    pred,
    pred_norm,
    score_doc,
    task_scores,
)
from llamaherd.evaluate.tasks import PROTOCOLS, Doc, Request, TruthfulQaMc2, build_requests


def make_doc(choices: list[str], gold: int = 0, metrics=("acc", "acc_norm"), true_mask=None) -> Doc:
    return Doc(
        task="made_up", doc_id=0, index=0, context="Q:", choices=tuple(choices), gold=gold,
        requests=tuple(Request("Q:", " " + c) for c in choices), metrics=metrics, true_mask=true_mask,
    )  # fmt: skip


def test_acc_is_argmax_of_summed_loglikelihood_ties_to_lowest_index():
    assert pred([-1.0, -0.5, -2.0]) == 1
    assert pred([-1.0, -1.0, -3.0]) == 0
    assert pred([-3.0, -1.0, -1.0]) == 1
    doc = make_doc(["a", "b", "c"], gold=1)
    assert score_doc(doc, [(-1.0, False), (-0.5, True), (-2.0, False)])["acc"] == 1.0
    assert score_doc(doc, [(-1.0, False), (-1.0, False), (-2.0, False)])["acc"] == 0.0  # tie -> index 0


def test_acc_norm_divides_by_characters_of_the_choice_without_leading_space():
    # -2/1 = -2 loses to -5/3 = -1.67, though -2 > -5. Counting the leading space of the continuations
    # " a" and " abc" would give -2/2 = -1 and -5/4 = -1.25 and pick the other choice.
    doc = make_doc(["a", "abc"], gold=1)
    lls = [(-2.0, True), (-5.0, False)]
    assert pred([-2.0, -5.0]) == 0
    assert pred_norm([-2.0, -5.0], doc.choices) == 1
    assert score_doc(doc, lls) == {"acc": 0.0, "acc_norm": 1.0}
    assert doc.choice_lengths == (1, 3)
    assert pred_norm([-2.0, -4.0], ["a", "bb"]) == 0  # -2 and -2 tie: the lowest index


def test_mc2_is_normalised_probability_mass_of_true_answers():
    lls = [math.log(0.2), math.log(0.1), math.log(0.3), math.log(0.4)]
    assert mc2(lls, [True, True, False, False]) == pytest.approx(0.3, abs=1e-12)
    assert mc2([0.0, math.log(3.0)], [True, False]) == pytest.approx(0.25, abs=1e-12)  # 1 / (1 + 3)
    doc = make_doc(["x", "y", "z", "w"], metrics=("mc2",), true_mask=(True, True, False, False))
    assert score_doc(doc, [(ll, False) for ll in lls]) == {"mc2": pytest.approx(0.3, abs=1e-12)}


def test_mc2_true_answers_per_protocol():
    """Labels 1, 0, 1: the 2023 harness counts only the answers before the first 0 as true."""
    row = {"question": "q", "mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 0, 1]}}
    lls = [math.log(0.5), math.log(0.25), math.log(0.25)]
    task = TruthfulQaMc2()
    assert mc2(lls, task.true_mask(row, PROTOCOLS["leaderboard-2023"])) == pytest.approx(0.5, abs=1e-12)
    assert mc2(lls, task.true_mask(row, PROTOCOLS["harness"])) == pytest.approx(0.75, abs=1e-12)


def test_mc1_is_whether_the_first_mc1_answer_is_the_most_likely_of_the_mc1_answers(tmp_path):
    """The 2023 harness's truthfulqa_mc (and lm-eval 0.4's truthfulqa_mc1): argmax over the mc1_targets
    answers == 0. Those answers are another list than mc2's: here a subset in another order plus one answer
    mc2 lacks, which gets a request of its own after the mc2 ones."""
    (tmp_path / "truthfulqa").mkdir()
    item = {"question": "q?", "mc1_targets": {"C": 1, "A": 0, "E": 0},
            "mc2_targets": {"A": 1, "C": 1, "B": 0, "D": 0}}  # fmt: skip
    (tmp_path / "truthfulqa" / "mc_task.json").write_text(json.dumps([item]))
    [doc] = build_requests(TruthfulQaMc2(tmp_path), "harness")
    assert [r.continuation for r in doc.requests] == [" A", " C", " B", " D", " E"]
    assert doc.mc1_indices == (1, 0, 4) and doc.true_mask == (True, True, False, False)

    def score(a, c, b, d, e):
        return score_doc(doc, [(ll, False) for ll in (a, c, b, d, e)])

    # mc1 compares C=-2 (correct), A=-1, E=-1.5: A wins, so 0; mc2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-0.5 + e^-3)
    # over the four mc2 answers only (E's log-likelihood is not part of it).
    s = score(-1.0, -2.0, -0.5, -3.0, -1.5)
    assert s["mc1"] == 0.0
    assert s["mc2"] == pytest.approx((math.exp(-1) + math.exp(-2)) / (
        math.exp(-1) + math.exp(-2) + math.exp(-0.5) + math.exp(-3)), abs=1e-12)
    assert score(-3.0, -1.0, -0.1, -0.2, -4.0)["mc1"] == 1.0  # B and D, not mc1 answers, do not count
    assert score(-1.0, -1.0, -9.0, -9.0, -2.0)["mc1"] == 1.0  # a tie goes to the first: the correct answer
    assert score(-3.0, -1.0, -9.0, -9.0, -0.5)["mc1"] == 0.0  # the mc1-only answer E wins


def test_mean_and_sample_standard_error():
    # mean 0.75; sample variance (3 * 0.25^2 + 0.75^2) / 3 = 0.25; stderr sqrt(0.25) / sqrt(4) = 0.25
    assert mean_score([1.0, 0.0, 1.0, 1.0]) == Score(0.75, pytest.approx(0.25, abs=1e-12), 4)
    assert mean_score([1.0]) == Score(1.0, None, 1)  # the harness reports N/A
    docs = [make_doc(["a", "bb"], gold=g) for g in (0, 1, 1)]
    results = [[(-1.0, True), (-3.0, False)], [(-1.0, True), (-3.0, False)], [(-3.0, False), (-1.0, True)]]
    scores = task_scores(docs, results)
    assert scores["acc"].value == pytest.approx(2 / 3) and scores["acc"].n == 3
    # sample variance of (1, 0, 1): 1/3; stderr sqrt(1/3) / sqrt(3) = 1/3
    assert scores["acc"].stderr == pytest.approx(1 / 3)


def test_mmlu_group_weighted_vs_unweighted():
    a = mean_score([1.0, 0.0])  # 0.5, stderr sqrt(0.5) / sqrt(2) = 0.5
    b = mean_score([1.0, 1.0, 1.0, 0.0])  # 0.75, stderr 0.25
    weighted = group_score([a, b], weighted=True)
    # (0.5 * 2 + 0.75 * 4) / 6; pooled variance ((2-1) * 0.25 * 2 + (4-1) * 0.0625 * 4) / (6 - 2) = 0.3125
    assert weighted.value == pytest.approx(4 / 6)
    assert weighted.stderr == pytest.approx(math.sqrt(0.3125 / 6))
    assert weighted.n == 6
    unweighted = group_score([a, b], weighted=False)
    assert unweighted.value == pytest.approx(0.625)  # (0.5 + 0.75) / 2
    assert unweighted.stderr == pytest.approx(math.sqrt(0.25 + 0.0625) / 2)
    assert group_score([a, mean_score([1.0])], weighted=True).stderr is None


def test_leaderboard_average_of_the_four():
    headline = {"arc_challenge": 0.5, "hellaswag": 0.7, "mmlu": 0.4, "truthfulqa_mc2": 0.4}
    assert leaderboard_average(headline) == pytest.approx(0.5)
    with pytest.raises(InputError, match="missing mmlu"):
        leaderboard_average({k: v for k, v in headline.items() if k != "mmlu"})


def test_results_must_match_requests():
    with pytest.raises(InputError, match="2 results for 3 requests"):
        score_doc(make_doc(["a", "b", "c"]), [(-1.0, False), (-2.0, False)])


# Against lm-eval's own functions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(7)


@pytest.mark.slow
def test_stderr_and_group_aggregation_match_lm_eval(rng):
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    subjects = [[float(rng.random() < 0.6) for _ in range(rng.randint(2, 40))] for _ in range(12)]
    scores = [mean_score(values) for values in subjects]
    for values, score in zip(subjects, scores):
        assert score.value == lm_metrics.mean(values)
        assert score.stderr == lm_metrics.mean_stderr(values)
    values, stderrs, sizes = [s.value for s in scores], [s.stderr for s in scores], [s.n for s in scores]
    weighted, unweighted = group_score(scores, weighted=True), group_score(scores, weighted=False)
    assert weighted.value == lm_metrics.aggregate_subtask_metrics(values, sizes, weight_by_size=True)
    assert weighted.stderr == lm_metrics.pooled_sample_stderr(stderrs, sizes)
    assert unweighted.value == lm_metrics.aggregate_subtask_metrics(values, sizes, weight_by_size=False)
    assert unweighted.stderr == lm_metrics.unweighted_mean_stderr(stderrs)


@pytest.mark.slow
def test_acc_acc_norm_and_mc2_match_lm_eval_process_results(rng):
    """lm-eval's ConfigurableTask.process_results for a multiple-choice task, and truthfulqa_mc2's
    process_results_mc2, on random log-likelihoods (with forced ties)."""
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    row = {"question": "q", "choices": ["a", "bbbb", "cc", "ddddddd"], "answer": 2}
    cfg = {
        "task": "made_up", "output_type": "multiple_choice", "test_split": "test",
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list([row])}),
        "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean"}, {"metric": "acc_norm", "aggregation": "mean"}],
    }  # fmt: skip
    lm_task = ConfigurableTask(config=cfg)
    doc = make_doc(row["choices"], gold=row["answer"])
    for trial in range(300):
        lls = [-rng.uniform(0.1, 30.0) for _ in row["choices"]]
        if trial % 3 == 0:
            lls[3] = lls[1] = max(lls)  # a tie in acc
        if trial % 3 == 1:
            lls[2] = lls[0] * 2  # a tie in acc_norm
        results = [(ll, False) for ll in lls]
        theirs = lm_task.process_results(row, results)
        assert score_doc(doc, results) == {"acc": theirs["acc"], "acc_norm": theirs["acc_norm"]}

        labels = [1] * rng.randint(1, 3) + [0] * rng.randint(1, 4)
        rng.shuffle(labels)
        mc_lls = [-rng.uniform(0.5, 40.0) for _ in labels]
        expected = process_results_mc2({"mc2_targets": {"labels": labels}}, [(ll, False) for ll in mc_lls])
        assert mc2(mc_lls, [label == 1 for label in labels]) == pytest.approx(expected["acc"], rel=1e-12)
