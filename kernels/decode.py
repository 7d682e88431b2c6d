"""Faster twins of three calls in the sampler's decode step (a few rows, one new token each, no autograd). Each
computes what the plain PyTorch call beside it computes (tests/test_model.py compares them); why each is faster,
with the measurements: bench/README-generate.md.

    rows_linear(x, weight, bias)           F.linear(x, weight, bias)
    output_logits(h, weight)               F.linear(h, weight).float()
    single_query_attention(q, k, v, mask)  F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True), one query

single_query_attention is the decode step's attention on CUDA too: no key/value repeated per query head and no
fused kernel needed for one query.
"""

import torch
import torch.nn.functional as F

FEW_ROWS = (
    64  # up to this many rows a product takes the rows_linear path (a decode step has one row per completion)
)


def rows_linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias for a few rows, taken as W x^T (N, rows) and transposed back: MKL splits
    this orientation across threads along W's N rows, while x W^T with a few rows gains little from a second thread."""
    x2 = x.reshape(-1, x.shape[-1])  # (rows, K)
    y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias[:, None], weight, x2.t())  # (N, rows)
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., N)


def output_logits(h, weight):
    """(rows, H) final hidden states @ (V, H)^T -> (rows, V) float32 logits. On CPU in float32 by oneDNN's matmul,
    which streams the large output matrix past a few rows faster than MKL's sgemm does; F.linear elsewhere."""
    if (
        h.device.type == "cpu"
        and h.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    ):
        return torch.ops.mkldnn._linear_pointwise(h.contiguous(), weight, None, "none", [], "")
    return F.linear(h, weight).float()


def single_query_attention(q, k, v, mask=None, fp32_scores=False):
    """softmax(q k^T / sqrt(hd) + mask) v for one query per row: q (B, nh, 1, hd), k, v (B, n_kv, S, hd), mask
    additive, broadcastable to (B, 1, 1, S), or None -> (B, nh, 1, hd). The nh / n_kv query heads that share a
    key/value head are the rows of one product, so each cached key and value is read once per step and none is
    repeated. fp32_scores (CUDA, 16-bit inputs): scores and softmax in float32 from bmm's out_dtype, the
    probabilities rounded to v's dtype for the product with v, as the fused SDPA kernels do."""
    B, nh, _, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    qg = q.reshape(
        B, n_kv, nh // n_kv, hd
    )  # query head h reads key/value head h // (nh / n_kv), as SDPA's GQA does
    if fp32_scores:  # bmm's out_dtype overload runs on CUDA only; (B * n_kv, S, hd) is a view of the cache
        kt = k.reshape(B * n_kv, S, hd).transpose(1, 2)
        s = torch.bmm(qg.reshape(B * n_kv, nh // n_kv, hd), kt, out_dtype=torch.float32).view(B, n_kv, -1, S)
    else:
        s = torch.matmul(qg, k.transpose(-1, -2))  # (B, n_kv, nh / n_kv, S)
    s = s * hd**-0.5
    if mask is not None:
        s = s + mask
    return torch.matmul(s.softmax(-1).to(v.dtype), v).reshape(B, nh, 1, hd)
