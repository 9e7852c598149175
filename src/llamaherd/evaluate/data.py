"""Benchmark data: from the Hugging Face hub through `datasets`, or from local files in the original
release formats (a `--data-dir` laid out like `../shared/benchmarks/`, see docs/evaluation.md).

Every loader returns the same record layout as the hub dataset, so a task formats a doc the same way
whichever source it came from. Local rows are checked as they are read: a malformed row fails with the
file, the line and the field; missing files fail with the paths that were tried and how to supply them.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llamaherd.errors import InputError
from llamaherd.hub import OfflineError

Record = dict[str, Any]

DOCS_HINT = "see docs/evaluation.md"

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip

TRUTHFULQA_V0_MC2_OPTIONS = 5882  # options in the v0 mc_task.json the 2023 leaderboard used


@dataclass(frozen=True)
class TaskData:
    """The splits of one benchmark, and where they came from (recorded in results)."""

    splits: dict[str, list[Record]]
    source: str  # "hub:<dataset id>" or the local paths read
    form: str  # data format, e.g. "hf-hub", "ai2-jsonl", "llama.cpp-text"
    caveats: tuple[str, ...] = ()  # known ways this data differs from what the protocol expects


class Malformed(InputError):
    """A row of a local data file that does not have the expected fields."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field {field!r} {problem}")


def open_text(path: Path) -> IO[str]:
    """Open a text file, decompressing .gz and .bz2 by suffix."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_jsonl(path: Path, allow_cut_tail: bool = False) -> tuple[list[tuple[int, Any]], int | None]:
    """(line number, object) per non-empty line, and the number of a cut-off final line if any.

    A final line with no newline that is not valid JSON is a file truncated mid-row; with
    `allow_cut_tail` it is skipped and reported instead of failing.
    """
    rows: list[tuple[int, Any]] = []
    with open_text(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            if allow_cut_tail and number == len(lines):
                return rows, number
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows, None


def read_json_array(path: Path) -> list[tuple[int, Any]]:
    """(line number where the item starts, item) for each item of a top-level JSON array."""
    with open_text(path) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    pos = _skip_space(text, 0)
    try:
        if text[pos : pos + 1] != "[":
            raise InputError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON array")
        pos = _skip_space(text, pos + 1)
        while text[pos : pos + 1] != "]":
            item, end = decoder.raw_decode(text, pos)
            items.append((text.count("\n", 0, pos) + 1, item))
            pos = _skip_space(text, end)
            if text[pos : pos + 1] == ",":
                pos = _skip_space(text, pos + 1)
            elif text[pos : pos + 1] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return items


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row starts, cells) for each row of a header-less CSV file."""
    with open_text(path) as f:
        reader = csv.reader(f)
        start = 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1


def get(row: Any, field: str, kind: type, where: str) -> Any:
    """`row[a][b]` for field "a.b", checked to be of `kind`; Malformed names the field otherwise."""
    value = row
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise Malformed(where, field, "is missing")
        value = value[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise Malformed(where, field, f"should be {kind.__name__}, got {type(value).__name__}")
    return value


def find(data_dir: Path, candidates: Sequence[str], what: str, how: str) -> Path:
    """The first candidate path under data_dir that exists; otherwise say where we looked and what to do."""
    for name in candidates:
        if (data_dir / name).exists():
            return data_dir / name
    tried = ", ".join(str(data_dir / c) for c in candidates)
    raise InputError(
        f"missing {what}: looked for {tried}. {how}, or leave out --data-dir to load it from the "
        f"Hugging Face hub ({DOCS_HINT})"
    )


def load_hub(
    dataset: str, name: str | None, splits: Sequence[str], local_hint: str
) -> dict[str, list[Record]]:
    """Splits of a hub dataset as lists of records; a one-line error when the hub cannot be reached."""
    label = f"{dataset} ({name})" if name else dataset
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"loading {label} from the Hugging Face hub needs the `datasets` package "
            f"(pip install datasets); or pass --data-dir with {local_hint} ({DOCS_HINT})"
        ) from None
    try:
        loaded = datasets.load_dataset(dataset, name)
    except OSError as e:  # ConnectionError in offline mode or without network, FileNotFoundError
        first = str(e).splitlines()[0] if str(e) else ""
        raise OfflineError(
            f"offline: cannot load {label} from the Hugging Face hub ({type(e).__name__}: {first}); "
            f"pass --data-dir with {local_hint} ({DOCS_HINT})"
        ) from None
    return {split: [dict(row) for row in loaded[split]] for split in splits}


# ARC-Challenge -------------------------------------------------------------------------------------

