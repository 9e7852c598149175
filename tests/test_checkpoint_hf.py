"""Hugging Face checkpoints: sharded and .bin reading, export that transformers loads, clear errors."""

import json

import pytest
import torch
from hf_tiny import KINDS, VOCAB, make_hf_model, save_hf_model

from llamaherd.checkpoints.hf import save_hf
from llamaherd.errors import CheckpointError
from llamaherd.load import load_gpt


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


IDX = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def test_sharded_safetensors(tmp_path):
    hf = make_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    err = (_logits(load_gpt(tmp_path), IDX) - hf(IDX).logits).abs().max().item()
    assert err <= 1e-4


def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    hf = save_hf_model("llama-mha", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    err = (_logits(load_gpt(tmp_path), IDX) - hf(IDX).logits).abs().max().item()
    assert err <= 1e-4


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_bin_needing_arbitrary_unpickling_is_refused(tmp_path):
    save_hf_model("llama-mha", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_gpt(tmp_path)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_export_opens_in_transformers_with_identical_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    save_hf_model(kind, tmp_path / "src")
    ours = load_gpt(tmp_path / "src")
    save_hf(ours.state_dict(), ours.config, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        err = (reloaded(IDX).logits - ours(IDX)).abs().max().item()
    assert err <= 1e-5


def test_truncated_safetensors(tmp_path):
    save_hf_model("llama-mha", tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_gpt(tmp_path)


def test_missing_weights_file(tmp_path):
    save_hf_model("llama-mha", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_gpt(tmp_path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    save_hf_model("llama-mha", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"down_proj.weight' has shape \(64, 96\), expected \(64, 100\)"):
        load_gpt(tmp_path)


def test_unknown_architecture(tmp_path):
    save_hf_model("llama-mha", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture model_type='mamba'"):
        load_gpt(tmp_path)


def test_missing_tensor_reports_incomplete(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model("llama-mha", tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.down_proj.weight"):
        load_gpt(tmp_path)


_PEAK_SCRIPT = """
import sys, torch
from llamaherd.load import load_gpt
import llamaherd.checkpoints.hf, safetensors.torch  # imports before the baseline


def high_water_kb():  # this address space's own peak (ru_maxrss would carry the parent's across exec)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])


base = high_water_kb()
model = load_gpt(sys.argv[1])
print((high_water_kb() - base) * 1024)
"""


def test_loading_does_not_allocate_twice(tmp_path):
    """Peak memory while loading stays near one copy of the weights (meta-device build, per-tensor assign)."""
    import subprocess
    import sys

    from llamaherd.config import Config
    from llamaherd.model import GPT

    cfg = Config(name="mem", vocab_size=8000, n_layer=8, n_head=8, n_embd=512, intermediate_size=1536)
    model = GPT(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    save_hf(model.state_dict(), cfg, tmp_path)
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    # The model (one weights' worth) plus per-tensor transients (the largest tensor is the embedding) that
    # the allocator may keep: measured 1.34x alone and 1.52x inside the full suite. A second full copy, or
    # keeping the file memory-mapped while copying, would reach 2x.
    assert grown < 1.75 * weights, (
        f"loading grew peak RSS by {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights")
