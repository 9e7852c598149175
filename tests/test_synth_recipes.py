"""The recipes end to end on a tiny random chat model: the same rows from the local engine teacher and from
`herd serve` over HTTP (greedy), seeded rows independent of the batch, and a SIGKILLed `herd synth` that resumes
to the file an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from test_serve import save_tiny_chat_model
from test_serve_interop import ServerThread

from llamaherd import kernels
from llamaherd.load import load_model
from llamaherd.serve.app import ServeConfig, create_app
from llamaherd.synth.explain import explain_items
from llamaherd.synth.job import SynthJob, run_job
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import Seed
from llamaherd.synth.teacher import TeacherRequest
from llamaherd.synth.teacher_http import HTTPTeacher
from llamaherd.synth.teacher_local import LocalTeacher
from llamaherd.synth.templates import ORCA_SYSTEM_MESSAGES

SEEDS = ["Why is the sky blue?", "Name three llamas.", "What is rain?", "Plan a picnic.", "Count to four."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The serve tests' tiny chat model with a context long enough for Baize's prompt (RoPE has no fixed length)."""
    path = save_tiny_chat_model(tmp_path_factory.mktemp("synth-recipes"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}))
    return path


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny)


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_text("\n".join(SEEDS) + "\n")
    return path


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["explain", "self-chat"])
def test_local_and_http_teachers_give_the_same_rows_for_greedy_decoding(recipe, tiny, loaded, seeds, tmp_path):
    job = SynthJob(recipe=recipe, seeds=str(seeds), out=str(tmp_path / "local"), n=5,
                   sampling=Sampling(max_tokens=16, temperature=0.0), near_dup=None, keep_refusals=True,
                   max_turns=2 if recipe == "self-chat" else None)
    local = run_job(job, LocalTeacher(loaded, max_batch=3))
    with ServerThread(create_app(load_model(tiny), ServeConfig(max_batch=2, max_len=1024))) as server:
        http = run_job(replace(job, out=str(tmp_path / "http"), base_url=server.base_url),
                       HTTPTeacher(server.base_url, concurrency=3, backoff=0.0))
    assert rows(tmp_path / "local") == rows(tmp_path / "http")
    assert local["counts"]["finished"] == 5 and local["counts"]["kept"] > 0
    assert local["counts"] == http["counts"]
    assert local["this_run"]["tokens"]["completion"] == http["this_run"]["tokens"]["completion"] > 0
    if recipe == "explain":  # every row keeps the system message it was drawn (the first of Orca's is empty)
        for row in rows(tmp_path / "local"):
            system = ORCA_SYSTEM_MESSAGES[row["system_message"] - 1]
            assert (row["messages"][0]["content"] == system) if system else row["messages"][0]["role"] == "user"


def test_seeded_requests_give_the_same_reply_alone_or_in_a_batch(loaded):
    teacher = LocalTeacher(loaded, max_batch=4)
    requests = [TeacherRequest(f"r{i}", messages=(("user", s),), max_tokens=12, temperature=1.0, seed=7 + i)
                for i, s in enumerate(SEEDS)]
    together = {r.request.key: r.text for r in teacher.run(requests)}
    alone = {r.key: next(iter(LocalTeacher(loaded, max_batch=1).run([r]))).text for r in requests}
    assert together == alone
    assert len(set(together.values())) > 1


def herd_synth(tiny, seeds, out) -> list[str]:
    return [sys.executable, "-m", "llamaherd.cli", "synth", "explain", "--instructions", str(seeds),
            "--teacher", str(tiny), "--out", str(out), "-n", "24", "--max-tokens", "24", "--temperature", "0.9",
            "--seed", "5", "--max-batch", "2"]


def test_a_sigkilled_run_resumes_to_the_file_of_an_uninterrupted_run(tiny, seeds, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(herd_synth(tiny, seeds, whole), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(herd_synth(tiny, seeds, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal, deadline = killed / "journal.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = len(journal.read_text().splitlines())
    assert done_before < 24
    subprocess.run(herd_synth(tiny, seeds, killed), check=True, env=env, capture_output=True)
    # Bit for bit where every prompt chunk sums in one order (AVX2 builds, kernels.prompt_pass); elsewhere ATen's
    # GEMM and SDPA round by the chunk's shape, and a sampled reply (so the filters' verdicts) may differ.
    if kernels.tile_lanes() == 8:
        assert (killed / "data.jsonl").read_bytes() == (whole / "data.jsonl").read_bytes()
    entries = [json.loads(line)["item"] for line in journal.read_text().splitlines()]
    assert len(entries) == len(set(entries)) == 24
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["totals"]["runs"] == 1 and manifest["this_run"]["requests"] == 24 - done_before


def test_the_dry_run_counts_requests_and_prompt_tokens_as_the_teacher_encodes_them(tiny, seeds, tmp_path, capsys):
    from transformers import AutoTokenizer

    from llamaherd.cli import main

    assert main(["synth", "explain", "--instructions", str(seeds), "--teacher", str(tiny), "--out",
                 str(tmp_path / "dry"), "--dry-run", "--seed", "2", "--max-tokens", "50", "--price-in", "1",
                 "--price-out", "2"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    hf = AutoTokenizer.from_pretrained(tiny)  # the independent count: transformers renders the same template
    expected = 0
    for item in explain_items([Seed(s, "") for s in SEEDS], None, Sampling(max_tokens=50, seed=2)):
        (request,) = next(item.steps())
        messages = [{"role": r, "content": c} for r, c in request.messages]
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected += len(hf(text, add_special_tokens=False)["input_ids"])  # the template writes the BOS itself
    assert estimate["requests"] == 5 and estimate["prompt_tokens"] == expected
    assert estimate["completion_tokens_at_most"] == 250
    assert estimate["cost_usd_at_most"] == pytest.approx(round((expected + 500) / 1e6, 4))
    assert not (tmp_path / "dry").exists()  # nothing written, nothing spent
