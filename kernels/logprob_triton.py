"""Label log-probabilities under softmax(logits / T) with Triton kernels: one read of each logits row forward,
one read and one write backward, fp32 math on fp32 or bf16 logits.

With z = logits / T (one row), lse = log sum_v exp(z_v), p_v = exp(z_v - lse):
    logp    = z[y] - lse
    entropy = lse - sum_v p_v z_v
    d logp / d logits_v = (onehot(y)_v - p_v) / T

Forward (_logprob_fwd_kernel), one program per row: stream the row in BLOCK_V blocks keeping a running max m,
s = sum exp(z - m) and t = sum exp(z - m) (z - m); when the max grows from m to m', both are rescaled by
a = exp(m - m'):  s' = a s,  t' = a (t + s (m - m')). At the end lse = m + log s and entropy = log s - t / s.
Only lse (4 bytes per row) is saved for backward.
Backward (_logprob_bwd_kernel), one program per (row, vocab block): p = exp(z - lse) recomputed from the saved lse,
grad = (onehot - p) * g / T, written in the logits' dtype (into a new tensor, or in place over a scratch chunk).
Rows labelled -100 write 0 and do no work.

The PyTorch twin (logprob_torch.py) has the same signatures and math (its fused op works in vocabulary blocks, for
CPU reasons); see it for the recompute rationale.
"""

import torch
import triton
import triton.language as tl

from .logprob_torch import (
    IGNORE_INDEX,
    _scatter_rows,
    check_fused_inputs,
    check_labels,
    check_temperature,
    default_chunk_rows,
)

# Launch parameters, chosen for an H100 on V = 151936 bf16 logits (memory bound: a row is 297 KiB):
# - forward: 4096-wide blocks, 8 warps -> 16 elements per thread per step (two 16-byte bf16 loads), 38 steps per
#   row, one exp per element (the block max is reduced first, so old sums are rescaled once per block, not per
#   element: two exps per element would approach the SFU limit at 3.35 TB/s), one program per row; with N in the
#   thousands there are many programs per SM to hide latency.
# - backward: no reduction, so a 2-D grid (row, block) with 4096-wide blocks: 38 x N programs, no loop.
FWD_BLOCK_V = 4096
BWD_BLOCK_V = 4096
NUM_WARPS = 8


