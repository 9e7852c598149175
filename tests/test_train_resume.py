"""Kill a fine-tuning run with SIGKILL part-way; `--resume` must give exactly the uninterrupted loss sequence."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from train_tiny import herd_cmd, losses, make_tiny_run_inputs, run_in_process, subprocess_env, tiny_args


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """LoRA with dropout, so the restored RNG state matters too (full-weight resume: test_train_loop.py)."""
    model, data = make_tiny_run_inputs(tmp_path)
    env = subprocess_env()
    common = {"method": "lora", "max_steps": 12, "save_every": 4, "eval_every": 5, "lora_dropout": 0.1}
    ref = tmp_path / "ref"
    run_in_process(tiny_args(model, data, ref, **common))

    out = tmp_path / "killed"
    proc = subprocess.Popen(herd_cmd(*tiny_args(model, data, out, **common)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once step 10 is logged (checkpoint: step 8)
        if metrics.exists() and '"step": 10,' in metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    state = json.loads((out / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert (state["step"], state["batch_in_epoch"]) == (8, 8)
    assert not (out / "lineage.json").exists()

    done = subprocess.run(herd_cmd(*tiny_args(model, data, out, resume=True, **common)), check=False, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "step-00000008" in done.stdout
    assert losses(out) == losses(ref)  # bit-for-bit: same data order, RNG, optimizer and scheduler state
    assert losses(out, "val_loss") == losses(ref, "val_loss")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # no step lost or logged twice
    assert (out / "lineage.json").exists()
