"""The sampler's decode loop (sampler.generate) against the loop it replaced (baf830a's generate, copied below as
reference_generate): the same tokens, masks and log-probs for the same seeds, greedy and sampled, with and without
stop strings, on the CPU's eager path (rows leave the batch as they finish), the fixed-shape path (finished rows
masked, compaction into a few batch sizes, the host looking every few steps) and the compiled step."""

import pytest
import torch
from test_grpo import tiny_model

import sampler
from kernels import decode
from kernels.stop_strings import StopStrings

PROMPTS = [[5, 9, 11, 3], [7, 8], [12, 4, 4, 4, 6, 1, 30], [40]]
EOS = [3, 17, 29]  # frequent enough in a 64-token vocabulary that rows end at different steps

# (temperature, top_p, top_k): greedy; plain sampling; temperature with top-k and top-p
SETTINGS = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.8, 0.9, 12)]


class PieceTok:  # token i decodes to one of a few short texts, so stop strings span several tokens
    texts = ["ab", "c", "a", "bca", "b", "ca", "cab", "x", "xcc", ""]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.texts[i % len(self.texts)] for i in ids)


STOPS = ["abca", "cc", "bcab"]


class ReferenceKVCache:
    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def append(self, layer, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.length : self.length + T] = k
        self.v[layer][:, :, self.length : self.length + T] = v
        return self.k[layer][:, :, : self.length + T], self.v[layer][:, :, : self.length + T]

    def select_rows(self, rows):
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


