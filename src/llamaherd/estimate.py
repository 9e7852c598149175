"""How much memory fine-tuning (full, LoRA, QLoRA) or inference needs, from the model's shapes alone.

What is counted, per component:
  weights      every parameter in its dtype (a QLoRA base: int8 rows + one scale each, the output head too,
               or NF4 with one fp32 absmax per 64 values), plus the LoRA matrices.
  gradients    one per trainable parameter, in its dtype.
  optimizer    AdamW: two moments per trainable parameter, in the parameter dtype (as torch.optim keeps them).
  activations  the tensors this model's autograd graph saves for backward, counted per layer from what each
               op keeps (RMSNorm, projections, SDPA's q/k/v/out/logsumexp, the MLP), plus the loss head:
               saved log-probabilities and, transiently, the logits, their gradient and one temporary
               (4 * tokens * vocab in fp32). Inference: one layer's intermediates and the KV cache.
Not counted: the Python/torch runtime, a checkpoint loader's own buffers, allocator caching, data.

`total_bytes` adds the four components; `peak_bytes` is the largest simultaneous footprint of a step in
PyTorch: activations are freed as gradients appear, so weights + optimizer + max(activations, gradients +
the optimizer's largest per-tensor temporary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaherd import config as presets
from llamaherd.config import Config
from llamaherd.errors import InputError
from llamaherd.info import int8_head_change
from llamaherd.lora import TARGETS

METHODS = ("full", "lora", "qlora", "inference")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BLOCK = 64


@dataclass(frozen=True)
class Estimate:
    """Parameter counts and bytes; `total_bytes` and `peak_bytes` are derived (see the module docstring)."""

    method: str
    seq_len: int
    batch: int
    total_params: int
    trainable_params: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    peak_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes + \
            self.kv_cache_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return DTYPE_BYTES[dtype]


def _linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable linear layer of one block (and lm_head)."""
    d, h, kv, hd, f = config.n_embd, config.n_head, config.n_query_groups, config.head_dim, config.intermediate_size
    shapes = {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d), "up": (d, f), "down": (f, d)}
    if config.mlp_class == "swiglu":
        shapes["gate"] = (d, f)
    return shapes


def lora_parameters(config: Config, r: int, targets: Sequence[str]) -> int:
    """Trainable LoRA parameters: r * (in + out) for every targeted layer."""
    shapes = _linear_shapes(config)
    n = 0
    for t in targets:
        t = next((k for k, v in TARGETS.items() if v == t), t)  # accept q_proj as well as q
        if t == "lm_head":
            if config.tie_embeddings:
                raise InputError("this model ties lm_head to the embeddings; drop 'lm_head' from the LoRA targets")
            n += r * (config.n_embd + config.vocab_size)
        elif t in shapes:
            n += config.n_layer * r * sum(shapes[t])
        else:
            raise InputError(f"LoRA target {t!r} does not exist in this model; choose from {', '.join(shapes)}")
    return n


