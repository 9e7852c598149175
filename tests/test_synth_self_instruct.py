"""Self-Instruct's loop with a scripted teacher: the original scripts' filters and the ROUGE-L novelty check
decide what enters the pool, the counts say why the rest left, instances are asked per kept instruction, and a
run killed in the instance phase resumes without asking the instruction rounds again."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from rouge_score import rouge_scorer

from llamaherd.synth.job import SynthJob, run_job
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.teacher import TeacherReply
from llamaherd.synth.templates import SELF_INSTRUCT_HEADER, self_instruct_filter

VERBS = ["Write", "Explain", "Describe", "Summarize", "Translate", "Compare", "Suggest", "Rewrite"]
THINGS = ["a poem about", "three facts about", "the history of", "a short story about", "an email about",
          "the benefits of", "a recipe for", "a slogan for"]
TOPICS = ["cats", "the ocean", "the moon", "llamas", "coffee", "winter", "a busy city", "old trains", "bees"]
BAD = ["Draw a picture of a cat for me.", "Sort.", "Write a program that adds two numbers together."]


class ScriptedTeacher:
    """Instruction prompts get nine numbered tasks (some breaking a filter, some near-copies), classification
    questions a Yes/No, instance prompts an Output; all a deterministic function of the prompt."""

    teacher_id = "scripted"
    identity = {"kind": "scripted", "name": "scripted"}

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[str] = []
        self.fail_after = fail_after

    def run(self, requests):
        for request in requests:
            if self.fail_after is not None and len(self.sent) >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.sent.append(request.prompt)
            yield TeacherReply(request, self.answer(request.prompt), "stop", 10, 10)

    @staticmethod
    def answer(prompt: str) -> str:
        rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
        if prompt.startswith(SELF_INSTRUCT_HEADER):
            tasks = [f"{rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(TOPICS)}." for _ in range(7)]
            tasks += [rng.choice(BAD), tasks[0].replace(".", " please.")]
            return " " + "\n".join(f"{9 + k}. {t}" if k else t for k, t in enumerate(tasks)) + "\n17. "
        if "classification task" in prompt:
            return " No"
        return "Output: A reply written for this task."


def job(tmp_path, **kw) -> SynthJob:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"{v} {t} {p}."}) + "\n"
                             for v, t, p in zip(VERBS, THINGS, TOPICS)))
    return SynthJob(recipe="self-instruct", seeds=str(seeds), out=str(tmp_path / "out"), n=12,
                    sampling=Sampling(max_tokens=64, temperature=0.7, seed=1), near_dup=None, **kw)


def test_filters_and_rouge_decide_the_pool_and_each_instruction_gets_an_instance(tmp_path):
    manifest = run_job(job(tmp_path), ScriptedTeacher())
    rows = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["output"] == "A reply written for this task." for r in rows)
    instructions = [r["instruction"] for r in rows]
    assert all(self_instruct_filter(i) is None for i in instructions)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seeds = [json.loads(line)["instruction"] for line in (tmp_path / "seeds.jsonl").read_text().splitlines()]
    for k, inst in enumerate(instructions):  # the independent check: rouge-score against everything before it
        assert max(scorer.score(p, inst)["rougeL"].fmeasure for p in seeds + instructions[:k]) <= 0.7
    dropped = manifest["generation"]["instructions_dropped"]
    assert dropped["keyword:picture"] > 0 and dropped["length"] > 0 and dropped["rouge_l"] > 0


def test_a_run_killed_in_the_instance_phase_does_not_ask_the_rounds_again(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    run_job(job(whole), ScriptedTeacher())
    killed = tmp_path / "killed"
    killed.mkdir()
    first = ScriptedTeacher(fail_after=15)  # 5 round prompts, then 10 of the 24 instance requests
    with pytest.raises(KeyboardInterrupt):
        run_job(job(killed), first)
    assert any(p.startswith(SELF_INSTRUCT_HEADER) for p in first.sent)
    second = ScriptedTeacher()
    run_job(job(killed), second)
    assert not any(p.startswith(SELF_INSTRUCT_HEADER) for p in second.sent)
    assert not set(first.sent) & set(second.sent)
    assert (killed / "out" / "data.jsonl").read_bytes() == (whole / "out" / "data.jsonl").read_bytes()
