"""Feeding the leaderboard (results.json, lineage.json, the 2023 reference table) and what it ranks and prints."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest
from leaderboard_samples import write_lineage, write_results

from llamaherd.leaderboard import (
    LeaderboardError,
    Registry,
    board_rows,
    import_lineage,
    import_lineage_near,
    load_reference,
    read_reference,
    record_results,
)
from llamaherd.leaderboard.cli import add_leaderboard_parser
from llamaherd.leaderboard.table import to_csv, to_json

SCORES = {"arc": 30.0, "hellaswag": 40.0, "mmlu": 25.0, "truthfulqa": 45.0}


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "db.sqlite") as r:
        yield r


def test_results_json_is_recorded_per_task(reg, tmp_path):
    path = write_results(tmp_path / "eval", "tiny", SCORES, fingerprint="sha256:" + "11" * 32, limit=20)
    done = record_results(reg, path)
    assert (done.model, done.protocol, done.estimate) == ("tiny", "leaderboard-2023", True)
    runs = {r["task"]: r for r in reg.runs()}
    assert sorted(runs) == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]
    arc = runs["arc_challenge"]
    assert (arc["benchmark"], arc["n_shot"], arc["limit"], arc["is_estimate"], arc["metric"]) == (
        "arc", 25, 20, 1, "acc_norm")
    assert arc["score"] == 30.0 and arc["metrics"] == {"acc_norm": 0.3, "acc_norm_stderr": 0.0123}
    assert arc["samples_path"] == str(tmp_path / "eval" / "samples_arc_challenge.jsonl")
    assert arc["versions"]["llamaherd"] == "0.1.0" and arc["fingerprint"] == "sha256:" + "11" * 32
    model = reg.get_model("tiny")
    assert (model.family, model.n_params) == ("llama", 135_000_000)
    record_results(reg, path)  # idempotent
    assert len(reg.runs(latest=False)) == 4 and len(reg.models()) == 1


def test_model_matched_by_fingerprint_then_name(reg, tmp_path):
    fp = "sha256:" + "22" * 32
    record_results(reg, write_results(tmp_path / "a", "first-name", SCORES, fingerprint=fp))
    # Same weights under another name: same model.
    record_results(reg, write_results(tmp_path / "b", "second-name", SCORES, fingerprint=fp,
                                      date="2024-03-01T00:00:00+00:00"))
    assert [m.name for m in reg.models()] == ["first-name"]
    # Same name, new weights: same model, new fingerprint; the run remembers which weights it measured.
    record_results(reg, write_results(tmp_path / "c", "FIRST-NAME", SCORES, fingerprint="sha256:" + "33" * 32,
                                      date="2024-04-01T00:00:00+00:00"))
    assert [(m.name, m.fingerprint) for m in reg.models()] == [("first-name", "sha256:" + "33" * 32)]
    assert {r["fingerprint"] for r in reg.runs(latest=False)} == {fp, "sha256:" + "33" * 32}


def test_bad_results_json_names_file_and_field(reg, tmp_path):
    path = write_results(tmp_path / "bad", "m", SCORES)
    data = json.loads(path.read_text())
    data["protocol"] = "helm"
    path.write_text(json.dumps(data))
    with pytest.raises(LeaderboardError, match=r"results.json: field 'protocol' is 'helm'"):
        record_results(reg, path)
    data["protocol"] = "harness"
    data["tasks"]["mmlu"]["n_shot"] = "five"
    path.write_text(json.dumps(data))
    with pytest.raises(LeaderboardError, match=r"field 'tasks.mmlu.n_shot' is 'five'; expected int"):
        record_results(reg, path)
    path.write_text("{not json")
    with pytest.raises(LeaderboardError, match="not valid JSON"):
        record_results(reg, path)
    assert reg.runs(latest=False) == []


def test_lineage_json_import_is_idempotent(reg, tmp_path):
    path = write_lineage(tmp_path / "ft", "my-lora", "smollm2-base", child_fingerprint=None)
    edge = import_lineage(reg, path)
    assert (edge.parent, edge.child, edge.method) == ("smollm2-base", "my-lora", "lora-sft")
    import_lineage(reg, path)
    (e,) = reg.edges()
    assert e["data_files"] == [{"path": "data/alpaca.jsonl", "sha256": "cd" * 32}]
    assert e["hyperparameters"] == {"lr": 2e-4, "lora_r": 8} and e["final_metrics"] == {"val_loss": 1.23}
    assert reg.get_model("smollm2-base").fingerprint == "sha256:" + "ab" * 32
    assert len(reg.models()) == 2


def test_lineage_with_unknown_method_is_refused(reg, tmp_path):
    path = write_lineage(tmp_path / "ft", "c", "p", method="distill")
    with pytest.raises(LeaderboardError, match="field 'method' is 'distill'"):
        import_lineage(reg, path)


def test_lineage_found_inside_or_beside_the_model(reg, tmp_path):
    write_lineage(tmp_path / "run1", "adapter", "base")
    assert import_lineage_near(reg, tmp_path / "run1").child == "adapter"
    model_dir = tmp_path / "run2" / "merged"
    model_dir.mkdir(parents=True)
    write_lineage(tmp_path / "run2", "merged", "base", method="merge", child_path="merged")
    assert import_lineage_near(reg, model_dir).method == "merge"
    # A lineage.json beside a model it does not describe is not imported.
    other = tmp_path / "run2" / "unrelated"
    other.mkdir()
    assert import_lineage_near(reg, other) is None
    assert import_lineage_near(reg, tmp_path / "nowhere") is None


def test_evaluating_a_fine_tune_imports_its_lineage(reg, tmp_path):
    ft_dir = tmp_path / "ft"
    write_lineage(ft_dir, "my-ft", "base-model")
    done = record_results(reg, write_results(tmp_path / "eval", "my-ft", SCORES, path=str(ft_dir)))
    assert done.lineage is not None and done.lineage.parent == "base-model"
    assert board_rows(reg)[0].parent == "base-model"


def test_a_bad_carried_lineage_says_the_results_were_recorded(reg, tmp_path):
    path = write_results(tmp_path / "eval", "my-ft", SCORES)
    data = json.loads(path.read_text())
    data["model"]["lineage"] = json.loads(write_lineage(tmp_path / "ft", "my-ft", "p", method="distill").read_text())
    path.write_text(json.dumps(data))
    with pytest.raises(LeaderboardError, match="'distill'.*results were recorded without a parent"):
        record_results(reg, path)
    assert [(r.name, r.parent) for r in board_rows(reg)] == [("my-ft", None)]


def test_deltas_against_parent_hand_worked(reg, tmp_path):
    # Parent average (40 + 50 + 30 + 40) / 4 = 40.00; child (45 + 55 + 32 + 44) / 4 = 44.00: delta +4.00.
    # The grandchild, a --limit estimate: (41 + 50 + 30 + 39) / 4 = 40.00: delta -4.00, marked estimate.
    record_results(reg, write_results(tmp_path / "p", "parent", {"arc": 40, "hellaswag": 50, "mmlu": 30,
                                                                  "truthfulqa": 40}))
    write_lineage(tmp_path / "c", "child", "parent", parent_fingerprint=reg.get_model("parent").fingerprint)
    record_results(reg, write_results(tmp_path / "ce", "child", {"arc": 45, "hellaswag": 55, "mmlu": 32,
                                                                  "truthfulqa": 44}, path=str(tmp_path / "c")))
    write_lineage(tmp_path / "g", "grandchild", "child", method="dpo",
                  parent_fingerprint=reg.get_model("child").fingerprint)
    record_results(reg, write_results(tmp_path / "ge", "grandchild", {"arc": 41, "hellaswag": 50, "mmlu": 30,
                                                                       "truthfulqa": 39},
                                      path=str(tmp_path / "g"), limit=10))
    rows = {r.name: r for r in board_rows(reg)}
    assert rows["parent"].delta is None
    assert (rows["child"].average, rows["child"].delta, rows["child"].delta_estimate) == (44.0, 4.0, False)
    assert (rows["grandchild"].delta, rows["grandchild"].delta_estimate, rows["grandchild"].method) == (
        -4.0, True, "dpo")
    assert [r.name for r in board_rows(reg)] == ["child", "grandchild", "parent"]  # 44, then a 40-40 tie by name


def _shared_rows(shared_dir):
    with (shared_dir / "reference" / "open_llm_leaderboard_2023.csv").open(newline="") as f:
        return {r["model"]: r for r in csv.DictReader(f)}


def test_reference_rows_match_the_shared_table(reg, shared_dir):
    shared = _shared_rows(shared_dir)
    assert load_reference(reg) == len(shared)
    assert load_reference(reg) == 0  # already loaded
    rows = {r.name: r for r in board_rows(reg, kind="reported")}
    assert set(rows) == set(shared)
    for name in ("Llama-2-7b-hf", "falcon-40b-instruct", "vicuna-13b-v1.3", "StableBeluga2 (FreeWilly2)",
                 "llama-7b"):
        want = shared[name]
        got = rows[name]
        assert got.scores == {b: float(want[b]) for b in ("arc", "hellaswag", "mmlu", "truthfulqa")}
        assert got.average == float(want["average"])
        assert got.source == want["source_url_or_repo_path"] and got.date == want["source_date"]
    # Rows without published scores stay empty rather than invented.
    assert rows["SmolLM2-135M"].scores == dict.fromkeys(("arc", "hellaswag", "mmlu", "truthfulqa"))
    assert rows["SmolLM2-135M"].average is None


def test_reference_lineage_and_deltas(reg):
    load_reference(reg)
    rows = {r.name: r for r in board_rows(reg, kind="reported")}
    # vicuna-7b-v1.3's base is huggyllama/llama-7b, which the board shows as its baseline row llama-7b.
    assert (rows["vicuna-7b-v1.3"].parent, rows["vicuna-7b-v1.3"].method) == ("llama-7b", "sft")
    assert rows["vicuna-7b-v1.3"].delta == pytest.approx(55.62 - 49.72)  # = +5.90
    assert rows["Llama-2-70b-chat-hf"].delta == pytest.approx(66.80 - 67.35)  # = -0.55
    assert rows["StableBeluga2 (FreeWilly2)"].parent == "Llama-2-70b-hf"
    assert [r.name for r in board_rows(reg, kind="reported")][:3] == [
        "StableBeluga2 (FreeWilly2)", "StableBeluga1-Delta (FreeWilly1)", "Llama-2-70b-hf"]


def test_packaged_reference_copy_keeps_every_fact(shared_dir):
    shared = _shared_rows(shared_dir)
    for row in read_reference():
        want = shared[row.model]
        assert (row.hub_id, row.family, row.base_model or "", row.method) == (
            want["hub_id"], want["family"], want["base_model"], want["method"])
        assert row.source == want["source_url_or_repo_path"] and row.notes == want["notes"]


def test_filters_measured_beside_reported(reg, tmp_path):
    load_reference(reg)
    record_results(reg, write_results(tmp_path / "e", "tiny", SCORES, protocol="harness", limit=5))
    assert [r.name for r in board_rows(reg, kind="measured")] == ["tiny"]
    assert [r.name for r in board_rows(reg, protocol="harness")] == ["tiny"]
    assert {r.name for r in board_rows(reg, family="falcon")} == {
        "falcon-40b", "falcon-40b-instruct", "falcon-7b", "falcon-7b-instruct"}


def test_json_and_csv_output(reg, tmp_path):
    record_results(reg, write_results(tmp_path / "e", "tiny", SCORES, limit=5))
    rows = board_rows(reg)
    (as_json,) = json.loads(to_json(rows))
    assert as_json["scores"] == SCORES and as_json["average"] == 35.0 and as_json["estimate"] is True
    (as_csv,) = csv.DictReader(io.StringIO(to_csv(rows)))
    assert (as_csv["name"], as_csv["mmlu"], as_csv["average"], as_csv["estimate"]) == ("tiny", "25.0", "35.0", "True")


def herd(*argv: str) -> None:
    """`herd ARGV` as the herd entry point runs it, with only the leaderboard command (no torch import)."""
    parser = argparse.ArgumentParser(prog="herd")
    add_leaderboard_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_table_show_add_remove(tmp_path, capsys, monkeypatch):
    db = tmp_path / "cli.sqlite"
    monkeypatch.setenv("LLAMAHERD_DB", str(db))
    monkeypatch.setenv("COLUMNS", "160")
    results = write_results(tmp_path / "e", "[bold]tiny[/bold]", SCORES, limit=5)
    herd("leaderboard", "import-results", str(results))
    herd("leaderboard", "--family", "llama", "--kind", "measured")
    out = capsys.readouterr().out
    assert "[bold]tiny[/bold]" in out and "~35.00" in out and "~ estimate" in out
    herd("leaderboard", "--json", "--protocol", "leaderboard-2023")
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "[bold]tiny[/bold]" in names and "Llama-2-7b-hf" in names
    herd("leaderboard", "--csv", "--kind", "reported", "--family", "falcon")
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 4
    herd("leaderboard", "add", "my-merge", "--family", "llama2", "--parent", "Llama-2-7b-hf", "--method", "merge",
         "--notes", "hand-made")
    herd("leaderboard", "show", "my-merge", "--json")
    shown = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert shown["model"]["notes"] == "hand-made" and shown["parents"][0]["name"] == "Llama-2-7b-hf"
    herd("leaderboard", "show", "Llama-2-7b-hf")
    assert "dsdanielpark" in capsys.readouterr().out
    herd("leaderboard", "remove", "my-merge")
    with pytest.raises(LeaderboardError, match="no model named 'my-merge'"):
        herd("leaderboard", "show", "my-merge", "--db", str(db))
    html = tmp_path / "page.html"
    herd("leaderboard", "export", "--html", str(html))
    assert html.read_text().startswith("<!doctype html>")


def test_story_summary_for_the_demo(tmp_path):
    from rich.console import Console

    from llamaherd.leaderboard import story_summary

    out = io.StringIO()
    results = write_results(tmp_path / "eval", "smollm2-135m-instruct", SCORES, limit=10)
    page = story_summary(tmp_path / "db.sqlite", results, tmp_path / "site" / "board.html",
                         Console(file=out, width=200))
    text = out.getvalue()
    assert page == tmp_path / "site" / "board.html" and page.is_file()
    assert "smollm2-135m-instruct" in text and "~35.00" in text and "Llama-2-70b-hf" in text and "67.35" in text
    assert str(page) in text
    with Registry(tmp_path / "db.sqlite") as reg:  # the embedded model is the reference table's row
        (row,) = board_rows(reg, kind="measured")
        assert (row.family, row.parent) == ("smollm2", "SmolLM2-135M")
