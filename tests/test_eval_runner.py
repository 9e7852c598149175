"""`herd eval` on a tiny model and tiny local data: results.json, per-item records, truncation count,
resume after SIGKILL, and refusing to mix records of different runs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from eval_tiny import TinyEncoder, save_tiny_eval_model, write_tiny_benchmarks

from llamaherd.errors import InputError
from llamaherd.evaluate.engine import LoglikelihoodEngine
from llamaherd.evaluate.runner import EvalOptions, evaluate
from llamaherd.evaluate.tasks import build_requests, resolve_tasks
from llamaherd.load import load_gpt

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-eval-run")
    model_dir = save_tiny_eval_model(root / "model")
    write_tiny_benchmarks(root / "data")
    return model_dir, root / "data"


def _options(model_dir, data_dir, out, **kw) -> EvalOptions:
    base = {"model": str(model_dir), "protocol": "harness", "tasks": ["arc_challenge", "truthfulqa_mc2"],
            "data_dir": data_dir, "output": out, "batch_size": 4, "device": "cpu", "progress": False}
    return EvalOptions(**(base | kw))


def test_results_and_records(setup, tmp_path):
    model_dir, data_dir = setup
    results = evaluate(_options(model_dir, data_dir, tmp_path / "out", limit=12))

    assert results["schema"] == 1 and results["protocol"] == "harness"
    assert results["limit"] == 12 and results["estimate"] is True
    assert results["model"]["fingerprint"].startswith("sha256:") and results["model"]["n_params"] > 0
    assert set(results["scores"]) == {"arc", "hellaswag", "mmlu", "truthfulqa", "average"}
    assert results["scores"]["hellaswag"] is None and results["scores"]["average"] is None
    arc = results["tasks"]["arc_challenge"]
    assert (arc["n_shot"], arc["n_docs"], arc["metric"], arc["data_form"]) == (25, 12, "acc_norm", "ai2-jsonl")
    assert set(arc["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert results["scores"]["arc"] == pytest.approx(100 * arc["metrics"]["acc_norm"])
    assert results["tasks"]["truthfulqa_mc2"]["metric"] == "mc2"

    # Records hold the engine's log-likelihoods; the 25-shot ARC prompts overflow the 256-token model.
    model = load_gpt(model_dir)
    enc = TinyEncoder(model_dir)
    engine = LoglikelihoodEngine(model, enc, add_bos=True, batch_size=1)
    [task] = resolve_tasks("arc_challenge", data_dir)
    docs = build_requests(task, "harness", 12)
    lines = [json.loads(x) for x in (tmp_path / "out" / arc["samples"]).read_text().splitlines()]
    assert sorted(r["doc_id"] for r in lines) == list(range(12))
    n_truncated = 0
    for rec in lines:
        doc = docs[rec["doc_id"]]
        expected = engine.loglikelihood([(r.context, r.continuation) for r in doc.requests])
        assert [r["logprob"] for r in rec["requests"]] == pytest.approx([e.logprob for e in expected], abs=1e-4)
        per_char = [e.logprob / len(c) for e, c in zip(expected, doc.choices, strict=True)]
        assert rec["prediction"] == per_char.index(max(per_char))
        assert rec["correct"] == (rec["prediction"] == rec["gold"] == doc.gold)
        for r in doc.requests:
            n_tokens = len(enc.encode(r.context + r.continuation, add_bos=True))
            n_truncated += n_tokens > model.config.block_size + 1
    assert n_truncated > 0
    assert results["truncated_requests"] >= n_truncated  # plus any TruthfulQA ones


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_numbers(setup, tmp_path):
    model_dir, data_dir = setup
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llamaherd.cli", "eval", str(model_dir), "--suite", "harness",
           "--tasks", "arc_challenge,truthfulqa_mc2", "--data-dir", str(data_dir), "--batch-size", "1",
           "--device", "cpu", "--output", str(out), "--no-progress"]
    db = tmp_path / "leaderboard.sqlite"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LLAMAHERD_DB": str(db)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = out / "samples_arc_challenge.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = samples.read_bytes().count(b"\n")
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    assert 3 <= n_before < 40

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["timings"]["resumed_docs"] >= n_before
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in lines) == list(range(40))  # each doc exactly once

    fresh = evaluate(_options(model_dir, data_dir, tmp_path / "fresh", batch_size=1))
    for task, entry in fresh["tasks"].items():
        assert resumed["tasks"][task]["metrics"] == pytest.approx(entry["metrics"], abs=1e-9)
    assert resumed["scores"] == pytest.approx(fresh["scores"], abs=1e-7)
    assert resumed["estimate"] is False and resumed["limit"] is None

    with sqlite3.connect(db) as con:  # herd eval recorded the finished run in the leaderboard, once per task
        n_runs = con.execute("SELECT COUNT(*) FROM eval_runs").fetchone()[0]
    assert n_runs == len(resumed["tasks"])


def test_output_of_another_run_is_refused(setup, tmp_path):
    model_dir, data_dir = setup
    out = tmp_path / "out"
    evaluate(_options(model_dir, data_dir, out, limit=2, tasks=["truthfulqa_mc2"]))
    with pytest.raises(InputError, match=r"different evaluation \(protocol"):
        evaluate(_options(model_dir, data_dir, out, limit=2, tasks=["truthfulqa_mc2"], protocol="leaderboard-2023"))
    # Same run, larger limit: the finished docs are reused.
    again = evaluate(_options(model_dir, data_dir, out, limit=4, tasks=["truthfulqa_mc2"]))
    assert again["timings"]["resumed_docs"] == 2 and again["tasks"]["truthfulqa_mc2"]["n_docs"] == 4


def test_truthfulqa_record_marks_true_answers(setup, tmp_path):
    model_dir, data_dir = setup
    evaluate(_options(model_dir, data_dir, tmp_path / "o", tasks=["truthfulqa_mc2"], limit=8))
    items = json.loads((data_dir / "truthfulqa" / "mc_task.json").read_text())
    for line in (tmp_path / "o" / "samples_truthfulqa_mc2.jsonl").read_text().splitlines():
        rec = json.loads(line)
        labels = list(items[rec["index"]]["mc2_targets"].values())
        lps = torch.tensor([r["logprob"] for r in rec["requests"]], dtype=torch.float64)
        probs = lps.exp() / lps.exp().sum()
        assert rec["metrics"]["mc2"] == pytest.approx(float(probs[torch.tensor(labels) == 1].sum()), abs=1e-9)
        assert rec["correct"] == bool(labels[rec["prediction"]])


def test_summary_table(setup, tmp_path, capsys):
    from llamaherd.evaluate.cli import print_summary

    model_dir, data_dir = setup
    results = evaluate(_options(model_dir, data_dir, tmp_path / "o", tasks=["truthfulqa_mc2"], limit=3,
                                max_length=40))
    results["tasks"]["truthfulqa_mc2"]["caveats"] = ["rare [tags] are kept"]
    print_summary(results)
    out = capsys.readouterr().out
    mc2 = results["tasks"]["truthfulqa_mc2"]["metrics"]["mc2"]
    assert "truthfulqa_mc2" in out and f"{100 * mc2:.2f}" in out and "ESTIMATE (--limit 3)" in out
    assert "rare [tags] are kept" in out  # data text is not taken for markup
    assert results["truncated_requests"] > 0 and f"{results['truncated_requests']} requests were left-truncated" in out
