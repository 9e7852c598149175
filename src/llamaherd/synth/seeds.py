"""Seed files: plain text (one seed per line) or JSONL / a JSON array with one of the fields `topic`, `question`,
`instruction` per record (Alpaca records are read as instructions, with their `input` and `output`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaherd.errors import InputError

SEED_FIELDS = ("topic", "question", "instruction")


@dataclass(frozen=True)
class Seed:
    """One seed and where it came from (`file:line`); input/output are an Alpaca record's, source its `source`
    field (the explain recipe's per-source system-message mapping reads it)."""

    text: str
    where: str
    input: str = ""
    output: str = ""
    source: str = ""


def read_seeds(path: str | Path) -> list[Seed]:
    """Every seed of a file, in order; InputError naming the file, line and field for a bad record."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such seed file; pass a text file with one seed per line or a JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e}); re-save the seed file as UTF-8") from None
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the seed file") from None
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON array of seed records")
        seeds = [_record(path, i + 1, r, "record") for i, r in enumerate(records)]
    elif path.suffix == ".jsonl" or stripped.startswith("{"):
        seeds = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
                seeds.append(_record(path, n, record, "line"))
    else:
        seeds = [Seed(line.strip(), f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not seeds:
        raise InputError(f"{path}: holds no seeds; add one per line")
    return seeds


def _record(path: Path, n: int, record, what: str) -> Seed:
    where = f"{path}:{n}" if what == "line" else f"{path}[{n - 1}]"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with one of the fields {', '.join(SEED_FIELDS)}")
    for name in SEED_FIELDS:
        if name in record:
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{where}: field '{name}' must be a non-empty string")
            extra = {k: record.get(k, "") for k in ("input", "output", "source")}
            for k, v in extra.items():
                if not isinstance(v, str):
                    raise InputError(f"{where}: field '{k}' must be a string")
            return Seed(value.strip(), where, **extra)
    raise InputError(f"{where}: none of the fields {', '.join(SEED_FIELDS)} (keys: {sorted(record)}); "
                     "name the seed text with one of them")
