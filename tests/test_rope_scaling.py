"""RoPE scaling from every checkpoint format against transformers, at positions well past the original context:
HF `rope_parameters` (transformers 5) and `rope_scaling` (older writers; `type` spelling), GGUF metadata, Meta
params.json. What cannot be computed exactly is refused in one line naming the file, the field and its value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from hf_tiny import VOCAB, make_hf_model
from test_checkpoint_gguf import write_tiny_gguf
from test_checkpoint_meta import write_meta

from llamaherd.checkpoints import gguf as gguf_reader
from llamaherd.checkpoints import meta as meta_reader
from llamaherd.checkpoints.hf import read_config, save_hf
from llamaherd.config import Config, RopeScaling
from llamaherd.errors import CheckpointError
from llamaherd.load import load_gpt

N_CTX = 64  # max_position_embeddings of the tiny models
SEQ = 200  # tokens per comparison: three times the context
THETA = 10000.0

# transformers 5 spelling, rope_theta added at use. With head_dim 16 and theta 1e4 the wavelengths run from 6 to
# 2e4 positions, so each rule's regions are all hit: llama3 (original 32, bands at 8 and 32 positions) keeps
# one frequency, blends one and divides six; YaRN (original 32) ramps from kept to interpolated over dims 0-2.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    # own betas put the ramp's ends at dims 0.81 and 2.62, which `truncate` would round to 0 and 3
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 2.0, "beta_slow": 0.25, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
                              "attention_factor": 0.9, "beta_fast": 8.0},
}
CASES = [("llama-gqa", s) for s in SCALINGS] + [("falcon-7b-style", "linear"), ("falcon-7b-style", "dynamic")]


def _tokens(n: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def _hf(kind: str, rope: dict | None, theta: float = THETA):
    overrides = {} if rope is None else {"rope_parameters": rope | {"rope_theta": theta}}
    return make_hf_model(kind, max_position_embeddings=N_CTX, **overrides)


def _save(kind: str, rope: dict, out: Path, theta: float = THETA) -> Path:
    _hf(kind, rope, theta).save_pretrained(out)
    return out


def _legacy(src: Path, dst: Path) -> Path:
    """The same checkpoint as older writers (transformers 4) spell it: `rope_scaling` with `type`, top-level theta."""
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    p = c.pop("rope_parameters")
    c["rope_theta"] = p.pop("rope_theta")
    kind = p.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **p}
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def _reference_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    """transformers' logits for the checkpoint at `path`, from a fresh model (dynamic RoPE keeps state)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(idx).logits


def _plain_rope_differs(kind: str, path: Path, idx: torch.Tensor) -> bool:
    """Whether the checkpoint's RoPE changes transformers' logits against plain RoPE with theta 1e4."""
    with torch.no_grad():
        return (_reference_logits(path, idx) - _hf(kind, {"rope_type": "default"})(idx).logits).abs().max() > 1e-2


