"""The leaderboard's SQLite registry: models, lineage edges, evaluation runs and reported reference results.

One file in the user's data directory, shared by every `herd` process: WAL mode and a busy timeout let
several evaluations write at once, `PRAGMA user_version` plus ordered migrations carry old files forward,
and a file that is not ours (corrupt, foreign or from a newer llamaherd) is refused before anything is written.
"""

from __future__ import annotations

import difflib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from llamaherd.errors import HerdError

ENV_VAR = "LLAMAHERD_DB"
BUSY_TIMEOUT_S = 30.0
SQLITE_HEADER = b"SQLite format 3\x00"
# Methods a lineage edge may carry: those fine-tuning runs write, plus the reference table's own labels.
METHODS = ("full-sft", "lora-sft", "qlora-sft", "merge", "dpo", "ppo", "quantization", "sft", "lora", "rlhf",
           "reward", "rejection-sampling")

# MIGRATIONS[i] takes a database from user_version i to i + 1; append, never edit, once released.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            family TEXT, n_params INTEGER, source TEXT, path TEXT, fingerprint TEXT UNIQUE,
            license TEXT, chat_format TEXT, notes TEXT,
            added TEXT NOT NULL)""",
        """CREATE TABLE lineage (
            id INTEGER PRIMARY KEY,
            parent_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            child_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            method TEXT NOT NULL,
            data_files TEXT NOT NULL DEFAULT '[]',
            hyperparameters TEXT NOT NULL DEFAULT '{}',
            final_metrics TEXT NOT NULL DEFAULT '{}',
            date TEXT, source TEXT,
            UNIQUE (parent_id, child_id), CHECK (parent_id <> child_id))""",
        """CREATE TABLE eval_runs (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            fingerprint TEXT, protocol TEXT NOT NULL, task TEXT NOT NULL, benchmark TEXT,
            task_version TEXT, n_shot INTEGER, n_docs INTEGER, "limit" INTEGER,
            is_estimate INTEGER NOT NULL DEFAULT 0, data_form TEXT, metric TEXT, score REAL,
            metrics TEXT NOT NULL DEFAULT '{}', date TEXT NOT NULL, versions TEXT NOT NULL DEFAULT '{}',
            samples_path TEXT, results_path TEXT,
            UNIQUE (model_id, protocol, task, date))""",
        "CREATE INDEX lineage_child ON lineage(child_id)",
        # Re-evaluations keep every run; this view shows the newest per model, protocol and task.
        """CREATE VIEW latest_runs AS
            SELECT * FROM (SELECT r.*, ROW_NUMBER() OVER (
                PARTITION BY model_id, protocol, task ORDER BY date DESC, id DESC) AS rn FROM eval_runs r)
            WHERE rn = 1""",
    ),
    (
        """CREATE TABLE reported_results (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            protocol TEXT NOT NULL DEFAULT 'leaderboard-2023',
            arc REAL, hellaswag REAL, mmlu REAL, truthfulqa REAL, average REAL,
            source TEXT NOT NULL, source_date TEXT, notes TEXT,
            UNIQUE (model_id, source))""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
OUR_TABLES = {"models", "lineage", "eval_runs", "reported_results", "meta"}


