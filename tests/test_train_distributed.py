"""Two processes on CPU (gloo, torchrun) match one process at the same global batch: DDP and FSDP2."""

from __future__ import annotations

import subprocess

import pytest
from train_tiny import losses, make_tiny_run_inputs, run_in_process, subprocess_env, tiny_args, torchrun_cmd

RUN = {"max_steps": 4, "batch_size": 4, "micro_batch_size": 1, "eval_every": 2, "save_every": 2}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process references, run in this process (4 micro-batches accumulated per step)."""
    root = tmp_path_factory.mktemp("dist")
    model, data = make_tiny_run_inputs(root)
    runs = {}
    for method in ("full", "lora"):
        runs[method] = root / f"single-{method}"
        run_in_process(tiny_args(model, data, runs[method], method=method, **RUN))
    return model, data, runs


@pytest.mark.parametrize(("strategy", "method"), [("ddp", "full"), ("fsdp", "lora")])
def test_two_processes_match_one(single, strategy, method):
    model, data, runs = single
    out = runs[method].parent / f"{strategy}-{method}"
    # Two processes x 2 micro-batches each: the same 4 samples per optimizer step.
    done = subprocess.run(torchrun_cmd(2, *tiny_args(model, data, out, method=method, distributed=strategy, **RUN)),
                          check=False, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = runs[method]
    assert len(losses(out)) == RUN["max_steps"]
    assert losses(out) == pytest.approx(losses(ref), rel=1e-5, abs=1e-6)
    assert losses(out, "val_loss") == pytest.approx(losses(ref, "val_loss"), rel=1e-5, abs=1e-6)
    assert losses(out, "items") == losses(ref, "items")  # same trained tokens per step
    saved = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    assert (out / saved).exists() and (out / "lineage.json").exists()
