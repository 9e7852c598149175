"""Read llama.cpp GGUF files: architecture from the metadata, tensors dequantized under internal names.

GGUF stores each tensor's shape innermost-first (ggml's `ne` order) and, for llama models, the q/k rows
in Meta's interleaved RoPE layout; both are undone here so tensors come out exactly as Hugging Face's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llamaherd.checkpoints.rope_layout import to_rotate_half
from llamaherd.config import Config
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
_UNQUANTIZED = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _open(path: str | Path) -> gguf.GGUFReader:
    """A parsed reader, tensor data memory-mapped; cached since parsing a vocabulary takes seconds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path}: truncated or not a GGUF file ({e})") from None


def _value(field: Any) -> Any:
    """A metadata value as plain Python; float32 scalars keep their shortest decimal (1e-05, not 9.99e-06)."""
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))
    return value


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of the file's metadata (tokenizer vocabulary, chat template, hyper-parameters)."""
    reader = _open(path)
    return {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _architecture(reader: gguf.GGUFReader, path: str | Path) -> str:
    field = reader.get_field("general.architecture")
    arch = _value(field) if field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {arch!r} in {path}: supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def read_config(path: str | Path) -> Config:
    """The model architecture from the GGUF metadata (`llama.*` and `tokenizer.ggml.*` keys)."""
    reader = _open(path)
    arch = _architecture(reader, path)

    def get(key: str, default: Any = None) -> Any:
        field = reader.get_field(key)
        return _value(field) if field is not None else default

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
        return value

    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    n_head = need(f"{arch}.attention.head_count")
    return Config(
        name=Path(path).stem,
        family=arch,
        block_size=need(f"{arch}.context_length"),
        # The embedding's row count is the model's vocabulary, even when the token list is shorter.
        vocab_size=int(names["token_embd.weight"].shape[1]),
        n_layer=need(f"{arch}.block_count"),
        n_head=n_head,
        n_query_groups=get(f"{arch}.attention.head_count_kv", n_head),
        n_embd=need(f"{arch}.embedding_length"),
        head_dim=get(f"{arch}.attention.key_length"),
        intermediate_size=need(f"{arch}.feed_forward_length"),
        norm_eps=need(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_base=get(f"{arch}.rope.freq_base", 10000.0),
        rope_dim=get(f"{arch}.rope.dimension_count"),
        attn_bias="blk.0.attn_q.bias" in names,
        attn_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_embeddings="output.weight" not in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
    )


def internal_name(gguf_name: str) -> str | None:
    """The internal (Hugging Face) name of a llama GGUF tensor, or None if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL and suffix in ("weight", "bias"):
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _PER_LAYER:
        return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _to_torch(tensor: Any, path: str | Path) -> torch.Tensor:
    """One tensor in torch (out, in) order: F32/F16/BF16 keep their dtype, quantized types become fp32."""
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml ne order -> row-major
    if qtype in _UNQUANTIZED:
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which cannot be dequantized "
            "(supported: F32, F16, BF16 and the quantized types of the gguf package, e.g. Q4_0, Q4_1, Q8_0, "
            "Q4_K, Q6_K)"
        ) from None
    return torch.from_numpy(values.astype(np.float32, copy=False)).reshape(shape)


def iter_tensors(path: str | Path, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (internal name, tensor) one at a time, dequantized, q/k rows back in rotate-half order."""
    reader = _open(path)
    _architecture(reader, path)
    unknown = [t.name for t in reader.tensors if internal_name(t.name) is None]
    if unknown:
        raise CheckpointError(f"{path}: tensors with no llama equivalent: {', '.join(unknown[:5])}")
    for tensor in reader.tensors:
        name = internal_name(tensor.name)
        w = _to_torch(tensor, path)
        if ".self_attn.q_proj." in name:
            w = to_rotate_half(w, config.n_head)
        elif ".self_attn.k_proj." in name:
            w = to_rotate_half(w, config.n_query_groups)
        yield name, w