@torch.inference_mode()
def reference_generate(model, prompts, *, eos_token_ids, group_size=1, max_new_tokens=128, temperature=1.0,
                       top_p=1.0, top_k=0, seed=0, stop_strings=None, tokenizer=None, pad_token_id=None,
                       first_row=0):  # fmt: skip
    """baf830a's sampler.generate, unchanged but for its names: the outputs the new loop must reproduce."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0].clamp(min=0))
    N, G = len(prompts), group_size
    rows = N * G
    stops = (
        StopStrings(tokenizer, stop_strings, model.config.vocab_size, rows, device) if stop_strings else None
    )
    ids, mask = sampler.left_pad(prompts, pad, device)
    L = ids.shape[1]
    cache = ReferenceKVCache(model.config, N, L + max_new_tokens, dtype, device)
    last_logits = lambda h, w: decode.output_logits(h[:, -1], w)  # noqa: E731
    logits = model(ids, attention_mask=mask, cache=cache, head=last_logits)
    expand = torch.arange(N, device=device).repeat_interleave(G)
    cache.select_rows(expand)
    logits, mask = logits[expand], mask[expand]
    attn = torch.cat([mask, torch.zeros(rows, max_new_tokens, dtype=mask.dtype, device=device)], 1)
    u = sampler.row_uniforms(seed, rows, max_new_tokens, first_row).to(device)
    out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    out_mask = torch.zeros((rows, max_new_tokens), device=device)
    out_logp = torch.zeros((rows, max_new_tokens), device=device)
    active = torch.arange(rows, device=device)
    for t in range(max_new_tokens):
        tok, logp = sampler.sample_next(logits, u[active, t], temperature, top_p, top_k)
        out_ids[active, t], out_logp[active, t], out_mask[active, t] = tok, logp, 1.0
        done = torch.isin(tok, eos)
        if stops is not None:
            done |= stops.step(tok)
        if t == max_new_tokens - 1:
            break
        keep = (~done).nonzero()[:, 0]
        if len(keep) == 0:
            break
        if len(keep) < len(active):
            active, tok, attn = active[keep], tok[keep], attn[keep]
            cache.select_rows(keep)
            if stops is not None:
                stops.select_rows(keep)
        attn[:, L + t] = 1
        logits = model(tok[:, None], attention_mask=attn[:, : L + t + 1], cache=cache, head=last_logits)
    return out_ids, out_mask, out_logp * out_mask


@pytest.fixture(scope="module")
def model():
    m = tiny_model(vocab=64, seed=3, layers=2).eval()
    return m


def run_both(model, settings, stops, **path):
    temperature, top_p, top_k = settings
    # EOS: tokens that rows of three prompts emit at steps 4, 9 and 14 when nothing stops them (greedy: the G rows
    # of a prompt agree, so their lengths differ by prompt only)
    free = reference_generate(model, PROMPTS, eos_token_ids=[], group_size=5, max_new_tokens=21,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=4, first_row=3)[0]  # fmt: skip
    eos = [int(free[0, 4]), int(free[7, 9]), int(free[12, 14])]
    kw = dict(eos_token_ids=eos, group_size=5, max_new_tokens=21, temperature=temperature, top_p=top_p,
              top_k=top_k, seed=4, first_row=3)  # fmt: skip
    if stops:
        kw.update(stop_strings=STOPS, tokenizer=PieceTok())
    return reference_generate(model, PROMPTS, **kw), sampler.generate(model, PROMPTS, **kw, **path)


def lengths(mask):
    return mask.sum(-1).long().tolist()


@pytest.mark.parametrize("stops", [False, True], ids=["eos", "eos+stops"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "sampled", "topk-topp"])
def test_eager_path_equals_the_old_loop_exactly(model, settings, stops):
    """The CPU's default path (rows leave the batch as they finish, attention over the filled part) runs the same
    products on the same batches as the old loop: bit-for-bit the same outputs."""
    (ids0, mask0, logp0), (ids1, mask1, logp1) = run_both(model, settings, stops)
    assert len(set(lengths(mask0))) >= 2  # rows end at different steps, some before the last
    assert min(lengths(mask0)) < 21
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1) and torch.equal(logp0, logp1)


@pytest.mark.parametrize("stops", [False, True], ids=["eos", "eos+stops"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "sampled", "topk-topp"])
def test_fixed_shape_path_equals_the_old_loop(model, settings, stops):
    """static=True (what CUDA and --compile run): attention over the whole zero-filled cache under the mask, all
    rows of a fixed batch size in every product. The sums run over other lengths and batches, so log-probs agree
    to float32 round-off (1e-5) and the tokens are the same (no near-ties in these logits)."""
    (ids0, mask0, logp0), (ids1, mask1, logp1) = run_both(model, settings, stops, static=True)
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)
    torch.testing.assert_close(logp1, logp0, rtol=0, atol=1e-5)


def test_fixed_shape_path_compacts_into_a_few_sizes_in_place(model, monkeypatch):
    """The fixed-shape path compacts only at the host's checks, into batch_sizes(rows), in place: the cache's
    tensors stay the same allocation throughout."""
    seen = []
    real = sampler.KVCache.select_rows

    def spy(self, keep, filled):
        ptrs = [t.data_ptr() for t in self.k + self.v]
        real(self, keep, filled)
        assert [t.data_ptr() for t in self.k + self.v] == ptrs
        seen.append((len(keep), filled))

    monkeypatch.setattr(sampler.KVCache, "select_rows", spy)
    prompts = PROMPTS * 4  # 16 prompts x G = 5: 80 rows, sizes 80, 40, 20, 10
    kw = dict(eos_token_ids=list(range(0, 64, 6)), group_size=5, max_new_tokens=40, temperature=1.0, seed=1)
    ids0, mask0, logp0 = reference_generate(model, prompts, **kw)
    ids1, mask1, logp1 = sampler.generate(model, prompts, static=True, **kw)
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)
    torch.testing.assert_close(logp1, logp0, rtol=0, atol=1e-5)
    L = max(len(p) for p in prompts)
    assert seen and all(n in sampler.batch_sizes(80) for n, _ in seen)
    assert all((f - L + 1) % sampler.STATIC_CHECK_EVERY == 0 for _, f in seen)  # only at the checks
    assert sampler.batch_sizes(80) == [80, 40, 20, 10] and sampler.batch_sizes(7) == [7, 4, 2, 1]


def test_row_finishing_between_checks_is_masked_and_padded(model):
    """With the host looking every 8 steps, a row that ends at step 2 keeps decoding until step 7: what it
    produces there is padding, mask 0, log-prob 0, exactly as when it leaves at once."""
    kw = dict(eos_token_ids=EOS, group_size=3, max_new_tokens=12, temperature=1.0, seed=7, pad_token_id=63)
    ids0, mask0, logp0 = sampler.generate(model, PROMPTS, **kw)
    ids1, mask1, logp1 = sampler.generate(model, PROMPTS, static=True, **kw)
    n = mask0.sum(-1).long()
    assert (n < 8).any()
    for r in range(len(n)):
        assert (ids1[r, n[r] :] == 63).all() and (logp1[r, n[r] :] == 0).all()
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)


def test_compiled_step_equals_the_old_loop(model):
    """compile=True on CPU (torch.compile's default mode, inductor's C++ kernels; CUDA graphs need CUDA): the same
    tokens, log-probs to 1e-5 (inductor fuses and reorders float32 sums). One setting, sampled with stop strings:
    each batch size the rows compact into is one more compilation, tens of seconds each on CPU."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable here ({e})")
    (ids0, mask0, logp0), (ids1, mask1, logp1) = run_both(model, SETTINGS[1], True, compile=True)
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)
    torch.testing.assert_close(logp1, logp0, rtol=0, atol=1e-5)