def _max_diff(path: Path, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return (load_gpt(path)(idx) - _reference_logits(path, idx)).abs().max().item()


# --- Hugging Face config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, scaling", CASES)
def test_hf_scaling_matches_transformers_past_the_context(kind, scaling, tmp_path):
    path = _save(kind, SCALINGS[scaling], tmp_path / "v5")
    written = json.loads((path / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == SCALINGS[scaling]["rope_type"]
    assert written.get("rope_scaling") is None  # transformers 5 writes rope_parameters only
    idx = _tokens()
    assert _plain_rope_differs(kind, path, idx)  # so a reader that drops the scaling fails below
    for variant in (path, _legacy(path, tmp_path / "v4")):
        err = _max_diff(variant, idx)
        assert err <= 1e-4, f"{kind} {scaling} ({variant.name}): max |logit diff| {err:.2e}"


def test_codellama_rope_theta(tmp_path):
    """CodeLlama: plain RoPE with theta 1e6, in both spellings."""
    path = _save("llama-gqa", {"rope_type": "default"}, tmp_path / "v5", theta=1e6)
    idx = _tokens()
    assert _plain_rope_differs("llama-gqa", path, idx)
    for variant in (path, _legacy(path, tmp_path / "v4")):
        assert read_config(variant).rope_base == 1e6
        assert _max_diff(variant, idx) <= 1e-4


@pytest.mark.parametrize("edit", [
    # both spellings present: transformers takes `rope_scaling`
    lambda c: c | {"rope_scaling": {"type": "linear", "factor": 2.0}},
    # a top-level original_max_position_embeddings (as Phi-3 writes it) wins over the one inside
    lambda c: c | {"original_max_position_embeddings": 16},
])
def test_precedence_between_fields_as_in_transformers(edit, tmp_path):
    path = _save("llama-gqa", SCALINGS["yarn"], tmp_path)
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(c)))
    assert _max_diff(path, _tokens()) <= 1e-4


def test_dynamic_cached_decoding_matches_transformers(tmp_path):
    """Decoding past max_position_embeddings with a KV cache: transformers recomputes the dynamic frequencies as
    the sequence grows and keeps each cached key as it was rotated; llamaherd's cache gives the same logits."""
    from transformers import AutoModelForCausalLM

    path = _save("llama-gqa", SCALINGS["dynamic"], tmp_path)
    hf, ours = AutoModelForCausalLM.from_pretrained(path).eval(), load_gpt(path)
    idx, prompt = _tokens(120), 40
    with torch.no_grad():
        out = hf(idx[:, :prompt], use_cache=True)
        expected = [out.logits[:, -1]]
        for t in range(prompt, idx.shape[1]):
            out = hf(idx[:, t:t + 1], cache=out.cache, use_cache=True)
            expected.append(out.logits[:, -1])
        cache = ours.new_cache(1, idx.shape[1])
        got = [ours(idx[:, :prompt], cache=cache)[:, -1]]
        got += [ours(idx[:, t:t + 1], cache=cache)[:, -1] for t in range(prompt, idx.shape[1])]
        one_pass = ours(idx)[0, prompt - 1:]
    got, expected = torch.cat(got), torch.cat(expected)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - one_pass).abs().max().item() > 1e-3  # past the context, decoding differs from one pass


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_export_round_trips_into_transformers(scaling, tmp_path):
    path = _save("llama-gqa", SCALINGS[scaling], tmp_path / "src")
    ours = load_gpt(path)
    out = save_hf(ours.state_dict(), ours.config, tmp_path / "out")
    assert read_config(out).rope_scaling == ours.config.rope_scaling is not None
    idx = _tokens()
    err = (_reference_logits(out, idx) - _reference_logits(path, idx)).abs().max().item()
    assert err <= 1e-4, f"{scaling}: exported checkpoint gives different logits in transformers ({err:.2e})"


def test_config_with_scaling_serialises_and_hashes():
    config = Config(rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32, truncate=False))
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)


_BASE = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": N_CTX}


