"""The four Open LLM Leaderboard tasks and the two protocols that turn them into log-likelihood requests.

A protocol fixes everything that moved scores between the 2023 leaderboard (lm-evaluation-harness
b281b09) and today's `lm-eval` 0.4: BOS, doc order, few-shot selection, MMLU aggregation and which
TruthfulQA answers count as true. A task fixes the data, the prompt format and the shot count.
`build_requests(task, protocol, limit)` combines them into `Doc`s, each holding the requests the
engine scores and what the scorer needs.
"""

from __future__ import annotations

import difflib
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llamaherd.errors import InputError
from llamaherd.evaluate.data import (
    MMLU_SUBJECTS,
    Record,
    TaskData,
    load_arc,
    load_mmlu,
    load_truthfulqa,
)
from llamaherd.evaluate.hellaswag import load_hellaswag

TARGET_DELIMITER = " "  # between a prompt and its answer
FEWSHOT_DELIMITER = "\n\n"  # after each answered few-shot example

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@dataclass(frozen=True)
class Protocol:
    """Where the 2023 leaderboard and today's harness differ, as data."""

    name: str
    add_bos: bool  # encode with the tokenizer's special tokens (BOS where it adds one) or with none
    seed: int  # seed of the generator that shuffles docs (if shuffle_docs) and draws few-shot examples
    shuffle_docs: bool  # 2023: eval docs shuffled by that generator, then --limit keeps the first N
    drop_eval_doc: bool  # harness: draw k+1 and drop the eval doc for tasks without a test split
    mmlu_weighted: bool  # MMLU = size-weighted mean over all docs (harness) or mean of 57 subjects (2023)
    mc2_true_before_first_false: bool  # 2023: answers before the first false one are the true ones


PROTOCOLS = {
    "leaderboard-2023": Protocol(
        "leaderboard-2023",
        add_bos=False,
        seed=42,
        shuffle_docs=True,
        drop_eval_doc=False,
        mmlu_weighted=False,
        mc2_true_before_first_false=True,
    ),
    "harness": Protocol(
        "harness",
        add_bos=True,
        seed=1234,
        shuffle_docs=False,
        drop_eval_doc=True,
        mmlu_weighted=True,
        mc2_true_before_first_false=False,
    ),
}


