"""The sampler: G completions per prompt from a KV cache, each prompt prefilled once, for training and eval.py.

    KVCache      preallocated keys and values per layer; rows compact in place; static: fixed shapes for CUDA graphs
    row_uniforms one seeded uniform per (row, step): a row's tokens depend on its seed, not on its batch
    sample_next  temperature, top-k, top-p by inverse CDF; the token's log-prob under softmax(logits / T)
    generate     prefill the N prompts into their G rows each, decode until EOS or a stop string
                 (kernels/stop_strings.py, matched on token ids); two loops over one step function (_step):
                 eager (the CPU's default): finished rows leave the batch at once, attention reads the filled cache;
                 fixed shapes (static, CUDA's default and --compile's): finished rows masked, the host looking
                 every STATIC_CHECK_EVERY steps, compaction only into batch_sizes(rows), attention over the whole
                 zero-filled cache under a mask kept in place; compile=True compiles _step (CUDA graphs on CUDA)

The log-probs the trainer recomputes for the same tokens are logprobs.py's; the model itself is model.py's.
"""

import torch
import torch.nn.functional as F

from kernels import decode
from kernels.stop_strings import StopStrings


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, S_max, hd), filled left to right; rows share one length
    because prompts are left-padded to the same length. Preallocation avoids a torch.cat per token per layer.

    The live rows are the first `rows` of the allocation: compaction (select_rows) moves them there in place.
    Eager (static=False): `length` is a host int and append returns the filled part, (rows, n_kv, length + T, hd).
    Static (static=True, fixed shapes for CUDA graphs): zero-filled (masked keys and values must be finite, as
    0 * value enters the attention sum), `length` is a (1,) long tensor on the device that forward advances in
    place, and append writes there and returns the whole (rows, n_kv, S_max, hd): the shapes do not change as
    decoding goes on, and the mask hides what is not filled."""

    def __init__(self, cfg, batch: int, max_len: int, dtype, device, static: bool = False):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        alloc = torch.zeros if static else torch.empty
        self.k = [alloc(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [alloc(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.rows, self.static = batch, static
        self.length = torch.zeros(1, dtype=torch.long, device=device) if static else 0

    def append(self, layer, k, v):
        n, T = self.rows, k.shape[2]
        if self.static:  # device-side position: no host int, so one captured graph serves every step
            at = self.length + torch.arange(T, device=k.device) if T > 1 else self.length  # (T,)
            self.k[layer][:n].index_copy_(2, at, k)
            self.v[layer][:n].index_copy_(2, at, v)
            return self.k[layer][:n], self.v[layer][:n]
        self.k[layer][:n, :, self.length : self.length + T] = k
        self.v[layer][:n, :, self.length : self.length + T] = v
        return self.k[layer][:n, :, : self.length + T], self.v[layer][:n, :, : self.length + T]

    def prefill(self, group: int):
        """A cache view for the prefill of rows / group prompts whose append writes each prompt's keys and values
        into its `group` rows directly: no prompt-sized cache, no copy of it."""
        return _GroupPrefill(self, group)

    def select_rows(self, keep: torch.Tensor, filled: int):
        """Move the rows `keep` (ascending, n of them) to the first n rows, in place, over the first `filled`
        positions: a temporary of one layer's filled part, never a second cache."""
        n = len(keep)
        for c in self.k + self.v:
            c[:n, :, :filled] = c[keep, :, :filled]
        self.rows = n


class _GroupPrefill:
    """KVCache.prefill's view: keys/values (N, n_kv, T, hd) of N prompts -> each into rows i*G .. i*G+G-1."""

    def __init__(self, cache, group):
        self.cache, self.group, self.length = cache, group, 0

    def append(self, layer, k, v):
        N, n_kv, T, hd = k.shape
        out = []
        for c, x in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            grouped = c[: N * self.group].view(N, self.group, n_kv, c.shape[2], hd)
            grouped[:, :, :, :T] = x[:, None]  # (N, G, n_kv, T, hd) <- (N, 1, n_kv, T, hd)
            out.append(
                grouped[:, 0, :, :T]
            )  # (N, n_kv, T, hd): the prompts' attention reads the cache as before
        return out


