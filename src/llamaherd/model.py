"""One decoder for LLaMA, Llama 2, Falcon and Llama-architecture models, driven by `Config`.

Sequential residual (LLaMA):              Parallel residual (Falcon):
    x = x + attn(norm_1(x))                   h = norm_1(x)        (Falcon-7B: shared norm)
    x = x + mlp(norm_2(x))                    x = x + attn(h) + mlp(h or norm_2(x))   (40B: own norms)

Grouped-query attention: n_head query heads share n_query_groups key/value heads
(n_query_groups == n_head: multi-head; == 1: multi-query).
Parameter names follow Hugging Face Llama (see llamaherd.checkpoints) so checkpoints map 1:1.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from llamaherd import hugepages, rope
from llamaherd.config import Config
from llamaherd import kernels
from llamaherd.lean_autograd import NormProjections, RMSNormFunction, SiluMul, SwiGLUDown
from llamaherd.threads import share_cores


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        if (y := kernels.rms_norm(x, self.weight, self.eps)) is not None:  # decoding, engine prompts: one pass
            return y
        if x.dtype == self.weight.dtype == torch.float32:  # no kernels (a GPU, grad mode on frozen weights)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 (as Meta and HF do), scale in the input dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; on a CPU without bf16/fp16 matrix units, a half-precision product of several rows runs in fp32.

    ATen's fallback half GEMM is some 50x slower than its fp32 GEMM there, while converting the weight costs
    one pass over it: prefill and batched scoring go from unusable to fp32 speed. The products of half values
    are exact in fp32 and both accumulate in fp32, so results agree with the native kernel up to summation
    order. A single row (decode) keeps the native matrix-vector kernel, which reads half the bytes.
    Without autograd, a few rows (decode steps) take llamaherd's matrix-vector kernel, and within the engine
    longer prompt chunks its register tiles on AVX2 CPUs (llamaherd.kernels.native_linear).
    """
    if (y := kernels.native_linear(x, weight, bias)) is not None:
        return y
    if (weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu"
            and x.numel() > x.shape[-1] and not kernels.half_matrix_units(weight.dtype)):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose half-precision matmuls stay fast on CPUs without half matrix units (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device (the loader fills it): torch's meta
    `normal_` goes through Python decompositions whose first use costs seconds of imports."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def lean_training(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether the lean autograd functions may stand in for these projections' own forward: training (grad mode,
    no autocast) through plain bias-free `Linear`s in x's full-precision dtype (not LoRA, int8 or half)."""
    return (torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and x.dtype in (torch.float32, torch.float64)
            and all(type(m) is Linear and m.bias is None and m.weight.dtype == x.dtype for m in linears))


class Normed:
    """x and the norm whose output the next projections read. `project` hands training with RMSNorm to
    `NormProjections`, which keeps x instead of norm(x); otherwise norm(x) is computed once (a Falcon-7B block
    shares it between attention and MLP) and projected by each module."""

    def __init__(self, x: torch.Tensor, norm: nn.Module) -> None:
        self.x, self.norm, self._value = x, norm, None

    def value(self) -> torch.Tensor:
        if self._value is None:
            self._value = self.norm(self.x)
        return self._value

    def project(self, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
        if isinstance(self.norm, RMSNorm) and lean_training(self.x, *linears):
            return NormProjections.apply(self.x, self.norm.weight, self.norm.eps, *(m.weight for m in linears))
        h = self.value()
        fused = getattr(linears[0], "fused", None)
        if fused is not None and not torch.is_grad_enabled() and fused.serves(linears):
            return fused(h)
        return tuple(m(h) for m in linears)


class FusedProjections:
    """Projections of one input (q/k/v, gate/up) whose weights are row blocks of one tensor, so inference runs
    them as one product: fewer, larger matrix products per decode step (issue 12). Each module keeps its own
    parameters, now views into the shared tensor, so names, checkpoints and eager forward are unchanged;
    a module that is replaced (LoRA) or whose weight is reassigned (`.to()`) is computed on its own again."""

    def __init__(self, modules: tuple[nn.Module, ...]) -> None:
        from llamaherd.quantize import Int8Linear

        self.modules, self.int8 = modules, isinstance(modules[0], Int8Linear)
        attr = "weight_int8" if self.int8 else "weight"
        self.weight = torch.cat([getattr(m, attr).detach() for m in modules])
        self.scale = torch.cat([m.scale for m in modules]) if self.int8 else None
        self.bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
        self.sizes = [getattr(m, attr).shape[0] for m in modules]
        start = 0
        for m, n in zip(modules, self.sizes):
            rows = slice(start, start + n)
            if self.int8:
                m.weight_int8, m.scale = self.weight[rows], self.scale[rows]
            else:
                m.weight = nn.Parameter(self.weight[rows], requires_grad=m.weight.requires_grad)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[rows], requires_grad=m.bias.requires_grad)
            start += n
        self._pointers = self._current(modules)

    def _current(self, modules) -> list[int]:
        attr = "weight_int8" if self.int8 else "weight"  # not hasattr: a miss on a Module raises inside
        return [getattr(m, attr).data_ptr() for m in modules]

    def serves(self, modules: tuple[nn.Module, ...]) -> bool:
        return modules == self.modules and self._current(modules) == self._pointers

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.int8:
            from llamaherd.quantize import int8_linear

            y = int8_linear(h, self.weight, self.scale, self.bias)
        else:
            y = linear(h, self.weight, self.bias)
        return y.split(self.sizes, dim=-1)