ARC_DIRS = ("arc_challenge", "ARC-Challenge", "ARC-V1-Feb2018-2/ARC-Challenge")
ARC_FILES = {"train": "ARC-Challenge-Train.jsonl", "test": "ARC-Challenge-Test.jsonl"}
ARC_HINT = "arc_challenge/ARC-Challenge-Test.jsonl and ARC-Challenge-Train.jsonl (AI2 ARC-V1-Feb2018)"
ARC_NUMERIC_KEYS = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def arc_record(row: Record, where: str) -> Record:
    """Check a flat (hub layout) ARC row; the answer key must name one of the labels, and mapping a
    numeric key 1-5 to A-E (the 2023 harness rule) must give the same index as looking it up."""
    get(row, "question", str, where)
    texts = get(row, "choices.text", list, where)
    labels = get(row, "choices.label", list, where)
    key = get(row, "answerKey", str, where)
    if len(texts) != len(labels) or not texts:
        raise Malformed(where, "choices", f"has {len(texts)} texts but {len(labels)} labels")
    if not all(isinstance(t, str) for t in texts + labels):
        raise Malformed(where, "choices", "should hold strings")
    letter = ARC_NUMERIC_KEYS.get(key, key)
    if key not in labels or "ABCDE".find(letter) != labels.index(key):
        raise Malformed(where, "answerKey", f"{key!r} does not match the choice labels {labels}")
    return row


def load_arc(data_dir: Path | None) -> TaskData:
    """ARC-Challenge train (few-shot pool) and test (evaluated) from the hub or AI2's jsonl files."""
    if data_dir is None:
        splits = load_hub("allenai/ai2_arc", "ARC-Challenge", ["train", "test"], ARC_HINT)
        return TaskData(
            {
                s: [arc_record(r, f"hub allenai/ai2_arc {s} row {i}") for i, r in enumerate(rows)]
                for s, rows in splits.items()
            },
            source="hub:allenai/ai2_arc/ARC-Challenge",
            form="hf-hub",
        )
    how = "Put the AI2 release files ARC-Challenge-{Train,Test}.jsonl there"
    folder = find(data_dir, ARC_DIRS, "ARC-Challenge data", how)
    paths = {
        split: find(folder, [file], f"ARC-Challenge {split} split", how) for split, file in ARC_FILES.items()
    }
    splits = {}
    for split, path in paths.items():
        rows, _ = read_jsonl(path)
        splits[split] = [arc_record(_flatten_arc(row, f"{path}:{n}"), f"{path}:{n}") for n, row in rows]
    return TaskData(splits, source=", ".join(map(str, paths.values())), form="ai2-jsonl")


def _flatten_arc(row: Record, where: str) -> Record:
    """AI2 jsonl row {id, question: {stem, choices: [{text, label}]}, answerKey} -> hub layout."""
    choices = get(row, "question.choices", list, where)
    for i, choice in enumerate(choices):
        get(choice, "text", str, f"{where} choice {i}")
        get(choice, "label", str, f"{where} choice {i}")
    return {
        "id": get(row, "id", str, where),
        "question": get(row, "question.stem", str, where),
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": get(row, "answerKey", str, where),
    }


# MMLU ----------------------------------------------------------------------------------------------

MMLU_DIRS = ("mmlu/data", "mmlu", "data")
MMLU_HINT = "mmlu/data/{dev,test}/<subject>_{dev,test}.csv (Hendrycks data.tar, no header)"
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def load_mmlu(subject: str, data_dir: Path | None) -> TaskData:
    """One MMLU subject: dev (the 5 few-shot examples, in file order) and test, from cais/mmlu or the
    original per-subject CSV files."""
    if data_dir is None:
        splits = load_hub("cais/mmlu", subject, ["dev", "test"], MMLU_HINT)
        for split, rows in splits.items():
            for i, row in enumerate(rows):
                _check_mmlu(row, f"hub cais/mmlu {subject} {split} row {i}")
        return TaskData(splits, source=f"hub:cais/mmlu/{subject}", form="hf-hub")
    how = "Put the Hendrycks MMLU data.tar folders dev/ and test/ (per-subject CSV files) under mmlu/data/"
    root = find(data_dir, [f"{d}/test/{subject}_test.csv" for d in MMLU_DIRS], f"MMLU {subject} data", how)
    root = root.parent.parent
    paths = {
        split: find(root, [f"{split}/{subject}_{split}.csv"], f"MMLU {subject} {split}", how)
        for split in ("dev", "test")
    }
    splits = {split: _read_mmlu_csv(path, subject) for split, path in paths.items()}
    return TaskData(splits, source=", ".join(map(str, paths.values())), form="hendrycks-csv")


