"""Self-Instruct (Wang et al. 2022) and its Alpaca variant (Taori et al. 2023): grow a pool of instructions
from seed tasks, keep only novel ones, then write an input/output instance for each.

Instruction rounds: each round sends `requests_per_round` prompts (Self-Instruct: 8 example tasks per prompt,
6 seed + 2 machine-generated, shuffled; Alpaca: 3 seed tasks with their instances, the teacher writes up to 20);
new instructions pass the original scripts' keyword and length filters (templates.py), then the ROUGE-L novelty
check against the whole pool (rouge.py: kept when F <= 0.7). Each round's decisions go to the journal, so a
resumed run rebuilds the pool from it and asks nothing again.

Instances: Self-Instruct asks, per instruction, whether it is a classification task, then for an instance
(output-first for classification, input-first otherwise; templates.instance_prompt); Alpaca's reply already
holds each instruction's input and output.
"""

from __future__ import annotations

import random
from collections import Counter

from llamaherd.synth.rouge import NoveltyPool
from llamaherd.synth.runner import Asker, Item, Journal, Outcome, Steps
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import Seed
from llamaherd.synth.teacher import TeacherRequest
from llamaherd.synth import templates

RECIPE = "self-instruct"
VARIANTS = ("self-instruct", "alpaca")
# Stop sequences of the original requests (self_instruct/bootstrap_instructions.py; stanford_alpaca
# generate_instruction.py): the teacher stops before the task after the last one wanted.
STOPS = {"self-instruct": ("\n\n", "\n16", "16.", "16 ."), "alpaca": ("\n20", "20.")}
EXAMPLES_PER_PROMPT = {"self-instruct": 8, "alpaca": 3}
MACHINE_EXAMPLES = 2  # Self-Instruct: 2 of the 8 examples come from the machine-generated pool once it has some


class InstructionRounds:
    """The instruction-generation loop, resumable from the journal."""

    def __init__(self, seeds: list[Seed], sampling: Sampling, variant: str = "self-instruct",
                 requests_per_round: int = 5, threshold: float = 0.7, completion: bool = True) -> None:
        self.seeds, self.sampling, self.variant = seeds, sampling, variant
        self.requests_per_round, self.completion = requests_per_round, completion
        self.pool = NoveltyPool(threshold)
        for seed in seeds:
            self.pool.insert(seed.text)
        self.machine: list[dict] = []  # kept tasks: {"instruction"} (+ "input", "output" for alpaca)
        self.counts: Counter = Counter()

    def run(self, asker: Asker, journal: Journal, n: int, max_rounds: int) -> list[dict]:
        """Rounds until n instructions are kept or max_rounds have run; the kept tasks, in order."""
        for number in range(max_rounds):
            if len(self.machine) >= n:
                break
            round_id = f"{RECIPE}-round-{number:06d}"
            entry = journal.entries.get(round_id)
            if entry is None:
                decisions = self._round(asker, number)
                journal.append(round_id, Outcome("round", row={"decisions": decisions}))
            else:
                decisions = entry["row"]["decisions"]
                for d in decisions:
                    if d["kept"]:
                        self.pool.insert(d["task"]["instruction"])
            for d in decisions:
                if d["kept"]:
                    self.machine.append(d["task"])
                else:
                    self.counts[d["reason"]] += 1
        return self.machine[:n]

    def prompt(self, rng: random.Random) -> str:
        """One instruction-generation prompt, its example tasks drawn with rng."""
        if self.variant == "alpaca":
            tasks = rng.sample(self.seeds, EXAMPLES_PER_PROMPT["alpaca"])
            return templates.alpaca_prompt([{"instruction": s.text, "input": s.input, "output": s.output}
                                            for s in tasks])
        chosen = rng.sample([t["instruction"] for t in self.machine], min(MACHINE_EXAMPLES, len(self.machine)))
        chosen += rng.sample([s.text for s in self.seeds], EXAMPLES_PER_PROMPT["self-instruct"] - len(chosen))
        rng.shuffle(chosen)
        return templates.self_instruct_prompt(chosen)

    def request(self, key: str, prompt: str, seed: int) -> TeacherRequest:
        """An instruction-generation request (a completion, or a chat message with completion False)."""
        s = self.sampling
        fields = {"prompt": prompt} if self.completion else {"messages": (("user", prompt),)}
        return TeacherRequest(key, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              stop=STOPS[self.variant], seed=seed, **fields)

    def _round(self, asker: Asker, number: int) -> list[dict]:
        rng = random.Random(f"{self.sampling.seed}:{number}")
        requests = [self.request(f"{RECIPE}-round-{number:06d}/{j}", self.prompt(rng),
                                  self.sampling.request_seed(number, j)) for j in range(self.requests_per_round)]
        decisions = []
        for reply in asker.ask(requests):
            if not reply.ok:
                decisions.append({"kept": False, "reason": f"failed: {reply.error}", "task": None})
                continue
            for task in self._parse(reply.text, reply.finish_reason):
                decisions.append(self._decide(task))
        return decisions

    def _parse(self, text: str, finish_reason: str | None) -> list[dict]:
        if self.variant == "alpaca":
            return templates.parse_alpaca(text, EXAMPLES_PER_PROMPT["alpaca"], finish_reason or "stop")
        return [{"instruction": i}
                for i in templates.parse_self_instruct(text, EXAMPLES_PER_PROMPT["self-instruct"], finish_reason)]

    def _decide(self, task: dict) -> dict:
        check = templates.alpaca_filter if self.variant == "alpaca" else templates.self_instruct_filter
        if (reason := check(task["instruction"])) is not None:
            return {"kept": False, "reason": reason, "task": task}
        kept, score, similar = self.pool.add(task["instruction"])
        if not kept:
            return {"kept": False, "reason": "rouge_l", "task": task, "rouge_l": score, "similar": similar}
        return {"kept": True, "reason": None, "task": task, "rouge_l": score}