class _Saved:
    """Walks one block the way autograd records it and adds up, per token, the elements kept for backward.

    A linear layer keeps its input when its weight trains (full) or feeds a LoRA A (a dropped copy, plus the
    dropout mask when the input itself needs a gradient; CPU dropout keeps a float mask); a frozen linear
    keeps nothing but its weight. An op whose inputs need no gradient (the first block of a frozen model)
    keeps nothing at all. Tensors read by several ops are counted once.
    """

    def __init__(self, config: Config, full: bool, targets: set[str], r: int, dropout: bool, lean: bool) -> None:
        self.config, self.full, self.targets, self.r, self.dropout = config, full, targets, r, dropout
        self.lean = lean  # fp32/fp64 without autocast: model.lean_training holds for plain projections
        self.kept: set[str] = set()
        self.elems = 0

    def keep(self, name: str, width: int) -> None:
        if name not in self.kept:
            self.kept.add(name)
            self.elems += width

    def norm(self, x: str, grad: bool) -> bool:
        """A norm keeps its input and 1/rms (model.RMSNormFunction; LayerNorm: input, mean, 1/std)."""
        if self.full or grad:
            self.keep(x, self.config.n_embd)
            self.elems += 1 if self.config.norm_class == "rmsnorm" else 2
        return self.full or grad

    def linear(self, x: str, width: int, grad: bool, name: str, recomputed: bool = False) -> bool:
        """`recomputed`: a plain projection rebuilds its input in backward from tensors kept anyway
        (lean_autograd.NormProjections: norm(x); SwiGLUDown: silu(gate) * up)."""
        if self.full and not (recomputed and self.lean):
            self.keep(x, width)
        if name in self.targets:
            self.elems += self.r  # A x, kept for B's gradient
            if self.dropout:
                self.elems += width + (width if grad else 0)  # dropped copy (for A) and the mask
            else:
                self.keep(x, width)
        return grad or self.full or name in self.targets

    def block(self, grad_in: bool) -> bool:
        """One block with input `x`; returns whether its output needs a gradient."""
        c = self.config
        h, kv, hd, d, f = c.n_head, c.n_query_groups, c.head_dim, c.n_embd, c.intermediate_size
        shared = c.parallel_residual and c.shared_attention_norm
        g_h1 = self.norm("x", grad_in)
        rms = c.norm_class == "rmsnorm"
        gq, gk, gv = (self.linear("h1", d, g_h1, n, recomputed=rms and not c.attn_bias) for n in ("q", "k", "v"))
        g_attn = gq or gk or gv
        if g_attn:  # SDPA keeps q, k, v (after RoPE), its output and the logsumexp
            self.keep("out", h * hd)
            self.elems += h * hd + 2 * kv * hd + h
        g_o = self.linear("out", h * hd, g_attn, "o")
        if c.parallel_residual:
            mlp_in, g_mlp_in = ("h1", g_h1) if shared else ("h2", self.norm("x", grad_in))
        else:
            mlp_in, g_mlp_in = "h2", self.norm("x_mid", grad_in or g_o)
        g_up = self.linear(mlp_in, d, g_mlp_in, "up", recomputed=rms and not c.mlp_bias)
        if c.mlp_class == "swiglu":
            g_gate = self.linear(mlp_in, d, g_mlp_in, "gate", recomputed=rms and not c.mlp_bias)
            g_act = g_gate or g_up
            if g_act:  # model.SiluMul / SwiGLUDown keep gate and up, and recompute silu(gate) in backward
                self.keep("gate_out", f)
                self.keep("up_out", f)
            # a plain down projection (SwiGLUDown) recomputes its input silu(gate) * up for its weight gradient
            g_down = self.linear("act", f, g_act, "down", recomputed="down" not in self.targets and not c.mlp_bias)
        else:
            if g_up:
                self.keep("up_out", f)  # GELU's input
            g_down = self.linear("act", f, g_up, "down")
        return grad_in or g_o or g_down


def _activation_elements(config: Config, full: bool, targets: set[str], r: int, dropout: bool,
                         checkpointing: bool, lean: bool) -> float:
    """Per token: what the blocks and the loss head keep for backward (excluding the logits transients)."""
    grad, per_block = full, []
    for _ in range(config.n_layer):
        walk = _Saved(config, full, targets, r, dropout, lean)
        grad = walk.block(grad)
        per_block.append(walk.elems)
    if checkpointing:  # block inputs kept; during backward one block at a time is recomputed
        layers = config.n_layer * config.n_embd + max(per_block)
    else:
        layers = sum(per_block)
    head = _Saved(config, full, targets, r, dropout, lean)
    head.linear("hf", config.n_embd, head.norm("xf", grad), "lm_head")
    ids = (2 if full else 0) + 2  # int64 token ids (embedding gradient) and labels, in 4-byte units
    return layers + head.elems + 2 * config.rope_dim + config.vocab_size + ids  # + saved log-probabilities


def model_config(model: Config | str | Path | None) -> Config:
    """A Config from a preset/alias name (no download), a local checkpoint, or None (the embedded model)."""
    if isinstance(model, Config):
        return model
    if isinstance(model, str) and presets.is_known(model):
        return presets.preset(model)
    from llamaherd.load import read_config, resolve

    return read_config(resolve(model))


