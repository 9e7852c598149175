"""The lean autograd functions against autograd on the plain ops (float64, gradcheck) and what they keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaherd import kernels
from llamaherd.config import Config
from llamaherd.lean_autograd import NormProjections, RMSNormFunction, SiluMul, SwiGLUDown
from llamaherd.model import GPT, RMSNorm

EPS = 1e-5


def rms_norm_by_hand(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def leaves(*tensors, grad=True):
    return [t.clone().requires_grad_(grad) for t in tensors]


def assert_same_gradients(fn, reference, inputs, grad_out):
    """fn and reference (plain autograd ops) on copies of inputs: equal outputs and equal input gradients."""
    ours, ref = leaves(*inputs), leaves(*inputs)
    out, want = fn(*ours), reference(*ref)
    out, want = (out,) if torch.is_tensor(out) else out, (want,) if torch.is_tensor(want) else want
    for o, w in zip(out, want, strict=True):
        torch.testing.assert_close(o, w)
    torch.autograd.backward(out, grad_out)
    torch.autograd.backward(want, grad_out)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def kept_numels(fn, *inputs):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        fn(*inputs)
    return sorted(kept)


def test_silu_mul():
    torch.manual_seed(0)
    gate, up = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert_same_gradients(SiluMul.apply, lambda g, u: F.silu(g) * u, (gate, up), torch.randn(5, 7).double())
    assert torch.autograd.gradcheck(SiluMul.apply, leaves(gate, up))
    assert kept_numels(SiluMul.apply, *leaves(gate, up)) == [35, 35]  # gate and up, not silu(gate)


def test_silu_mul_backward_kernel_fp32_on_views_of_the_fused_product():
    """fp32 on the CPU takes the native one-pass backward (kernels.silu_mul_backward), here on gate and up as views
    into one fused gate/up product: the gradients autograd computes from F.silu(gate) * up."""
    if kernels.native_ops() is None:
        pytest.skip("native kernels unavailable here")
    torch.manual_seed(0)
    fused = torch.randn(3, 40, 2 * 24) * 4  # silu's whole range: strongly negative to strongly positive
    gate, up = fused[..., :24], fused[..., 24:]
    grad = torch.randn(3, 40, 24)
    assert kernels.silu_mul_backward(gate, up, torch.sigmoid(gate), grad) is not None  # the kernel runs
    assert_same_gradients(SiluMul.apply, lambda g, u: F.silu(g) * u, (gate, up), grad)
    assert_same_gradients(SwiGLUDown.apply, lambda g, u, w: F.linear(F.silu(g) * u, w),
                          (gate, up, torch.randn(5, 24)), torch.randn(3, 40, 5))


def test_swiglu_down():
    torch.manual_seed(0)
    gate, up, weight = (torch.randn(*s, dtype=torch.float64) for s in ((2, 5, 7), (2, 5, 7), (3, 7)))
    assert_same_gradients(SwiGLUDown.apply, lambda g, u, w: F.linear(F.silu(g) * u, w), (gate, up, weight),
                          torch.randn(2, 5, 3).double())
    assert torch.autograd.gradcheck(SwiGLUDown.apply, leaves(gate, up, weight))
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (*leaves(gate, up), weight))  # a frozen projection
    assert kept_numels(SwiGLUDown.apply, *leaves(gate, up, weight)) == [21, 70, 70]  # not the product


def test_rms_norm_function():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    fn = lambda t, w: RMSNormFunction.apply(t, w, EPS)  # noqa: E731
    assert_same_gradients(fn, rms_norm_by_hand, (x, weight), torch.randn(2, 5, 8).double())
    assert torch.autograd.gradcheck(fn, leaves(x, weight))
    assert torch.autograd.gradcheck(fn, (*leaves(x), weight))  # a frozen norm (LoRA)
    # the module in training keeps its input and 1/rms, not also x/rms
    assert kept_numels(RMSNorm(8, EPS), torch.randn(2, 5, 8, requires_grad=True)) == [8, 10, 80]


def test_norm_projections():
    torch.manual_seed(0)
    x, nw = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    wq, wk = torch.randn(6, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    fn = lambda t, n, a, b: NormProjections.apply(t, n, EPS, a, b)  # noqa: E731

    def reference(t, n, a, b):
        h = rms_norm_by_hand(t, n)
        return F.linear(h, a), F.linear(h, b)

    grads = (torch.randn(2, 5, 6).double(), torch.randn(2, 5, 4).double())
    assert_same_gradients(fn, reference, (x, nw, wq, wk), grads)
    assert torch.autograd.gradcheck(fn, leaves(x, nw, wq, wk))
    assert torch.autograd.gradcheck(fn, (*leaves(x), nw, wq, *leaves(wk)))  # frozen norm and one frozen projection
    assert kept_numels(fn, *leaves(x, nw, wq, wk)) == [8, 10, 32, 48, 80]  # x and 1/rms, not norm(x)


def test_model_gradients_unchanged(monkeypatch):
    """A training step of a whole model through the lean functions equals one through plain autograd ops (fp64)."""
    import llamaherd.model as m

    config = Config(vocab_size=64, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)
    torch.manual_seed(0)
    model = GPT(config).double()
    ids = torch.randint(0, 64, (2, 9))

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss, grads = step()
    with monkeypatch.context() as patch:  # no lean function anywhere
        patch.setattr(m, "lean_training", lambda *a: False)
        patch.setattr(m.RMSNormFunction, "apply", lambda x, w, eps: rms_norm_by_hand(x, w))
        patch.setattr(m.SiluMul, "apply", lambda g, u: F.silu(g) * u)
        plain_loss, plain_grads = step()
    torch.testing.assert_close(loss, plain_loss)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
