"""Meta `consolidated.NN.pth` reader: tiny Meta checkpoints written from transformers models by inverting
the known HF conversion (transformers' convert_llama_weights_to_hf.py), read back and compared exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamaherd.checkpoints.meta import ffn_hidden_size, iter_tensors, read_config
from llamaherd.checkpoints.rope_layout import to_interleaved, to_rotate_half
from llamaherd.config import preset
from llamaherd.errors import CheckpointError

# Meta params.json for each tiny model; intermediate_size follows from multiple_of / ffn_dim_multiplier.
PARAMS = {
    "mha": {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6, "vocab_size": -1,
            "max_seq_len": 256},
    "gqa": {"dim": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 64,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "vocab_size": 128, "rope_theta": 500000.0,
            "max_seq_len": 256},
}
HF_SIZES = {"mha": 192, "gqa": 384}  # 4*dim*2/3 (*1.3) rounded up to multiple_of, worked out by hand
# Meta name (per layer) -> (HF name, dim the model-parallel shards split; None: replicated)
LAYER = {
    "attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
    "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
    "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w2": ("mlp.down_proj", 1),
    "feed_forward.w3": ("mlp.up_proj", 0), "attention_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
}
TOP = {"tok_embeddings": ("model.embed_tokens", 1), "norm": ("model.norm", None), "output": ("lm_head", 0)}


def make_hf(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PARAMS[kind]
    config = LlamaConfig(
        vocab_size=128, hidden_size=p["dim"], intermediate_size=HF_SIZES[kind],
        num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"], num_key_value_heads=p.get("n_kv_heads", p["n_heads"]),
        max_position_embeddings=p["max_seq_len"], rms_norm_eps=p["norm_eps"],
        rope_theta=p.get("rope_theta", 10000.0), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0.0, 0.2 if t.dim() == 2 else 1.0)
    return model.eval()


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute` in transformers' convert_llama_weights_to_hf.py (Meta -> HF q/k rows)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta(hf_model, params: dict, out: Path, n_shards: int, rope_freqs: bool = False) -> None:
    """Write `hf_model` in Meta's layout: params.json + `n_shards` model-parallel consolidated.NN.pth."""
    sd = hf_model.state_dict()
    n_kv = params.get("n_kv_heads", params["n_heads"])
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]

    def put(meta_name: str, w: torch.Tensor, dim: int | None) -> None:
        parts = [w] * n_shards if dim is None else torch.chunk(w, n_shards, dim=dim)
        for shard, part in zip(shards, parts, strict=True):
            shard[meta_name] = part.clone()  # a view would save the whole storage into every shard

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"], TOP["tok_embeddings"][1])
    for i in range(params["n_layers"]):
        for meta, (hf, dim) in LAYER.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if meta == "attention.wq":
                w = _hf_to_meta_rows(w, params["n_heads"])
            elif meta == "attention.wk":
                w = _hf_to_meta_rows(w, n_kv)
            put(f"layers.{i}.{meta}.weight", w, dim)
    put("norm.weight", sd["model.norm.weight"], None)
    put("output.weight", sd["lm_head.weight"], TOP["output"][1])
    if rope_freqs:  # LLaMA 1 checkpoints carry this buffer
        head_dim = params["dim"] // params["n_heads"]
        put("rope.freqs", 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim), None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")


@pytest.fixture(scope="module", params=sorted(PARAMS))
def meta_ckpt(request, tmp_path_factory):
    kind = request.param
    hf = make_hf(kind)
    out = tmp_path_factory.mktemp(f"meta-{kind}")
    write_meta(hf, PARAMS[kind], out, n_shards=2, rope_freqs=kind == "mha")
    return out, hf


def test_tensors_match_hf_exactly(meta_ckpt):
    out, hf = meta_ckpt
    expected = hf.state_dict()
    got = dict(iter_tensors(out, read_config(out)))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name