@pytest.mark.parametrize("fields, field, value", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8, "rope_theta": THETA}}, "rope_parameters.rope_type", "'longrope'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling.type", "'su'"),
    ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}, "rope_scaling.rope_type", "'ntk-by-parts'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": THETA}}, "rope_parameters.factor", "is missing"),
    ({"rope_scaling": {"type": "linear", "factor": "4"}}, "rope_scaling.factor", "'4'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_scaling", "low_freq_factor, high_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "0.5"),
])
def test_hf_rope_that_cannot_be_computed_is_refused(fields, field, value, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_BASE | fields))
    with pytest.raises(CheckpointError) as e:
        read_config(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and f"'{field}'" in message and value in message


# --- GGUF metadata (llama.cpp's keys) -------------------------------------------------------------------------

RST = gguf.RopeScalingType
# (metadata as llama.cpp writes it, the same RoPE in transformers' terms)
GGUF_CASES = {
    "linear": (lambda w: (w.add_rope_scaling_type(RST.LINEAR), w.add_rope_scaling_factor(4.0)),
               {"rope_type": "linear", "factor": 4.0}),
    "factor-without-type": (lambda w: w.add_rope_scaling_factor(4.0), {"rope_type": "linear", "factor": 4.0}),
    "old-scale-linear-key": (lambda w: w.add_float32("llama.rope.scale_linear", 2.0),
                             {"rope_type": "linear", "factor": 2.0}),
    "yarn": (lambda w: (w.add_rope_scaling_type(RST.YARN), w.add_rope_scaling_factor(4.0),
                        w.add_rope_scaling_orig_ctx_len(32), w.add_rope_scaling_yarn_beta_fast(16.0),
                        w.add_rope_scaling_yarn_beta_slow(2.0), w.add_rope_scaling_finetuned(True)),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
              "beta_slow": 2.0}),
    "yarn-trained-context": (lambda w: (w.add_rope_scaling_type(RST.YARN), w.add_rope_scaling_factor(2.0)),
                             {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": N_CTX}),
    "none-ignores-factor": (lambda w: (w.add_rope_scaling_type(RST.NONE), w.add_rope_scaling_factor(4.0)), None),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_scaling_matches_transformers(case, tmp_path):
    metadata, rope = GGUF_CASES[case]
    hf = _hf("llama-gqa", rope)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf, f32=True, metadata=metadata)
    idx = _tokens()
    with torch.no_grad():
        err = (load_gpt(path)(idx) - hf(idx).logits).abs().max().item()
    assert err <= 1e-4, f"{case}: max |logit diff| {err:.2e}"


@pytest.mark.parametrize("metadata, key, value", [
    (lambda w: w.add_rope_scaling_type(RST.LONGROPE), "llama.rope.scaling.type", "'longrope'"),
    (lambda w: w.add_string("llama.rope.scaling.type", "ntk"), "llama.rope.scaling.type", "'ntk'"),
    (lambda w: (w.add_rope_scaling_type(RST.YARN), w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_yarn_log_mul(0.1)), "llama.rope.scaling.yarn_log_multiplier", "0.1"),
    (lambda w: w.add_rope_scaling_attn_factors(0.5), "llama.rope.scaling.attn_factor", "0.5"),
    (lambda w: w.add_tensor("rope_freqs.weight", torch.ones(8).numpy()), "rope_freqs.weight", "tensor"),
])
def test_gguf_rope_that_cannot_be_computed_is_refused(metadata, key, value, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, make_hf_model("llama-gqa"), f32=True, metadata=metadata)
    with pytest.raises(CheckpointError) as e:
        gguf_reader.read_config(path)
    message = str(e.value)
    assert "\n" not in message and path.name in message and f"'{key}'" in message and value in message


# --- Meta params.json -----------------------------------------------------------------------------------------

META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
               "vocab_size": VOCAB, "rope_theta": 500000.0, "max_seq_len": N_CTX}


@pytest.mark.parametrize("params, factor", [
    ({"use_scaled_rope": True}, 8.0),  # Llama 3.1: Meta's apply_scaling constants
    ({"use_scaled_rope": True, "rope_scaling_factor": 32.0}, 32.0),  # llama-models' override
])
def test_meta_use_scaled_rope_matches_transformers_llama3(params, factor, tmp_path):
    llama3 = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    # intermediate 192: Meta's FeedForward for dim 64, multiple_of 32 (int(2 * 256 / 3) rounded up)
    hf = make_hf_model("llama-gqa", intermediate_size=192, max_position_embeddings=N_CTX,
                       rope_parameters=llama3 | {"rope_theta": 500000.0})
    write_meta(hf, META_PARAMS | params, tmp_path, n_shards=1)
    idx = _tokens()
    plain = make_hf_model("llama-gqa", intermediate_size=192, max_position_embeddings=N_CTX)
    with torch.no_grad():
        expected = hf(idx).logits
        assert (expected - plain(idx).logits).abs().max() > 1e-3
        err = (load_gpt(tmp_path)(idx) - expected).abs().max().item()
    assert err <= 1e-4, f"max |logit diff| {err:.2e}"


def test_generation_past_the_context_with_dynamic_scaling(tmp_path):
    """Dynamic NTK is made for sequences past max_position_embeddings: greedy generation runs past it as
    transformers' generate does (same tokens); without dynamic scaling it stops at the context with a warning."""
    import warnings

    from transformers import AutoModelForCausalLM

    from llamaherd.generate import generate_ids

    path = _save("llama-gqa", SCALINGS["dynamic"], tmp_path / "dynamic")
    hf, ours = AutoModelForCausalLM.from_pretrained(path).eval(), load_gpt(path)
    prompt = _tokens(40)
    n_new = 2 * N_CTX
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, 40:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = generate_ids(ours, prompt[0].tolist(), max_new_tokens=n_new, stop_ids=())
    assert got == expected.tolist()

    plain = load_gpt(_save("llama-gqa", SCALINGS["linear"], tmp_path / "linear"))
    with pytest.warns(UserWarning, match=f"context window of {N_CTX} tokens: at most {N_CTX - 40} new tokens"):
        cut = generate_ids(plain, prompt[0].tolist(), max_new_tokens=n_new, stop_ids=())
    assert len(cut) == N_CTX - 40


# --- Bad RoPE numbers, from every format: refused in one line naming the file, the field and the value ----------


def _refused(read, path: Path, field: str, value: str) -> None:
    with pytest.raises(CheckpointError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and f"'{field}'" in message and value in message


def _yarn(**fields) -> dict:
    return {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32} | fields}


@pytest.mark.parametrize("fields, field, value", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 0}}, "rope_parameters.factor", "0"),
    ({"rope_parameters": {"rope_type": "linear", "factor": float("nan")}}, "rope_parameters.factor", "nan"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": -2.0}}, "rope_parameters.factor", "-2.0"),
    ({"rope_scaling": {"type": "linear", "factor": True}}, "rope_scaling.factor", "True"),  # a bool, not 1.0
    ({"rope_theta": -5}, "rope_theta", "-5"),
    ({"rope_theta": 0}, "rope_theta", "0"),
    ({"rope_theta": "1e6"}, "rope_theta", "'1e6'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, "rope_parameters.rope_theta", "inf"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}}, "rope_parameters", "high_freq_factor > low"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}}, "rope_parameters.low_freq_factor", "0"),
    (_yarn(beta_fast=0), "rope_parameters.beta_fast", "0"),
    (_yarn(beta_slow=-1.0), "rope_parameters.beta_slow", "-1.0"),
    (_yarn(attention_factor=0.0), "rope_parameters.attention_factor", "0.0"),
    (_yarn(mscale=-0.7, mscale_all_dim=1.0), "rope_parameters.mscale", "-0.7"),
    (_yarn(mscale_all_dim=float("inf"), mscale=1.0), "rope_parameters.mscale_all_dim", "inf"),
    (_yarn(original_max_position_embeddings=32.5), "rope_parameters.original_max_position_embeddings", "32.5"),
    (_yarn(original_max_position_embeddings="32"), "rope_parameters.original_max_position_embeddings", "'32'"),
    (_yarn(truncate=0), "rope_parameters.truncate", "0"),  # a number, not a bool
    (_yarn() | {"original_max_position_embeddings": -1}, "original_max_position_embeddings", "-1"),
    (_yarn(original_max_position_embeddings=None) | {"max_position_embeddings": True}, "max_position_embeddings",
     "True"),
    # a factor with no type would silently be plain RoPE; a null type is no type
    ({"rope_parameters": {"factor": 4.0, "rope_theta": THETA}}, "rope_parameters.factor", "without a RoPE type"),
    ({"rope_scaling": {"type": None, "factor": 4.0}}, "rope_scaling.factor", "without a RoPE type"),
    # keys the type does not read would be dropped
    ({"rope_parameters": {"rope_type": "default", "factor": 4.0}}, "rope_parameters.factor", "'default'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}}, "rope_scaling.low_freq_factor",
     "'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}},
     "rope_scaling.original_max_position_embeddings", "'dynamic'"),
    ({"rope_scaling": {"type": ["linear"], "factor": 2.0}}, "rope_scaling.type", "['linear']"),
    ({"partial_rotary_factor": True}, "partial_rotary_factor", "True"),
])
def test_hf_bad_rope_values_are_refused(fields, field, value, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_BASE | fields))
    _refused(read_config, path, field, value)


