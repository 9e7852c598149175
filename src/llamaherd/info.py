"""Parameter counts and the memory to hold a model's weights in each precision."""

from __future__ import annotations

from llamaherd.config import Config
from llamaherd.terminal import printable

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}


def quantizable_params(config: Config) -> int:
    """Parameters in the blocks' linear layers (what int8 weight-only quantization shrinks)."""
    d, h, kv, hd, f = config.n_embd, config.n_head, config.n_query_groups, config.head_dim, config.intermediate_size
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = (3 if config.mlp_class == "swiglu" else 2) * d * f
    return config.n_layer * (attn + mlp)


def weight_bytes(config: Config) -> dict[str, int]:
    """Bytes for the weights alone, per precision; int8 (llamaherd.quantize) has every linear layer and the output
    head in int8 with one bf16 scale per row, embeddings and norms in bf16 (a tied model adds an int8 copy of
    its embedding for the head)."""
    n = config.n_params
    out = {k: n * b for k, b in BYTES_PER_PARAM.items()}
    q = quantizable_params(config)
    n_rows = config.n_layer * (config.n_head * config.head_dim * 2 + 2 * config.n_query_groups * config.head_dim)
    out["int8"] = q + 2 * (n - q) + 2 * n_rows + int8_head_change(config, 2)  # int8 + bf16 rest + bf16 scales
    return out


def int8_head_change(config: Config, float_bytes: int) -> int:
    """Bytes the int8 output head (llamaherd.quantize) adds to a count that holds the head and embedding in
    `float_bytes` per value: int8 rows and one scale per row, in place of an untied head's float weight, or on
    top of a tied model's embedding (which the lookup keeps)."""
    head = config.vocab_size * config.n_embd
    return head + config.vocab_size * float_bytes - (0 if config.tie_embeddings else head * float_bytes)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(config: Config) -> str:
    """The text `herd info` prints; the names come from the checkpoint, so they pass through `printable`."""
    lines = [
        f"{printable(config.name)}: {human_count(config.n_params)} parameters ({config.n_params:,})",
        f"  family {printable(config.family)}, {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads, "
        f"{config.n_query_groups} KV groups, context {config.block_size}, vocab {config.vocab_size}",
    ]
    if config.hub_id:
        fmt = f", chat format {printable(config.chat_format)}" if config.chat_format else ""
        lines.append(f"  hub id {printable(config.hub_id)}{fmt}")
    lines.append("  memory for the weights alone (1 GB = 1e9 bytes):")
    for precision, nbytes in weight_bytes(config).items():
        lines.append(f"    {precision:5s} {human_bytes(nbytes):>10s}")
    return "\n".join(lines)
