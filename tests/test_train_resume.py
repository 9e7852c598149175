"""Kill a fine-tuning run with SIGKILL part-way; `--resume` must give exactly the uninterrupted loss sequence."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

from train_tiny import (
    Crash,
    crash_at,
    herd_cmd,
    losses,
    make_tiny_run_inputs,
    run_in_process,
    subprocess_env,
    tiny_args,
)


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


def test_moved_run_directory_model_and_data_resume_exactly(tmp_path, monkeypatch, capsys):
    """A run directory is a location, not a setting; so are the base model and data files (compared by content)."""
    model, data = make_tiny_run_inputs(tmp_path)
    common = {"method": "lora", "max_steps": 8, "save_every": 4, "eval_every": 3, "lora_dropout": 0.1}
    ref = tmp_path / "ref"
    run_in_process(tiny_args(model, data, ref, **common))

    first = tmp_path / "first"
    crash_at(monkeypatch, 6)
    with pytest.raises(Crash):
        run_in_process(tiny_args(model, data, first, **common))
    monkeypatch.undo()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    run_dir, new_model, new_data = moved / "renamed-run", moved / "base", moved / "train.json"
    first.rename(run_dir)
    model.rename(new_model)
    data.rename(new_data)
    capsys.readouterr()

    run_in_process(tiny_args(new_model, new_data, run_dir, resume=True, **common))
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000004'}" in capsys.readouterr().out
    assert losses(run_dir) == losses(ref)  # bit-for-bit, as if never interrupted or moved
    assert losses(run_dir, "val_loss") == losses(ref, "val_loss")
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["child"]["path"] == str((run_dir / "adapter").resolve())


def test_resume_refuses_other_content_at_a_location(tmp_path, monkeypatch):
    """Paths may change, content may not: other data or another base model is named in the error."""
    from llamaherd.errors import CheckpointError

    model, data = make_tiny_run_inputs(tmp_path)
    common = {"method": "lora", "max_steps": 6, "save_every": 2, "eval_every": 100}
    out = tmp_path / "run"
    crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        run_in_process(tiny_args(model, data, out, **common))
    monkeypatch.undo()

    rows = json.loads(data.read_text())
    rows[0], rows[1] = rows[1], rows[0]  # same samples, another order: another run
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps(rows))
    with pytest.raises(CheckpointError, match=r"the run config changed \(data: .*data\.json.*other\.json.* \(other "
                                              r"content\)\)"):
        run_in_process(tiny_args(model, other_data, out, resume=True, **common))

    other_model = tmp_path / "other-base"
    shutil.copytree(model, other_model)
    config = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match=r"\(model: .*tiny.*other-base.* \(other content\)\)"):
        run_in_process(tiny_args(other_model, data, out, resume=True, **common))


def test_checkpoint_written_before_a_new_setting_resumes(tmp_path, monkeypatch):
    """A run_config.yaml from before a TrainConfig field existed (here `task`) resumes: the field counts as its
    default, which is what that run did."""
    import yaml

    model, data = make_tiny_run_inputs(tmp_path)
    common = {"method": "full", "max_steps": 4, "save_every": 2, "eval_every": 100}
    ref = tmp_path / "ref"
    run_in_process(tiny_args(model, data, ref, **common))
    out = tmp_path / "old"
    crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        run_in_process(tiny_args(model, data, out, **common))
    monkeypatch.undo()
    for saved in [out / "run_config.yaml", *(out / "checkpoints").glob("*/run_config.yaml")]:
        settings = yaml.safe_load(saved.read_text())
        del settings["task"]
        saved.write_text(yaml.safe_dump(settings))
    run_in_process(tiny_args(model, data, out, resume=True, **common))
    assert losses(out) == losses(ref)
