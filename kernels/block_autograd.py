"""Memory-lean autograd for the elementwise pieces of a transformer block (PyTorch, any device).

Autograd of the plain expressions (model.rms_norm, model.rope, model.swiglu: the readable reference) keeps every
intermediate that gets multiplied: x * r in RMSNorm, q and rotate_half(q) in the rotary embedding, silu(gate) in
SwiGLU, and silu(gate) * up again as the down projection's input. The Functions below keep only their inputs (and
r, one number per token) and redo that cheap elementwise work in backward. Same math as the plain expressions:
tests/test_model.py compares them in float64 and counts what each keeps for backward.
"""

import torch
import torch.nn.functional as F


class RMSNormFn(torch.autograd.Function):
    """y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), in float32 like the reference implementations.
    Backward with n = x * r and dn = dy * w:  dw = sum(dy * n),  dx = r * (dn - n * mean(dn * n))."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; float64 stays (gradcheck)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.to(r.dtype) * r  # (..., D) recomputed
        dyf = dy.to(r.dtype)
        dw = (dyf * n).reshape(-1, n.shape[-1]).sum(0)  # (D,)
        dn = dyf * weight.to(r.dtype)
        dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw.to(weight.dtype), None


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_half_transposed(u):
    """The transpose of rotate_half: (u1, u2) -> (u2, -u1)."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat([u2, -u1], dim=-1)


class RotaryFn(torch.autograd.Function):
    """y = x * cos + rotate_half(x) * sin, a rotation of each pair (x_i, x_{i+d/2}) by its position's angle.
    Linear in x, so backward needs only cos and sin: dx = dy * cos + rotate_half^T(dy * sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return dy * cos + rotate_half_transposed(dy * sin), None, None


class SwiGLUFn(torch.autograd.Function):
    """h = silu(g) * u with silu(g) = g * sigmoid(g). Keeps g and u only (not silu(g)); with s = sigmoid(g):
    du = dh * g * s,  dg = dh * u * s * (1 + g * (1 - s))."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        return dh * u * s * (1 + g * (1 - s)), dh * g * s


class SwiGLUDownFn(torch.autograd.Function):
    """y = h W^T with h = silu(g) * u: SwiGLU and the down projection in one Function, so that h, the down
    projection's input (as many floats per token as g or u), is not kept for backward: backward rebuilds it with
    one multiply, as silu(g) = g * s is needed for du anyway. With s = sigmoid(g) and dh = dy W:
    dW = dy^T h,  du = dh * g * s,  dg = dh * u * s * (1 + g (1 - s))."""

    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        return F.linear(F.silu(g) * u, weight)  # (..., I) -> (..., H)

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        s = torch.sigmoid(g)
        gs = g * s  # silu(g), recomputed
        dw = None
        if ctx.needs_input_grad[2]:
            h = gs * u  # (..., I) recomputed down-projection input
            dw = dy.reshape(-1, dy.shape[-1]).T @ h.reshape(-1, h.shape[-1])  # (H, I)
            del h
        dh = dy @ weight  # (..., I)
        return dh * u * s * (1 + g * (1 - s)), dh * gs, dw


def rms_norm(x, weight, eps):
    return RMSNormFn.apply(x, weight, eps)


def rope(x, cos, sin):
    return RotaryFn.apply(x, cos, sin)


def swiglu(g, u):
    return SwiGLUFn.apply(g, u)


def swiglu_down(g, u, weight):
    return SwiGLUDownFn.apply(g, u, weight)