def test_hf_null_type_alone_is_plain_rope(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_BASE | {"rope_parameters": {"rope_type": None, "rope_theta": 5e5}}))
    config = read_config(path)
    assert config.rope_scaling is None and config.rope_base == 5e5


def test_hf_factor_below_one_is_computed_as_transformers(tmp_path):
    """transformers warns on a factor < 1 but computes it (frequencies multiplied): so does llamaherd."""
    path = _save("llama-gqa", {"rope_type": "linear", "factor": 0.5}, tmp_path)
    idx = _tokens()
    assert _plain_rope_differs("llama-gqa", path, idx)
    assert _max_diff(path, idx) <= 1e-4


@pytest.mark.parametrize("metadata, key, value", [
    (lambda w: w.add_rope_scaling_factor(-4.0), "llama.rope.scaling.factor", "-4.0"),
    (lambda w: w.add_rope_scaling_factor(float("nan")), "llama.rope.scaling.factor", "nan"),
    (lambda w: w.add_string("llama.rope.scaling.factor", "abc"), "llama.rope.scaling.factor", "'abc'"),
    (lambda w: w.add_float32("llama.rope.scale_linear", float("-inf")), "llama.rope.scale_linear", "-inf"),
    (lambda w: (w.add_rope_scaling_type(RST.YARN), w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_yarn_beta_fast(0.0)), "llama.rope.scaling.yarn_beta_fast", "0.0"),
    (lambda w: (w.add_rope_scaling_type(RST.YARN), w.add_rope_scaling_factor(4.0),
                w.add_string("llama.rope.scaling.original_context_length", "32")),
     "llama.rope.scaling.original_context_length", "'32'"),
])
def test_gguf_bad_rope_values_are_refused(metadata, key, value, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, make_hf_model("llama-gqa"), f32=True, metadata=metadata)
    _refused(gguf_reader.read_config, path, key, value)