class LeaderboardError(HerdError):
    """The leaderboard database or an imported file cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModelRecord:
    """One row of the models table."""

    id: int
    name: str
    family: str | None
    n_params: int | None
    source: str | None
    path: str | None
    fingerprint: str | None
    license: str | None
    chat_format: str | None
    notes: str | None
    added: str


MODEL_FIELDS = ("family", "n_params", "source", "path", "fingerprint", "license", "chat_format", "notes")


def utc_now() -> str:
    """The current time as ISO-8601 UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def default_db_path(explicit: str | Path | None = None) -> Path:
    """`--db`, else `$LLAMAHERD_DB`, else `$XDG_DATA_HOME/llamaherd/leaderboard.sqlite` (~/.local/share)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "llamaherd" / "leaderboard.sqlite"


def _refuse(path: Path, why: str) -> LeaderboardError:
    return LeaderboardError(f"{path}: {why}; the file was left untouched (move it aside, or choose another "
                            f"database with --db or ${ENV_VAR})")


def _check_file(path: Path) -> None:
    """Refuse anything that is not an SQLite file before SQLite opens it for writing."""
    if path.is_dir():
        raise LeaderboardError(f"{path}: is a directory; --db and ${ENV_VAR} name a database file")
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise _refuse(path, "not an SQLite database (corrupt or another kind of file)")


class Registry:
    """An open leaderboard database; use as a context manager or call `close()`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = default_db_path(path)
        _check_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        try:
            self._check_schema()
            self._configure()
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise _refuse(self.path, f"unreadable database ({e})") from None
        except LeaderboardError:
            self.conn.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @property
    def user_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _check_schema(self) -> None:
        version = self.user_version
        if version > SCHEMA_VERSION:
            raise _refuse(self.path, f"schema version {version} is newer than this llamaherd understands "
                                     f"({SCHEMA_VERSION}); upgrade llamaherd")
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables - OUR_TABLES:
            raise _refuse(self.path, "an SQLite database that is not a llamaherd leaderboard")
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _refuse(self.path, f"database is damaged ({check})")

    def _configure(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:  # switching needs a moment alone with a new file; other openers may hold it
                self.conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        """Apply the missing migrations, each in its own transaction, re-checking the version under the lock."""
        while self.user_version < SCHEMA_VERSION:
            with self.transaction():
                version = self.user_version
                if version >= SCHEMA_VERSION:
                    break
                for statement in MIGRATIONS[version]:
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front, so concurrent writers queue instead of deadlocking."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # --- models -------------------------------------------------------------------------------------------

    def find_model(self, name: str | None = None, fingerprint: str | None = None) -> ModelRecord | None:
        """The model with this content fingerprint, else the one with this name (case-insensitive)."""
        for column, value in (("fingerprint", fingerprint), ("name", name)):
            if value:
                row = self.conn.execute(f"SELECT * FROM models WHERE {column} = ?", (value,)).fetchone()
                if row:
                    return ModelRecord(**dict(row))
        return None

    def get_model(self, name: str) -> ModelRecord:
        """The model called `name`, or an error suggesting the closest registered names."""
        model = self.find_model(name=name)
        if model is None:
            names = [r[0] for r in self.conn.execute("SELECT name FROM models")]
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; `herd leaderboard` lists them"
            raise LeaderboardError(f"no model named {name!r} in {self.path}{hint}")
        return model

    def models(self) -> list[ModelRecord]:
        return [ModelRecord(**dict(r)) for r in self.conn.execute("SELECT * FROM models ORDER BY name")]

    def upsert_model(self, name: str, *, overwrite: bool = False, **fields: Any) -> ModelRecord:
        """Match by fingerprint then name; create the model or update it.

        `path` and `fingerprint` describe the current weights and always follow the latest call; other fields
        only fill gaps unless `overwrite` is set.
        """
        unknown = set(fields) - set(MODEL_FIELDS)
        if unknown:
            raise TypeError(f"unknown model fields: {sorted(unknown)}")
        given = {k: v for k, v in fields.items() if v is not None}
        with self.transaction():
            model = self.find_model(name=name, fingerprint=given.get("fingerprint"))
            if model is None:
                cols = ["name", "added", *given]
                self.conn.execute(f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                  (name, utc_now(), *given.values()))
            else:
                current = {k: getattr(model, k) for k in MODEL_FIELDS}
                changes = {k: v for k, v in given.items()
                           if overwrite or k in ("path", "fingerprint") or current[k] is None}
                if changes:
                    sets = ", ".join(f"{k} = ?" for k in changes)
                    self.conn.execute(f"UPDATE models SET {sets} WHERE id = ?", (*changes.values(), model.id))
                name = model.name
            return self.find_model(name=name)

    def remove_model(self, name: str) -> ModelRecord:
        """Delete a model with its edges, runs and reported results."""
        model = self.get_model(name)
        with self.transaction():
            self.conn.execute("DELETE FROM models WHERE id = ?", (model.id,))
        return model

    # --- lineage, runs, reported results ------------------------------------------------------------------

    def upsert_edge(self, parent_id: int, child_id: int, method: str, *, data_files: list | None = None,
                    hyperparameters: dict | None = None, final_metrics: dict | None = None,
                    date: str | None = None, source: str | None = None) -> None:
        """Record (or refresh) that `child` was made from `parent` by `method`."""
        if method not in METHODS:
            raise LeaderboardError(f"unknown lineage method {method!r}; expected one of {', '.join(METHODS)}")
        if parent_id == child_id:
            raise LeaderboardError("a model cannot be its own parent")
        values = (method, json.dumps(data_files or []), json.dumps(hyperparameters or {}),
                  json.dumps(final_metrics or {}), date, source)
        with self.transaction():
            self.conn.execute(
                """INSERT INTO lineage (parent_id, child_id, method, data_files, hyperparameters, final_metrics,
                   date, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (parent_id, child_id) DO UPDATE SET method = excluded.method,
                   data_files = excluded.data_files, hyperparameters = excluded.hyperparameters,
                   final_metrics = excluded.final_metrics, date = excluded.date, source = excluded.source""",
                (parent_id, child_id, *values))

    def edges(self) -> list[dict[str, Any]]:
        """Every lineage edge with parent and child names, JSON columns decoded, oldest first."""
        rows = self.conn.execute(
            """SELECT l.*, p.name AS parent, c.name AS child FROM lineage l
               JOIN models p ON p.id = l.parent_id JOIN models c ON c.id = l.child_id ORDER BY l.id""")
        return [_decode(r, ("data_files", "hyperparameters", "final_metrics")) for r in rows]

    def add_run(self, model_id: int, **run: Any) -> None:
        """Insert one task's evaluation; the same (model, protocol, task, date) replaces itself."""
        for key in ("metrics", "versions"):
            run[key] = json.dumps(run.get(key) or {})
        run["is_estimate"] = int(bool(run.get("is_estimate")))
        cols = ["model_id", *run]
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in run)
        with self.transaction():
            self.conn.execute(
                f"""INSERT INTO eval_runs ({', '.join(f'"{c}"' for c in cols)})
                    VALUES ({', '.join('?' * len(cols))})
                    ON CONFLICT (model_id, protocol, task, date) DO UPDATE SET {updates}""",
                (model_id, *run.values()))

    def runs(self, model_id: int | None = None, *, latest: bool = True) -> list[dict[str, Any]]:
        """Evaluation runs (the newest per model/protocol/task, or the whole history), newest first."""
        table = "latest_runs" if latest else "eval_runs"
        where, params = ("WHERE r.model_id = ?", (model_id,)) if model_id is not None else ("", ())
        rows = self.conn.execute(
            f"""SELECT r.*, m.name AS model FROM {table} r JOIN models m ON m.id = r.model_id {where}
                ORDER BY r.date DESC, r.id DESC""", params)
        return [_decode(r, ("metrics", "versions"), drop=("rn",)) for r in rows]

    def upsert_reported(self, model_id: int, *, source: str, protocol: str = "leaderboard-2023",
                        **values: Any) -> None:
        """Store published scores for a model (one row per source)."""
        cols = ["model_id", "source", "protocol", *values]
        updates = ", ".join(f"{c} = excluded.{c}" for c in ["protocol", *values])
        with self.transaction():
            self.conn.execute(
                f"""INSERT INTO reported_results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})
                    ON CONFLICT (model_id, source) DO UPDATE SET {updates}""",
                (model_id, source, protocol, *values.values()))

    def reported(self, model_id: int | None = None) -> list[dict[str, Any]]:
        """Reported reference results with the model's name."""
        where, params = ("WHERE r.model_id = ?", (model_id,)) if model_id is not None else ("", ())
        rows = self.conn.execute(f"""SELECT r.*, m.name AS model FROM reported_results r
                                     JOIN models m ON m.id = r.model_id {where} ORDER BY r.id""", params)
        return [dict(r) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                              "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _decode(row: sqlite3.Row, json_cols: tuple[str, ...], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {k: v for k, v in dict(row).items() if k not in drop}
    for col in json_cols:
        out[col] = json.loads(out[col])
    return out


@contextmanager
def opened(db: Registry | str | Path | None) -> Iterator[Registry]:
    """Use an open registry as is, or open (and afterwards close) the one at a path or the default location."""
    if isinstance(db, Registry):
        yield db
        return
    with Registry(db) as reg:
        yield reg
