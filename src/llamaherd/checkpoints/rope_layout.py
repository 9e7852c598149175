"""Row order of the q/k projections: Meta's interleaved RoPE layout vs Hugging Face's rotate-half.

Meta's checkpoints (and llama.cpp's GGUF files) rotate adjacent pairs (x0, x1), (x2, x3), ... of each
head; Hugging Face rotates the first half of a head against the second half. The two are the same model
up to a permutation of the q/k output rows within each head, which these two functions apply.
"""

from __future__ import annotations

import torch


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved (Meta, GGUF) rows -> rotate-half (HF) rows; `w` is (n_heads * head_dim, ...)."""
    head_dim = w.shape[0] // n_heads
    # (n_heads, head_dim // 2, 2, ...) -> (n_heads, 2, head_dim // 2, ...): evens first, then odds
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half (HF) rows -> interleaved (Meta, GGUF) rows; the inverse of `to_rotate_half`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
