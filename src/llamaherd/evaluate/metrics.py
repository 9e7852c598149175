"""Scores computed the way lm-evaluation-harness computes them.

Per doc, from the (log-likelihood, is_greedy) result of each request: `acc` (argmax of the summed
log-likelihood), `acc_norm` (argmax of log-likelihood / character length of the choice), ties going to
the lowest index as numpy's argmax does, `mc1` (TruthfulQA: whether the correct answer, the first of
mc1_targets, has the highest log-likelihood among those answers) and `mc2` (normalised probability mass
of the true answers).
Per task: the mean and the sample standard error of the mean. Per group (MMLU): the size-weighted mean
with the pooled standard error (harness) or the plain mean of the subjects with sqrt(sum se^2) / k
(leaderboard-2023). The leaderboard average is the mean of the four headline numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llamaherd.errors import InputError
from llamaherd.evaluate.tasks import Doc

# The headline metric of each leaderboard task (lm-eval calls truthfulqa_mc2's mc2 "acc").
LEADERBOARD_METRICS = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "mmlu": "acc",
    "truthfulqa_mc2": "mc2",
}

Result = tuple[float, bool]  # (summed log-likelihood, is_greedy) of one request


@dataclass(frozen=True)
class Score:
    """An aggregated metric: its value, standard error (None where the harness reports N/A) and docs."""

    value: float
    stderr: float | None
    n: int


def pred(logprobs: Sequence[float]) -> int:
    """Index of the highest summed log-likelihood (the first one on ties)."""
    return int(np.argmax(np.asarray(logprobs, dtype=np.float64)))


def pred_norm(logprobs: Sequence[float], choices: Sequence[str]) -> int:
    """Index of the highest log-likelihood per character of the choice string (the first on ties)."""
    lengths = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(np.asarray(logprobs, dtype=np.float64) / lengths))


def mc2(logprobs: Sequence[float], true_mask: Sequence[bool]) -> float:
    """Probability mass of the true answers, normalised over all answers, from the raw summed
    log-likelihoods (no length normalisation)."""
    probs = np.exp(np.asarray(logprobs, dtype=np.float64))
    return float(np.sum((probs / np.sum(probs))[np.asarray(true_mask, dtype=bool)]))


def score_doc(doc: Doc, results: Sequence[Result]) -> dict[str, float]:
    """The doc's metrics (doc.metrics) from one result per request, in request order."""
    if len(results) != len(doc.requests):
        raise InputError(
            f"{doc.task} doc {doc.doc_id}: {len(results)} results for {len(doc.requests)} requests"
        )
    logprobs = [ll for ll, _ in results]
    values = {}
    if "acc" in doc.metrics:
        values["acc"] = float(pred(logprobs) == doc.gold)
    if "acc_norm" in doc.metrics:
        values["acc_norm"] = float(pred_norm(logprobs, doc.choices) == doc.gold)
    if "mc1" in doc.metrics:
        if doc.mc1_indices is None:
            raise InputError(f"{doc.task} doc {doc.doc_id}: mc1 needs the doc's mc1_indices")
        values["mc1"] = float(pred([logprobs[i] for i in doc.mc1_indices]) == 0)
    if "mc2" in doc.metrics:
        if doc.true_mask is None:
            raise InputError(f"{doc.task} doc {doc.doc_id}: mc2 needs the doc's true_mask")
        values["mc2"] = mc2(logprobs[: len(doc.true_mask)], doc.true_mask)
    return values


def mean_score(values: Sequence[float]) -> Score:
    """Mean and sample standard error of the mean (sample stddev / sqrt(n)); N/A for one value."""
    n = len(values)
    if n == 0:
        raise InputError("no values to aggregate")
    mu = sum(values) / n
    stderr = math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return Score(mu, stderr, n)


def task_scores(docs: Sequence[Doc], results: Sequence[Sequence[Result]]) -> dict[str, Score]:
    """Every metric of a task over its docs; results[i] holds the results of docs[i]'s requests."""
    if not docs or len(docs) != len(results):
        raise InputError(f"{len(results)} result lists for {len(docs)} docs")
    per_doc = [score_doc(doc, res) for doc, res in zip(docs, results)]
    return {metric: mean_score([d[metric] for d in per_doc]) for metric in docs[0].metrics}


def group_score(subtasks: Sequence[Score], weighted: bool) -> Score:
    """A group (MMLU) from its subtasks: size-weighted mean with the pooled standard error (harness),
    or the unweighted mean of the subtask means with sqrt(sum se^2) / k (leaderboard-2023)."""
    if not subtasks:
        raise InputError("no subtask scores to aggregate")
    sizes = [s.n for s in subtasks]
    total, k = sum(sizes), len(subtasks)
    weights = sizes if weighted else [1] * k
    value = sum(s.value * w for s, w in zip(subtasks, weights)) / sum(weights)
    if any(s.stderr is None for s in subtasks):
        return Score(value, None, total)
    if weighted:
        pooled_var = sum((n - 1) * s.stderr**2 * n for s, n in zip(subtasks, sizes)) / (total - k)
        stderr = float(np.sqrt(pooled_var / total))
    else:
        stderr = float(np.sqrt(sum(s.stderr**2 for s in subtasks)) / k)
    return Score(value, stderr, total)


def leaderboard_average(headline: Mapping[str, float]) -> float:
    """Mean of the four headline numbers: ARC acc_norm, HellaSwag acc_norm, MMLU acc, TruthfulQA mc2."""
    missing = [t for t in LEADERBOARD_METRICS if t not in headline]
    if missing:
        raise InputError(f"the leaderboard average needs all four tasks; missing {', '.join(missing)}")
    return sum(headline[t] for t in LEADERBOARD_METRICS) / len(LEADERBOARD_METRICS)