@pytest.mark.parametrize("params, field, value", [
    ({"rope_theta": -1}, "rope_theta", "-1"),
    ({"rope_theta": 0}, "rope_theta", "0"),
    ({"rope_theta": "abc"}, "rope_theta", "'abc'"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope", "'yes'"),
    ({"use_scaled_rope": "false"}, "use_scaled_rope", "'false'"),
    ({"use_scaled_rope": 1}, "use_scaled_rope", "1"),
    ({"use_scaled_rope": True, "rope_scaling_factor": "x"}, "rope_scaling_factor", "'x'"),
    ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "rope_scaling_factor", "0"),
    ({"use_scaled_rope": True, "rope_high_freq_factor": 1.0}, "rope_high_freq_factor", "high_freq_factor > low"),
    ({"rope_scaling_factor": 32.0}, "rope_scaling_factor", "without use_scaled_rope"),
    ({"use_scaled_rope": False, "rope_high_freq_factor": 2.0}, "rope_high_freq_factor", "without use_scaled_rope"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling", "not a params.json field"),
])
def test_meta_bad_rope_values_are_refused(params, field, value, tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS | params))
    with pytest.raises(CheckpointError) as e:
        meta_reader.read_config(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "params.json") in message and f"'{field}'" in message
    assert value in message
