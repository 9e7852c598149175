"""The leaderboard registry: location, CRUD, migrations, refusal of files it must not touch, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from leaderboard_samples import write_results

from llamaherd.leaderboard import LeaderboardError, Registry, board_rows, default_db_path, record_results
from llamaherd.leaderboard.registry import MIGRATIONS, SCHEMA_VERSION


def test_default_location_env_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAHERD_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "llamaherd" / "leaderboard.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "llamaherd" / "leaderboard.sqlite"
    monkeypatch.setenv("LLAMAHERD_DB", str(tmp_path / "env.sqlite"))
    assert default_db_path() == tmp_path / "env.sqlite"
    assert default_db_path(tmp_path / "flag.sqlite") == tmp_path / "flag.sqlite"
    with Registry() as reg:  # created where the environment says, with its directory
        assert reg.path == tmp_path / "env.sqlite"
    assert (tmp_path / "env.sqlite").is_file()


def test_wal_mode_and_schema_version(tmp_path):
    with Registry(tmp_path / "db.sqlite") as reg:
        assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reg.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        assert reg.user_version == SCHEMA_VERSION


def test_model_crud(tmp_path):
    with Registry(tmp_path / "db.sqlite") as reg:
        m = reg.upsert_model("my-model", family="llama2", n_params=7_000_000, fingerprint="sha256:aa",
                             license="apache-2.0", chat_format="chatml", notes="first")
        assert (m.family, m.n_params, m.license, m.chat_format, m.notes) == (
            "llama2", 7_000_000, "apache-2.0", "chatml", "first")
        assert reg.find_model(fingerprint="sha256:aa").name == "my-model"
        assert reg.find_model(name="MY-MODEL").id == m.id  # names match case-insensitively
        # Gaps are filled, set fields kept unless overwritten; path/fingerprint follow the latest weights.
        m2 = reg.upsert_model("my-model", family="other", path="/x", fingerprint="sha256:bb")
        assert (m2.id, m2.family, m2.path, m2.fingerprint) == (m.id, "llama2", "/x", "sha256:bb")
        assert reg.upsert_model("my-model", overwrite=True, family="other").family == "other"
        assert [x.name for x in reg.models()] == ["my-model"]
        with pytest.raises(LeaderboardError, match="did you mean 'my-model'"):
            reg.get_model("my-modle")
        reg.remove_model("my-model")
        assert reg.models() == []


def test_remove_cascades_to_runs_and_edges(tmp_path):
    with Registry(tmp_path / "db.sqlite") as reg:
        parent = reg.upsert_model("parent")
        record_results(reg, write_results(tmp_path / "r", "child", {"arc": 1, "hellaswag": 2, "mmlu": 3,
                                                                     "truthfulqa": 4}))
        child = reg.get_model("child")
        reg.upsert_edge(parent.id, child.id, "lora-sft")
        reg.remove_model("child")
        assert reg.runs(latest=False) == [] and reg.edges() == []
        with pytest.raises(LeaderboardError, match="unknown lineage method"):
            reg.upsert_edge(parent.id, parent.id, "magic")


def test_old_version_database_is_migrated(tmp_path):
    """A file made by schema version 1 (no reported results yet) opens, gains the new tables, keeps its data."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO models (name, family, added) VALUES ('kept', 'falcon', '2023-07-01')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Registry(path) as reg:
        assert reg.user_version == SCHEMA_VERSION
        assert reg.get_model("kept").family == "falcon"
        reg.upsert_reported(reg.get_model("kept").id, source="test", arc=1.0, average=2.0)
        assert reg.reported()[0]["arc"] == 1.0


def test_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "new.sqlite"
    with Registry(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(LeaderboardError) as err:
        Registry(path)
    message = str(err.value)
    assert "newer" in message and str(path) in message and "\n" not in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"this is not a database\n" * 100,
                                     b"SQLite format 3\x00" + b"\xff" * 4080])
def test_corrupt_file_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "broken.sqlite"
    path.write_bytes(content)
    with pytest.raises(LeaderboardError) as err:
        Registry(path)
    message = str(err.value)
    assert str(path) in message and "left untouched" in message and "\n" not in message
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.sqlite"]


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(LeaderboardError, match="not a llamaherd leaderboard"):
        Registry(path)


def test_reevaluation_keeps_history_and_shows_latest(tmp_path):
    with Registry(tmp_path / "db.sqlite") as reg:
        old = {"arc": 30.0, "hellaswag": 40.0, "mmlu": 25.0, "truthfulqa": 45.0}
        new = {"arc": 31.0, "hellaswag": 42.0, "mmlu": 27.0, "truthfulqa": 44.0}
        record_results(reg, write_results(tmp_path / "new", "m", new, date="2024-02-01T00:00:00+00:00"))
        record_results(reg, write_results(tmp_path / "old", "m", old, date="2024-01-01T00:00:00+00:00"))
        record_results(reg, write_results(tmp_path / "old", "m", old, date="2024-01-01T00:00:00+00:00"))
        assert len(reg.runs(latest=False)) == 8  # two runs of four tasks; the re-import added nothing
        latest = {r["task"]: r["score"] for r in reg.runs()}
        assert latest == {"arc_challenge": 31.0, "hellaswag": 42.0, "mmlu": 27.0, "truthfulqa_mc2": 44.0}
        (row,) = board_rows(reg)
        assert row.average == pytest.approx((31 + 42 + 27 + 44) / 4)


def _writer(db: str, out: str, worker: int, n: int) -> None:
    for i in range(n):
        scores = {"arc": worker, "hellaswag": i, "mmlu": 1.0, "truthfulqa": 2.0}
        record_results(db, write_results(Path(out) / f"w{worker}_{i}", f"model-{worker}-{i}", scores,
                                         date=f"2024-01-01T00:00:{i:02d}+00:00"))


def test_parallel_writers_lose_nothing(tmp_path):
    """Several processes create the same new database and record results at once; every run arrives."""
    db, workers, per_worker = tmp_path / "shared.sqlite", 6, 5
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(db), str(tmp_path), w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    with Registry(db) as reg:
        assert len(reg.models()) == workers * per_worker
        assert len(reg.runs(latest=False)) == workers * per_worker * 4
        assert {(r.name, r.scores["arc"], r.scores["hellaswag"]) for r in board_rows(reg)} == {
            (f"model-{w}-{i}", w, i) for w in range(workers) for i in range(per_worker)}