def _plain_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, int8 scale or None) of a bias-free Linear or Int8Linear; None for anything else (LoRA, biases)."""
    from llamaherd.quantize import Int8Linear

    if type(module) is Linear and module.bias is None:
        return module.weight, None
    if type(module) is Int8Linear and module.bias is None:
        return module.weight_int8, module.scale
    return None


def fuse_projections(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every block (see FusedProjections) where they are all plain Linear or all
    Int8Linear with the same dtype and bias presence; others stay as they are. For inference (the engine)."""
    from llamaherd.quantize import Int8Linear

    for block in model.modules():
        if not isinstance(block, Block):
            continue
        groups = [(block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj)]
        if block.mlp.swiglu:
            groups.append((block.mlp.gate_proj, block.mlp.up_proj))
        for group in groups:
            kind = type(group[0])
            attr = "weight_int8" if kind is Int8Linear else "weight"
            if (kind not in (Linear, Int8Linear) or any(type(m) is not kind for m in group)
                    or len({(getattr(m, attr).dtype, getattr(m, attr).device, m.bias is None) for m in group}) != 1
                    or any(getattr(m, attr).device.type == "meta" for m in group)):
                continue
            if getattr(group[0], "fused", None) is None or not group[0].fused.serves(group):
                group[0].fused = FusedProjections(group)


def place_on_huge_pages(model: nn.Module) -> bool:
    """Move every parameter, buffer and fused projection weight of `model` into one region of transparent huge
    pages, in module order (the order a decode step reads them): decoding on the CPU streams them faster
    (`llamaherd.hugepages`). For inference (the engine); True when they are there. Fused projections that
    served their modules before still do."""
    fused = [m.fused for m in model.modules() if getattr(m, "fused", None) is not None]
    serving = [f for f in fused if f.serves(f.modules)]
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for f in fused for t in (f.weight, f.scale, f.bias) if t is not None]
    if not hugepages.relocate(tensors):
        return False
    for f in serving:
        f._pointers = f._current(f.modules)
    return True


def prepare_for_decoding(model: nn.Module) -> None:
    """`fuse_projections` then `place_on_huge_pages` (the engine's set-up), skipped when neither can change
    anything: no module, parameter or buffer assigned anywhere in the process (a cache's aside), no tensor of this
    model moved, and huge pages as available as at the last call on it. Each one-off generation builds an engine,
    and the two walks cost ~8 ms on SmolLM2 against ~1 ms for this check."""
    def state() -> tuple:
        tensors = itertools.chain(model.parameters(), model.buffers())
        return _structure_version, hugepages.available(), tuple(t.data_ptr() for t in tensors)

    if model.__dict__.get("_prepared_state") == state():
        return
    fuse_projections(model)
    place_on_huge_pages(model)
    model.__dict__["_prepared_state"] = state()