def estimate(
    config: Config | str | Path | None,
    method: str = "full",
    seq_len: int = 512,
    batch: int = 1,
    lora_r: int = 8,
    lora_targets: Sequence[str] = ("q", "v"),
    lora_dropout: float = 0.0,
    dtype: str = "fp32",
    quantize: str | None = None,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    bf16_autocast: bool = False,
    optimizer_in_backward: bool = False,
) -> Estimate:
    """Memory for `batch` sequences of `seq_len` tokens of a model (a Config, or a name/path: `model_config`).

    method: full | lora | qlora (frozen quantized base + LoRA; `quantize` int8 (default, CPU) or nf4) |
        inference (weights, KV cache for seq_len tokens and one layer's intermediates; `quantize` optional).
    dtype: the weights' dtype (gradients and AdamW moments follow it). bf16_autocast: matmul outputs, and
        so most activations, in bf16 over fp32 weights. optimizer: adamw | sgd (no state).
    optimizer_in_backward: each gradient is applied and freed as soon as it is computed (no gradient buffer).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if optimizer not in ("adamw", "sgd"):
        raise InputError(f"unknown optimizer {optimizer!r}; choose adamw or sgd")
    if seq_len < 1 or batch < 1:
        raise InputError(f"seq_len={seq_len} and batch={batch} must be >= 1")
    config = model_config(config)
    wb = _dtype_bytes(dtype)
    ab = 2 if bf16_autocast else wb
    if method == "qlora":
        quantize = quantize or "int8"
    if quantize not in (None, "int8", "nf4"):
        raise InputError(f"unknown quantization {quantize!r}; choose int8 or nf4")
    if quantize and method in ("full", "lora"):
        raise InputError(f"quantize={quantize!r} applies to qlora and inference only")
    shapes = _linear_shapes(config)
    n_params = config.n_params
    lora = method in ("lora", "qlora")
    targets = {next((k for k, v in TARGETS.items() if v == t), t) for t in lora_targets} if lora else set()
    lora_n = lora_parameters(config, lora_r, sorted(targets)) if lora else 0
    trainable = n_params if method == "full" else lora_n

    # weights
    linear_n = config.n_layer * sum(i * o for i, o in shapes.values())
    if quantize == "int8":
        rows = config.n_layer * sum(o for _, o in shapes.values())
        weight_bytes = linear_n + rows * wb + (n_params - linear_n) * wb
        weight_bytes += int8_head_change(config, wb)  # the head is int8 too
    elif quantize == "nf4":
        weight_bytes = linear_n // 2 + linear_n // NF4_BLOCK * 4 + (n_params - linear_n) * wb
    else:
        weight_bytes = n_params * wb
    weight_bytes += lora_n * wb

    tokens = batch * seq_len
    largest = max(config.vocab_size * config.n_embd, max(i * o for i, o in shapes.values()))
    if method == "inference":
        kv = 2 * config.n_layer * tokens * config.n_query_groups * config.head_dim * wb
        d, f = config.n_embd, config.intermediate_size
        act = tokens * (2 * d + 3 * f) * ab + batch * config.vocab_size * 4  # one block's largest set + last logits
        return Estimate(method, seq_len, batch, n_params, 0, weight_bytes, 0, 0, act, kv, weight_bytes + kv + act)

    full = method == "full"
    lean = wb >= 4 and not bf16_autocast
    saved = _activation_elements(config, full, targets, lora_r, lora_dropout > 0, activation_checkpointing, lean)
    act = int(tokens * (saved * ab + 3 * config.vocab_size * 4))  # + logits, their gradient, one temporary

    grads = trainable * wb
    opt = 2 * trainable * wb if optimizer == "adamw" else 0
    widest = max(max(s) for s in shapes.values()) if "lm_head" not in targets else config.vocab_size
    biggest_trainable = (largest if full else lora_r * widest) * wb
    if optimizer_in_backward:
        grads = biggest_trainable
        peak = weight_bytes + opt + act + grads
    else:
        step_temp = biggest_trainable if optimizer == "adamw" else 0
        peak = weight_bytes + opt + max(act, grads + step_temp)
    return Estimate(method, seq_len, batch, n_params, trainable, weight_bytes, grads, opt, act, 0, peak)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_estimate(est: Estimate) -> str:
    """A small table for `herd estimate` (decimal units: 1 GB = 10^9 bytes)."""
    ratio = f" (1/{est.total_params / est.trainable_params:,.0f})" if est.trainable_params else ""
    rows = [
        ("method", f"{est.method}, batch {est.batch} x {est.seq_len} tokens"),
        ("parameters", f"{est.total_params:,}"),
        ("trainable", f"{est.trainable_params:,}{ratio}"),
        ("weights", _size(est.weight_bytes)),
        ("gradients", _size(est.gradient_bytes)),
        ("optimizer state", _size(est.optimizer_bytes)),
        ("activations", _size(est.activation_bytes)),
    ]
    if est.kv_cache_bytes:
        rows.append(("KV cache", _size(est.kv_cache_bytes)))
    rows += [("total", _size(est.total_bytes)), ("peak (one step)", _size(est.peak_bytes))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
