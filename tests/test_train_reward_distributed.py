"""`herd reward` in two processes on CPU (gloo, torchrun) matches one process at the same global batch: DDP with
full weights, FSDP2 with LoRA (whose merged export gathers the sharded base weights)."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch
from train_tiny import WORDS, losses, make_tiny_run_inputs, run_in_process, subprocess_env, torchrun_cmd

from llamaherd.train.reward import load_reward_model, sequence_rewards

RUN = {"max-steps": 4, "batch-size": 4, "micro-batch-size": 1, "eval-every": 2, "save-every": 2, "lr": 1e-3,
       "chat-format": "alpaca", "lora-dropout": 0.0, "val-fraction": 0.25}


def _args(model, data, out, method: str, *extra: str) -> list[str]:
    args = ["reward", str(model), "--data", str(data), "--out-dir", str(out), "--method", method, "--no-progress",
            "--no-plot"]
    for key, value in RUN.items():
        args += [f"--{key}", str(value)]
    return [*args, *extra]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process references, run in this process (4 micro-batches accumulated per step)."""
    root = tmp_path_factory.mktemp("reward-dist")
    model, _ = make_tiny_run_inputs(root)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        answer, other = (" ".join(rng.choices(WORDS, k=rng.randint(2, 5))) for _ in range(2))
        rows.append({"prompt": f"Repeat: {answer}", "chosen": answer, "rejected": other})
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for method in ("full", "lora"):
        runs[method] = root / f"single-{method}"
        run_in_process(_args(model, data, runs[method], method))
    return model, data, runs


@pytest.mark.parametrize(("strategy", "method"), [("ddp", "full"), ("fsdp", "lora")])
def test_two_processes_match_one(single, strategy, method):
    model, data, runs = single
    out = runs[method].parent / f"{strategy}-{method}"
    done = subprocess.run(torchrun_cmd(2, *_args(model, data, out, method, "--distributed", strategy)),
                          check=False, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = runs[method]
    assert len(losses(out)) == RUN["max-steps"]
    for key in ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin"):
        assert losses(out, key) == pytest.approx(losses(ref, key), rel=1e-5, abs=1e-6), key
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        scores = [sequence_rewards(load_reward_model(run / "model").model, ids, mask) for run in (out, ref)]
    torch.testing.assert_close(*scores, rtol=1e-5, atol=1e-5)