@dataclass(frozen=True)
class Request:
    """One log-likelihood request in the harness's split form: trailing whitespace of the context
    has moved to the front of the continuation."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Doc:
    """One evaluated doc: its requests (one per choice) and what scoring needs."""

    task: str
    doc_id: int  # position in the protocol's evaluation order (what --limit keeps the first of)
    index: int  # position in the split as loaded (file or hub order)
    context: str  # description + few-shot examples + this doc's prompt, as the harness builds it
    choices: tuple[str, ...]  # answer strings, without the target delimiter
    gold: int
    requests: tuple[Request, ...]
    metrics: tuple[str, ...]  # what this doc is scored on: acc/acc_norm, or mc1/mc2
    true_mask: tuple[bool, ...] | None = None  # mc2: which of the first len(true_mask) choices count as true
    fewshot_indices: tuple[int, ...] = ()  # positions of the few-shot examples in the task's pool
    mc1_indices: tuple[int, ...] | None = None  # mc1: its answers' positions in choices, the correct one first

    @property
    def choice_lengths(self) -> tuple[int, ...]:
        """Character length of each choice (no leading space): the acc_norm divisor."""
        return tuple(len(c) for c in self.choices)


class Task(ABC):
    """A benchmark: where its docs come from and how one is written as a prompt and choices."""

    name: str
    group: str | None = None  # the group whose score aggregates this task (mmlu)
    versions: ClassVar[Mapping[str, str]]  # task version under each protocol
    n_shot: ClassVar[Mapping[str, int]]  # few-shot examples under each protocol
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    eval_split: str
    fewshot_split: str | None
    description = ""
    fewshot_first_n = False  # take the first k of the pool in order (MMLU) instead of sampling
    harness_drops_eval_doc = False  # lm-eval names no test split for it (see Protocol.drop_eval_doc)

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self._data: TaskData | None = None

    @property
    def data(self) -> TaskData:
        """The loaded splits and their provenance (loaded on first use)."""
        if self._data is None:
            self._data = self.load()
        return self._data

    @abstractmethod
    def load(self) -> TaskData: ...

    def docs(self, split: str) -> list[Record]:
        """Records of one split, in file / hub order."""
        if split not in self.data.splits:
            raise InputError(f"{self.name} has no {split!r} split; it has {', '.join(self.data.splits)}")
        return self.data.splits[split]

    def eval_docs(self) -> list[Record]:
        return self.docs(self.eval_split)

    def fewshot_docs(self) -> list[Record]:
        return self.docs(self.fewshot_split) if self.fewshot_split else []

    @abstractmethod
    def doc_to_text(self, doc: Record) -> str: ...

    @abstractmethod
    def doc_to_choices(self, doc: Record) -> list[str]: ...

    @abstractmethod
    def gold(self, doc: Record) -> int: ...

    def doc_to_target(self, doc: Record) -> str:
        return self.doc_to_choices(doc)[self.gold(doc)]

    def true_mask(self, doc: Record, protocol: Protocol) -> tuple[bool, ...] | None:
        """Which choices count as true for mc2; None for tasks scored by accuracy."""
        return None

    def mc1_choices(self, doc: Record) -> list[str] | None:
        """The answers mc1 picks from, the correct one first; None for tasks without mc1."""
        return None


class ArcChallenge(Task):
    name = "arc_challenge"
    versions: ClassVar[Mapping[str, str]] = {"leaderboard-2023": "0", "harness": "1.0"}
    n_shot: ClassVar[Mapping[str, int]] = {"leaderboard-2023": 25, "harness": 25}
    eval_split, fewshot_split = "test", "train"

    def load(self) -> TaskData:
        return load_arc(self.data_dir)

    def doc_to_text(self, doc: Record) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choices(self, doc: Record) -> list[str]:
        return doc["choices"]["text"]

    def gold(self, doc: Record) -> int:
        return doc["choices"]["label"].index(doc["answerKey"])  # the loader checked 1-5 -> A-E agrees


class HellaSwag(Task):
    name = "hellaswag"
    versions: ClassVar[Mapping[str, str]] = {"leaderboard-2023": "0", "harness": "1.0"}
    n_shot: ClassVar[Mapping[str, int]] = {"leaderboard-2023": 10, "harness": 10}
    eval_split, fewshot_split = "validation", "train"
    harness_drops_eval_doc = True

    def __init__(self, data_dir: Path | None = None, form: str | None = None) -> None:
        super().__init__(data_dir)
        self.form = form

    def load(self) -> TaskData:
        return load_hellaswag(self.data_dir, self.form)

    def doc_to_text(self, doc: Record) -> str:
        return doc["query"]

    def doc_to_choices(self, doc: Record) -> list[str]:
        return doc["choices"]

    def gold(self, doc: Record) -> int:
        return doc["gold"]


class MmluSubject(Task):
    group = "mmlu"
    versions: ClassVar[Mapping[str, str]] = {"leaderboard-2023": "1", "harness": "1.0"}
    n_shot: ClassVar[Mapping[str, int]] = {"leaderboard-2023": 5, "harness": 5}
    metrics = ("acc",)
    eval_split, fewshot_split = "test", "dev"
    fewshot_first_n = True

    def __init__(self, subject: str, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.subject = subject
        self.name = f"mmlu_{subject}"
        self.description = (
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
            + FEWSHOT_DELIMITER
        )

    def load(self) -> TaskData:
        return load_mmlu(self.subject, self.data_dir)

    def doc_to_text(self, doc: Record) -> str:
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", doc["choices"]))
        return f"{doc['question'].strip()}\n{options}Answer:"

    def doc_to_choices(self, doc: Record) -> list[str]:
        return ["A", "B", "C", "D"]

    def gold(self, doc: Record) -> int:
        return doc["answer"]


class TruthfulQaMc2(Task):
    """TruthfulQA multiple choice: mc2 (the leaderboard's number) and mc1 beside it, as the 2023 harness's
    `truthfulqa_mc` reported both (today's lm-eval splits them into truthfulqa_mc1 and truthfulqa_mc2).

    mc1 picks among the mc1_targets answers, whose first is the one correct answer; in the data they are a
    subset of the mc2 answers in another order, so they reuse the mc2 requests (any mc1 answer the mc2 list
    lacks gets a request of its own, after the mc2 ones).
    """

    name = "truthfulqa_mc2"
    versions: ClassVar[Mapping[str, str]] = {"leaderboard-2023": "1", "harness": "3.0"}
    n_shot: ClassVar[Mapping[str, int]] = {"leaderboard-2023": 0, "harness": 0}
    metrics = ("mc1", "mc2")
    eval_split, fewshot_split = "validation", None
    harness_drops_eval_doc = True

    def load(self) -> TaskData:
        return load_truthfulqa(self.data_dir)

    def doc_to_text(self, doc: Record) -> str:
        return f"{TRUTHFULQA_PRIMER}\n\nQ: {doc['question']}\nA:"

    def doc_to_choices(self, doc: Record) -> list[str]:
        return doc["mc2_targets"]["choices"]

    def gold(self, doc: Record) -> int:
        return 0  # unused by mc2; the harness's doc_to_target

    def true_mask(self, doc: Record, protocol: Protocol) -> tuple[bool, ...]:
        labels = doc["mc2_targets"]["labels"]
        if protocol.mc2_true_before_first_false:  # b281b09 splits at the first 0
            return tuple(i < labels.index(0) for i in range(len(labels)))
        return tuple(label == 1 for label in labels)

    def mc1_choices(self, doc: Record) -> list[str]:
        return doc["mc1_targets"]["choices"]  # b281b09 and lm-eval 0.4 both take the first as the gold


TASK_NAMES = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")  # the leaderboard suite


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A Protocol by name (leaderboard-2023 or harness)."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise InputError(
            f"unknown protocol {protocol!r}.{_suggest(protocol, list(PROTOCOLS))} "
            f"Known: {', '.join(PROTOCOLS)}"
        )
    return PROTOCOLS[protocol]


def resolve_tasks(
    names: str | Sequence[str], data_dir: Path | None = None, hellaswag_form: str | None = None
) -> list[Task]:
    """Task objects for names like "arc_challenge,mmlu"; mmlu expands to its 57 subject tasks and
    mmlu_<subject> names one subject. Nothing is loaded until a task's docs are asked for."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    subjects = [f"mmlu_{s}" for s in MMLU_SUBJECTS]
    tasks: list[Task] = []
    for name in names:
        if name == "mmlu":
            tasks += [MmluSubject(s, data_dir) for s in MMLU_SUBJECTS]
        elif name in subjects:
            tasks.append(MmluSubject(name.removeprefix("mmlu_"), data_dir))
        elif name == "arc_challenge":
            tasks.append(ArcChallenge(data_dir))
        elif name == "hellaswag":
            tasks.append(HellaSwag(data_dir, hellaswag_form))
        elif name == "truthfulqa_mc2":
            tasks.append(TruthfulQaMc2(data_dir))
        else:
            raise InputError(
                f"unknown task {name!r}.{_suggest(name, list(TASK_NAMES) + subjects)} "
                f"Known: {', '.join(TASK_NAMES)} (or mmlu_<subject>)"
            )
    return tasks


def split_request(context: str, continuation: str) -> Request:
    """Move trailing whitespace of the context to the continuation, as the harness does before
    encoding (so " Paris" after "is " is scored as "  Paris" after "is")."""
    kept = context.rstrip()
    return Request(kept, context[len(kept) :] + continuation)


def build_requests(task: Task, protocol: str | Protocol, limit: int | None = None) -> list[Doc]:
    """The Docs the protocol evaluates for a task, in its order, each with its few-shot context and
    one request per choice; `limit` keeps the first N (after the 2023 shuffle)."""
    proto = get_protocol(protocol)
    indexed = list(enumerate(task.eval_docs()))
    if limit is not None and not 1 <= limit <= len(indexed):
        raise InputError(
            f"--limit {limit} is outside 1..{len(indexed)}, the number of {task.eval_split} docs of "
            f"{task.name}{' (the limit applies to each MMLU subject)' if task.group == 'mmlu' else ''}; "
            f"use a limit in that range or leave it out to evaluate every doc"
        )
    rng = random.Random(proto.seed)
    if proto.shuffle_docs:
        rng.shuffle(indexed)
    k = task.n_shot[proto.name]
    pool = task.fewshot_docs() if k else []
    if k > len(pool):
        raise InputError(
            f"{task.name} needs {k} few-shot examples but its {task.fewshot_split} split has {len(pool)}"
        )
    docs = []
    for doc_id, (index, doc) in enumerate(indexed[:limit]):
        shots = _fewshot(task, proto, rng, pool, doc, k)
        context = (
            task.description
            + "".join(
                task.doc_to_text(pool[i]) + TARGET_DELIMITER + task.doc_to_target(pool[i]) + FEWSHOT_DELIMITER
                for i in shots
            )
            + task.doc_to_text(doc)
        )
        choices = list(task.doc_to_choices(doc))
        mc1 = task.mc1_choices(doc)
        if mc1 is not None:
            choices += [c for c in dict.fromkeys(mc1) if c not in choices]
        docs.append(
            Doc(
                task=task.name,
                doc_id=doc_id,
                index=index,
                context=context,
                choices=tuple(choices),
                gold=task.gold(doc),
                requests=tuple(split_request(context, TARGET_DELIMITER + c) for c in choices),
                metrics=task.metrics,
                true_mask=task.true_mask(doc, proto),
                fewshot_indices=tuple(shots),
                mc1_indices=None if mc1 is None else tuple(choices.index(c) for c in mc1),
            )
        )
    return docs


def _fewshot(
    task: Task, proto: Protocol, rng: random.Random, pool: list[Record], doc: Record, k: int
) -> list[int]:
    """Pool positions of the k few-shot examples for one doc. Sampling positions draws exactly what
    `rng.sample(pool, k)` draws: random.sample depends only on the population's length."""
    if k == 0:
        return []
    if task.fewshot_first_n:
        return list(range(k))
    if not (proto.drop_eval_doc and task.harness_drops_eval_doc):
        return rng.sample(range(len(pool)), k)
    shots = [i for i in rng.sample(range(len(pool)), k + 1) if pool[i] != doc][:k]
    if len(shots) < k:  # the eval doc was drawn more than once (duplicate rows): draw again without it
        shots = rng.sample([i for i in range(len(pool)) if pool[i] != doc], k)
    return shots
