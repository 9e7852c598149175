"""`herd finetune` from a YAML config (flags override), its outputs and lineage.json; `herd merge` vs transformers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from train_tiny import make_tiny_run_inputs, run_in_process

from llamaherd.cli import main
from llamaherd.fingerprint import model_fingerprint
from llamaherd.load import load_model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir, data = make_tiny_run_inputs(root)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model_dir), "data": [str(data)], "method": "lora", "lora_r": 4, "lora_alpha": 8,
        "lora_targets": ["q", "v", "o", "down"], "chat_format": "alpaca", "max_steps": 50, "batch_size": 4,
        "micro_batch_size": 2, "lr": 3e-3, "eval_every": 2, "save_every": 2, "out_dir": str(root / "run"),
        "progress": False, "lora_alpha_pattern": {"q_proj|v_proj": 40},  # PEFT's pattern keys (regexes)
    }))
    # Flags win over the file; a pattern flag takes REGEX=VALUE.
    run_in_process(["finetune", "--config", str(config), "--max-steps", "4",
                    "--lora-rank-pattern", r"layers\.1\..*v_proj=6"])
    return model_dir, data, root / "run"


def test_outputs_config_and_lineage(lora_run):
    model_dir, data, out = lora_run
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["lora_targets"] == ["q", "v", "o", "down"] and saved["lr"] == 3e-3
    assert saved["lora_alpha_pattern"] == {"q_proj|v_proj": 40}
    assert saved["lora_rank_pattern"] == {r"layers\.1\..*v_proj": 6}
    beside_checkpoint = out / "checkpoints" / "step-00000004" / "run_config.yaml"
    assert beside_checkpoint.read_text() == (out / "run_config.yaml").read_text()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all({"lr", "tokens_per_s", "grad_norm"} <= set(r) for r in records if "loss" in r)

    lineage = json.loads((out / "lineage.json").read_text())
    assert set(lineage) == {"schema", "child", "parent", "method", "data_files", "hyperparameters",
                            "final_metrics", "date"}
    assert lineage["schema"] == 1 and lineage["method"] == "lora-sft"
    assert set(lineage["child"]) == set(lineage["parent"]) == {"name", "path", "fingerprint"}
    assert lineage["parent"]["fingerprint"] == model_fingerprint(model_dir)
    assert lineage["child"]["path"] == str((out / "adapter").resolve())
    assert lineage["child"]["fingerprint"] == model_fingerprint(out / "adapter")
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    assert lineage["data_files"] == [{"path": str(data.resolve()), "sha256": sha}]
    assert lineage["hyperparameters"]["lora_r"] == 4 and lineage["hyperparameters"]["max_steps"] == 4
    assert lineage["final_metrics"]["steps"] == 4 and "val_loss" in lineage["final_metrics"]
    assert lineage["date"].endswith("+00:00")


def test_trained_adapter_opens_in_peft_and_merge_matches_transformers(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llamaherd.lora import load_adapter, lora_layers

    model_dir, _, out = lora_run
    ids = torch.tensor([[1, 5, 17, 33, 64, 90, 2, 7]])
    loaded = load_model(model_dir)
    load_adapter(loaded.model, out / "adapter").eval()  # new LoRA layers start in training mode (dropout)
    layers = lora_layers(loaded.model)  # r=4, alpha=8; q/v: alpha 40; layer 1's v_proj: rank 6
    assert [(layers[f"model.layers.{i}.self_attn.{x}_proj"].r, layers[f"model.layers.{i}.self_attn.{x}_proj"].scaling)
            for i in (0, 1) for x in "qvo"] == [(4, 10.0), (4, 10.0), (4, 2.0), (4, 10.0), (6, 40 / 6), (4, 2.0)]
    base_logits = load_model(model_dir).model(ids)
    with torch.no_grad():
        ours = loaded.model(ids)
    assert (ours - base_logits).abs().max() > 1e-4  # training moved the adapter away from B = 0

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ours, atol=1e-4)

    run_in_process(["merge", str(model_dir), str(out / "adapter"), str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours, atol=1e-4)


def test_config_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n")
    assert main(["finetune", "--config", str(bad)]) == 2
    assert "unknown field 'lerning_rate'" in capsys.readouterr().err
    assert main(["finetune", "--data", "x.json", "--batch-size", "6", "--micro-batch-size", "4"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_falcon_lora_is_exported_merged(tmp_path):
    """PEFT has no adapter layout for Falcon's fused attention: the run writes the merged model instead."""
    from eval_tiny import save_tiny_tokenizer
    from hf_tiny import save_hf_model
    from train_tiny import tiny_args
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "falcon"
    save_hf_model("falcon-7b-style", model_dir)
    save_tiny_tokenizer(model_dir)
    _, data = make_tiny_run_inputs(tmp_path / "data")
    out = tmp_path / "run"
    run_in_process(tiny_args(model_dir, data, out, method="lora", lora_targets="q", max_steps=2, lr=1e-2))
    assert not (out / "adapter").exists()
    ids = torch.tensor([[1, 5, 17, 33, 64, 90, 2, 7]])
    with torch.no_grad():
        ours = load_model(out / "model").model(ids)
        theirs = AutoModelForCausalLM.from_pretrained(out / "model").eval()(ids).logits
        base = load_model(model_dir).model(ids)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert (ours - base).abs().max() > 1e-4
    assert json.loads((out / "lineage.json").read_text())["child"]["path"] == str((out / "model").resolve())


def test_estimate_prints_the_table(capsys):
    assert main(["estimate", "llama-7b", "--method", "lora", "--seq-len", "512", "--batch", "2"]) == 0
    table = capsys.readouterr().out
    for row in ("parameters", "trainable", "weights", "gradients", "optimizer state", "activations", "total"):
        assert row in table
    assert "6,738,415,616" in table  # LLaMA-7B's published parameter count
