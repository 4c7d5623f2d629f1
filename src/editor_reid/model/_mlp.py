"""A transformer MLP that keeps less for its backward pass, with the same gradients.

``fc2(gelu(fc1(x)))`` under autograd saves three tensors: ``x`` (for fc1's weight gradient),
``h = fc1(x)`` (for GELU's gradient) and ``gelu(h)`` (for fc2's weight gradient), the last two
four times as wide as the tokens. :func:`gelu_mlp` saves ``x`` and ``h`` only and recomputes
``gelu(h)`` in the backward pass: one elementwise op, against a quarter or more of a ViT block's
saved activations (benchmarks/bench_saved.py). The forward runs the same ops as the plain MLP,
so its output is bit-identical; the backward uses autograd's own formulas (``gelu_backward``,
the matmuls of ``linear``'s backward), so the gradients equal the plain MLP's to float rounding
(tests/test_lean_mlp.py). Under autocast it computes the backward in the dtype the forward's
matmuls ran in, as autocast's casts would, and returns gradients in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gelu_mlp"]


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        out = F.linear(F.gelu(h), w2, b2)
        # What autocast's fc1 saved: its input in the dtype fc1 ran in (a cast copy, or x itself).
        ctx.save_for_backward(x.to(h.dtype), h, w1, w2)
        ctx.x_dtype = x.dtype
        ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, w1, w2 = ctx.saved_tensors
        dtype = h.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # [T, D_out]
        h2 = h.reshape(-1, h.shape[-1])  # [T, H]
        grad_w1 = grad_b1 = grad_w2 = grad_b2 = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_w2 = (g.t() @ F.gelu(h2)).to(w2.dtype)
        if ctx.needs_input_grad[4]:
            grad_b2 = g.sum(0).to(ctx.bias_dtypes[1])
        if any(ctx.needs_input_grad[:3]):
            grad_h = torch.ops.aten.gelu_backward(g @ w2.to(dtype), h2)
            if ctx.needs_input_grad[1]:
                grad_w1 = (grad_h.t() @ x.reshape(-1, x.shape[-1])).to(w1.dtype)
            if ctx.needs_input_grad[2]:
                grad_b1 = grad_h.sum(0).to(ctx.bias_dtypes[0])
            if ctx.needs_input_grad[0]:
                grad_x = (grad_h @ w1.to(dtype)).reshape(x.shape).to(ctx.x_dtype)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` (exact GELU), keeping ``x`` and ``fc1(x)`` for the backward pass
    but not ``gelu(fc1(x))``: x [..., D] -> [..., D_out]."""
    return _GeluMlp.apply(x, w1, b1, w2, b2)
