"""RoPE inverse frequencies, and the scale on cos/sin, for every scaling a checkpoint can declare.

The rules are transformers' (`modeling_rope_utils`: `_compute_linear_scaling_rope_parameters`,
`_compute_dynamic_ntk_parameters`, `_compute_llama3_parameters`, `_compute_yarn_parameters`), evaluated in
float32 in the same order, so a scaled checkpoint gives the same logits here as there:

- linear (position interpolation, kaiokendev): every frequency divided by `factor`.
- dynamic (NTK-aware, bloc97/emozilla): plain RoPE up to `block_size` positions; a longer sequence of
  `seq_len` positions raises the base to base * (factor * seq_len / block_size - factor + 1) ** (d / (d - 2)).
- llama3 (Llama 3.1): wavelengths above original / low_freq_factor divided by `factor`, below
  original / high_freq_factor kept, a linear blend in between.
- yarn (Peng et al. 2023): frequencies ramped from interpolated (divided by `factor`) to kept across the
  dimensions that turn between beta_slow and beta_fast times in the original context; cos and sin scaled by
  `attention_factor`, by default 0.1 * ln(factor) + 1.
"""

from __future__ import annotations

import math

import torch

from llamaherd.config import Config, RopeScaling


def _periods(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    """base^(2i/dim) for i < dim/2, float32 on the CPU: one over each plain RoPE frequency (Su et al. 2021)."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)


def _plain(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    """The unscaled RoPE frequencies base^(-2i/dim)."""
    return 1.0 / _periods(base, dim)


def inv_freq(config: Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(rope_dim // 2,) inverse frequencies and the factor on cos/sin, for a sequence of `seq_len` positions.

    Only dynamic scaling depends on `seq_len`; None (or at most `block_size`) gives its unscaled frequencies.
    Computed on the CPU (also under a meta-device build: the meta kernels cost seconds of imports).
    """
    s, base, dim = config.rope_scaling, config.rope_base, config.rope_dim
    if s is None:
        return _plain(base, dim), 1.0
    if s.type == "linear":
        return _plain(base, dim) / s.factor, 1.0
    if s.type == "dynamic":
        return _plain(_ntk_base(base, dim, s.factor, config.block_size, seq_len), dim), 1.0
    if s.type == "llama3":
        return _llama3(_plain(base, dim), s), 1.0
    return _yarn(base, dim, s, config.block_size)


def _ntk_base(base: float, dim: int, factor: float, n_ctx: int, seq_len: int | None) -> float | torch.Tensor:
    """Dynamic NTK: the base for `seq_len` positions; the plain base within the trained context."""
    if seq_len is None or seq_len <= n_ctx:
        return base
    stretch = factor * torch.tensor(float(seq_len), device="cpu") / n_ctx - (factor - 1)  # float32, as transformers
    return base * stretch ** (dim / (dim - 2))


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths interpolated by `factor`, short ones kept, the band between blended."""
    n_ctx, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv
    long_waves = wavelen > n_ctx / low
    between = (wavelen >= n_ctx / high) & ~long_waves
    smooth = (n_ctx / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    return torch.where(between, blended, torch.where(long_waves, inv / s.factor, inv))


def _yarn(base: float, dim: int, s: RopeScaling, n_ctx: int) -> tuple[torch.Tensor, float]:
    """YaRN: per-dimension mix of interpolated and original frequencies, and its attention temperature."""
    n_orig = s.original_max_position_embeddings
    factor = s.factor if s.factor is not None else n_ctx / n_orig

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = s.attention_factor
    if attention is None:
        attention = mscale(s.mscale) / mscale(s.mscale_all_dim) if s.mscale and s.mscale_all_dim else mscale(1)

    def dim_turning(rotations: float) -> float:
        """The (fractional) dimension index whose wavelength fits `rotations` times into the original context."""
        return dim * math.log(n_orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_turning(s.beta_fast or 32), dim_turning(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    kept = 1 - ramp  # share of the original frequency: 1 for fast-turning dimensions, 0 for slow ones
    periods = _periods(base, dim)
    inv = 1 / (factor * periods) * (1 - kept) + 1 / periods * kept
    return inv, float(attention)
