"""Label log-probabilities under softmax(logits / T) in plain PyTorch: the CPU twin of logprob_triton.py.

Same signatures and the same algorithm as the Triton path: rows are processed one chunk at a time, the forward pass
keeps only the per-row logsumexp, and the backward pass recomputes the softmax from it. Extra peak memory is
O(chunk x V) instead of the O(N x V) of "full logits -> log_softmax -> gather" (which also keeps a second N x V copy
for backward and builds two more in backward).

With z = logits / T (one row), lse = log sum_v exp(z_v), p_v = exp(z_v - lse):
    logp    = z[y] - lse
    entropy = -sum_v p_v log p_v = lse - sum_v p_v z_v
    d logp / d logits_v = (onehot(y)_v - p_v) / T

Rows whose label is IGNORE_INDEX (-100) give logp = 0, entropy = 0 and no gradient. Math is fp32 for fp32 / bf16 /
fp16 inputs (float64 stays float64, so gradcheck can run on this file).
"""
import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 384 * 2**20  # default budget for one chunk of logits: 384 MiB (see default_chunk_rows)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and sizes (shared with logprob_triton.py)

def compute_dtype(t):
    """fp32 math for fp32 / bf16 / fp16 inputs; float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_labels(labels, n_rows, vocab, where):
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: labels must be int64 or int32, got {labels.dtype}")
    if labels.numel() != n_rows:
        raise ValueError(f"{where}: labels has {labels.numel()} entries but there are {n_rows} rows")
    flat = labels.reshape(-1)
    bad = ((flat < 0) & (flat != IGNORE_INDEX)) | (flat >= vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: labels[{i}] (flattened) = {int(flat[i])} is outside [0, {vocab}) and not "
                         f"{IGNORE_INDEX}")


def check_temperature(temperature, where):
    if not float(temperature) > 0.0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")


def check_fused_inputs(hidden, weight, labels):
    where = "fused_linear_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    check_labels(labels, hidden.shape[0], weight.shape[0], where)


def default_chunk_rows(vocab, elem_size, n_rows, chunk_size=None):
    """Rows per chunk. Default: as many rows as fit CHUNK_BYTES of logits, rounded down to a multiple of 64, at least
    64. A fixed byte budget, independent of N: extra peak memory stays O(chunk x V) however many rows come in.
    Bigger is faster and costs memory linearly: the chunk is the short side of every per-chunk matmul (on this CPU,
    H=896 V=151936: 192 rows ran ~35 GFLOP/s, 384-768 rows ~50-58 GFLOP/s), and the last chunk, kept for backward,
    skips its recompute. 384 MiB keeps both bench sizes at about 0.2 of the naive peak (target 0.25).
    fp32: V=49152 -> 2048 rows; V=151936 -> 640 rows (371 MiB); bf16: V=151936 -> 1280 rows."""
    if chunk_size is None:
        rows = max(64, CHUNK_BYTES // (vocab * elem_size) // 64 * 64)
    else:
        rows = int(chunk_size)
        if rows < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk row math. Each function overwrites the chunk `z` (c, V) in place, so a chunk never needs a second
# (c, V) tensor, and uses few whole-chunk ops. (Walking a chunk in L2-sized row blocks was tried: thousands of small
# parallel ops, each waiting for the other core on a shared 2-core machine; slower here.)

def log_softmax_rows_(z, labels, want_entropy):
    """z (c, V) scaled logits, overwritten by log_softmax(z). labels (c,) valid indices.
    Returns logp (c,) at the labels, lse (c,) and entropy (c,) or None."""
    z_y = z.gather(1, labels[:, None]).squeeze(1)            # (c,) label logit, read before z is overwritten
    # One fused, cache-blocked pass, written into its own input: ATen's CPU kernel finishes reading a row (max,
    # sum of exp) before writing that row, so out=z is safe; the float64 parity tests would catch a change.
    torch.log_softmax(z, dim=1, out=z)
    logp = z.gather(1, labels[:, None]).squeeze(1)           # (c,) log p(label)
    lse = z_y - logp                                         # lse = z_y - log p_y
    ent = None
    if want_entropy:
        ent = -torch.linalg.vecdot(z.exp(), z)               # H = -sum_v p_v log p_v (one (c, V) temporary)
    return logp, lse, ent


def softmax_rows_(z, lse):
    """z (c, V) scaled logits -> p = exp(z - lse) in place, from the lse saved in forward."""
    return z.sub_(lse[:, None]).exp_()


def softmax_grad_rows_(z, lse, g, labels):
    """z (c, V) scaled logits -> in place G = (onehot(labels) - p) * g.
    lse (c,), g (c,) the upstream gradient already divided by T, labels (c,) valid indices."""
    softmax_rows_(z, lse).mul_(-g[:, None])                                   # -p * g
    z[torch.arange(z.shape[0], device=z.device), labels] += g                 # + onehot * g
    return z


# ----------------------------------------------------------------------------------------------------------------
# logprobs_from_logits: logits already exist; chunking only bounds the fp32 working copy and lets us skip the
# second N x V tensor that log_softmax would keep.

class LogprobsFromLogits(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, labels, temperature, want_entropy):
        # logits (N, V), labels (N,)
        N, V = logits.shape
        dtype = compute_dtype(logits)
        valid = labels != IGNORE_INDEX                                       # (N,)
        y = torch.where(valid, labels, 0)                                    # (N,) safe index for ignored rows
        rows = default_chunk_rows(V, 4, N)
        buf = torch.empty(rows, V, dtype=dtype, device=logits.device)       # (C, V) fp32 working copy
        logp = torch.empty(N, dtype=dtype, device=logits.device)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=dtype, device=logits.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            z = buf[:j - i]
            z.copy_(logits[i:j])                                             # upcast to fp32 before scaling
            if temperature != 1.0:
                z.mul_(1.0 / temperature)                                    # z = logits / T
            logp[i:j], lse[i:j], ent_c = log_softmax_rows_(z, y[i:j], want_entropy)
            if want_entropy:
                ent[i:j] = ent_c
        logp.masked_fill_(~valid, 0.0)
        if want_entropy:
            ent.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, y, valid, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, y, valid, lse = ctx.saved_tensors
        N, V = logits.shape
        inv_t = 1.0 / ctx.temperature
        g = torch.where(valid, grad_logp.to(lse.dtype) * inv_t, 0.0)         # (N,) ignored rows -> 0 gradient
        grad_logits = torch.empty_like(logits)                               # (N, V) in the logits' dtype
        same = grad_logits.dtype == lse.dtype
        rows = default_chunk_rows(V, 4, N)
        buf = None if same else torch.empty(rows, V, dtype=lse.dtype, device=logits.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            z = grad_logits[i:j] if same else buf[:j - i]                    # work directly in the output if fp32
            z.copy_(logits[i:j])
            if ctx.temperature != 1.0:
                z.mul_(inv_t)
            softmax_grad_rows_(z, lse[i:j], g[i:j], y[i:j])                 # (onehot - p) * g / T
            if not same:
                grad_logits[i:j].copy_(z)
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
    logp, ent = LogprobsFromLogits.apply(flat, labels.reshape(-1).long(), float(temperature), return_entropy)
    if return_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_logprobs: the logits are never materialized beyond one chunk.
#
# Recompute, not gradient-in-forward: the output is a per-row log-prob whose upstream gradient g_i is only known in
# backward, and d/dW = sum_i g_i (onehot_i - p_i)^T h_i / T mixes rows with those unknown weights, so it cannot be
# precomputed without keeping (N, V) numbers. (Liger can compute gradients in forward because its fused op ends in
# a scalar loss.) So forward saves lse (N,) only, and backward recomputes each chunk's logits with one extra matmul.
# The forward alone (old / reference log-probs under no_grad) costs one matmul, like the naive path.
# One recompute is saved: when a backward will follow, the last chunk's log-softmax stays in the chunk buffer (which
# lives until backward instead of being freed; the backward needs one anyway, so this op's peak does not grow, but
# a training step holds that chunk, up to CHUNK_BYTES, between its forward and backward) and backward starts from it. Chunks are laid out with the short one first so the kept chunk is a full one.
#
# Only rows with a real label are computed: ignored rows (prompt, padding) are dropped before the matmuls.

class FusedLinearLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, want_entropy, keep_last):
        # hidden (N, H), weight (V, H), labels (N,)
        N, H = hidden.shape
        V = weight.shape[0]
        dtype = compute_dtype(hidden)
        rows_idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)             # (n,) rows that have a label
        n = rows_idx.numel()
        h = _select_rows(hidden, rows_idx, dtype)                            # (n, H)
        W = weight.to(dtype)                                                 # (V, H) no copy when already fp32
        y = labels[rows_idx]                                                 # (n,)
        rows = default_chunk_rows(V, torch.finfo(dtype).bits // 8, max(n, 1), chunk_size)
        logp_v = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        ent_v = torch.empty(n if want_entropy else 0, dtype=dtype, device=hidden.device)
        buf = torch.empty(min(rows, n), V, dtype=dtype, device=hidden.device)  # (C, V) reused by every chunk
        for i, j in chunk_bounds(n, rows):
            z = torch.mm(_scaled(h[i:j], temperature), W.T, out=buf[:j - i])  # (c, V) z = h W^T / T
            logp_v[i:j], lse[i:j], ent_c = log_softmax_rows_(z, y[i:j], want_entropy)
            if want_entropy:
                ent_v[i:j] = ent_c
        logp = _scatter_rows(logp_v, rows_idx, N)
        ent = _scatter_rows(ent_v, rows_idx, N) if want_entropy else ent_v
        ctx.save_for_backward(hidden, weight, rows_idx, y, lse)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.kept = z if keep_last and n > 0 else None                        # (c, V) last chunk's log-softmax
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, rows_idx, y, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, T, rows = lse.dtype, ctx.temperature, ctx.rows
        n, (V, H) = rows_idx.numel(), weight.shape
        h = _select_rows(hidden, rows_idx, dtype)                            # (n, H)
        W = weight.to(dtype)                                                 # (V, H)
        g = grad_logp[rows_idx].to(dtype) / T                                # (n,) upstream grad / T
        grad_h = torch.empty(n, H, dtype=dtype, device=hidden.device) if need_h else None
        # fp32 accumulator; the first chunk writes it (so no zero fill), unless there is no chunk at all
        grad_w = (torch.empty if n > 0 else torch.zeros)(V, H, dtype=dtype, device=hidden.device) if need_w else None
        kept, ctx.kept = ctx.kept, None                                      # usable once (retain_graph reruns)
        buf = kept if kept is not None else torch.empty(min(rows, n), V, dtype=dtype, device=hidden.device)
        # G = diag(g) (onehot - P) with g = upstream grad / T. The onehot part and the row scaling by g are applied
        # to (c, H) tensors, so the (c, V) chunk only sees the recompute and p = exp(z - lse) (sub, exp):
        #   grad_h = G W   = g * (W[y] - P W)
        #   grad_W = G^T h = scatter_add(y, g * h) - P^T (g * h)
        for k, (i, j) in enumerate(reversed(chunk_bounds(n, rows))):       # last chunk first: it may be kept
            h_c, y_c, g_c = h[i:j], y[i:j], g[i:j, None]                    # (c, H), (c,), (c, 1)
            if k == 0 and kept is not None:
                P = kept.exp_()                                              # (c, V) p = exp(log p), no recompute
            else:
                z = torch.mm(_scaled(h_c, T), W.T, out=buf[:j - i])          # (c, V) recomputed logits / T
                P = softmax_rows_(z, lse[i:j])                               # (c, V) softmax, in place
            if need_h:
                gh = torch.mm(P, W, out=grad_h[i:j])                         # (c, H) P W
                gh.sub_(W[y_c]).mul_(-g_c)                                   # g * (W[y] - P W)
            if need_w:
                gh_w = h_c * (-g_c)                                          # (c, H) -g * h
                if k == 0:
                    torch.mm(P.T, gh_w, out=grad_w)                          # (V, H) grad_W = -P^T (g h)
                else:
                    grad_w.addmm_(P.T, gh_w)                                 # grad_W -= P^T (g h)
        if need_w:
            grad_w.index_add_(0, y, g[:, None] * h)                          # grad_W[y] += g h (once, all rows)
        grad_hidden = _scatter_rows(grad_h, rows_idx, hidden.shape[0]).to(hidden.dtype) if need_h else None
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None, None


def chunk_bounds(n, rows):
    """[(i, j), ...] covering range(n) in chunks of `rows`, the short chunk first: 10, 4 -> (0,2) (2,6) (6,10)."""
    first = n - (max(n - 1, 0) // rows) * rows
    return [(0, first)] + [(i, i + rows) for i in range(first, n, rows)] if n > 0 else []


def _scaled(h, temperature):
    return h if temperature == 1.0 else h * (1.0 / temperature)             # scale (c, H), cheaper than (c, V)


def _select_rows(x, idx, dtype):
    if idx.numel() == x.shape[0]:
        return x.to(dtype)                                                   # every row labelled: no gather copy
    return x.index_select(0, idx).to(dtype)


def _scatter_rows(x, idx, n_rows):
    if idx.numel() == n_rows:
        return x
    out = x.new_zeros((n_rows,) + tuple(x.shape[1:]))
    return out.index_copy_(0, idx, x)


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, chunk_size=None, return_entropy=False):
    """hidden (N, H), weight (V, H), labels (N,) -> logprobs (N,) float32 [, entropy (N,) float32, detached],
    with logits = hidden @ weight.T / temperature computed chunk_size rows at a time (default: default_chunk_rows)."""
    check_fused_inputs(hidden, weight, labels)
    check_temperature(temperature, "fused_linear_logprobs")
    keep_last = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp, ent = FusedLinearLogprobs.apply(hidden, weight, labels.reshape(-1).long(), float(temperature), chunk_size,
                                          return_entropy, keep_last)
    return (logp, ent) if return_entropy else logp
