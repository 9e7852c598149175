"""HellaSwag data in the forms it can be found in, each recorded by name in the results.

- `hf-hub`: `Rowan/hellaswag` through `datasets` (original fields).
- `rowanz-jsonl`: the official `hellaswag_val.jsonl` / `hellaswag_train.jsonl` (original fields); exact.
- `llama.cpp-text`: `hellaswag_val_full.txt[.bz2]`, all 10,042 validation items, 6 lines each, already
  preprocessed by llama.cpp's rules: ctx_b is not capitalized and rare `[tags]` are kept, so some
  prompts differ from the harness's.
- `olmo-requests`: OLMo's `requests.jsonl.gz`, 1,000 validation items whose `query` the harness way
  built; a subsample, so scores only estimate the full-split score.

The few-shot pool is always the train split with its original fields (10-shot in both protocols).
"""

from __future__ import annotations

import re
from pathlib import Path

from llamaherd.errors import InputError
from llamaherd.evaluate.data import (
    DOCS_HINT,
    Malformed,
    Record,
    TaskData,
    find,
    get,
    load_hub,
    open_text,
    read_jsonl,
)

FORMS = ("rowanz-jsonl", "llama.cpp-text", "olmo-requests")
FILES = {
    "rowanz-jsonl": ("hellaswag/hellaswag_val.jsonl",),
    "llama.cpp-text": ("hellaswag/hellaswag_val_full.txt.bz2", "hellaswag/hellaswag_val_full.txt"),
    "olmo-requests": ("hellaswag/olmo_oe_eval_rc_5shot/requests.jsonl.gz",),
}
TRAIN_FILE = "hellaswag/hellaswag_train.jsonl"
TRAIN_ROWS = 39905  # rows of the official hellaswag_train.jsonl
HINT = "hellaswag/hellaswag_val.jsonl and hellaswag/hellaswag_train.jsonl (rowanz/hellaswag data/)"
CAVEATS = {
    "llama.cpp-text": "llama.cpp text form: ctx_b is not capitalized and rare [tags] are kept, "
    "so some prompts differ from the harness's",
    "olmo-requests": "OLMo requests form: a 1,000-doc subsample of the 10,042 validation docs, "
    "so the score only estimates the full-split score",
}


