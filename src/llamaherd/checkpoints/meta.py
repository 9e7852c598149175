"""Meta's original LLaMA / Llama 2 checkpoints: `params.json` + model-parallel `consolidated.NN.pth` shards.

Each shard holds a slice of every large matrix (fairscale's column/row-parallel layers); the slices are
concatenated back one tensor at a time, and q/k rows are moved from Meta's interleaved RoPE layout to
Hugging Face's rotate-half order.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llamaherd.checkpoints.rope_fields import make_scaling, rope_flag, rope_number
from llamaherd.checkpoints.rope_layout import to_rotate_half
from llamaherd.config import Config, RopeScaling
from llamaherd.errors import CheckpointError

# Meta name -> (internal name, dimension its shards are concatenated on; None: replicated in every shard).
# Column-parallel layers split their output rows (dim 0), row-parallel layers and the embedding their
# input columns (dim 1).
_TOP_LEVEL = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
_PER_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
# LLaMA 1 checkpoints store their RoPE frequencies; they follow from rope_theta and are recomputed.
_DERIVED = {"rope.freqs"}


def internal_name(meta_name: str) -> tuple[str, int | None] | None:
    """(internal name, shard concatenation dim or None) for a Meta tensor name, or None if unknown."""
    if meta_name in _TOP_LEVEL:
        return _TOP_LEVEL[meta_name]
    m = _LAYER_NAME.fullmatch(meta_name)
    if m and m.group(2) in _PER_LAYER:
        name, dim = _PER_LAYER[m.group(2)]
        return f"model.layers.{m.group(1)}.{name}", dim
    return None


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden size exactly as Meta's `FeedForward` computes it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def shard_files(directory: str | Path) -> list[Path]:
    """`consolidated.00.pth` ... in model-parallel rank order; a gap in the numbering is an error."""
    directory = Path(directory)
    ranks = {int(m.group(1)): p for p in directory.iterdir() if (m := _SHARD_NAME.fullmatch(p.name))}
    if not ranks:
        raise CheckpointError(f"{directory}: no consolidated.*.pth shards found")
    for rank in range(max(ranks) + 1):
        if rank not in ranks:
            raise CheckpointError(f"{directory / f'consolidated.{rank:02d}.pth'}: missing shard")
    return [ranks[r] for r in sorted(ranks)]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard, memory-mapped: nothing is read into RAM until a tensor is used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refusing to unpickle arbitrary objects ({first})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _read_params(directory: Path) -> dict[str, Any]:
    path = directory / "params.json"
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Meta checkpoint directory needs params.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("dim", "n_layers", "n_heads", "norm_eps"):
        if key not in params:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    return params


def _rope_scaling(p: dict[str, Any], path: Path) -> RopeScaling | None:
    """`use_scaled_rope`: Llama 3.1's scaling with the constants of Meta's reference `apply_scaling` (factor 8,
    low/high frequency factors 1 and 4, original context 8192); llama-models' `rope_scaling_factor` and
    `rope_high_freq_factor` override the two it names. Those without `use_scaled_rope: true` would be ignored,
    and a Hugging Face `rope_scaling` object is not read from params.json: both are refused."""
    if "rope_scaling" in p:
        raise CheckpointError(f"{path}: field 'rope_scaling' = {p['rope_scaling']!r} is not a params.json field "
                              "(Meta's Llama 3.1 scaling is use_scaled_rope: true; Hugging Face's is in config.json)")
    overrides = {f: p[f] for f in ("rope_scaling_factor", "rope_high_freq_factor") if p.get(f) is not None}
    scaled = "use_scaled_rope" in p and rope_flag(path, "use_scaled_rope", p["use_scaled_rope"])
    if not scaled and overrides:
        field, value = next(iter(overrides.items()))
        raise CheckpointError(f"{path}: field {field!r} = {value!r} is given without use_scaled_rope: true "
                              "(set it, or remove the field)")
    if not scaled:
        return None
    return make_scaling(
        path, "rope_high_freq_factor", "llama3", original_max_position_embeddings=8192, low_freq_factor=1.0,
        factor=rope_number(path, "rope_scaling_factor", overrides.get("rope_scaling_factor", 8.0)),
        high_freq_factor=rope_number(path, "rope_high_freq_factor", overrides.get("rope_high_freq_factor", 4.0)),
    )


def read_config(path: str | Path) -> Config:
    """The architecture from `params.json`; a vocab_size of -1 is read from the embedding's shape."""
    directory = Path(path)
    p = _read_params(directory)
    vocab_size = p.get("vocab_size", -1)
    if vocab_size <= 0:
        shard = shard_files(directory)[0]
        embedding = _load_shard(shard).get("tok_embeddings.weight")
        if embedding is None:
            raise CheckpointError(f"{shard}: tensor 'tok_embeddings.weight' is missing")
        vocab_size = embedding.shape[0]
    # Meta's params.json rarely names the context length: LLaMA 1 (norm_eps 1e-6) used 2048, Llama 2 4096.
    block_size = p.get("max_seq_len") or (2048 if p["norm_eps"] < 1e-5 else 4096)
    return Config(
        name=directory.resolve().name,
        family="llama",
        block_size=block_size,
        vocab_size=vocab_size,
        n_layer=p["n_layers"],
        n_head=p["n_heads"],
        n_query_groups=p.get("n_kv_heads") or p["n_heads"],
        n_embd=p["dim"],
        intermediate_size=ffn_hidden_size(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
        norm_eps=p["norm_eps"],
        rope_base=rope_number(directory / "params.json", "rope_theta", p.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(p, directory / "params.json"),
        tie_embeddings=False,
    )


def iter_tensors(path: str | Path, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (internal name, tensor) one at a time, shards merged, in the stored dtype."""
    files = shard_files(path)
    shards = [_load_shard(f) for f in files]
    for meta_name in shards[0]:
        if meta_name in _DERIVED:
            continue
        mapped = internal_name(meta_name)
        if mapped is None:
            raise CheckpointError(f"{files[0]}: unknown tensor {meta_name!r} in a Meta LLaMA checkpoint")
        name, dim = mapped
        parts = []
        for file, shard in zip(files, shards, strict=True):
            if meta_name not in shard:
                raise CheckpointError(f"{file}: tensor {meta_name!r} is missing (truncated or mixed shards?)")
            parts.append(shard[meta_name])
        w = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if name == "model.embed_tokens.weight" and w.shape[1] != config.n_embd:
            raise CheckpointError(
                f"{Path(path)}: embedding width {w.shape[1]} from {len(files)} shard(s) != dim "
                f"{config.n_embd} in params.json (shards missing?)"
            )
        if name.endswith("q_proj.weight"):
            w = to_rotate_half(w, config.n_head)
        elif name.endswith("k_proj.weight"):
            w = to_rotate_half(w, config.n_query_groups)
        mapped_file = any(w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in parts)
        yield name, w.clone() if mapped_file else w  # its own memory: the loader keeps it, not the mapping