def row_uniforms(seed: int, rows: int, steps: int, first_row: int = 0) -> torch.Tensor:
    """One uniform per (row, step) from a generator seeded by (seed, row): a row's samples depend only on its own
    seed and logits, not on which other rows share the batch, so the prefill-once group path and G separate
    prefills draw the same tokens. first_row: the place of row 0 in the global batch, so a batch split over
    processes draws what one process drawing all of it would."""
    u = torch.empty(rows, steps)
    g = torch.Generator()
    for r in range(rows):
        g.manual_seed((seed * 1_000_003 + first_row + r) % (2**63))
        u[r] = torch.rand(steps, generator=g)
    return u


TOP_P_CANDIDATES = (
    1024  # top-p looks at the k most likely tokens first: a full-vocabulary sort is much slower
)


def nucleus(probs, top_p):
    """The top-p candidates of each row: probabilities sorted descending (B, k), zero past the nucleus, and their
    token ids (B, k). A token is dropped when the tokens more likely than it already hold top_p of the mass.
    Exact: the k most likely tokens are enough whenever they hold top_p of the mass; otherwise sort everything."""
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    cand_p, cand_ids = probs.topk(k, dim=-1)  # (B, k), sorted descending
    if k < probs.shape[-1] and bool((cand_p.sum(-1) < top_p).any()):
        cand_p, cand_ids = probs.sort(dim=-1, descending=True)
    drop = cand_p.cumsum(-1) - cand_p >= top_p  # keeps at least the most likely token
    return cand_p.masked_fill(drop, 0.0), cand_ids


def inverse_cdf(w, u, block=1024):
    """Per row, the first index at which the running sum of w reaches u * sum(w) (u = 0: the first w > 0), so never
    an index with w = 0: w (B, n) >= 0, u (B,) in [0, 1) -> (B,). Two levels, the sums of blocks of w and then the
    running sum inside the one block that holds the crossing, in float64: a running sum over the whole vocabulary
    is a sequential loop, the slowest op of a sampling step."""
    B, n = w.shape
    nb = -(-n // block)
    wb = (F.pad(w, (0, nb * block - n)) if nb * block > n else w).view(
        B, nb, block
    )  # zero weight: never picked
    ends = wb.sum(-1).double().cumsum(-1)  # (B, nb) running sum at each block's end
    target = (u.double() * ends[:, -1]).clamp(min=torch.finfo(torch.float64).tiny)[:, None]  # (B, 1)
    b = torch.searchsorted(ends, target).clamp(max=nb - 1)  # (B, 1) the block where the sum reaches target
    start = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)), 0.0)  # (B, 1) the sum before that block
    within = start + wb.gather(1, b[:, :, None].expand(B, 1, block))[:, 0].double().cumsum(-1)  # (B, block)
    j = torch.searchsorted(
        within, target.minimum(within[:, -1:])
    )  # round-off may put target past the block's end
    return (b * block + j)[:, 0]


def sample_next(logits, u, temperature, top_p, top_k):
    """logits (B, V) float32, u (B,) uniforms -> next tokens (B,) and their log-prob under softmax(logits / T).
    Sampling is by inverse CDF: the first candidate whose cumulative probability exceeds u (times the kept mass,
    which renormalizes after top-k / top-p truncation)."""
    z = logits / temperature if temperature not in (0, 1) else logits  # greedy reports log-probs at T = 1
    m = z.amax(-1, keepdim=True)  # (B, 1)
    e = (z - m).exp_()  # (B, V) probabilities times the partition function, the largest 1
    log_partition = m[:, 0] + e.sum(-1).log()  # the trainer's distribution: full vocabulary, logits / T
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        if top_k and top_k < z.shape[-1]:
            kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            e = e.masked_fill(z < kth, 0.0)
        if top_p < 1.0:
            cand_p, cand_ids = nucleus(e / e.sum(-1, keepdim=True), top_p)  # (B, k) each
            tok = cand_ids.gather(-1, inverse_cdf(cand_p, u)[:, None])[:, 0]
        else:
            tok = inverse_cdf(e, u)
    return tok, z.gather(-1, tok[:, None])[:, 0] - log_partition