def instance_items(tasks: list[dict], sampling: Sampling, variant: str, completion: bool = True) -> list[Item]:
    """One Alpaca row per kept instruction."""
    return [Item(f"{RECIPE}-{i:06d}", _instance_steps(i, task, sampling, variant, completion))
            for i, task in enumerate(tasks)]


def _instance_steps(i: int, task: dict, sampling: Sampling, variant: str, completion: bool):
    item_id = f"{RECIPE}-{i:06d}"

    def request(step: int, prompt: str, max_tokens: int, stop: tuple[str, ...]) -> TeacherRequest:
        fields = {"prompt": prompt} if completion else {"messages": (("user", prompt),)}
        # greedy, as generate_instances.py and identify_clf_or_not.py ask (temperature 0)
        return TeacherRequest(f"{item_id}/{step}", max_tokens=max_tokens, temperature=0.0, stop=stop,
                              seed=sampling.request_seed(i, step), **fields)

    def alpaca_row() -> Outcome:  # the instance came with the instruction: nothing to ask
        return Outcome("kept", row={"instruction": task["instruction"], "input": task.get("input", ""),
                                    "output": task.get("output", ""), "id": item_id})

    def self_instruct_steps() -> Steps:
        instruction = task["instruction"]
        (clf,) = yield [request(0, templates.is_classification_prompt(instruction), 3, ("\n", "Task"))]
        if not clf.ok:
            return Outcome("failed", clf.error)
        classification = templates.parse_is_classification(clf.text)
        # generate_instances.py: 300 tokens for classification tasks, 350 otherwise
        (inst,) = yield [request(1, templates.instance_prompt(instruction, classification),
                                 300 if classification else 350, ("Example 6", "Task:"))]
        if not inst.ok:
            return Outcome("failed", inst.error)
        instances = templates.parse_instances(inst.text, classification, inst.finish_reason)
        if not instances:
            return Outcome("dropped", "no_instance")
        first = instances[0]
        return Outcome("kept", row={"instruction": instruction, "input": first["input"], "output": first["output"],
                                    "classification": classification, "id": item_id})

    return alpaca_row if variant == "alpaca" else self_instruct_steps