def preprocess(text: str) -> str:
    """The harness's clean-up of WikiHow artifacts: strip, " [title]" -> ". ", drop every [...] tag,
    then one pass of double space -> single space."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def process_row(row: Record, where: str) -> Record:
    """An original-fields row plus `query`, `choices` and `gold`, built as the harness builds them."""
    ctx_b = get(row, "ctx_b", str, where)
    context = get(row, "ctx_a", str, where) + " " + ctx_b.capitalize()
    endings = get(row, "endings", list, where)
    if not all(isinstance(e, str) for e in endings) or not endings:
        raise Malformed(where, "endings", "should be a non-empty list of strings")
    label = row.get("label")
    if label is None or label == "":
        raise Malformed(where, "label", "is missing (the test split has no labels)")
    if not str(label).isdigit() or int(label) >= len(endings):
        raise Malformed(where, "label", f"should index the endings, got {label!r}")
    return {
        **row,
        "query": preprocess(get(row, "activity_label", str, where) + ": " + context),
        "choices": [preprocess(e) for e in endings],
        "gold": int(label),
    }


def load_hellaswag(data_dir: Path | None, form: str | None = None) -> TaskData:
    """Validation (evaluated) and train (few-shot pool) splits. With a data_dir, the first form
    found is used unless `form` names one of FORMS."""
    if data_dir is None:
        splits = load_hub("Rowan/hellaswag", None, ["train", "validation"], HINT)
        return TaskData(
            {
                s: [process_row(r, f"hub Rowan/hellaswag {s} row {i}") for i, r in enumerate(rows)]
                for s, rows in splits.items()
            },
            source="hub:Rowan/hellaswag",
            form="hf-hub",
        )
    if form is not None and form not in FORMS:
        raise InputError(f"unknown HellaSwag data form {form!r}; use one of {', '.join(FORMS)}")
    forms = [form] if form else list(FORMS)
    candidates = [name for f in forms for name in FILES[f]]
    path = find(
        data_dir,
        candidates,
        "HellaSwag validation data",
        "Put the official hellaswag_val.jsonl (or llama.cpp's hellaswag_val_full.txt.bz2) under hellaswag/",
    )
    form = next(f for f in forms if any(path == data_dir / name for name in FILES[f]))
    validation = {
        "rowanz-jsonl": _read_rowanz,
        "llama.cpp-text": _read_llama_cpp,
        "olmo-requests": _read_olmo,
    }[form](path)
    train_path, train, train_caveats = _read_train(data_dir)
    caveats = ((CAVEATS[form],) if form in CAVEATS else ()) + train_caveats
    return TaskData(
        {"validation": validation, "train": train}, source=f"{path}, {train_path}", form=form, caveats=caveats
    )


def _read_rowanz(path: Path) -> list[Record]:
    rows, _ = read_jsonl(path)
    return [process_row(row, f"{path}:{n}") for n, row in rows]


def _read_train(data_dir: Path) -> tuple[Path, list[Record], tuple[str, ...]]:
    """The few-shot pool; a truncated copy (hellaswag_train*.jsonl) is accepted and flagged."""
    folder = data_dir / "hellaswag"
    found = sorted(folder.glob("hellaswag_train*.jsonl")) if folder.is_dir() else []
    path = data_dir / TRAIN_FILE if (data_dir / TRAIN_FILE).exists() else (found[0] if found else None)
    if path is None:
        raise InputError(
            f"missing the HellaSwag train split, the pool of the 10 few-shot examples: looked for "
            f"{data_dir / TRAIN_FILE} and {folder}/hellaswag_train*.jsonl. Put the official "
            f"hellaswag_train.jsonl (rowanz/hellaswag data/) there, or leave out --data-dir to load "
            f"Rowan/hellaswag from the Hugging Face hub ({DOCS_HINT})"
        )
    rows, cut_line = read_jsonl(path, allow_cut_tail=True)
    caveats = []
    if cut_line is not None:
        caveats.append(f"{path} is truncated: its cut-off line {cut_line} was skipped")
    if len(rows) != TRAIN_ROWS:
        caveats.append(
            f"few-shot pool has {len(rows)} of the {TRAIN_ROWS} train rows, "
            "so the few-shot examples differ from the harness's"
        )
    return path, [process_row(row, f"{path}:{n}") for n, row in rows], tuple(caveats)


def _read_llama_cpp(path: Path) -> list[Record]:
    """Blocks of 6 lines: query, gold label, then the 4 endings."""
    with open_text(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise Malformed(
            f"{path}:{len(lines) - len(lines) % 6 + 1}",
            "item",
            f"is incomplete: {len(lines)} lines is not a multiple of 6",
        )
    records = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1]
        if label not in ("0", "1", "2", "3"):
            raise Malformed(f"{path}:{start + 2}", "label", f"should be 0-3, got {label!r}")
        records.append({"query": lines[start], "choices": lines[start + 2 : start + 6], "gold": int(label)})
    return records


def _read_olmo(path: Path) -> list[Record]:
    """One doc per `native_id` (each comes with 4 conditional and 4 unconditional requests)."""
    rows, _ = read_jsonl(path)
    docs: dict[int, Record] = {}
    for n, row in rows:
        where = f"{path}:{n}"
        native_id = get(row, "native_id", int, where)
        doc = {
            "ind": native_id,
            "query": get(row, "doc.query", str, where),
            "choices": get(row, "doc.choices", list, where),
            "gold": get(row, "doc.gold", int, where),
        }
        if doc["gold"] not in range(len(doc["choices"])):
            raise Malformed(where, "doc.gold", f"should index doc.choices, got {doc['gold']}")
        if docs.setdefault(native_id, doc) != doc:
            raise Malformed(where, "doc", f"differs from an earlier request's doc for native_id {native_id}")
    return list(docs.values())