class RotaryEmbedding(nn.Module):
    """RoPE in Hugging Face's rotate-half layout: dims [0, d/2) pair with [d/2, d).

    Frequencies and the scale on cos/sin follow the checkpoint's RoPE scaling (llamaherd.rope). Dynamic NTK
    scaling takes its frequencies from the longest position of each call once it exceeds block_size, as
    transformers recomputes them whenever a sequence grows: a pass over a whole sequence rotates it all with the
    frequencies of its full length, and cached decoding keeps each key as rotated when it was computed, as in
    transformers' generate. Unlike transformers, nothing carries over between calls (it keeps the longest length
    seen until a call shorter than its max_position_embeddings).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope.inv_freq(config)  # computed on the CPU, also under a meta build
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = config.rope_scaling is not None and config.rope_scaling.type == "dynamic"

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1, T, rope_dim) for broadcasting over heads."""
        inv_freq = self.inv_freq
        if self.dynamic and positions.numel() and (seq_len := int(positions.max()) + 1) > self.config.block_size:
            inv_freq = rope.inv_freq(self.config, seq_len)[0].to(inv_freq.device)
        freqs = positions[..., None].float() * inv_freq  # (B, T, rope_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # YaRN: scaled in fp32 before the cast, as transformers does
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, head_dim); rotates the first cos.shape[-1] dims, leaves the rest."""
    d = cos.shape[-1]
    rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class KVCache(nn.Module):
    """Keys and values of past positions for every layer, preallocated to `max_len`.

    All rows of a batch share one write position (`length`); rows of different prompt lengths are
    left-padded and their padding is hidden by the attention mask. A prefix computed once can be
    copied to several rows with `expand` (multiple-choice evaluation, shared system prompts).
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        shape = (config.n_layer, batch_size, config.n_query_groups, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) at the current position; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Causal attention (B, T, H * hd) of q (B, H, T, hd) after storing k, v, by `kernels.prompt_attention`
        when it serves this pass (a prompt within `generating`, no padding mask); None, nothing stored, if not."""
        if not kernels.serves_prompt_attention(q, self.k):
            return None
        self.update(layer, k, v)
        B, T = q.shape[0], q.shape[2]
        positions = torch.arange(self.length, self.length + T, device=q.device).expand(B, T)
        return kernels.prompt_attention(q, self.k[layer], self.v[layer], torch.arange(B, device=q.device), positions)

    def expand(self, batch_size: int) -> KVCache:
        """A new cache whose rows are copies of this single-row cache (only the filled part is copied)."""
        if self.batch_size != 1:
            raise ValueError("expand() needs a cache with batch size 1")
        new = KVCache.__new__(KVCache)
        nn.Module.__init__(new)
        shape = (self.k.shape[0], batch_size, *self.k.shape[2:])
        new.register_buffer("k", self.k.new_zeros(shape), persistent=False)
        new.register_buffer("v", self.v.new_zeros(shape), persistent=False)
        new.k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        new.v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        new.length, new.max_len = self.length, self.max_len
        return new


class SlotCache(nn.Module):
    """Keys and values of `max_batch` independent sequences (slots), each with its own length (the engine's cache).

    A slot is one row, preallocated to `max_len`; a sequence joins by taking a free row and leaves by giving it
    back, so nothing is copied when the batch changes. Key index = RoPE position (no padding inside a row); what
    lies past a row's length is stale and hidden by the mask of `rows`. `copy_prefix` shares a computed prefix.
    """

    def __init__(self, config: Config, max_batch: int, max_len: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        shape = (config.n_layer, max_batch, config.n_query_groups, max_len, config.head_dim)
        cpu = torch.device(device or "cpu").type == "cpu"  # read at every decode step: huge pages, as the weights
        for name in ("k", "v"):
            zeros = hugepages.zeros(shape, dtype) if cpu else torch.zeros(shape, dtype=dtype, device=device)
            self.register_buffer(name, zeros, persistent=False)
        self.max_len = max_len

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> CacheRows:
        """The rows `slots` (B,) written at `positions` (B, T) by one forward pass (each row at its own offset)."""
        ids, pos = slots.tolist(), positions.tolist()
        # Neighbouring rows are a view (no copy of their keys/values per layer); one row at consecutive positions
        # (every single-sequence step) is written by slicing instead of scattering.
        span = slice(ids[0], ids[0] + len(ids)) if ids == list(range(ids[0], ids[0] + len(ids))) else None
        start = pos[0][0] if len(ids) == 1 and pos[0] == list(range(pos[0][0], pos[0][0] + len(pos[0]))) else None
        end = max(max(p) for p in pos) + 1
        same = len(pos[0]) == 1 and len({p[0] for p in pos}) == 1  # one query per row, all at one position
        from_zero = pos[0] == list(range(len(pos[0]))) and all(p == pos[0] for p in pos)
        return CacheRows(self, slots, positions, end, span, start, same, from_zero)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (a shared prompt prefix, computed once)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class CacheRows(NamedTuple):
    """Rows of a SlotCache as one forward pass sees them: query t of row b sits at positions[b, t] and attends
    to keys [0, positions[b, t]] of its own slot (earlier tokens of the row, then causal within the call).
    Built by `SlotCache.rows`, which also works out the shortcuts below once per pass rather than per layer."""

    cache: SlotCache
    slots: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B, T)
    end: int  # keys [0, end) are read: the largest position + 1
    span: slice | None  # the slots as a range of neighbouring rows, when they are one
    start: int | None  # one row written at positions start, start + 1, ...: a slice, not a scatter
    same_position: bool  # T == 1 and every row at the same position: every key up to it is visible, no mask
    from_zero: bool = False  # every row at positions 0..T-1 (prompts' first chunks): plain causal, no mask

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hd) at each row's positions."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if self.start is not None:
            row, where = self.span.start, slice(self.start, self.start + k.shape[2])
            keys[row, :, where], values[row, :, where] = k[0], v[0]
        else:
            index = (self.slots[:, None], slice(None), self.positions)  # selects (B, T, n_kv, hd)
            keys[index], values[index] = k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Attention (B, T, H * hd) of q (B, H, T, hd) over each row's keys [0, its position], after storing k, v,
        by `kernels.prompt_attention` (reads the rows in place) when it serves this pass (a prompt chunk within
        `generating`); None, nothing stored, if not."""
        if not kernels.serves_prompt_attention(q, self.cache.k):
            return None
        self.store(layer, k, v)
        return kernels.prompt_attention(q, self.cache.k[layer], self.cache.v[layer], self.slots, self.positions)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) at each row's positions; return the rows' keys/values (B, n_kv, S, hd)."""
        self.store(layer, k, v)
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if self.span is not None:
            return keys[self.span, :, :self.end], values[self.span, :, :self.end]
        return keys[:, :, :self.end].index_select(0, self.slots), values[:, :, :self.end].index_select(0, self.slots)

    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, S) bool: key j is visible to the query at position p when j <= p; None when all keys are or
        when the causal mask is SDPA's own (every row at positions 0..T-1, so S == T: a 511-token first chunk of
        SmolLM2 spent 107 ms in masked attention against ~50 causal)."""
        if self.same_position or self.from_zero:
            return None
        keys = torch.arange(self.end, device=self.positions.device)
        return (keys <= self.positions[..., None])[:, None]