def test_config_matches_hf(meta_ckpt):
    out, hf = meta_ckpt
    c, config = hf.config, read_config(out)
    assert (config.n_layer, config.n_head, config.n_query_groups, config.n_embd) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size)
    assert config.intermediate_size == c.intermediate_size
    assert (config.vocab_size, config.block_size, config.norm_eps) == (
        c.vocab_size, c.max_position_embeddings, c.rms_norm_eps)
    assert config.rope_base == c.rope_parameters["rope_theta"]
    assert not config.tie_embeddings


def test_logits_match_transformers(meta_ckpt):
    from llamaherd.load import load_gpt

    out, hf = meta_ckpt
    ours = load_gpt(out)
    idx = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ours(idx) - hf(idx).logits).abs().max().item()
    assert err <= 1e-4, f"max |logit diff| {err:.2e}"


def test_ffn_hidden_size_reproduces_published_sizes():
    """LLaMA / Llama 2 params.json values give the published intermediate sizes (config presets)."""
    assert ffn_hidden_size(4096, 256) == preset("llama-2-7b").intermediate_size == 11008
    assert ffn_hidden_size(5120, 256) == preset("llama-2-13b").intermediate_size == 13824
    assert ffn_hidden_size(6656, 256) == preset("llama-30b").intermediate_size == 17920
    assert ffn_hidden_size(8192, 256) == preset("llama-65b").intermediate_size == 22016
    assert ffn_hidden_size(8192, 4096, 1.3) == preset("llama-2-70b").intermediate_size == 28672


def test_rope_layout_round_trip():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(to_rotate_half(to_interleaved(w, 6), 6), w)
    # HF's converter permute (Meta -> HF): pairs (x0, x1), (x2, x3) become halves [x0, x2, ...], [x1, x3, ...]
    hf_permute = w.view(6, 4, 2, 5).transpose(1, 2).reshape(48, 5)
    assert torch.equal(to_rotate_half(w, 6), hf_permute)
    assert torch.equal(to_interleaved(hf_permute, 6), w)


def test_default_context_length_by_generation(tmp_path):
    params = {k: v for k, v in PARAMS["gqa"].items() if k != "max_seq_len"}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert read_config(tmp_path).block_size == 4096  # Llama 2 (norm_eps 1e-5)
    (tmp_path / "params.json").write_text(json.dumps(params | {"norm_eps": 1e-6}))
    assert read_config(tmp_path).block_size == 2048  # LLaMA 1 (norm_eps 1e-6)


@pytest.fixture
def small_ckpt(tmp_path):
    out = tmp_path / "ckpt"
    write_meta(make_hf("gqa"), PARAMS["gqa"], out, n_shards=2)
    return out


def test_missing_params_json(small_ckpt):
    (small_ckpt / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt/params.json: not found"):
        read_config(small_ckpt)


def test_bad_params_json(small_ckpt):
    (small_ckpt / "params.json").write_text('{"dim": 96,')
    with pytest.raises(CheckpointError, match=r"params.json: invalid JSON"):
        read_config(small_ckpt)
    (small_ckpt / "params.json").write_text('{"dim": 96}')
    with pytest.raises(CheckpointError, match=r"params.json: field 'n_layers' is missing"):
        read_config(small_ckpt)


def test_truncated_shard(small_ckpt):
    shard = small_ckpt / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    config = read_config(small_ckpt)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: truncated or not a PyTorch") as e:
        list(iter_tensors(small_ckpt, config))
    assert "\n" not in str(e.value)


def test_missing_shard(small_ckpt):
    config = read_config(small_ckpt)
    (small_ckpt / "consolidated.01.pth").rename(small_ckpt / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: missing shard"):
        list(iter_tensors(small_ckpt, config))
    (small_ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"embedding width 48 from 1 shard\(s\) != dim 96"):
        list(iter_tensors(small_ckpt, config))


def test_no_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS["mha"]))
    with pytest.raises(CheckpointError, match="no consolidated.*.pth shards found"):
        read_config(tmp_path)  # vocab_size -1 needs the embedding's shape