def _read_mmlu_csv(path: Path, subject: str) -> list[Record]:
    records = []
    for line, cells in read_csv(path):
        where = f"{path}:{line}"
        if len(cells) != len(MMLU_COLUMNS):
            field = MMLU_COLUMNS[min(len(cells), len(MMLU_COLUMNS) - 1)]
            raise Malformed(
                where, field, f"row has {len(cells)} columns, expected 6 (question,A,B,C,D,answer)"
            )
        if cells[5] not in ("A", "B", "C", "D"):
            raise Malformed(where, "answer", f"should be one of A, B, C, D, got {cells[5]!r}")
        records.append(
            {
                "question": cells[0],
                "subject": subject,
                "choices": cells[1:5],
                "answer": "ABCD".index(cells[5]),
            }
        )
    return records


def _check_mmlu(row: Record, where: str) -> None:
    get(row, "question", str, where)
    choices = get(row, "choices", list, where)
    if len(choices) != 4:
        raise Malformed(where, "choices", f"has {len(choices)} options, expected 4")
    if get(row, "answer", int, where) not in range(4):
        raise Malformed(where, "answer", f"should be 0-3, got {row['answer']}")


# TruthfulQA ----------------------------------------------------------------------------------------

TRUTHFULQA_FILES = ("truthfulqa/mc_task.json", "truthfulqa/data/v0/mc_task.json", "mc_task.json")
TRUTHFULQA_HINT = "truthfulqa/mc_task.json (sylinrl/TruthfulQA, the v0 release)"


def load_truthfulqa(data_dir: Path | None) -> TaskData:
    """TruthfulQA multiple-choice validation (817 questions) from the hub or the original mc_task.json."""
    if data_dir is None:
        rows = load_hub("truthfulqa/truthful_qa", "multiple_choice", ["validation"], TRUTHFULQA_HINT)
        records = rows["validation"]
        for i, row in enumerate(records):
            where = f"hub truthfulqa/truthful_qa validation row {i}"
            for key in ("mc1_targets", "mc2_targets"):
                _check_targets(
                    key, get(row, f"{key}.choices", list, where), get(row, f"{key}.labels", list, where), where
                )
        return TaskData(
            {"validation": records},
            source="hub:truthfulqa/truthful_qa/multiple_choice",
            form="hf-hub",
            caveats=_truthfulqa_caveats(records),
        )
    path = find(
        data_dir,
        TRUTHFULQA_FILES,
        "TruthfulQA data",
        "Put mc_task.json from sylinrl/TruthfulQA (data/v0/) under truthfulqa/",
    )
    records = []
    for line, item in read_json_array(path):
        where = f"{path}:{line}"
        record: Record = {"question": get(item, "question", str, where)}
        for key in ("mc1_targets", "mc2_targets"):
            targets = get(item, key, dict, where)
            record[key] = {"choices": list(targets), "labels": list(targets.values())}
            _check_targets(key, record[key]["choices"], record[key]["labels"], where)
        records.append(record)
    return TaskData(
        {"validation": records},
        source=str(path),
        form="truthfulqa-mc_task-json",
        caveats=_truthfulqa_caveats(records),
    )


def _check_targets(key: str, choices: list, labels: list, where: str) -> None:
    """mc1/mc2 answers with 0/1 labels: mc2 with some true and some false, mc1 with its correct answer first
    (the harness scores mc1 as "is answer 0 the most likely")."""
    if not choices or len(choices) != len(labels):
        raise Malformed(where, key, f"has {len(choices)} answers and {len(labels)} labels")
    if any(label not in (0, 1) or isinstance(label, bool) for label in labels):
        raise Malformed(where, key, "labels should be 0 or 1")
    if key == "mc1_targets" and labels[0] != 1:
        raise Malformed(where, key, "should list the correct answer (label 1) first")
    if key == "mc2_targets" and (1 not in labels or 0 not in labels):
        raise Malformed(where, key, "needs at least one true (1) and one false (0) answer")


def _truthfulqa_caveats(records: list[Record]) -> tuple[str, ...]:
    n = sum(len(r["mc2_targets"]["choices"]) for r in records)
    if n == TRUTHFULQA_V0_MC2_OPTIONS:
        return ()
    caveat = (
        f"{n} mc2 answer options where the v0 release the 2023 leaderboard used has "
        f"{TRUTHFULQA_V0_MC2_OPTIONS}: this is another version of TruthfulQA"
    )
    return (caveat,)
