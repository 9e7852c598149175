"""Summed next-token cross-entropy (and per-token log-probs) of the output head without materialising (tokens,
vocab) logits.

A plain `F.cross_entropy(head(h))` keeps the log-probabilities for backward and, during backward, the logits'
gradient and a temporary beside them: three (tokens, vocab) fp32 tensors, 0.6 GB for 1,000 tokens of a
49k vocabulary, alive while every layer's activations still are (the peak of a training step). Here the
logits are computed a slice of rows at a time and, when a gradient is wanted, the gradients of the hidden
states and of the head weight are formed right away (softmax minus one-hot, times the weight / hidden
states): the same products backward would compute, so no extra compute, and only one slice of logits is
ever alive. Backward then scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamaherd.model import GPT, Linear, linear

SLICE_BYTES = 64 * 2**20  # fp32 logits computed at a time


class _FusedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                with_grad: bool) -> torch.Tensor:
        want_h = with_grad and ctx.needs_input_grad[0]
        want_w = with_grad and ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 logits and loss (fp64 weights: fp64)
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        with torch.autocast(h.device.type, enabled=False):  # the head in the weights' precision
            for start in range(0, h.shape[0], rows):
                hs, ys = h[start:start + rows].to(weight.dtype), labels[start:start + rows]
                logits = linear(hs, weight).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, ys[:, None]).squeeze(1)).sum()
                if not (want_h or want_w):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax ...
                g[torch.arange(len(ys), device=g.device), ys] -= 1  # ... minus one-hot: d loss / d logits
                g = g.to(weight.dtype)
                if want_h:
                    grad_h[start:start + rows] = linear(g, weight.t())  # g @ weight
                if want_w:
                    grad_w.addmm_(g.t(), hs)
        # Kept as plain attributes (they are neither inputs nor outputs): backward hands the very tensors on,
        # scaled in place, so the weight's .grad takes them over instead of copying (one weight's worth less).
        ctx.grads = [grad_h, grad_w]
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def head_cross_entropy(model: GPT, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of cross-entropy(head(h), labels) in fp32; h (N, n_embd) final-norm hidden states.

    A plain head weight (the tied embedding or a float `lm_head`) goes through the fused slices; a head that is
    a LoRA or quantized layer goes through its module and `F.cross_entropy`.
    """
    plain = model.config.tie_embeddings or type(model.lm_head) is Linear
    if not plain:
        return F.cross_entropy(model.head(h).float(), labels, reduction="sum")
    weight = model.output_weight
    rows = max(1, SLICE_BYTES // (4 * weight.shape[0]))
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedHeadCrossEntropy.apply(h, weight, labels, rows, with_grad)


class _HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[target] per row, a slice of rows at a time; backward recomputes each slice's logits.

    The gradient arriving at each row differs (a DPO pair's weight), so it cannot be formed in forward as above:
    one extra head product per row in backward buys never holding more than one slice of logits.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        acc = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(out)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], rows):
                logits = linear(h[start:start + rows].to(weight.dtype), weight).to(acc)
                lse[start:start + rows] = torch.logsumexp(logits, dim=-1)
                out[start:start + rows] = logits.gather(1, targets[start:start + rows, None]).squeeze(1)
        out -= lse
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], ctx.rows):
                stop = min(start + ctx.rows, h.shape[0])
                hs, go = h[start:stop].to(weight.dtype), grad_out[start:stop].to(lse.dtype)
                g = linear(hs, weight).to(lse.dtype).sub_(lse[start:stop, None]).exp_()  # softmax
                g.mul_(-go[:, None])
                g[torch.arange(stop - start, device=g.device), targets[start:stop]] += go  # (one-hot - softmax) go
                g = g.to(weight.dtype)
                if want_h:
                    grad_h[start:stop] = linear(g, weight.t())
                if want_w:
                    grad_w.addmm_(g.t(), hs)
        return grad_h, grad_w, None, None


def head_log_probs(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under the output head, per row: (N,) fp32 from h (N, n_embd) final-norm hidden states.

    For per-sequence log-probabilities (DPO, PPO) without (tokens, vocab) logits kept for backward; a head that
    is a LoRA or quantized layer goes through its module and a plain log-softmax.
    """
    plain = model.config.tie_embeddings or type(model.lm_head) is Linear
    if not plain:
        return torch.log_softmax(model.head(h).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    weight = model.output_weight
    return _HeadLogProbs.apply(h, weight, targets, max(1, SLICE_BYTES // (4 * weight.shape[0])))