def interpreting():
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_logprob_fwd_kernel, triton.runtime.jit.JITFunction)


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    stride_row,
    V,
    inv_t,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 at real sizes
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == IGNORE:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WANT_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
    else:
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], -1e30, tl.float32)  # running max (finite start: s * (m - m') stays 0 * finite)
        s = tl.zeros([], tl.float32)  # sum exp(z - m)
        t = tl.zeros([], tl.float32)  # sum exp(z - m) * (z - m)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t  # (BLOCK_V,)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            a = tl.exp(m - m_new)  # rescale factor for the old sums
            e = tl.exp(z - m_new)  # 0 on masked lanes
            if WANT_ENTROPY:
                d = tl.where(e > 0.0, z - m_new, 0.0)  # guard 0 * -inf on masked lanes / -inf logits
                t = a * (t + s * (m - m_new)) + tl.sum(e * d, axis=0)
            s = s * a + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        z_y = tl.load(base + label).to(tl.float32) * inv_t
        tl.store(logp_ptr + row, z_y - lse)
        tl.store(lse_ptr + row, lse)
        if WANT_ENTROPY:
            tl.store(ent_ptr + row, log_s - t / s)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_ptr,
    out_ptr,
    stride_in,
    stride_out,
    V,
    inv_t,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = out_ptr + row * stride_out + offs
    if label == IGNORE:
        tl.store(out, tl.zeros([BLOCK_V], out_ptr.dtype.element_ty), mask=mask)
    else:
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_ptr + row).to(tl.float32) * inv_t  # upstream grad / T
        z = tl.load(logits_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        grad = (tl.where(offs == label, 1.0, 0.0) - p) * g  # (onehot - p) * g / T
        # round to nearest even (the GPU default; said explicitly so the interpreter does not truncate)
        tl.store(out, grad.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def _block(V, block):
    return min(block, triton.next_power_of_2(V))


def logprob_forward(logits, labels, inv_t, want_entropy):
    """logits (N, V) with unit stride along V, labels (N,) -> logp, lse, entropy (N,) fp32 (entropy empty if not
    wanted)."""
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    ent = torch.empty(N if want_entropy else 1, dtype=torch.float32, device=logits.device)
    if N > 0:
        _logprob_fwd_kernel[(N,)](
            logits,
            labels,
            logp,
            lse,
            ent,
            logits.stride(0),
            V,
            inv_t,
            IGNORE=IGNORE_INDEX,
            BLOCK_V=_block(V, FWD_BLOCK_V),
            WANT_ENTROPY=want_entropy,
            num_warps=NUM_WARPS,
        )
    return logp, lse, ent[:N] if want_entropy else ent[:0]


def logprob_backward(logits, labels, lse, grad_logp, inv_t, out):
    """Writes (onehot - p) * grad_logp / T into out (N, V); out may be logits itself (in place)."""
    N, V = logits.shape
    if N > 0:
        block = _block(V, BWD_BLOCK_V)
        _logprob_bwd_kernel[(N, triton.cdiv(V, block))](
            logits,
            labels,
            lse,
            grad_logp,
            out,
            logits.stride(0),
            out.stride(0),
            V,
            inv_t,
            IGNORE=IGNORE_INDEX,
            BLOCK_V=block,
            num_warps=NUM_WARPS,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# logprobs_from_logits


class LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, want_entropy):
        logp, lse, ent = logprob_forward(logits, labels, 1.0 / temperature, want_entropy)
        ctx.save_for_backward(logits, labels, lse)
        ctx.inv_t = 1.0 / temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # not in place: the caller may still hold the logits
        logprob_backward(logits, labels, lse, grad_logp.float().contiguous(), ctx.inv_t, grad_logits)
        return grad_logits, None, None, None


def logprobs_from_logits(logits, labels, temperature=1.0, return_entropy=False):
    """logits (..., V), labels (...) -> logprobs (...) float32 [, entropy (...) float32, detached]."""
    check_temperature(temperature, "logprobs_from_logits")
    V = logits.shape[-1]
    check_labels(labels, logits.numel() // max(V, 1), V, "logprobs_from_logits")
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    logp, ent = LogprobsFromLogits.apply(
        flat, labels.reshape(-1).long().contiguous(), float(temperature), return_entropy
    )
    if return_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_logprobs: per chunk of rows, logits = h W^T by a torch matmul (tensor cores), then the kernels above
# on that chunk. Recompute in backward, not gradient-in-forward (the reason is in logprob_torch.py). The backward
# kernel writes the chunk's gradient in place over its recomputed logits, so one (chunk, V) buffer serves both.
# Matmuls run in the weight's dtype (bf16 on GPU: fp32 accumulation inside the GEMM); grad_weight is accumulated
# across chunks in fp32 (an extra V x H fp32 buffer when the weight is bf16, O(V H), not O(N V)).


class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, want_entropy):
        N, V = hidden.shape[0], weight.shape[0]
        rows_idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) rows with a label
        n = rows_idx.numel()
        h = _rows_in(hidden, rows_idx, weight.dtype)  # (n, H)
        y = labels[rows_idx].contiguous()  # (n,)
        rows = default_chunk_rows(V, weight.element_size(), max(n, 1), chunk_size)
        inv_t = 1.0 / temperature
        logp_v = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent_v = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=hidden.device)
        buf = torch.empty(
            min(rows, n), V, dtype=weight.dtype, device=hidden.device
        )  # (C, V) reused per chunk
        for i in range(0, n, rows):
            j = min(i + rows, n)
            logits = torch.mm(h[i:j], weight.T, out=buf[: j - i])  # (c, V)
            logp_v[i:j], lse[i:j], ent_c = logprob_forward(logits, y[i:j], inv_t, want_entropy)
            if want_entropy:
                ent_v[i:j] = ent_c
        logp = _scatter_rows(logp_v, rows_idx, N)
        ent = _scatter_rows(ent_v, rows_idx, N) if want_entropy else ent_v
        ctx.save_for_backward(hidden, weight, rows_idx, y, lse)
        ctx.inv_t, ctx.rows = inv_t, rows
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, rows_idx, y, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        n, (V, H), rows = rows_idx.numel(), weight.shape, ctx.rows
        h = _rows_in(hidden, rows_idx, weight.dtype)  # (n, H)
        g = grad_logp[rows_idx].float().contiguous()  # (n,) upstream grad
        grad_h = torch.empty(n, H, dtype=weight.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if need_w else None
        buf = torch.empty(min(rows, n), V, dtype=weight.dtype, device=hidden.device)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            logits = torch.mm(h[i:j], weight.T, out=buf[: j - i])  # (c, V) recomputed
            G = logprob_backward(logits, y[i:j], lse[i:j], g[i:j], ctx.inv_t, out=logits)  # (c, V) in place
            if need_h:
                torch.mm(G, weight, out=grad_h[i:j])  # (c, H) grad_h = G W
            if need_w and weight.dtype == torch.float32:
                grad_w.addmm_(G.T, h[i:j])  # (V, H) grad_W += G^T h
            elif need_w:
                grad_w += G.T @ h[i:j]  # bf16 GEMM (fp32 inside), fp32 sum
        grad_hidden = _scatter_rows(grad_h, rows_idx, hidden.shape[0]).to(hidden.dtype) if need_h else None
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None


def _rows_in(x, idx, dtype):
    x = x if idx.numel() == x.shape[0] else x.index_select(0, idx)
    return x.to(dtype).contiguous()


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, chunk_size=None, return_entropy=False):
    """hidden (N, H), weight (V, H), labels (N,) -> logprobs (N,) float32 [, entropy (N,) float32, detached],
    with logits = hidden @ weight.T / temperature computed chunk_size rows at a time (default: default_chunk_rows)."""
    check_fused_inputs(hidden, weight, labels)
    check_temperature(temperature, "fused_linear_logprobs")
    logp, ent = FusedLinearLogprobs.apply(
        hidden, weight, labels.reshape(-1).long(), float(temperature), chunk_size, return_entropy
    )
    return (logp, ent) if return_entropy else logp
