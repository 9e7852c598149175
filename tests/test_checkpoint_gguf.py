"""GGUF reader vs transformers' own GGUF loader (embedded SmolLM2 and tiny written files), plus errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_tiny import make_hf_model

from llamaherd.checkpoints.gguf import gguf_metadata, iter_tensors, read_config
from llamaherd.errors import CheckpointError

QT = gguf.GGMLQuantizationType

# One tensor of every kind in a different storage type, as llama.cpp's quantizers mix them.
TYPES = {
    "token_embd": QT.Q8_0, "output": QT.Q8_0, "output_norm": QT.F32, "attn_norm": QT.F32, "ffn_norm": QT.F32,
    "attn_q": QT.F16, "attn_k": QT.Q8_0, "attn_v": QT.Q4_0, "attn_output": QT.Q4_1,
    "ffn_gate": QT.BF16, "ffn_up": QT.Q4_1, "ffn_down": QT.Q4_0,
}
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        _, _, i, sub = stem.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[sub]}.weight"
    return f"{GGUF_NAMES[stem]}.weight"


def _writer(path: Path, c, arch: str = "llama") -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    return w


def _close(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(path: Path, hf_model, f32: bool = False,
                    metadata: Callable[[gguf.GGUFWriter], None] | None = None) -> dict[str, QT]:
    """The HF model as llama.cpp would convert it (q/k permuted, mixed types or all `f32`), plus any `metadata`
    the callback writes; returns each tensor's type."""
    c = hf_model.config
    w = _writer(path, c)
    if metadata is not None:
        metadata(w)
    types = {}
    for name, t in hf_model.state_dict().items():
        x = t.numpy()
        if name.endswith("q_proj.weight"):
            x = _llamacpp_permute(x, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = _llamacpp_permute(x, c.num_key_value_heads)
        gname = _gguf_name(name)
        qtype = QT.F32 if f32 else TYPES[gname.split(".")[-2]]
        w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        types[name] = qtype
    _close(w)
    return types


def _quantization_bound(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """Worst-case |dequantized - original| per element for each storage type (blocks of 32 along rows)."""
    if qtype == QT.F32:
        return torch.zeros_like(x)
    if qtype == QT.F16:
        return x.abs() * 2**-11 + 2**-24  # half an fp16 ulp, subnormals included
    if qtype == QT.BF16:
        return x.abs() * 2**-8
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    if qtype == QT.Q8_0:  # scale amax/127 in fp16: half a step plus the scale's rounding
        bound = amax / 254 + amax * 2**-10
    elif qtype == QT.Q4_0:  # scale -amax/8: the far end is clipped from 8 to 7 steps, so one full step
        bound = amax / 8 * 1.01
    elif qtype == QT.Q4_1:  # scale (hi - lo)/15 and offset lo, both fp16
        bound = (hi - lo) / 30 + (lo.abs() + (hi - lo)) * 2**-10
    else:
        raise AssertionError(qtype)
    return bound.expand_as(blocks).reshape(x.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA llama written as GGUF; returns (path, HF model, per-tensor types)."""
    hf = make_hf_model("llama-gqa")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    types = write_tiny_gguf(path, hf)
    return path, hf, types


def test_tiny_gguf_reads_back_within_quantization_error(tiny):
    path, hf, types = tiny
    expected = hf.state_dict()
    config = read_config(path)
    got = dict(iter_tensors(path, config))
    assert set(got) == set(expected)
    assert {types[n] for n in got} >= {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1}
    for name, want in expected.items():
        t = got[name]
        assert t.shape == want.shape, name
        err = (t.float() - want).abs()
        bound = _quantization_bound(want, types[name])
        assert (err <= bound).all(), f"{name} ({types[name].name}): max excess {(err - bound).max():.3g}"
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16  # stored float dtype kept
    assert got["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16


def test_tiny_gguf_matches_transformers_loader(tiny):
    """transformers dequantizes and un-permutes the same file on its own: tensors must agree exactly."""
    from transformers import AutoModelForCausalLM

    path, hf, _ = tiny
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    config = read_config(path)
    for name, t in iter_tensors(path, config):
        assert torch.equal(t.float(), ref[name]), name
    c = hf.config
    assert (config.n_layer, config.n_head, config.n_query_groups, config.n_embd) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size)
    assert (config.intermediate_size, config.vocab_size, config.block_size, config.rope_base) == (
        c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.rope_parameters["rope_theta"])
    assert config.norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert not config.tie_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (c.bos_token_id, c.eos_token_id)


def test_unsupported_tensor_type_is_named(tmp_path):
    c = make_hf_model("llama-mha").config
    path = tmp_path / "q8_1.gguf"
    w = _writer(path, c)
    block, type_size = gguf.GGML_QUANT_SIZES[QT.Q8_1]  # gguf-py has no dequantizer for Q8_1
    w.add_tensor("token_embd.weight", np.zeros((c.vocab_size, c.hidden_size // block * type_size), np.uint8),
                 raw_dtype=QT.Q8_1)
    _close(w)
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' has type Q8_1"):
        list(iter_tensors(path, read_config(path)))


def test_integer_tensor_is_refused(tmp_path):
    c = make_hf_model("llama-mha").config
    path = tmp_path / "i32.gguf"
    w = _writer(path, c)
    w.add_tensor("token_embd.weight", np.zeros((c.vocab_size, c.hidden_size), np.int32))
    _close(w)
    with pytest.raises(CheckpointError, match=r"'token_embd.weight' has type I32"):
        list(iter_tensors(path, read_config(path)))


def test_unknown_architecture_and_tensor(tmp_path):
    c = make_hf_model("llama-mha").config
    path = tmp_path / "xyz.gguf"
    w = _writer(path, c, arch="xyz")
    w.add_tensor("token_embd.weight", np.zeros((c.vocab_size, c.hidden_size), np.float32))
    _close(w)
    with pytest.raises(CheckpointError, match=r"unknown architecture 'xyz' in .*xyz.gguf: supported: llama"):
        read_config(path)
    path = tmp_path / "pos_embd.gguf"
    w = _writer(path, c)
    w.add_tensor("token_embd.weight", np.zeros((c.vocab_size, c.hidden_size), np.float32))
    w.add_tensor("pos_embd.weight", np.ones((8, c.hidden_size), np.float32))
    _close(w)
    with pytest.raises(CheckpointError, match="no llama equivalent: pos_embd.weight"):
        list(iter_tensors(path, read_config(path)))


@pytest.mark.parametrize("where", ["empty", "magic", "header", "metadata", "tensor_infos", "tensor_data"])
def test_truncated_gguf_is_named(tiny, tmp_path, where):
    data = tiny[0].read_bytes()
    reader = gguf.GGUFReader(tiny[0])
    last = reader.tensors[-1]
    cut_at = {
        "empty": 0, "magic": 3, "header": 20, "metadata": reader.fields["tokenizer.ggml.tokens"].offset + 50,
        "tensor_infos": reader.tensors[len(reader.tensors) // 2].field.offset + 5,
        "tensor_data": last.data_offset + last.n_bytes // 2,
    }[where]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:cut_at])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated or not a GGUF file") as e:
        read_config(cut)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf: GGUF file not found"):
        read_config(tmp_path / "nope.gguf")


def test_logits_match_transformers_on_tiny_gguf(tiny):
    from transformers import AutoModelForCausalLM

    from llamaherd.load import load_gpt

    path, _, _ = tiny
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ours = load_gpt(path)
    idx = torch.randint(3, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ours(idx) - ref(idx).logits).abs().max().item()
    assert err <= 1e-4


# --- the real embedded model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Path:
    from llamaherd.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="module")
def hf_embedded(embedded):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded.parent, gguf_file=embedded.name).eval()


@pytest.mark.slow
def test_embedded_tensors_match_transformers(embedded, hf_embedded):
    config = read_config(embedded)
    expected = hf_embedded.state_dict()
    seen = set()
    for name, t in iter_tensors(embedded, config):
        err = (t.float() - expected[name]).abs().max().item()
        assert err <= 1e-6, f"{name}: max |diff| {err:.2e}"
        seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}  # tied: the embedding serves as the output layer


@pytest.mark.slow
def test_embedded_config_matches_transformers(embedded, hf_embedded):
    c = hf_embedded.config
    config = read_config(embedded)
    assert (config.n_layer, config.n_head, config.n_query_groups, config.n_embd, config.head_dim) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.head_dim)
    assert (config.intermediate_size, config.vocab_size, config.block_size) == (
        c.intermediate_size, c.vocab_size, c.max_position_embeddings)
    assert config.rope_base == c.rope_parameters["rope_theta"]
    assert config.norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert config.tie_embeddings == c.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        c.bos_token_id, c.eos_token_id, c.pad_token_id)


@pytest.mark.slow
def test_embedded_metadata_is_plain_python(embedded):
    meta = gguf_metadata(embedded)
    assert meta["general.architecture"] == "llama"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and isinstance(meta["tokenizer.ggml.tokens"][0], str)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5


@pytest.mark.slow
def test_embedded_logits_match_transformers(embedded, hf_embedded):
    from llamaherd.load import load_gpt

    ours = load_gpt(embedded)
    idx = torch.tensor([[1, 504, 3458, 282, 253, 3881, 30, 1073, 314, 253, 27310, 47]])
    with torch.no_grad():
        want = hf_embedded(idx).logits
        err = (ours(idx) - want).abs().max().item()
    assert err <= 1e-4, f"max |logit diff| {err:.2e}"


@pytest.mark.slow
def test_truncated_embedded_file(embedded, tmp_path):
    cut = tmp_path / "SmolLM2-cut.gguf"
    with embedded.open("rb") as f:
        cut.write_bytes(f.read(embedded.stat().st_size // 2))
    with pytest.raises(CheckpointError, match=r"SmolLM2-cut\.gguf: truncated or not a GGUF file"):
        read_config(cut)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q6_K])
def test_dequantize_equals_the_gguf_package(qtype):
    """Our torch dequantizers (Q8_0, Q4_0, Q4_1; Q6_K goes through gguf-py) against gguf-py's numpy ones,
    on random blocks with finite fp16 scales."""
    from llamaherd.checkpoints.gguf_file import dequantize

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, type_size), dtype=np.uint8)
    if qtype != QT.Q6_K:  # legacy blocks start with fp16 scale(s): make them finite
        n_scales = 2 if qtype == QT.Q4_1 else 1
        raw[:, : 2 * n_scales] = rng.normal(0, 0.1, size=(64, n_scales)).astype(np.float16).view(np.uint8)
    else:
        raw[:, -2:] = rng.normal(0, 0.1, size=(64, 1)).astype(np.float16).view(np.uint8)
    expected = gguf.quants.dequantize(raw, qtype).reshape(8, -1)
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype), (8, 64 * block // 8))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-7)
