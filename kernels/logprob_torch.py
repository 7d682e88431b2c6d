"""Label log-probabilities under softmax(logits / T) in plain PyTorch: the CPU twin of logprob_triton.py.

Same signatures and math as the Triton path: the forward pass saves the per-row logsumexp and the backward pass
gets the softmax back from it, so no (N, V) tensor of logits is ever built ("full logits -> log_softmax -> gather"
builds one, keeps a second N x V copy for backward and builds two more in backward). logprobs_from_logits works in
chunks of rows like the Triton path; fused_linear_logprobs works in vocabulary blocks of all rows and keeps most
of its forward exp(logits - block max) for backward, which suits a CPU whose time is all matmuls (see the comment
above its class).

With z = logits / T (one row), lse = log sum_v exp(z_v), p_v = exp(z_v - lse):
    logp    = z[y] - lse
    entropy = -sum_v p_v log p_v = lse - sum_v p_v z_v
    d logp / d logits_v = (onehot(y)_v - p_v) / T

Rows whose label is IGNORE_INDEX (-100) give logp = 0, entropy = 0 and no gradient. Math is fp32 for fp32 / bf16 /
fp16 inputs (float64 stays float64, so gradcheck can run on this file).
"""

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = (
    384 * 2**20
)  # default budget for one chunk of logits: 384 MiB (see default_chunk_rows; row-chunked
# paths: logprobs_from_logits here, both ops in logprob_triton.py)


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
        raise ValueError(
            f"{where}: labels[{i}] (flattened) = {int(flat[i])} is outside [0, {vocab}) and not "
            f"{IGNORE_INDEX}"
        )


def check_temperature(temperature, where):
    if not float(temperature) > 0.0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")


def check_fused_inputs(hidden, weight, labels):
    where = "fused_linear_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    check_labels(labels, hidden.shape[0], weight.shape[0], where)


