"""Read llama.cpp GGUF files: architecture from the metadata, tensors dequantized under internal names.

GGUF stores each tensor's shape innermost-first (ggml's `ne` order) and, for llama models, the q/k rows
in Meta's interleaved RoPE layout; both are undone here so tensors come out exactly as Hugging Face's.
"""

from __future__ import annotations

import functools
import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llamaherd.checkpoints.gguf_file import GGUFFile, read_gguf, read_tensor
from llamaherd.checkpoints.rope_fields import rope_number
from llamaherd.checkpoints.rope_layout import to_rotate_half
from llamaherd.config import Config, RopeScaling
from llamaherd.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _open(path: str | Path) -> GGUFFile:
    """Metadata and tensor directory; cached, since a model is often opened twice (config, then weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return read_gguf(path)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of the file's metadata (tokenizer vocabulary, chat template, hyper-parameters)."""
    return dict(_open(path).metadata)


def _architecture(gf: GGUFFile) -> str:
    arch = gf.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {arch!r} in {gf.path}: supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def read_config(path: str | Path) -> Config:
    """The model architecture from the GGUF metadata (`llama.*` and `tokenizer.ggml.*` keys)."""
    gf = _open(path)
    arch = _architecture(gf)
    get = gf.metadata.get

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
        return value

    names = {t.name: t for t in gf.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, llama.cpp's form of Llama 3.1 "
            "scaling) is not supported; load the Hugging Face checkpoint, whose config.json names the scaling"
        )
    n_head = need(f"{arch}.attention.head_count")
    n_ctx = need(f"{arch}.context_length")
    dim_key = f"{arch}.rope.dimension_count"
    rope_dim = None if get(dim_key) is None else rope_number(path, dim_key, get(dim_key), integer=True)
    return Config(
        name=Path(path).stem,
        family=arch,
        block_size=n_ctx,
        # The embedding's row count is the model's vocabulary, even when the token list is shorter.
        vocab_size=int(names["token_embd.weight"].shape[0]),
        n_layer=need(f"{arch}.block_count"),
        n_head=n_head,
        n_query_groups=get(f"{arch}.attention.head_count_kv", n_head),
        n_embd=need(f"{arch}.embedding_length"),
        head_dim=get(f"{arch}.attention.key_length"),
        intermediate_size=need(f"{arch}.feed_forward_length"),
        norm_eps=need(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_base=rope_number(path, f"{arch}.rope.freq_base", get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=rope_dim,
        rope_scaling=_rope_scaling(gf, arch, n_ctx),
        attn_bias="blk.0.attn_q.bias" in names,
        attn_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_embeddings="output.weight" not in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
    )


# Keys that change llama.cpp's RoPE beyond plain linear or YaRN scaling, with the values that leave it unchanged.
_NEUTRAL_ROPE_KEYS = {
    "rope.scaling.attn_factor": (1.0,), "rope.scaling.yarn_attn_factor": (1.0,),
    "rope.scaling.yarn_ext_factor": (1.0,), "rope.scaling.yarn_log_multiplier": (0.0,),
    "rope.scaling.alpha": (0.0, 1.0),
}


def _rope_scaling(gf: GGUFFile, arch: str, n_ctx: int) -> RopeScaling | None:
    """RoPE scaling from the metadata as llama.cpp reads it (llama-model.cpp `load_hparams`): a missing type means
    linear, a type of "none" or a factor of 0 or 1 none, the factor may sit under the older `rope.scale_linear`,
    YaRN's original context defaults to the trained one. Anything else that changes RoPE is refused."""
    md = gf.metadata
    prefix = f"{arch}.rope.scaling"

    def refuse(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{gf.path}: metadata key {key!r} = {md[key]!r} {why}")

    for suffix, neutral in _NEUTRAL_ROPE_KEYS.items():
        key = f"{arch}.{suffix}"
        if key in md and md[key] not in neutral:
            raise refuse(key, "is not supported (llamaherd computes linear and YaRN RoPE scaling as transformers does)")
    factor_key = f"{prefix}.factor" if f"{prefix}.factor" in md else f"{arch}.rope.scale_linear"
    factor = rope_number(gf.path, factor_key, md.get(factor_key, 0.0), zero_ok=True)
    kind = md.get(f"{prefix}.type", "linear")
    if kind == "none" or (kind in ("linear", "yarn") and factor in (0.0, 1.0)):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=factor)
    if kind == "yarn":
        orig_key = f"{prefix}.original_context_length"
        n_orig = rope_number(gf.path, orig_key, md.get(orig_key, 0), integer=True, zero_ok=True) or n_ctx
        beta_fast, beta_slow = (rope_number(gf.path, k, md[k]) if k in md else None
                                for k in (f"{prefix}.yarn_beta_fast", f"{prefix}.yarn_beta_slow"))
        return RopeScaling("yarn", factor=factor, original_max_position_embeddings=n_orig, beta_fast=beta_fast,
                           beta_slow=beta_slow)
    raise refuse(f"{prefix}.type", "is not supported; supported: none, linear, yarn")


def internal_name(gguf_name: str) -> str | None:
    """The internal (Hugging Face) name of a llama GGUF tensor, or None if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL and suffix in ("weight", "bias"):
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _PER_LAYER:
        return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def iter_tensors(path: str | Path, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (internal name, tensor) one at a time, dequantized, q/k rows back in rotate-half order."""
    gf = _open(path)
    _architecture(gf)
    unknown = [t.name for t in gf.tensors if internal_name(t.name) is None]
    if unknown:
        raise CheckpointError(f"{path}: tensors with no llama equivalent: {', '.join(unknown[:5])}")
    with open(gf.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as buf:
        for info in gf.tensors:
            name = internal_name(info.name)
            w = read_tensor(gf, info, buf)
            if ".self_attn.q_proj." in name:
                w = to_rotate_half(w, config.n_head)
            elif ".self_attn.k_proj." in name:
                w = to_rotate_half(w, config.n_query_groups)
            yield name, w
