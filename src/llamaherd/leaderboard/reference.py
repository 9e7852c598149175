"""The published 2023 Open LLM Leaderboard figures ("reported"), loaded beside the models measured here.

The numbers live in package data (`llamaherd/data/open_llm_leaderboard_2023.csv`), a copy of the project's
reference table with every row's source kept; nothing here types a score.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llamaherd.leaderboard.ingest import BENCHMARKS
from llamaherd.leaderboard.registry import LeaderboardError, Registry

REFERENCE_NAME = "open_llm_leaderboard_2023.csv"
REFERENCE_PROTOCOL = "leaderboard-2023"
COLUMNS = ("model", "hub_id", "family", "base_model", "method", *BENCHMARKS, "average",
           "source_url_or_repo_path", "source_date", "notes")
_META_KEY = "reference_sha256"


@dataclass(frozen=True)
class ReferenceRow:
    """One published leaderboard row: scores in percent (None where the board has none)."""

    model: str
    hub_id: str
    family: str
    base_model: str | None
    method: str
    scores: dict[str, float | None]
    average: float | None
    source: str
    source_date: str
    notes: str


def reference_text(path: str | Path | None = None) -> str:
    """The reference CSV's text: the packaged copy unless `path` names another file."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("llamaherd").joinpath("data", REFERENCE_NAME).read_text(encoding="utf-8")


def _number(value: str, where: str) -> float | None:
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise LeaderboardError(f"{where}: {value!r} is not a number") from None


def read_reference(path: str | Path | None = None) -> list[ReferenceRow]:
    """Parse the reference table, checking its header and numbers."""
    name = str(path or REFERENCE_NAME)
    reader = csv.DictReader(io.StringIO(reference_text(path)))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise LeaderboardError(f"{name}: header is {reader.fieldnames}; expected {list(COLUMNS)}")
    rows = []
    for line, r in enumerate(reader, start=2):
        where = f"{name} line {line}"
        rows.append(ReferenceRow(
            model=r["model"], hub_id=r["hub_id"], family=r["family"], base_model=r["base_model"] or None,
            method=r["method"], scores={b: _number(r[b], f"{where} field {b!r}") for b in BENCHMARKS},
            average=_number(r["average"], f"{where} field 'average'"), source=r["source_url_or_repo_path"],
            source_date=r["source_date"], notes=r["notes"]))
    return rows


def _parent_of(row: ReferenceRow, by_hub: dict[str, ReferenceRow], by_name: dict[str, ReferenceRow]) -> str:
    """The table's model name for a base_model hub id.

    `huggyllama/llama-7b` stands for Meta's LLaMA-7B, whose board row is the baseline `llama-7b`, so a hub id
    that is not a row of its own falls back to the row named like its last component.
    """
    base = row.base_model or ""
    match = by_hub.get(base) or by_name.get(base.rsplit("/", 1)[-1].lower())
    if match is None:
        raise LeaderboardError(f"{REFERENCE_NAME}: base_model {base!r} of {row.model!r} is not a row of the table")
    return match.model


def load_reference(db: Registry, path: str | Path | None = None) -> int:
    """Load the reference rows as "reported" results with their lineage; a no-op when already loaded.

    Returns the number of rows loaded (0 when the database already holds this exact table).
    """
    digest = hashlib.sha256(reference_text(path).encode()).hexdigest()
    if db.get_meta(_META_KEY) == digest:
        return 0
    rows = read_reference(path)
    by_hub = {r.hub_id: r for r in rows}
    by_name = {r.model.lower(): r for r in rows}
    with db.transaction():
        if db.get_meta(_META_KEY) == digest:  # another process loaded it while we waited for the lock
            return 0
        ids = {}
        for r in rows:  # the table's curated family (llama1, llama2...) wins over a config's generic "llama"
            ids[r.model] = db.upsert_model(r.model, overwrite=True, family=r.family, source=r.hub_id).id
            db.upsert_reported(ids[r.model], source=r.source, protocol=REFERENCE_PROTOCOL, **r.scores,
                               average=r.average, source_date=r.source_date, notes=r.notes)
        for r in rows:
            if r.base_model:
                db.upsert_edge(ids[_parent_of(r, by_hub, by_name)], ids[r.model], r.method,
                               source=f"{REFERENCE_NAME}: base_model")
        db.set_meta(_META_KEY, digest)
    return len(rows)