def default_chunk_rows(vocab, elem_size, n_rows, chunk_size=None):
    """Rows per chunk. Default: as many rows as fit CHUNK_BYTES of logits, rounded down to a multiple of 64, at least
    64. A fixed byte budget, independent of N: extra peak memory stays O(chunk x V) however many rows come in.
    Bigger is faster and costs memory linearly: the chunk is the short side of every per-chunk matmul.
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
# (c, V) tensor, and uses few whole-chunk ops: few large ops keep both cores busy (docs/EXPERIMENTS.md, 2026-11-23:
# walking a chunk in small row blocks was slower).


def log_softmax_rows_(z, labels, want_entropy):
    """z (c, V) scaled logits, overwritten by log_softmax(z). labels (c,) valid indices.
    Returns logp (c,) at the labels, lse (c,) and entropy (c,) or None."""
    z_y = z.gather(1, labels[:, None]).squeeze(1)  # (c,) label logit, read before z is overwritten
    # One fused, cache-blocked pass, written into its own input: ATen's CPU kernel finishes reading a row (max,
    # sum of exp) before writing that row, so out=z is safe; the float64 parity tests would catch a change.
    torch.log_softmax(z, dim=1, out=z)
    logp = z.gather(1, labels[:, None]).squeeze(1)  # (c,) log p(label)
    lse = z_y - logp  # lse = z_y - log p_y
    ent = None
    if want_entropy:
        ent = -torch.linalg.vecdot(z.exp(), z)  # H = -sum_v p_v log p_v (one (c, V) temporary)
    return logp, lse, ent


def softmax_rows_(z, lse):
    """z (c, V) scaled logits -> p = exp(z - lse) in place, from the lse saved in forward."""
    return z.sub_(lse[:, None]).exp_()


def softmax_grad_rows_(z, lse, g, labels):
    """z (c, V) scaled logits -> in place G = (onehot(labels) - p) * g.
    lse (c,), g (c,) the upstream gradient already divided by T, labels (c,) valid indices."""
    softmax_rows_(z, lse).mul_(-g[:, None])  # -p * g
    z[torch.arange(z.shape[0], device=z.device), labels] += g  # + onehot * g
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
        valid = labels != IGNORE_INDEX  # (N,)
        y = torch.where(valid, labels, 0)  # (N,) safe index for ignored rows
        rows = default_chunk_rows(V, 4, N)
        buf = torch.empty(rows, V, dtype=dtype, device=logits.device)  # (C, V) fp32 working copy
        logp = torch.empty(N, dtype=dtype, device=logits.device)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=dtype, device=logits.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            z = buf[: j - i]
            z.copy_(logits[i:j])  # upcast to fp32 before scaling
            if temperature != 1.0:
                z.mul_(1.0 / temperature)  # z = logits / T
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
        g = torch.where(valid, grad_logp.to(lse.dtype) * inv_t, 0.0)  # (N,) ignored rows -> 0 gradient
        grad_logits = torch.empty_like(logits)  # (N, V) in the logits' dtype
        same = grad_logits.dtype == lse.dtype
        rows = default_chunk_rows(V, 4, N)
        buf = None if same else torch.empty(rows, V, dtype=lse.dtype, device=logits.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            z = grad_logits[i:j] if same else buf[: j - i]  # work directly in the output if fp32
            z.copy_(logits[i:j])
            if ctx.temperature != 1.0:
                z.mul_(inv_t)
            softmax_grad_rows_(z, lse[i:j], g[i:j], y[i:j])  # (onehot - p) * g / T
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
# fused_linear_logprobs: the logits are never materialized as one (N, V) tensor.
#
# Recompute, not gradient-in-forward: the upstream gradient g_i of each row's log-prob is only known in backward,
# so forward saves lse (N,) and backward needs p again (Liger can do it in forward: its fused op ends in a loss).
# The work is split along the vocabulary: block b holds the logits of all n rows for columns [a, b), so backward
# writes grad_W[a:b] = P_b^T (g h) once per block and frees the block right after. Forward keeps most blocks
# (KEEP_FRACTION, at most KEEP_BYTES) and backward recomputes the rest; why this stays under the peak budget on a
# CPU (glibc maps blocks this large, so a freed block leaves at once) is in bench/README-kernels.md.
# A kept block holds e = exp(z - m_b), not z (m_b (n,) the row max within the block): with c = exp(m_b - lse),
#   P_b W_b = diag(c) (E_b W_b),   P_b^T (g h) = E_b^T (c g h)
# so a kept block costs backward its two matmuls and no pass over the block. A recomputed block gets the same
# bits, so log-probs under no_grad equal those computed with grad bit for bit.
# Only rows with a real label are computed: ignored rows (prompt, padding) are dropped before the matmuls.

KEEP_FRACTION = 0.8  # share of the logits forward may keep for backward ...
KEEP_BYTES = 2**30  # ... but at most 1 GiB (held from forward to backward)
BLOCK_BYTES = 32 * 2**20  # one vocabulary block of logits: the recompute buffer, 32 MiB


def vocab_block_cols(n_rows, vocab, elem_size, chunk_size=None):
    """Columns per vocabulary block (a block holds every row). Default: at least BLOCK_BYTES of logits, rounded up to
    a multiple of 128 columns, so that blocks stay above glibc's largest mmap threshold (32 MiB). chunk_size: the memory of chunk_size full rows, i.e. chunk_size * V logits per block,
    so the argument bounds the same working memory as in the row-chunked Triton path (tests use tiny values to get
    many blocks). fp32, BLOCK_BYTES: N=2048 -> 4096 columns; N=4096 -> 2048 columns."""
    n = max(n_rows, 1)
    if chunk_size is None:
        cols = -(-BLOCK_BYTES // (n * elem_size * 128)) * 128
    else:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        cols = max(1, int(chunk_size) * vocab // n)
    return min(cols, vocab)


def kept_blocks(n_rows, vocab, elem_size, cols):
    """How many of the leading vocabulary blocks forward keeps for backward: KEEP_FRACTION of the logits, or
    CHUNK_BYTES if that is more (small calls keep everything and recompute nothing), at most KEEP_BYTES. Naive holds
    >= 3 (N, V) fp32 tensors at its peak, so 0.8 of one, plus a block, stays under 0.25 of it."""
    budget = min(
        max(KEEP_FRACTION * n_rows * vocab, CHUNK_BYTES / elem_size), KEEP_BYTES / elem_size
    )  # logits
    return min(int(budget // max(n_rows * cols, 1)), -(-vocab // cols))


class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, want_entropy, keep):
        # hidden (N, H), weight (V, H), labels (N,)
        N, H = hidden.shape
        V = weight.shape[0]
        dtype = compute_dtype(hidden)
        esize = torch.finfo(dtype).bits // 8
        rows_idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) rows that have a label
        n = rows_idx.numel()
        h = _scaled(_select_rows(hidden, rows_idx, dtype), temperature)  # (n, H) h / T
        W = weight.to(dtype)  # (V, H) no copy when already fp32
        y = labels[rows_idx]  # (n,)
        cols = vocab_block_cols(n, V, esize, chunk_size)
        blocks = vocab_blocks(V, cols)
        n_keep = kept_blocks(n, V, esize, cols) if keep and n > 0 else 0
        B = len(blocks)
        z_y = torch.zeros(n, dtype=dtype, device=hidden.device)  # (n,) label logit
        lse_b = torch.empty(n, B, dtype=dtype, device=hidden.device)  # (n, B) logsumexp per block
        u_b = torch.empty(n, B if want_entropy else 0, dtype=dtype, device=hidden.device)  # (n, B) E_block[z]
        m_b = torch.empty(n, B, dtype=dtype, device=hidden.device)  # (n, B) row max per block
        buf = torch.empty(n * cols, dtype=dtype, device=hidden.device)  # z of the current block, reused
        scratch = torch.empty(
            n * cols if n_keep < B else 0, dtype=dtype, device=hidden.device
        )  # exp(z - m) of a
        # block not kept, reused
        kept = []
        for k, (a, b) in enumerate(blocks):
            w = b - a
            z = torch.mm(h, W[a:b].T, out=buf[: n * w].view(n, w))  # (n, w) z = h W^T / T, this block
            hit = ((y >= a) & (y < b)).nonzero().squeeze(1)  # rows whose label is in this block
            z_y[hit] = z[hit, y[hit] - a]
            m = torch.amax(z, dim=1)  # (n,)
            # a kept block's e gets its own tensor; the others share scratch (no fresh pages to fault in per block)
            e_out = (
                torch.empty(n, w, dtype=dtype, device=hidden.device)
                if k < n_keep
                else scratch[: n * w].view(n, w)
            )
            e = torch.sub(z, m[:, None], out=e_out).exp_()  # (n, w) exp(z - m)
            s = e.sum(1)  # (n,)
            lse_b[:, k] = m + s.log()
            m_b[:, k] = m
            if want_entropy:
                u_b[:, k] = torch.linalg.vecdot(e, z) / s  # E_block[z] = sum e z / s
            if k < n_keep:
                kept.append(e)
        lse = torch.logsumexp(lse_b, dim=1)  # (n,) over the whole vocabulary
        logp_v = z_y - lse
        logp = _scatter_rows(logp_v, rows_idx, N)
        ent = torch.zeros(0, dtype=dtype, device=hidden.device)
        if want_entropy:  # H = lse - sum_b P(block b) E_block[z]
            ent = _scatter_rows(lse - ((lse_b - lse[:, None]).exp() * u_b).sum(1), rows_idx, N)
        ctx.save_for_backward(hidden, weight, rows_idx, y, lse, m_b)
        ctx.temperature, ctx.cols = temperature, cols
        ctx.kept = kept or None  # [(n, w)] exp(z - m_b) of blocks 0..
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, rows_idx, y, lse, m_b = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, T, cols = lse.dtype, ctx.temperature, ctx.cols
        n, (V, H) = rows_idx.numel(), weight.shape
        kept, ctx.kept = ctx.kept, None  # usable once (retain_graph recomputes)
        h = _select_rows(hidden, rows_idx, dtype)  # (n, H)
        h_t = _scaled(h, T)  # (n, H) h / T, for the recompute
        W = weight.to(dtype)  # (V, H)
        g = grad_logp[rows_idx].to(dtype) / T  # (n,) upstream grad / T
        neg_gh = h * (-g[:, None])  # (n, H) -g h
        grad_h = torch.zeros(n, H, dtype=dtype, device=hidden.device) if need_h else None
        # every row of grad_W is written by exactly one block (so no zero fill, and its pages are touched block by
        # block), unless there are no rows at all
        grad_w = (
            (torch.empty if n > 0 else torch.zeros)(V, H, dtype=dtype, device=hidden.device)
            if need_w
            else None
        )
        kept = kept or []
        c = (m_b - lse[:, None]).exp()  # (n, B) p = exp(z - m_b) * c, per block
        buf = None
        # G = diag(g) (onehot - P). The onehot part and the row scalings (by g, and by c) are applied to (n, H)
        # tensors, so a (n, w) block is only ever e = exp(z - m_b), kept from forward or recomputed:
        #   grad_h = G W   = g * (W[y] - P W),                 P W       = sum_b diag(c_b) (E_b W_b)
        #   grad_W = G^T h = scatter_add(y, g * h) - P^T (g * h),  P_b^T (g h) = E_b^T (c_b g h)
        for k, (a, b) in enumerate(vocab_blocks(V, cols) if n > 0 else []):
            w = b - a
            if k < len(kept):
                E, kept[k] = kept[k], None  # (n, w) exp(z - m_b) kept from forward
            else:
                if buf is None:
                    buf = torch.empty(n * min(cols, V), dtype=dtype, device=hidden.device)
                z = torch.mm(h_t, W[a:b].T, out=buf[: n * w].view(n, w))  # (n, w) recomputed z, same bits
                E = z.sub_(m_b[:, k : k + 1]).exp_()  # (n, w) exp(z - m_b), the same bits
            if need_h:
                grad_h.addcmul_(E @ W[a:b], c[:, k : k + 1])  # += diag(c_b) E_b W_b = P_b W_b
            if need_w:
                torch.mm(
                    E.T, neg_gh * c[:, k : k + 1], out=grad_w[a:b]
                )  # (w, H) -E_b^T (c_b g h) = -P_b^T (g h)
            del E  # a kept block is freed here
        if need_h:
            grad_h.sub_(W[y]).mul_(-g[:, None])  # g * (W[y] - P W)
        if need_w:
            grad_w.index_add_(0, y, g[:, None] * h)  # grad_W[y] += g h
        grad_hidden = _scatter_rows(grad_h, rows_idx, hidden.shape[0]).to(hidden.dtype) if need_h else None
        grad_weight = grad_w.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None, None


def vocab_blocks(vocab, cols):
    """[(a, b), ...] covering range(vocab) in blocks of `cols`, the short one last: 10, 4 -> (0,4) (4,8) (8,10)."""
    return [(a, min(a + cols, vocab)) for a in range(0, vocab, cols)]


def _scaled(h, temperature):
    return h if temperature == 1.0 else h * (1.0 / temperature)  # scale (c, H), cheaper than (c, V)


def _select_rows(x, idx, dtype):
    if idx.numel() == x.shape[0]:
        return x.to(dtype)  # every row labelled: no gather copy
    return x.index_select(0, idx).to(dtype)


def _scatter_rows(x, idx, n_rows):
    if idx.numel() == n_rows:
        return x
    out = x.new_zeros((n_rows,) + tuple(x.shape[1:]))
    return out.index_copy_(0, idx, x)


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, chunk_size=None, return_entropy=False):
    """hidden (N, H), weight (V, H), labels (N,) -> logprobs (N,) float32 [, entropy (N,) float32, detached],
    with logits = hidden @ weight.T / temperature computed one vocabulary block (all rows) at a time
    (default: vocab_block_cols)."""
    check_fused_inputs(hidden, weight, labels)
    check_temperature(temperature, "fused_linear_logprobs")
    keep = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp, ent = FusedLinearLogprobs.apply(
        hidden, weight, labels.reshape(-1).long(), float(temperature), chunk_size, return_entropy, keep
    )
    return (logp, ent) if return_entropy else logp
