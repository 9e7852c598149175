"""The synth runner: items driven through a teacher, journal + request cache so a killed run resumes without
duplicates, losses or paying twice; output filters; Self-Instruct's ROUGE-L novelty pool against a brute force
pass with the `rouge-score` package."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from llamaherd.synth.cache import RequestCache
from llamaherd.synth.rouge import NoveltyPool
from llamaherd.synth.runner import Asker, Item, Journal, Outcome, OutputFilters, is_refusal, run_items, write_data
from llamaherd.synth.teacher import TeacherReply, TeacherRequest


class StubTeacher:
    """Answers with a deterministic function of the request content, in reverse order (so completion order differs
    from request order); `fail_after` raises mid-run like a kill."""

    teacher_id = "stub"
    identity = {"kind": "stub", "name": "stub"}

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[str] = []
        self.fail_after = fail_after

    def run(self, requests):
        for request in reversed(list(requests)):
            if self.fail_after is not None and len(self.sent) >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.sent.append(request.key)
            text = request.messages[-1][1][::-1] if request.messages else request.prompt.upper()
            yield TeacherReply(request, text, "stop", prompt_tokens=3, completion_tokens=5)


def two_step_items(n: int) -> list[Item]:
    """Each item asks twice: the second request depends on the first reply, as a turn-by-turn dialogue does."""
    def make(i: int):
        def steps():
            (first,) = yield [TeacherRequest(f"it{i}/0", messages=(("user", f"topic number {i}"),))]
            if not first.ok:
                return Outcome("failed", first.error)
            (second,) = yield [TeacherRequest(f"it{i}/1", prompt=first.text)]
            if i % 5 == 4:
                return Outcome("dropped", "rule")
            return Outcome("kept", row={"messages": [{"role": "user", "content": first.text},
                                                     {"role": "assistant", "content": second.text}], "id": f"it{i}"})
        return steps
    return [Item(f"it{i}", make(i)) for i in range(n)]


def run(tmp_path, teacher, n=12):
    journal = Journal(tmp_path / "journal.jsonl")
    asker = Asker(teacher, RequestCache(tmp_path / "cache.jsonl"))
    items = two_step_items(n)
    try:
        run_items(items, asker, journal)
    finally:
        counts = write_data(tmp_path, items, journal, OutputFilters(near_dup=None))
        journal.close()
    return counts


def test_rows_follow_item_order_and_each_step_sees_its_reply(tmp_path):
    counts = run(tmp_path, StubTeacher())
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"it{i}" for i in range(12) if i % 5 != 4]
    assert rows[0]["messages"] == [{"role": "user", "content": "0 rebmun cipot"},
                                   {"role": "assistant", "content": "0 REBMUN CIPOT"}]
    assert counts["kept"] == 10 and counts["dropped"] == {"rule": 2}


def test_a_killed_run_resumes_without_duplicates_losses_or_paying_twice(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    run(whole, StubTeacher())
    killed = tmp_path / "killed"
    killed.mkdir()
    first = StubTeacher(fail_after=15)
    with pytest.raises(KeyboardInterrupt):
        run(killed, first)
    finished = len((killed / "journal.jsonl").read_text().splitlines())
    assert 0 < finished < 12
    with (killed / "journal.jsonl").open("a") as f:  # a line torn by the kill
        f.write('{"item": "it9", "stat')
    second = StubTeacher()
    run(killed, second)
    assert (killed / "data.jsonl").read_bytes() == (whole / "data.jsonl").read_bytes()
    assert not set(first.sent) & set(second.sent), "a request answered before the kill was sent again"
    assert len(first.sent) + len(second.sent) == 24
    journal = [json.loads(line) for line in (killed / "journal.jsonl").read_text().splitlines()]
    assert sorted(e["item"] for e in journal) == sorted(f"it{i}" for i in range(12))


def test_a_failed_reply_is_recorded_with_its_reason_and_not_cached(tmp_path):
    class Failing(StubTeacher):
        def run(self, requests):
            for request in requests:
                self.sent.append(request.key)
                yield TeacherReply(request, None, error="HTTP 500: boom", attempts=3)

    counts = run(tmp_path, Failing(), n=3)
    assert counts["failed"] == {"HTTP 500": 3} and counts["kept"] == 0
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""
    again = StubTeacher()
    counts = run(tmp_path, again, n=3)  # a rerun retries the failed items, and only those
    assert sorted(again.sent) == ["it0/0", "it0/1", "it1/0", "it1/1", "it2/0", "it2/1"]
    assert counts["failed"] == {} and counts["kept"] == 3


def test_output_filters_drop_duplicates_near_duplicates_and_refusals():
    text = ("The llama is a domesticated South American camelid, widely used as a meat and pack animal by "
            "Andean cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. "
            "Their wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a "
            "few repetitions. When using a pack, they can carry about 25 to 30 percent of their body weight for "
            "eight to thirteen kilometres. The name llama was adopted by European settlers from native Peruvians.")
    near = text.replace("widely used", "commonly used")
    shingles = [{" ".join(w[i:i + 5]) for i in range(len(w) - 4)} for w in (text.lower().split(), near.lower().split())]
    assert len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1]) > 0.85  # the planted pair is near
    rows = [{"id": str(i), "messages": [{"role": "assistant", "content": t}]} for i, t in enumerate(
        [text, text.upper(), near, "As an AI language model, I cannot do that.", "Something else entirely here."])]
    counts = Counter()
    kept = OutputFilters(near_dup=0.8).apply(rows, counts)
    assert [r["id"] for r in kept] == ["0", "4"]
    assert counts == {"duplicate": 1, "near_duplicate": 1, "refusal": 1}
    assert [r["id"] for r in OutputFilters(near_dup=None, refusals=True).apply(rows, Counter())] == ["0", "2", "3", "4"]
    assert is_refusal("I'm sorry, but I cannot help with that.") and not is_refusal("Sorry for the delay.")


def instruction_corpus(n: int, seed: int = 0) -> list[str]:
    """Instructions built from a small vocabulary, so many pairs are close to the 0.7 threshold."""
    rng = random.Random(seed)
    verbs = ["Write", "Give", "List", "Explain", "Describe", "Summarize", "Classify", "Translate"]
    objects = ["a poem about", "three facts about", "the history of", "a short story about", "an email about",
               "the pros and cons of", "a recipe for", "a tweet about"]
    topics = ["cats", "the ocean", "climate change", "the moon", "llamas", "coffee", "winter", "python code",
              "a busy city", "your best friend"]
    extra = ["", " in one sentence", " for a child", " using simple words", " in the style of a pirate"]
    return [f"{rng.choice(verbs)} {rng.choice(objects)} {rng.choice(topics)}{rng.choice(extra)}."
            for _ in range(n)]


def test_the_novelty_pool_keeps_exactly_what_a_brute_force_rouge_pass_keeps():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    corpus = instruction_corpus(400)
    seeds, candidates = corpus[:20], corpus[20:]
    brute_pool, brute_kept = list(seeds), []
    for c in candidates:  # the original script's loop: score against every instruction so far
        if max(scorer.score(p, c)["rougeL"].fmeasure for p in brute_pool) <= 0.7:
            brute_pool.append(c)
            brute_kept.append(c)
    pool = NoveltyPool(0.7)
    for s in seeds:
        pool.insert(s)
    kept = [c for c in candidates if pool.add(c)[0]]
    assert kept == brute_kept
    assert 10 < len(kept) < len(candidates) - 10  # the threshold matters on this corpus
    probe = "Write a poem about the moon in one sentence."
    best, _ = pool.most_similar(probe)
    assert best == pytest.approx(max(scorer.score(p, probe)["rougeL"].fmeasure for p in pool.texts), abs=1e-12)


def test_the_manifest_counts_tokens_and_cost_and_a_rerun_pays_nothing(tmp_path):
    from llamaherd.synth.job import SynthJob, run_job
    from llamaherd.synth.sampling import Sampling

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Explain tides.\nName a colour.\nWhy do cats purr?\n")
    job = SynthJob(recipe="explain", seeds=str(seeds), out=str(tmp_path / "out"), sampling=Sampling(max_tokens=8),
                   price_in=2.0, price_out=10.0, near_dup=None)
    first = run_job(job, StubTeacher())
    assert first["teacher"] == {"name": "stub", "teacher_id": "stub", "kind": "stub"}
    assert first["counts"]["kept"] == 3 and first["this_run"]["requests"] == 3
    assert first["totals"]["cost_usd"] == pytest.approx((3 * 3 * 2.0 + 3 * 5 * 10.0) / 1e6)  # StubTeacher: 3 in, 5 out
    again = StubTeacher()
    second = run_job(job, again)
    assert again.sent == [] and second["totals"]["runs"] == 2
    assert second["totals"]["cost_usd"] == first["totals"]["cost_usd"]
    assert second["output_sha256"] == first["output_sha256"]


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    from llamaherd.errors import InputError
    from llamaherd.synth.job import SynthJob, run_job
    from llamaherd.synth.sampling import Sampling

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Explain tides.\n")
    run_job(SynthJob(recipe="explain", seeds=str(seeds), out=str(tmp_path / "o")), StubTeacher())
    with pytest.raises(InputError, match="sampling"):
        run_job(SynthJob(recipe="explain", seeds=str(seeds), out=str(tmp_path / "o"),
                         sampling=Sampling(temperature=0.1)), StubTeacher())
