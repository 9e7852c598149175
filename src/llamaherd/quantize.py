"""Weight-only int8 quantization (per output channel, symmetric) for memory-light inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.kernels import decode_linear


class _Int8MatMul(torch.autograd.Function):
    """x @ (weight_int8 * scale).T with ATen's fused kernel (which has no derivative of its own).

    The weight is frozen; x gets its gradient, so layers below a frozen int8 layer (LoRA) still train.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_int8, scale)
        return torch.ops.aten._weight_int8pack_mm(x, weight_int8, scale)

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
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale, self.bias)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) times int8 rows (out, in) scaled per row (out,), plus bias: (..., out) in x's dtype.

    Decode steps (a few rows, no autograd) take llamaherd's matrix-vector kernel; other CPU products ATen's
    fused int8-weight matmul, which makes no dequantized copy of the weight; elsewhere the weight is dequantized.
    """
    if (y := decode_linear(x, weight_int8, bias, scale)) is not None:
        return y
    out_features, in_features = weight_int8.shape
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.device.type == "cpu":
        y = _Int8MatMul.apply(x.reshape(-1, in_features), weight_int8, scale.to(x.dtype))
        y = y.view(*x.shape[:-1], out_features)
        return y if bias is None else y + bias.to(x.dtype)
    weight = weight_int8.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def swap_linears_for_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Replace every nn.Linear (except names in `skip`) by an empty Int8Linear on the same device."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                q = Int8Linear(child.in_features, child.out_features, child.bias is not None, child.weight.device)
                setattr(module, child_name, q)
