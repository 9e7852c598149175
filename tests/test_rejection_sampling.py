"""Rejection sampling (train/rejection.py): the kept response is the argmax of a stub reward model's scores, the
file is SFT data herd finetune trains on (lineage method rejection-sampling), a real reward model with another
tokenizer scores re-tokenized text, and a SIGKILLed run resumes to the uninterrupted file."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from eval_tiny import save_tiny_eval_model
from rm_tiny import save_tiny_reward_model, transformers_scores
from train_tiny import herd_cmd, run_in_process, subprocess_env, tiny_args

from llamaherd.errors import InputError
from llamaherd.train.rejection import RejectionConfig, prompt_seed, run_rejection_sampling

K = 4
WORDS = "fox dog water ice car soap hose spider".split()
STUB = '''
import json, os, pathlib, time
def score(prompts, completions, completion_ids):
    """A stub reward model: how many 'e' a response holds, less 1% of its length; every call logged."""
    log = pathlib.Path(os.environ["RS_LOG"])
    with log.open("a") as f:
        f.write(json.dumps({"prompt": prompts[0], "completions": completions}) + "\\n")
    n = len(log.read_text().splitlines())
    if os.environ.get("RS_STALL_AT") == str(n):
        pathlib.Path(os.environ["RS_FLAG"]).write_text("scoring")
        time.sleep(120)
    return [c.count("e") - 0.01 * len(c) for c in completions]
'''


def stub_score(text: str) -> float:
    return text.count("e") - 0.01 * len(text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    model = save_tiny_eval_model(root / "tiny")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the {w}"}) + "\n" for w in WORDS))
    stub = root / "stub.py"
    stub.write_text(STUB)
    return model, prompts, stub


def rs_args(inputs, out, **kw) -> list[str]:
    model, prompts, stub = inputs
    opts = {"prompts": prompts, "reward": f"{stub}:score", "out": out, "k": K, "max-new-tokens": 12,
            "chat-format": "alpaca", "seed": 5, "max-batch": 8, "progress": False} | kw
    args = ["rejection-sample", str(model)]
    for key, value in opts.items():
        args += [f"--{key}"] if value is True else [f"--no-{key}"] if value is False else [f"--{key}", str(value)]
    return args


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_the_kept_response_is_the_argmax_of_the_stub_scores_and_finetune_reads_it(inputs, tmp_path, monkeypatch):
    """Every prompt's k samples reach the scorer together; the row keeps the first of the highest scores (scores
    recomputed here from the logged texts), with all k scores and the seeds. herd finetune trains on the file
    as it is, and its lineage says rejection-sampling, with the policy as the data's teacher."""
    monkeypatch.setenv("RS_LOG", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "rs"
    run_in_process(rs_args(inputs, out))
    calls = {c["prompt"][-1]["content"]: c["completions"]
             for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())}
    kept = rows(out)
    assert [r["messages"][0]["content"] for r in kept] == [f"Tell me about the {w}" for w in WORDS]
    for index, row in enumerate(kept):
        samples = calls[row["messages"][0]["content"]]
        scores = [stub_score(s) for s in samples]
        best = scores.index(max(scores))
        assert len(samples) == K and len(set(samples)) > 1
        assert row["messages"][-1] == {"role": "assistant", "content": samples[best]}
        assert row["score"] == pytest.approx(max(scores)) and row["rejection_sampling"]["chosen"] == best
        assert row["rejection_sampling"]["scores"] == pytest.approx(scores)
        assert row["rejection_sampling"]["seeds"] == [prompt_seed(5, index, K) + i for i in range(K)]
        assert row["source"] == f"{inputs[1]}:{index + 1}"

    sft = tmp_path / "sft"
    run_in_process(tiny_args(inputs[0], out / "data.jsonl", sft, max_steps=2, batch_size=2, micro_batch_size=1,
                             val_data=out / "data.jsonl"))
    lineage = json.loads((sft / "lineage.json").read_text())
    assert lineage["method"] == "rejection-sampling"
    synthetic = lineage["data_files"][0]["synthetic"]
    assert synthetic["recipe"] == "rejection-sampling" and synthetic["matches_manifest"]
    assert synthetic["teacher"]["fingerprint"] == lineage["parent"]["fingerprint"]


def test_a_reward_model_with_another_tokenizer_scores_the_text(inputs, tmp_path):
    """The reward model's tokenizer is not the policy's: each kept score is transformers' reward of the text as the
    reward model's own tokenizer and chat format encode it."""
    rm = save_tiny_reward_model(tmp_path / "rm")
    model, prompts, _ = inputs
    out = tmp_path / "rs"
    run_rejection_sampling(RejectionConfig(model=str(model), prompts=[str(prompts)], out=str(out),
                                           reward_model=str(rm), rm_chat_format="vicuna", k=K, max_new_tokens=12,
                                           chat_format="alpaca", progress=False))
    kept = rows(out)
    assert [r["score"] for r in kept] == pytest.approx(transformers_scores(rm, [r["messages"] for r in kept],
                                                                           "vicuna"), abs=1e-4)
    assert all(max(r["rejection_sampling"]["scores"]) == r["score"] for r in kept)
    assert json.loads((out / "manifest.json").read_text())["scorer"]["kind"] == "reward-model"


def test_sigkill_then_rerun_gives_the_uninterrupted_file(inputs, tmp_path, monkeypatch, capsys):
    """Killed while the 4th prompt is scored, then rerun: the same data.jsonl, byte for byte, as a run never killed;
    the 3 journalled prompts are not sampled again and none is written twice."""
    monkeypatch.setenv("RS_LOG", str(tmp_path / "calls.jsonl"))
    ref = tmp_path / "ref"
    run_in_process(rs_args(inputs, ref))

    out, flag = tmp_path / "killed", tmp_path / "flag"
    env = subprocess_env() | {"RS_FLAG": str(flag), "RS_STALL_AT": "4"}
    (tmp_path / "calls.jsonl").unlink()
    proc = subprocess.Popen(herd_cmd(*rs_args(inputs, out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len((out / "journal.jsonl").read_text().splitlines()) == 3

    capsys.readouterr()
    run_in_process(rs_args(inputs, out))  # RS_STALL_AT is not set here
    assert "8 of 8 prompts kept (5 sampled this run" in capsys.readouterr().out
    assert (out / "data.jsonl").read_bytes() == (ref / "data.jsonl").read_bytes()
    journal = [json.loads(line)["item"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == len(set(journal)) == len(WORDS)


def test_bad_input_is_one_line(inputs, tmp_path, capsys, monkeypatch):
    from llamaherd.cli import main

    monkeypatch.setenv("RS_LOG", str(tmp_path / "calls.jsonl"))

    with pytest.raises(InputError, match="exactly one of --rm REWARD_MODEL and --reward"):
        RejectionConfig(prompts=["p.jsonl"])
    model, prompts, stub = inputs
    for args, message in [
        (rs_args(inputs, tmp_path / "a", prompts=tmp_path / "missing.jsonl"), "missing.jsonl: data file not found"),
        (rs_args(inputs, tmp_path / "b", k=0), "setting 'k' = 0: must be >= 1"),
        (rs_args(inputs, tmp_path / "c", reward=f"{stub}:absent"), "has no function 'absent'"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(rs_args(inputs, tmp_path / "d", k=2, **{"max-new-tokens": 2})) == 0
    assert main(rs_args(inputs, tmp_path / "d", k=3, **{"max-new-tokens": 2})) == 2  # another run in that folder
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run with other settings (k)" in err, err
