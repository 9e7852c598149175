"""Autograd functions for training that keep less for backward than autograd's own ops would.

At a step's peak every layer's saved tensors are alive at once, so each (tokens, width) tensor not kept per
layer is memory freed. These keep only inputs that are kept anyway (or that are small) and recompute in backward
what is cheap to rebuild: a norm's output and SwiGLU's product are elementwise passes over tensors at hand.
Each returns the same values as the plain ops; tests/test_lean_autograd.py checks gradients against autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamaherd import kernels


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's output and 1/rms: normalised in fp32 (fp64 stays fp64), scaled in the input dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return rms_norm_scale(x, rstd, weight), rstd


def rms_norm_scale(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm's output from its input and 1/rms (backward's recompute gives forward's value bit for bit)."""
    return (x.to(rstd.dtype) * rstd).to(x.dtype) * weight


def rms_norm_backward(needs: tuple[bool, bool], x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x and weight (where `needs` says so) for the incoming gradient of RMSNorm's output."""
    x_hat = x.to(rstd.dtype) * rstd
    grad_weight = (grad.to(rstd.dtype) * x_hat).flatten(0, -2).sum(0).to(weight.dtype) if needs[1] else None
    grad_x = None
    if needs[0]:  # d/dx of x*rstd: rstd * (g - x_hat * mean(g * x_hat)), g = grad * weight
        g = (grad * weight).to(rstd.dtype)
        grad_x = (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, grad_weight


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping its input and 1/rms; autograd's ops would also keep the normalised value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        return *rms_norm_backward(ctx.needs_input_grad[:2], x, rstd, weight, grad), None


class NormProjections(torch.autograd.Function):
    """Bias-free projections of RMSNorm(x) (q, k, v; or gate, up), keeping x and 1/rms: the projections' weight
    gradients read the norm's output, which autograd would keep; backward recomputes it, bit for bit (same ops
    on the same saved 1/rms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, *weights: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        h, rstd = rms_norm_forward(x, norm_weight, eps)
        ctx.save_for_backward(x, rstd, norm_weight, *weights)
        return tuple(F.linear(h, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rstd, norm_weight, *weights = ctx.saved_tensors
        h = rms_norm_scale(x, rstd, norm_weight)
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_weights, grad_h = [], None
        for g, w, need_w in zip(grads, weights, ctx.needs_input_grad[3:], strict=True):
            grad_weights.append(g.flatten(0, -2).T @ h.flatten(0, -2) if need_w else None)
            if need_h:
                g2 = g.flatten(0, -2)
                grad_h = g2 @ w if grad_h is None else grad_h.addmm_(g2, w)
        del h
        grad_x = grad_norm_weight = None
        if need_h:
            grad_x, grad_norm_weight = rms_norm_backward(ctx.needs_input_grad[:2], x, rstd, norm_weight,
                                                         grad_h.view(x.shape))
        return grad_x, grad_norm_weight, None, *grad_weights


def _silu_mul_backward(needs: tuple[bool, bool], gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of gate and up (where `needs` says so) for the incoming gradient of silu(gate) * up; on the CPU in
    fp32, one pass of the native kernel (`llamaherd.kernels.silu_mul_backward`) after the sigmoid."""
    sig = torch.sigmoid(gate)
    if all(needs) and (both := kernels.silu_mul_backward(gate, up, sig, grad)) is not None:
        return both
    grad_gate = grad * up * sig * (1 + gate * (1 - sig)) if needs[0] else None  # silu'
    grad_up = grad * gate * sig if needs[1] else None
    return grad_gate, grad_up


class SiluMul(torch.autograd.Function):
    """silu(gate) * up keeping gate and up; autograd's two ops would also keep silu(gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        return _silu_mul_backward(ctx.needs_input_grad, gate, up, grad)


class SwiGLUDown(torch.autograd.Function):
    """A bias-free down projection of silu(gate) * up keeping gate and up: `SiluMul` and then the projection would
    also keep the (tokens, intermediate) product its weight gradient reads; backward recomputes it bit for bit."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight = ctx.saved_tensors
        grad_weight = grad_gate = grad_up = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad.flatten(0, -2).T @ (F.silu(gate) * up).flatten(0, -2)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_gate, grad_up = _silu_mul_backward(ctx.needs_input_grad[:2], gate, up, grad @ weight)
        return grad_gate, grad_up, grad_weight
