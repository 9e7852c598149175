"""Provenance of synthetic data: a fine-tune on `herd synth` output records its teacher in lineage.json, and the
leaderboard (terminal table, `herd leaderboard show`, the web page's data) says which teacher wrote it."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
from leaderboard_samples import write_lineage, write_results
from train_tiny import make_tiny_run_inputs, run_in_process, tiny_args

from llamaherd.cli import main
from llamaherd.leaderboard import LeaderboardError, Registry, import_lineage
from llamaherd.leaderboard.ranking import board_data
from llamaherd.train.lineage import build_lineage

LOCAL_TEACHER = {"name": "smollm2-135m-instruct", "teacher_id": "local:smollm2-135m-instruct:ab12",
                 "kind": "local", "fingerprint": "sha256:" + "ab" * 32}
HTTP_TEACHER = {"name": "gpt-3.5-turbo", "teacher_id": "http:gpt-3.5-turbo@127.0.0.1", "kind": "http",
                "base_url": "http://127.0.0.1:8000/v1"}


def _synth_dir(folder: Path, rows: list[dict], teacher: dict, recipe: str = "self-chat", **manifest) -> Path:
    """A folder as `herd synth` leaves it: data.jsonl and manifest.json (its sha256 computed here by hashlib)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"schema": 1, "kind": "llamaherd-synth", "recipe": recipe, "output": "data.jsonl",
           "output_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "teacher": teacher,
           "counts": {"kept": len(rows)}, "seed": 0} | manifest
    (folder / "manifest.json").write_text(json.dumps(doc))
    return data


def _lineage(tmp_path: Path, data: Path) -> dict:
    """What `herd finetune` records for a run on `data` (hashed as the Trainer hashes it: the bytes trained on)."""
    child = tmp_path / "run" / "adapter"
    child.mkdir(parents=True, exist_ok=True)
    return build_lineage("ft", child, "base", tmp_path, "lora", [(data, hashlib.sha256(data.read_bytes()).hexdigest())],
                         {}, {}, parent_fingerprint="sha256:" + "cd" * 32)


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    """A real (tiny) `herd finetune` on a synthetic data file, its lineage imported into a registry."""
    root = tmp_path_factory.mktemp("synth-run")
    model_dir, alpaca = make_tiny_run_inputs(root)
    data = _synth_dir(root / "synth", json.loads(alpaca.read_text()), LOCAL_TEACHER, recipe="self-instruct")
    out = root / "run"
    run_in_process(tiny_args(model_dir, data, out, max_steps=2, eval_every=2, save_every=2))
    db = root / "db.sqlite"
    with Registry(db) as reg:
        import_lineage(reg, out / "lineage.json")
    return data, out, db


def test_finetune_on_synthetic_data_records_its_teacher(synth_run):
    data, out, _ = synth_run
    (entry,) = json.loads((out / "lineage.json").read_text())["data_files"]
    assert entry["path"] == str(data.resolve())
    assert entry["synthetic"] == {"recipe": "self-instruct", "teacher": LOCAL_TEACHER,
                                  "manifest": str((data.parent / "manifest.json").resolve()), "matches_manifest": True}


def test_leaderboard_says_trained_on_synthetic_data_from_the_teacher(synth_run, capsys, monkeypatch):
    _, out, db = synth_run
    sentence = "trained on synthetic data from smollm2-135m-instruct (self-instruct)"
    assert main(["leaderboard", "show", "run", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "made from" in shown and sentence in shown
    with Registry(db) as reg:
        data = board_data(reg)
    assert data["models"]["run"]["parents"][0]["synthetic"] == sentence
    # The ranking table: the child needs a scored row to be listed.
    monkeypatch.setenv("COLUMNS", "250")
    results = write_results(out / "eval", "run", {"arc": 30.0, "hellaswag": 40.0, "mmlu": 25.0, "truthfulqa": 45.0},
                            path=str(out / "model"))
    assert main(["leaderboard", "import-results", str(results), "--db", str(db)]) == 0
    assert main(["leaderboard", "--db", str(db)]) == 0
    assert sentence in capsys.readouterr().out


def test_edited_data_no_longer_matches_its_manifest(tmp_path):
    data = _synth_dir(tmp_path / "synth", [{"messages": [{"role": "user", "content": "hi"}]}], HTTP_TEACHER)
    (entry,) = _lineage(tmp_path, data)["data_files"]
    assert entry["synthetic"]["teacher"] == HTTP_TEACHER and entry["synthetic"]["matches_manifest"] is True
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "added by hand"}]}) + "\n")
    lineage = _lineage(tmp_path, data)
    (entry,) = lineage["data_files"]
    assert entry["synthetic"]["matches_manifest"] is False
    path = tmp_path / "run" / "lineage.json"
    path.write_text(json.dumps(lineage))
    with Registry(tmp_path / "db.sqlite") as reg:
        import_lineage(reg, path)
        shown = board_data(reg)["models"]["ft"]["parents"][0]["synthetic"]
    assert shown == "trained on synthetic data from gpt-3.5-turbo (self-chat, edited after generation)"


@pytest.mark.parametrize(("manifest", "field"), [
    ("{not json", "not valid JSON"),
    ({"teacher": {k: v for k, v in LOCAL_TEACHER.items() if k != "name"}}, "field 'teacher.name' is None"),
    ({"teacher": {k: v for k, v in LOCAL_TEACHER.items() if k != "fingerprint"}}, "field 'teacher.fingerprint'"),
    ({"teacher": "smollm2"}, "field 'teacher' is 'smollm2'"),
    ({"output_sha256": 12}, "field 'output_sha256' is 12"),
    ({"output": None}, "field 'output' is None"),
])
def test_a_malformed_manifest_warns_and_the_lineage_is_still_written(tmp_path, manifest, field):
    data = _synth_dir(tmp_path / "synth", [{"instruction": "a", "output": "b"}], LOCAL_TEACHER)
    path = data.parent / "manifest.json"
    if isinstance(manifest, str):
        path.write_text(manifest)
    else:
        path.write_text(json.dumps(json.loads(path.read_text()) | manifest))
    with pytest.warns(UserWarning, match=f"manifest.json: {field}") as caught:
        (entry,) = _lineage(tmp_path, data)["data_files"]
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert entry == {"path": str(data.resolve()), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}


@pytest.mark.parametrize("manifest", [{"kind": "some-other-tool"}, {"output": "other.jsonl"}])
def test_a_manifest_about_something_else_is_ignored_quietly(tmp_path, manifest):
    data = _synth_dir(tmp_path / "synth", [{"instruction": "a", "output": "b"}], LOCAL_TEACHER, **manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (entry,) = _lineage(tmp_path, data)["data_files"]
    assert "synthetic" not in entry


def test_import_refuses_a_malformed_synthetic_record(tmp_path):
    path = write_lineage(tmp_path / "ft", "child", "parent")
    lineage = json.loads(path.read_text())
    lineage["data_files"][0]["synthetic"] = {"recipe": "self-chat", "teacher": "smollm2"}
    path.write_text(json.dumps(lineage))
    with Registry(tmp_path / "db.sqlite") as reg, pytest.raises(LeaderboardError,
                                                                  match=r"field 'data_files\[0\]\.synthetic'"):
        import_lineage(reg, path)
