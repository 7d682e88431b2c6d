"""The sampler: G completions per prompt from a KV cache, each prompt prefilled once, for training and eval.py.

    KVCache      preallocated keys and values per layer
    row_uniforms one seeded uniform per (row, step): a row's tokens depend on its seed, not on its batch
    sample_next  temperature, top-k, top-p by inverse CDF; the token's log-prob under softmax(logits / T)
    generate     prefill the N prompts, copy each prompt's cache into its G rows, decode until EOS or a stop
                 string (kernels/stop_strings.py, matched on token ids)

The log-probs the trainer recomputes for the same tokens are logprobs.py's; the model itself is model.py's.
"""

import torch
import torch.nn.functional as F

from kernels import decode
from kernels.stop_strings import StopStrings


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, S_max, hd), filled left to right; rows share one length
    because prompts are left-padded to the same length. Preallocation avoids a torch.cat per token per layer."""

    def __init__(self, cfg, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def append(self, layer, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.length : self.length + T] = k
        self.v[layer][:, :, self.length : self.length + T] = v
        return self.k[layer][:, :, : self.length + T], self.v[layer][:, :, : self.length + T]

    def select_rows(self, rows: torch.Tensor):
        """Keep (or repeat) the given batch rows: used to copy a prompt's cache into its G rows and to drop
        finished rows."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


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
):
    """Sample `group_size` completions per prompt.

    prompts: list of N token-id lists (any lengths). Each prompt is prefilled once; its cache is then copied into
    its G rows. eos_token_ids: the ids that end a row (eos_token_ids(model, tokenizer): the tokenizer's and the
    model config's). Returns three tensors of shape (N*G, max_new_tokens), rows grouped by prompt (rows i*G..i*G+G-1
    belong to prompts[i]):
      completion_ids    - sampled tokens, pad after a row stops
      completion_mask   - 1.0 up to and including the first EOS or the token completing a stop string, by position
      sampling_logprobs - log-prob of each sampled token under softmax(logits / T) over the full vocabulary
                          (greedy: T = 1), 0 where masked
    """
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings needs the tokenizer")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0].clamp(min=0))
    N, G = len(prompts), group_size
    rows = N * G
    stops = (
        StopStrings(tokenizer, stop_strings, model.config.vocab_size, rows, device) if stop_strings else None
    )

    # prefill: the N distinct prompts once, logits at the last position only
    ids, mask = left_pad(prompts, pad, device)  # (N, L)
    L = ids.shape[1]
    cache = KVCache(model.config, N, L + max_new_tokens, dtype, device)
    last_logits = lambda h, w: decode.output_logits(h[:, -1], w)  # (rows, V) float32, inside forward (FSDP)
    logits = model(ids, attention_mask=mask, cache=cache, head=last_logits)  # (N, V)

    # copy each prompt's cache into its G rows: rows [i*G, (i+1)*G) <- prompt i
    expand = torch.arange(N, device=device).repeat_interleave(G)
    cache.select_rows(expand)
    logits, mask = logits[expand], mask[expand]
    attn = torch.cat([mask, torch.zeros(rows, max_new_tokens, dtype=mask.dtype, device=device)], 1)

    u = row_uniforms(seed, rows, max_new_tokens, first_row).to(device)  # (rows, steps)
    out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    out_mask = torch.zeros((rows, max_new_tokens), device=device)
    out_logp = torch.zeros((rows, max_new_tokens), device=device)
    active = torch.arange(rows, device=device)  # original row index of each row still in the batch
    for t in range(max_new_tokens):
        tok, logp = sample_next(logits, u[active, t], temperature, top_p, top_k)
        out_ids[active, t], out_logp[active, t], out_mask[active, t] = tok, logp, 1.0
        done = torch.isin(tok, eos)
        if stops is not None:
            done |= stops.step(tok)
        if t == max_new_tokens - 1:
            break
        keep = (~done).nonzero()[:, 0]  # the step's one wait for the device: which rows go on
        if len(keep) == 0:
            break
        if len(keep) < len(active):  # drop finished rows so later steps only compute live ones
            active, tok, attn = active[keep], tok[keep], attn[keep]
            cache.select_rows(keep)
            if stops is not None:
                stops.select_rows(keep)
        attn[:, L + t] = 1
        logits = model(tok[:, None], attention_mask=attn[:, : L + t + 1], cache=cache, head=last_logits)
    return out_ids, out_mask, out_logp * out_mask
