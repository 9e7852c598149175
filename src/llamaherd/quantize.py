"""Weight-only int8 quantization (per output channel, symmetric) for memory-light inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.kernels import native_linear


def dequantize(weight_int8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows (out, in) times their scales (out,): the float weight (out, in) in `dtype`."""
    return weight_int8.to(dtype) * scale.to(dtype)[:, None]


class _Int8MatMul(torch.autograd.Function):
    """x @ (weight_int8 * scale).T through a dequantized copy of the weight that lives for this call only.

    ATen's fused int8-weight matmul (`_weight_int8pack_mm`) measured 9x slower than dequantizing and running the
    float GEMM for a 512-row prefill on this project's machine (issue 12), and ~2.9 GB/s for decode. Autograd
    keeps the int8 weight, not the copy: the weight is frozen; x gets its gradient, so layers below a frozen
    int8 layer (LoRA) still train.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_int8, scale)
        return F.linear(x, dequantize(weight_int8, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight_int8, scale = ctx.saved_tensors
        return (grad * scale) @ weight_int8.to(grad.dtype), None, None


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 rows with one fp scale per row (4x smaller than fp32)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a float (out, in) weight into this layer."""
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight_int8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale = scale

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight_int8, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale, self.bias)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) times int8 rows (out, in) scaled per row (out,), plus bias: (..., out) in x's dtype.

    Decode steps take llamaherd's matrix-vector kernel and the engine's prompt chunks its register tiles (on AVX2
    CPUs), both reading the int8 bytes directly (`llamaherd.kernels.native_linear`); anything else (scoring,
    training, prompts elsewhere) runs the float product on a dequantized copy made per call (`_Int8MatMul`).
    """
    if (y := native_linear(x, weight_int8, bias, scale)) is not None:
        return y
    y = _Int8MatMul.apply(x, weight_int8, scale)
    return y if bias is None else y + bias.to(x.dtype)


def swap_linears_for_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Replace every nn.Linear (except names in `skip`) by an empty Int8Linear on the same device, the output head
    included, as llama.cpp's Q8_0 and torchao's int8 weight-only quantize it (bitsandbytes' LLM.int8 keeps it in
    16 bits): decoding a small model reads its head every token (SmolLM2: 113 MB in fp32, 28 MB in int8)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                q = Int8Linear(child.in_features, child.out_features, child.bias is not None, child.weight.device)
                setattr(module, child_name, q)
