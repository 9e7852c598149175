"""Tiny random Hugging Face models (the independent reference), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return LlamaConfig(**(base | kw))


def _falcon_config(**kw):
    from transformers import FalconConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=False,
        max_position_embeddings=256, alibi=False, parallel_attn=True, bos_token_id=11, eos_token_id=11,
    )
    return FalconConfig(**(base | kw))


KINDS = {
    "llama-mha": lambda: _llama_config(),
    "llama-gqa": lambda: _llama_config(num_key_value_heads=2, rope_theta=500000.0),
    "llama-tied": lambda: _llama_config(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    "falcon-7b-style": lambda: _falcon_config(multi_query=True, new_decoder_architecture=False),
    "falcon-40b-style": lambda: _falcon_config(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A random model of `kind`; `overrides` replace fields of its config (e.g. rope_parameters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = KINDS[kind]()
    if overrides:
        config = type(config).from_dict(config.to_dict() | overrides)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; widen the weights so argmax decisions are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0.0, 0.2 if p.dim() == 2 else 1.0)
                if p.dim() == 1:
                    p.abs_().add_(0.5)
    return model.eval()


def save_hf_model(kind: str, out: Path, seed: int = 0):
    model = make_hf_model(kind, seed)
    model.save_pretrained(out, safe_serialization=True)
    return model