class Spans(NamedTuple):
    """Packed samples: per row of a batch, the (start, end) of each causal segment, covering the row in order.

    A segment (start, end, ctx_start, ctx_end) also sees the whole earlier span [ctx_start, ctx_end) of its row
    before its own tokens: an answer after a prompt it shares with another answer (DPO's one row per pair).
    """

    rows: list[list[tuple[int, ...]]]

    @staticmethod
    def from_table(table: torch.Tensor) -> Spans:
        """One row's spans from an (n, 4) table of [start, end, ctx_start, ctx_end] (ctx_start < 0: no context)."""
        return Spans([[(s, e) if c < 0 else (s, e, c, ce) for s, e, c, ce in table.tolist()]])

    @staticmethod
    def from_segment_ids(segment_ids: torch.Tensor) -> Spans | None:
        """Spans of runs of equal ids in (B, T) `segment_ids`; None when each row holds a single sample from its
        start (plus trailing padding, id 0), where plain causal attention is already exact."""
        rows, packed = [], False
        for ids in segment_ids.tolist():
            cuts = [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]
            rows.append(list(zip([0, *cuts], [*cuts, len(ids)], strict=True)))
            trailing_padding = bool(cuts) and ids[-1] == 0
            packed |= len(cuts) + 1 - trailing_padding > 1
        return Spans(rows) if packed else None


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.n_query_groups, config.head_dim
        d, hd = config.n_embd, config.head_dim
        self.q_proj = Linear(d, self.n_head * hd, bias=config.attn_bias)
        self.k_proj = Linear(d, self.n_kv * hd, bias=config.attn_bias)
        self.v_proj = Linear(d, self.n_kv * hd, bias=config.attn_bias)
        self.o_proj = Linear(self.n_head * hd, d, bias=config.attn_out_bias)

    def forward(
        self,
        x: Normed,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | Spans | None,
        cache: KVCache | CacheRows | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.x.shape
        q, k, v = x.project(self.q_proj, self.k_proj, self.v_proj)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if (rotated := kernels.rope_qk(q, k, cos, sin, self.n_head, self.n_kv)) is not None:  # decode, engine prompts
            q, k = rotated
        else:
            q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
            k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if (mask is None or isinstance(cache, CacheRows)) and (y := cache.attend(layer, q, k, v)) is not None:
                return self.o_proj(y)  # a prompt chunk within `generating`: the native kernel, (B, T, H * hd)
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd), S = past + T
        gqa = self.n_kv != self.n_head
        if mask is None:
            # No padding and no past: plain causal. With a past and T == 1 every key is visible.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif isinstance(mask, Spans):  # each packed sample on its own: no work on a block-diagonal mask's zeros
            rows = []
            for b, spans in enumerate(mask.rows):
                parts = []
                for s, e, *ctx in spans:
                    if not ctx:
                        parts.append(F.scaled_dot_product_attention(
                            q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], is_causal=e - s > 1,
                            enable_gqa=gqa))
                        continue
                    keys = slice(ctx[0], ctx[1]), slice(s, e)
                    kc = torch.cat([k[b:b + 1, :, r] for r in keys], dim=2)  # (1, n_kv, context + own, hd)
                    vc = torch.cat([v[b:b + 1, :, r] for r in keys], dim=2)
                    # causal aligned at the bottom right: own token i sees the context and own tokens <= i
                    parts.append(F.scaled_dot_product_attention(
                        q[b:b + 1, :, s:e], kc, vc, attn_mask=causal_lower_right(e - s, kc.shape[2]), enable_gqa=gqa))
                rows.append(torch.cat(parts, dim=2))
            y = torch.cat(rows)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (LLaMA): down(silu(gate(x)) * up(x)); GELU (Falcon): down(gelu(up(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        d, f, b = config.n_embd, config.intermediate_size, config.mlp_bias
        self.swiglu = config.mlp_class == "swiglu"
        if self.swiglu:
            self.gate_proj = Linear(d, f, bias=b)
        self.up_proj = Linear(d, f, bias=b)
        self.down_proj = Linear(f, d, bias=b)

    def forward(self, x: Normed) -> torch.Tensor:
        if not self.swiglu:
            (up,) = x.project(self.up_proj)
            return self.down_proj(F.gelu(up))
        gate, up = x.project(self.gate_proj, self.up_proj)
        if not torch.is_grad_enabled():  # inference: no graph
            act = kernels.silu_mul(gate, up)  # decoding, engine prompts: one op
            return self.down_proj(F.silu(gate) * up if act is None else act)
        if lean_training(gate, self.down_proj):
            return SwiGLUDown.apply(gate, up, self.down_proj.weight)
        return self.down_proj(SiluMul.apply(gate, up))  # LoRA / int8 / autocast: the module's own forward


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.parallel = config.parallel_residual
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.shared_norm = config.parallel_residual and config.shared_attention_norm
        if not self.shared_norm:
            self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        h = Normed(x, self.input_layernorm)
        a = self.self_attn(h, cos, sin, mask, cache, layer)
        if self.parallel:
            m = self.mlp(h if self.shared_norm else Normed(x, self.post_attention_layernorm))
            return x + a + m
        x = x + a
        return x + self.mlp(Normed(x, self.post_attention_layernorm))


class DecoderStack(nn.Module):
    """Embeddings, blocks and final norm; named `model` in the parent as in Hugging Face."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)


_structure_version = 0  # bumped when a module, parameter or buffer is assigned, but a cache's (torch's global hooks)


def _structure_changed(module: nn.Module, *_) -> None:
    global _structure_version
    if not isinstance(module, (KVCache, SlotCache)):  # a cache's buffers (an engine made) change no model
        _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_structure_changed)
nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
nn.modules.module.register_module_buffer_registration_hook(_structure_changed)


class DecodePlan(NamedTuple):
    """The `llama_decode_layers` arguments (layer_args: one weight list per kind, an entry per block, then eps,
    n_head, n_kv; head: the final norm and head when the op can run them too), worked out once rather than at
    every decode step (looking them up through 30 blocks' modules cost ~1.2 ms a step, 5% of SmolLM2's). The
    blocks must be LLaMA blocks (RMSNorm, sequential residual, SwiGLU, no biases) whose q/k/v and gate/up are
    fused (the engine fuses them), with weights the kernels read (fp32, bf16, int8); anything else (Falcon, LoRA,
    fp16) runs the modules: layer_args None. The head joins when it is the tied embedding or a plain (or int8)
    lm_head without bias.

    A plan stays current until a module, parameter or buffer is assigned anywhere (LoRA injected, a projection
    replaced, `fuse_projections`) or a fused group's weights move (`.to()`, `.data =`); then it is built again.
    Buffers that `.to()` replaces without an assignment hook (an int8 layer's weights and scales) are not seen."""

    version: int
    layer_args: list | None
    head: tuple | None  # final norm's weight, the head's weight and its int8 scales (or None) when the op runs them
    fused_sources: list[torch.Tensor]  # the modules' weights that the fused copies stand for
    pointers: list[int]  # their data pointers when the plan was made

    def current(self) -> bool:
        pointers = list(map(torch.Tensor.data_ptr, self.fused_sources))  # map: no Python frame per tensor
        return self.version == _structure_version and pointers == self.pointers

    @staticmethod
    def of(model: GPT) -> DecodePlan:
        version, weights, sources = _structure_version, [], []
        config = model.config
        if config.norm_class != "rmsnorm" or config.parallel_residual or config.mlp_class != "swiglu":
            return DecodePlan(version, None, None, [], [])
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, gate_up = getattr(attn.q_proj, "fused", None), getattr(mlp.gate_proj, "fused", None)
            out, down = _plain_weight(attn.o_proj), _plain_weight(mlp.down_proj)
            if (qkv is None or gate_up is None or qkv.bias is not None or gate_up.bias is not None
                    or not qkv.serves((attn.q_proj, attn.k_proj, attn.v_proj))
                    or not gate_up.serves((mlp.gate_proj, mlp.up_proj)) or out is None or down is None
                    or any(w.dtype not in kernels.WEIGHT_DTYPES
                           for w in (qkv.weight, out[0], gate_up.weight, down[0]))):
                return DecodePlan(version, None, None, [], [])
            sources += [getattr(m, "weight_int8" if f.int8 else "weight") for f in (qkv, gate_up) for m in f.modules]
            weights.append((block.input_layernorm.weight, qkv.weight, qkv.scale, *out,
                            block.post_attention_layernorm.weight, gate_up.weight, gate_up.scale, *down))
        if not weights:
            return DecodePlan(version, None, None, [], [])
        eps = config.norm_eps  # every RMSNorm's (make_norm)
        norm, lm_head = model.model.norm, model._modules.get("lm_head")
        head = (model.model.embed_tokens.weight, None) if lm_head is None else _plain_weight(lm_head)
        if (head is None or type(norm) is not RMSNorm or norm.eps != eps
                or head[0].dtype not in kernels.WEIGHT_DTYPES or not head[0].is_contiguous()):
            head = None  # the modules run them (a LoRA head, a LayerNorm)
        return DecodePlan(version, [list(kind) for kind in zip(*weights)] + [eps, config.n_head, config.n_query_groups],
                          None if head is None else (norm.weight, *head), sources, [t.data_ptr() for t in sources])


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.rope = RotaryEmbedding(config)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The head's weight (vocab_size, n_embd): the tied embedding or lm_head's; an int8 head's dequantized copy
        (made per call, in the embedding's dtype), so every path projects with the values the head module uses."""
        from llamaherd.quantize import Int8Linear

        head = self._modules.get("lm_head")
        if isinstance(head, Int8Linear):
            return head.dequantized(self.model.embed_tokens.weight.dtype)
        return self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, dtype or p.dtype, p.device)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | Spans | None = None,
        cache: KVCache | CacheRows | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T).

        positions: (B, T) RoPE positions; default continues from the cache (or 0) for every row.
        attn_mask: (B, S) bool, True for real tokens, over all S = past + T positions (left padding);
            when given and positions is None, positions count real tokens only. Or (B, T, S) bool, the
            full mask (True = may attend), e.g. block-diagonal causal for packed samples, with `positions`.
            Or `Spans` (no cache): causal segments, some seeing a shared context, with `positions`.
        last_only: compute logits for the last position only (generation).
        return_hidden: return the final-norm hidden states (B, T, n_embd) instead of logits, so a caller
            that needs few positions (evaluation) projects only those with `output_weight`.
        segment_ids: (B, T) ids of packed samples (training): a token attends to the earlier tokens of its own
            sample only; give `positions` that restart at each sample. Padding (id 0) goes at the row's end.
            Same result as the block-diagonal (B, T, T) attn_mask, without computing the masked-out blocks.
        cache: a KVCache (one write position for all rows), or `SlotCache.rows(slots, positions)`, where each
            row is read and written at its own positions (the engine); then positions and mask come from it.
        """
        if isinstance(cache, CacheRows):
            return self._forward(idx, cache.positions, cache.mask(), cache, last_only, return_hidden)
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds the KV cache size {cache.max_len}")
        if positions is None:
            if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 2:
                positions = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if attn_mask is None and past > 0 and T > 1:
            attn_mask = torch.ones(B, past + T, dtype=torch.bool, device=idx.device)  # causal with an offset
        if segment_ids is not None or isinstance(attn_mask, Spans):
            if (segment_ids is not None and attn_mask is not None) or past:
                raise ValueError("segment_ids and Spans take neither attn_mask nor a filled cache")
            mask = attn_mask if segment_ids is None else Spans.from_segment_ids(segment_ids)
        else:
            mask = None if attn_mask is None else self._attention_mask(attn_mask, past, T)
        out = self._forward(idx, positions, mask, cache, last_only, return_hidden)
        if cache is not None:
            cache.length = past + T
        return out

    def _forward(self, idx, positions, mask, cache, last_only: bool, return_hidden: bool) -> torch.Tensor:
        """The blocks, final norm and head, once positions (B, T) and the attention mask are settled."""
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        native = self._native_decode(x, cache)
        if native is not None:  # a decode step, tens of ms: one look at the other processes is enough
            share_cores(x)
            head = native.head if not return_hidden else None  # logits straight from the op, norm and head in it
            x = native.llama_decode_layers(x, *native.layer_args, cos, sin, cache.cache.k, cache.cache.v, cache.slots,
                                           native.positions, *(head or ()))
            if head is not None:
                return x
        for i, block in enumerate(self.model.layers if native is None else ()):
            share_cores(x)  # per layer, forward and backward: threads for the busy llamaherd processes
            x = block(x, cos, sin, mask, cache, i)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.head(x)

    def _native_decode(self, x: torch.Tensor, cache) -> SimpleNamespace | None:
        """The native ops and each block's weights when this pass is a decode step (engine cache rows, one new
        position per sequence) whose blocks `llama_decode_layers` can run (see `DecodePlan`)."""
        ops = kernels.native_ops_for(x) if isinstance(cache, CacheRows) else None  # None unless a decode step
        if ops is None:
            return None
        plan = self.__dict__.get("_decode_plan")
        if plan is None or not plan.current():
            plan = self.__dict__["_decode_plan"] = DecodePlan.of(self)
        if plan.layer_args is None:
            return None
        return SimpleNamespace(llama_decode_layers=ops.llama_decode_layers, layer_args=plan.layer_args, head=plan.head,
                               positions=cache.positions[:, 0])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits for final-norm hidden states: the lm_head module when there is one (untied, or the int8 copy of a
        tied embedding; so LoRA/int8 take part), else the tied embedding."""
        return linear(h, self.output_weight) if self._modules.get("lm_head") is None else self.lm_head(h)

    @staticmethod
    def _attention_mask(attn_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: causal, hiding padded keys; each query always sees itself (no empty rows).

        A (B, T, S) attn_mask is taken as the full mask (it already holds causality).
        """
        S = past + T
        q_pos = torch.arange(past, S, device=attn_mask.device)[:, None]
        k_pos = torch.arange(S, device=attn_mask.device)[None, :]
        if attn_mask.dim() == 3:
            return (attn_mask.bool() | (k_pos == q_pos))[:, None]
        causal = k_pos <= q_pos  # (T, S)
        mask = causal[None] & attn_mask[:, None, :S].bool()
        mask |= k_pos == q_pos
        return mask[:, None]