def left_pad(prompts, pad_id, device):
    """list of token lists -> ids (N, L) left-padded, mask (N, L) with 1 on real tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p) :] = 1
    return ids.to(device), mask.to(device)


def eos_token_ids(model, tokenizer) -> tuple:
    """The tokenizer's EOS and the model config's (an int, a list or None in Hugging Face configs)."""
    ids = model.config.eos_token_id
    return tuple(sorted({tokenizer.eos_token_id} | set(ids if isinstance(ids, list) else [ids]) - {None}))


def _last_logits(h, w):
    """The head generate runs inside forward (FSDP holds the gathered output weight there): (B, T, H) -> (B, V)
    float32 logits at the last position."""
    # compiled: inductor picks the product; oneDNN's (output_logits) does not lower with the weight an input
    if torch.compiler.is_compiling():
        return F.linear(h[:, -1], w).float()
    return decode.output_logits(h[:, -1], w)


def _step(model, cache, tok, positions, mask, u, temperature, top_p, top_k):
    """One decode step, what --compile compiles: each row's last token tok (B,) at RoPE position positions (B, 1),
    attending where mask (B, 1, 1, S) is True, appended to the cache -> the next token (B,) and its log-prob (B,).
    Writes nothing but the cache, so a captured graph replays it with the same inputs in place."""
    logits = model(tok[:, None], attention_mask=mask, position_ids=positions, cache=cache, head=_last_logits)
    return sample_next(logits, u, temperature, top_p, top_k)


_compiled = {}  # mode -> torch.compile(_step): compiled once per process, its graphs cached on _step's code


def _compiled_step(device):
    # CUDA graphs on CUDA; inductor's default mode on CPU
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _compiled:
        _compiled[mode] = torch.compile(_step, mode=mode)
    return _compiled[mode]


STATIC_CHECK_EVERY = 8  # fixed shapes: the host reads which rows are done every this many steps
STATIC_LENGTH_ROUND = 64  # fixed shapes: the cache length rounded up to this, so batches share a few shapes
STATIC_BATCH_SIZES = 4  # fixed shapes: rows, rows/2, rows/4, rows/8: the batch sizes live rows compact into


def batch_sizes(rows: int) -> list:
    """The batch sizes the fixed-shape path decodes at, largest first: a few, as each is one compiled graph."""
    return sorted({-(-rows // 2**j) for j in range(STATIC_BATCH_SIZES)}, reverse=True)


@torch.inference_mode()
def generate(
    model,
    prompts,
    *,
    eos_token_ids,
    group_size=1,
    max_new_tokens=128,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    seed=0,
    stop_strings=None,
    tokenizer=None,
    pad_token_id=None,
    first_row=0,
    compile=False,
    static=None,
):
    """Sample `group_size` completions per prompt.

    prompts: list of N token-id lists (any lengths). Each prompt is prefilled once, its keys and values written
    into its G rows. eos_token_ids: the ids that end a row (eos_token_ids(model, tokenizer): the tokenizer's and the
    model config's). Returns three tensors of shape (N*G, max_new_tokens), rows grouped by prompt (rows i*G..i*G+G-1
    belong to prompts[i]):
      completion_ids    - sampled tokens, pad after a row stops
      completion_mask   - 1.0 up to and including the first EOS or the token completing a stop string, by position
      sampling_logprobs - log-prob of each sampled token under softmax(logits / T) over the full vocabulary
                          (greedy: T = 1), 0 where masked

    compile: torch.compile the decode step (_step; mode="reduce-overhead", CUDA graphs, on CUDA).
    static: fixed shapes inside the loop (default: on CUDA or with compile). The cache is zero-filled and attended
      over its whole length under the mask; finished rows keep decoding, masked, until the host looks, every
      STATIC_CHECK_EVERY steps, and then compact in place into one of batch_sizes(rows). Otherwise (the CPU's
      eager default) finished rows leave the batch at once (a CPU step costs in proportion to its rows) and
      attention reads the filled part only. Either way each row draws its own uniforms (row_uniforms), so the
      tokens do not depend on the path; the fixed-shape path's sums run over other lengths and batch sizes.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings needs the tokenizer")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    static = (compile or device.type == "cuda") if static is None else static
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0].clamp(min=0))
    N, G = len(prompts), group_size
    rows = N * G
    stops = (
        StopStrings(tokenizer, stop_strings, model.config.vocab_size, rows, device) if stop_strings else None
    )

    # prefill: the N distinct prompts once, logits at the last position only, keys and values into their G rows
    ids, mask = left_pad(prompts, pad, device)  # (N, L)
    L = ids.shape[1]
    S = L + max_new_tokens
    if static:
        S = -(-S // STATIC_LENGTH_ROUND) * STATIC_LENGTH_ROUND
    cache = KVCache(model.config, rows, S, dtype, device, static=static)
    logits = model(ids, attention_mask=mask, cache=cache.prefill(G), head=_last_logits)  # (N, V)
    logits = logits.repeat_interleave(G, 0)  # (rows, V)
    if static:
        cache.length.fill_(L)
    else:
        cache.length = L
    # (rows, 1, 1, S) the keys each row may see: its real prompt tokens, then each token it was fed
    attn = torch.zeros(rows, 1, 1, S, dtype=torch.bool, device=device)
    attn[:, 0, 0, :L] = mask.bool().repeat_interleave(G, 0)
    positions = mask.sum(-1, keepdim=True).repeat_interleave(G, 0)  # (rows, 1) the next token's RoPE position
    step = _step
    if compile:
        step = _compiled_step(device)
        for t in (*cache.k, *cache.v, cache.length):  # CUDA graphs read and write them where they are
            torch._dynamo.mark_static_address(t)
    graphs = compile and device.type == "cuda"
    every = STATIC_CHECK_EVERY if static else 1
    sizes = batch_sizes(rows) if static else None

    u = row_uniforms(seed, rows, max_new_tokens, first_row).to(device)  # (rows, steps)
    out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    out_mask = torch.zeros((rows, max_new_tokens), device=device)
    out_logp = torch.zeros((rows, max_new_tokens), device=device)
    active = torch.arange(rows, device=device)  # (n,) original row index of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # (n,) finished: later tokens are masked
    n = rows
    tok, logp = sample_next(logits, u[:, 0], temperature, top_p, top_k)
    for t in range(max_new_tokens):
        if t > 0:
            attn[:n, :, :, L + t - 1] = True  # the fed token's own key, written at L + t - 1 by this step
            seen = attn[:n] if static else attn[:n, :, :, : L + t]
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            tok, logp = step(model, cache, tok, positions[:n], seen, u[active, t], temperature, top_p, top_k)
            if graphs:  # the graph's outputs are overwritten by its next replay
                tok, logp = tok.clone(), logp.clone()
            positions[:n] += 1
        live = ~done
        out_ids[active, t] = tok.where(live, pad)
        out_logp[active, t] = logp.where(live, 0.0)
        out_mask[active, t] = live.float()
        done = done | torch.isin(tok, eos)
        if stops is not None:
            done |= stops.step(tok)
        if t == max_new_tokens - 1 or (t + 1) % every:
            continue
        keep = (~done).nonzero()[:, 0]  # the host's wait for the device: which rows go on
        if len(keep) == 0:
            break
        m = len(keep) if sizes is None else min(s for s in sizes if s >= len(keep))
        if m < n:  # the live rows (and, at a fixed size, finished ones to fill it) move to the first m rows
            if m > len(keep):
                keep = torch.sort(torch.argsort(done.int(), stable=True)[:m]).values
            cache.select_rows(keep, filled=L + t)
            attn[:m], positions[:m] = attn[keep], positions[keep]
            active, tok, done, n = active[keep], tok[keep], done[keep], m
            if stops is not None:
                stops.select_rows(keep)
    return out_ids, out_mask, out_logp * out_mask
