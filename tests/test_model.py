"""model.py against transformers' own implementations (the independent reference), and the sampler's rules.

Tolerance for float32 logit parity: max |ours - theirs| < 1e-4 * max |theirs|. Both compute the same float32 math
in a different order (fused vs split projections, SDPA vs eager attention); over a few layers that reorders
round-off at the 1e-7 relative level per op, so 1e-4 of the logit scale leaves ~100x headroom while any real bug
(wrong rope layout, missing bias, wrong norm) shows up at 1e-1 or more.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import builtin  # noqa: E402
import model as M
import sampler  # noqa: E402
from kernels import block_autograd as lean

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2_bias_untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3_qknorm": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=24),
    "llama3_rope_scaling": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
}  # fmt: skip


def tiny_hf_model(family: str, seed=0):
    """A random transformers model of the family with non-trivial weights (biases and norms included)."""
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0,
        rms_norm_eps=1e-6, **spec,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return hf


def assert_logits_close(ours, theirs):
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4 * scale, f"max abs diff {diff:.3g} vs logit scale {scale:.3g}"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        tiny_hf_model(fam).save_pretrained(d)
        dirs[fam] = d
    return dirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_parity_tiny(family, tiny_dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    ours = M.Transformer.from_pretrained(tiny_dirs[family]).eval()
    ids = torch.randint(
        0, 97, (3, 40), generator=torch.Generator().manual_seed(1)
    )  # 40 > 16: rope scaling bites
    with torch.no_grad():
        assert_logits_close(ours(ids), hf(ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_parity_tiny(family, tiny_dirs):
    """Our hand-written backwards (kernels/block_autograd.py) against transformers' plain autograd: the
    gradient of the same random projection of the logits, for every weight. Same tolerance idea as the logits:
    max |ours - theirs| < 1e-4 * max |theirs| per tensor (float32 round-off in a different order)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).train()
    ours = M.Transformer.from_pretrained(tiny_dirs[family]).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 33), generator=g)
    upstream = torch.randn(2, 33, 97, generator=g)
    (ours(ids) * upstream).sum().backward()
    (hf(ids).logits * upstream).sum().backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        diff = (p.grad - ref).abs().max().item()
        assert diff < 1e-4 * ref.abs().max().item(), f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name", ["rms_norm", "rope", "swiglu", "swiglu_down"])
def test_memory_lean_functions_equal_plain_autograd_float64(name):
    """Each memory-lean Function (kernels/block_autograd.py) against the plain expression that model.py keeps as the
    reference, under autograd, in float64 (values and gradients for a random upstream gradient agree to 1e-12: the
    same math, only round-off at 1e-16 differs), plus gradcheck. The plain expressions are checked against a
    textbook formula here too, so the reference itself cannot drift."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    if name == "rms_norm":
        inputs, ours, plain = (
            (rnd(3, 5, 16), 1 + 0.1 * rnd(16)),
            (lambda x, w: lean.rms_norm(x, w, 1e-6)),
            (lambda x, w: M.rms_norm(x, w, 1e-6)),
        )
        x, w = inputs
        assert torch.allclose(
            plain(x, w), w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(), atol=1e-12
        )
    elif name == "rope":
        angles = rnd(2, 5, 1, 4).repeat(1, 1, 1, 2)  # (B, T, 1, d)
        cos, sin = angles.cos(), angles.sin()
        inputs, ours, plain = (
            (rnd(2, 5, 3, 8),),
            (lambda x: lean.rope(x, cos, sin)),
            (lambda x: M.rope(x, cos, sin)),
        )
        x = inputs[
            0
        ]  # each pair (x_i, x_{i+4}) turned by angle a_i: (x_i cos - x_{i+4} sin, x_i sin + x_{i+4} cos)
        a, b, c, s_ = x[..., :4], x[..., 4:], cos[..., :4], sin[..., :4]
        assert torch.allclose(plain(x), torch.cat([a * c - b * s_, a * s_ + b * c], -1), atol=1e-12)
    elif name == "swiglu":
        inputs, ours, plain = (3 * rnd(4, 7), rnd(4, 7)), lean.swiglu, M.swiglu
        assert torch.allclose(plain(*inputs), inputs[0] / (1 + torch.exp(-inputs[0])) * inputs[1], atol=1e-12)
    else:  # g, u (2, 4, 7), W (5, 7)
        inputs, ours, plain = (
            (3 * rnd(2, 4, 7), rnd(2, 4, 7), rnd(5, 7)),
            lean.swiglu_down,
            (lambda g, u, w: torch.nn.functional.linear(M.swiglu(g, u), w)),
        )
    inputs = [t.requires_grad_() for t in inputs]
    out_ours, out_plain = ours(*inputs), plain(*inputs)
    assert torch.allclose(out_ours, out_plain, rtol=0, atol=1e-12)
    up = rnd(*out_ours.shape)
    grads_ours = torch.autograd.grad(out_ours, inputs, up)
    grads_plain = torch.autograd.grad(out_plain, inputs, up)
    for a, b in zip(grads_ours, grads_plain):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(ours, inputs)


def test_activations_kept_for_backward_per_token():
    """What autograd keeps for backward, counted with saved-tensor hooks (parameters excluded, shared storage counted
    once), on SmolLM2's shapes. Per layer only these may stay (floats per token): the block input x and r for each
    RMSNorm (2 x (H + 1)), the normed inputs of the projections (2 H), q, k, v and the attention output
    (2 nh hd + 2 nkv hd) with its logsumexp (nh), gate and up (2 I); plus, once, the final norm's input and r
    (H + 1), cos and sin (2 hd) and the int64 token ids (2). Plain autograd of the same blocks keeps 11788 floats per
    token and layer here (x * r, q and rotate_half(q), silu(gate) and silu(gate) * up besides); a change that brings
    one of those back fails this."""
    cfg = M.ModelConfig(num_hidden_layers=2)
    torch.manual_seed(0)
    model = M.Transformer(cfg)
    H, I, hd, nh, nkv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    per_layer = 2 * (H + 1) + 2 * H + 2 * nh * hd + 2 * nkv * hd + nh + 2 * I
    bound = cfg.num_hidden_layers * per_layer + (H + 1) + 2 * hd + 2
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, head=lambda hidden, w: hidden)  # the hidden states: no logits kept
    floats_per_token = sum(kept.values()) / 4 / ids.numel()
    assert floats_per_token <= bound, (floats_per_token, bound)
    assert floats_per_token > 0.9 * bound  # the count itself works (it sees the activations)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_roundtrip_through_transformers(family, tiny_dirs, tmp_path):
    ours = M.Transformer.from_pretrained(tiny_dirs[family]).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_logits_close(ours(ids), hf(ids).logits)
    # and our loader reads back exactly what it wrote
    again = M.Transformer.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_left_padding_matches_unpadded(tiny_dirs):
    """A left-padded row gives the same logits on its real tokens as the same prompt alone: positions count real
    tokens and padding keys are masked."""
    ours = M.Transformer.from_pretrained(tiny_dirs["qwen2_bias_untied"]).eval()
    g = torch.Generator().manual_seed(3)
    short, long = (
        torch.randint(0, 97, (7,), generator=g).tolist(),
        torch.randint(0, 97, (15,), generator=g).tolist(),
    )
    ids, mask = sampler.left_pad([short, long], 0, "cpu")
    with torch.no_grad():
        both = ours(ids, attention_mask=mask)
        alone = ours(torch.tensor([short]))
    assert_logits_close(both[0, -7:], alone[0])


# ---- the real built-in weights -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    path = builtin.builtin_model_dir()
    return path, M.Transformer.from_pretrained(path).eval(), M.load_tokenizer(path)


def chat_prompts(tok, questions):
    out = []
    for q in questions:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def test_builtin_parity_with_transformers(smol):
    path, ours, _ = smol
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_logits_close(ours(ids), hf(ids).logits)


def test_builtin_conversion_matches_transformers_gguf_loader(smol):
    """transformers dequantizes the same GGUF with its own code (including the q/k un-permutation): an independent
    check of our conversion."""
    pytest.importorskip(
        "accelerate", reason="transformers' GGUF loader needs accelerate (requirements-test.txt)"
    )
    _, ours, _ = smol
    g = builtin.builtin_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32
    )
    ids = torch.randint(0, 49152, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_logits_close(ours(ids), hf.eval()(ids).logits)


def greedy_without_cache(model, prompt, n, eos):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt) :]


def test_greedy_cache_equals_no_cache_equals_transformers(smol):
    path, ours, tok = smol
    prompts = chat_prompts(tok, ["What is the capital of France?", "Name three colors, please.", "2+2=?"])
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is left-padded
    ids, mask, _ = sampler.generate(ours, prompts, max_new_tokens=16, temperature=0, eos_token_ids=[2])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for r, p in enumerate(prompts):
        got = ids[r, : int(mask[r].sum())].tolist()
        assert got == greedy_without_cache(ours, p, 16, eos=2)
        theirs = hf.generate(
            torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2
        )
        assert got == theirs[0, len(p) :].tolist()


# ---- sampler rules on a tiny float64 model (exact arithmetic makes token equality a fair test) ---------------


@pytest.fixture(scope="module")
def tiny64(tiny_dirs):
    return M.Transformer.from_pretrained(tiny_dirs["llama_tied"], dtype=torch.float64).eval()


PROMPTS = [[5, 9, 11], [7, 1, 2, 3, 4, 60, 61], [30, 31, 32, 33, 34]]


def test_group_prefill_once_equals_independent_prefills(tiny64):
    G = 4
    grouped = sampler.generate(
        tiny64, PROMPTS, group_size=G, max_new_tokens=12, temperature=1.0, eos_token_ids=[3], seed=7
    )
    repeated = [p for p in PROMPTS for _ in range(G)]  # G separate prefills of each prompt, same row seeds
    separate = sampler.generate(
        tiny64, repeated, group_size=1, max_new_tokens=12, temperature=1.0, eos_token_ids=[3], seed=7
    )
    for a, b in zip(grouped, separate):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=1e-12)
    # and the rows of one group are not all the same (the row seeds differ)
    assert len({tuple(r.tolist()) for r in grouped[0][:G]}) > 1


def test_seeded_reproducible_and_seed_changes_samples(tiny64):
    a = sampler.generate(
        tiny64, PROMPTS, group_size=3, max_new_tokens=10, temperature=1.0, seed=11, eos_token_ids=(2,)
    )[0]
    b = sampler.generate(
        tiny64, PROMPTS, group_size=3, max_new_tokens=10, temperature=1.0, seed=11, eos_token_ids=(2,)
    )[0]
    c = sampler.generate(
        tiny64, PROMPTS, group_size=3, max_new_tokens=10, temperature=1.0, seed=12, eos_token_ids=(2,)
    )[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_by_position_when_pad_equals_eos(tiny64):
    free = sampler.generate(tiny64, PROMPTS, max_new_tokens=10, temperature=0, eos_token_ids=[])[0]
    eos = int(free[1, 4])  # a token the second row emits at step 4: make it the EOS (and the pad)
    ids, mask, logp = sampler.generate(tiny64, PROMPTS, max_new_tokens=10, temperature=0, eos_token_ids=[eos])
    for r in range(len(PROMPTS)):
        hits = (free[r] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 10  # up to and including the first EOS
        assert mask[r].tolist() == [1.0] * n + [0.0] * (10 - n)
        assert ids[r, :n].tolist() == free[r, :n].tolist()
        assert (ids[r, n:] == eos).all()  # padded with pad == eos, and those positions are masked out
        assert (logp[r, n:] == 0).all()
    assert mask[1].sum() <= 5


def test_stop_string_ends_row_including_its_tokens(tiny64):
    class CharTok:  # token i decodes to chr(65 + i % 26): a stop string is a run of letters
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(65 + i % 26) for i in ids)

    free = sampler.generate(tiny64, PROMPTS, max_new_tokens=10, temperature=0, eos_token_ids=[])[0]
    stop = CharTok().decode(free[0, 3:5].tolist())  # the text of the row-0 tokens at steps 3 and 4
    _, mask, _ = sampler.generate(tiny64, PROMPTS, max_new_tokens=10, temperature=0, eos_token_ids=[],
                            stop_strings=[stop], tokenizer=CharTok())  # fmt: skip
    text0 = CharTok().decode(free[0].tolist())
    assert int(mask[0].sum()) == text0.index(stop) + len(stop)


def first_stop_by_decoding(tokenizer, row, stop_strings):
    """The reference: the first position t at which decoding the row's tokens 0..t shows a stop string, else None."""
    for t in range(len(row)):
        if any(s in tokenizer.decode(row[: t + 1], skip_special_tokens=False) for s in stop_strings):
            return t
    return None


def test_stop_strings_on_token_ids_stop_where_decoding_does(smol):
    """The id-based matcher (model.StopStrings) against decoding, on the built-in tokenizer: rows of random tokens
    with "</answer>" (and a second stop string) spliced in, split across 1 to 9 tokens at random places, near misses
    ("</ans" then something else; "</", three other letters, "wer>"), tokens that carry the stop string's end and
    more (">\n"), a stop string inside one token ("ell" in " hello"). Every row must stop at the first position
    where its decoded text first contains a stop string, or not at all."""
    _, _, tok = smol
    stops = ["</answer>", "Final:", "ell"]
    texts = tok.batch_decode([[v] for v in range(len(tok))], skip_special_tokens=False)
    by_text = {}
    for v, p in enumerate(texts):
        by_text.setdefault(p, v)
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: int(torch.randint(n, (1,), generator=g))

    def pieces(s):  # s split at random places into texts that are single tokens
        cuts = sorted({rnd(len(s) - 1) + 1 for _ in range(rnd(len(s)))})
        parts = [s[a:b] for a, b in zip([0] + cuts, cuts + [len(s)])]
        return [
            by_text[p] if p in by_text else by_text[c] for p in parts for c in ([p] if p in by_text else p)
        ]

    overhang = [v for v, p in enumerate(texts) if p.startswith(">") and len(p) > 1][:20]  # ">" and more text
    inside = [
        v for v, p in enumerate(texts) if "ell" in p and not p.startswith("ell") and not p.endswith("ell")
    ]
    three = [v for v, p in enumerate(texts) if len(p) == 3 and p.isalpha() and p != "ans"][:50]  # not s[2:5]
    assert overhang and inside and three
    rows = []
    for r in range(300):
        row = [rnd(len(tok)) for _ in range(3 + rnd(6))]
        kind = r % 5
        if kind == 0:
            row += pieces("</answer>")
        elif kind == 1:
            row += (
                pieces("</ans") + [rnd(len(tok))] + pieces("</answer>")[:-1] + [overhang[rnd(len(overhang))]]
            )
        elif kind == 2:
            row += pieces("Final:") + pieces("</answer>")
        elif kind == 3:
            row += [inside[rnd(len(inside))]]
        else:  # "</" + three wrong characters + "wer>": the length of "ans" but not its text, no stop
            row += [by_text["</"], three[rnd(len(three))]] + pieces("wer>")
        row += [rnd(len(tok)) for _ in range(4)]
        rows.append(row)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (R, width), padded at the end
    matcher = sampler.StopStrings(tok, stops, len(tok), len(rows), "cpu")
    first = [None] * len(rows)
    for t in range(width):
        hit = matcher.step(ids[:, t])
        for r in hit.nonzero()[:, 0].tolist():
            if first[r] is None and t < len(rows[r]):  # padding is not part of the row
                first[r] = t
    expected = [first_stop_by_decoding(tok, r, stops) for r in rows]
    assert first == expected
    assert sum(e is not None for e in expected) >= 230  # the rows with a spliced stop string do stop
    assert sum(e is None for e in expected) >= 30  # and most of the others do not


def test_stop_strings_through_generate_match_decoding(tiny64):
    """generate with stop strings on a tokenizer whose tokens are 1- to 3-character texts: each row's mask ends at
    the first position where decoding its sampled tokens shows a stop string (or runs to the end)."""

    class PieceTok:  # token i decodes to one of a few short texts (one empty), so stop strings span several tokens
        texts = ["ab", "c", "a", "bca", "b", "ca", "cab", "x", "xcc", ""]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.texts[i % len(self.texts)] for i in ids)

    stops = ["abca", "cc", "bcab"]
    ids, mask, _ = sampler.generate(tiny64, PROMPTS, group_size=6, max_new_tokens=14, temperature=1.5, eos_token_ids=[],
                              seed=2, stop_strings=stops, tokenizer=PieceTok())  # fmt: skip
    free = sampler.generate(
        tiny64, PROMPTS, group_size=6, max_new_tokens=14, temperature=1.5, eos_token_ids=[], seed=2
    )[0]
    lengths = []
    for r in range(ids.shape[0]):
        t = first_stop_by_decoding(PieceTok(), free[r].tolist(), stops)
        n = 14 if t is None else t + 1
        assert mask[r].tolist() == [1.0] * n + [0.0] * (14 - n), r
        assert ids[r, :n].tolist() == free[r, :n].tolist()
        lengths.append(n)
    assert min(lengths) < 14 and len(set(lengths)) > 2  # rows stop, at different steps


def test_inverse_cdf_equals_full_running_sum():
    """Two-level inverse CDF against the one-level reference (a float64 running sum over the whole row and
    searchsorted), on rows with zeros, including u = 0 (the first index of positive weight)."""
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(3000, 2500, generator=g, dtype=torch.float64) * 4, -1)
    w[:, :7] = 0
    w[w < 1e-6] = 0
    u = torch.rand(3000, generator=g, dtype=torch.float64)
    u[:5] = 0
    ref = torch.searchsorted(w.cumsum(-1), (u * w.sum(-1))[:, None])[:, 0]
    ref[:5] = (w[:5] > 0).long().argmax(-1)
    for block in (64, 1000, 4096):
        assert torch.equal(sampler.inverse_cdf(w, u, block=block), ref)
        assert torch.equal(sampler.inverse_cdf(w.float(), u.float(), block=block), ref)


def test_decode_kernels_equal_the_plain_calls():
    """kernels/decode.py against the PyTorch calls they replace: rows_linear = F.linear (bias or not, any leading
    shape), single_query_attention = SDPA with grouped-query heads and an additive mask (float64: 1e-12),
    output_logits = F.linear (float32 round-off)."""
    from kernels import decode

    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape, dtype=torch.float64: torch.randn(*shape, generator=g, dtype=dtype)
    x, w, b = rnd(5, 1, 24), rnd(40, 24), rnd(40)
    assert torch.allclose(decode.rows_linear(x, w, b), F.linear(x, w, b), rtol=0, atol=1e-12)
    assert torch.allclose(decode.rows_linear(x[:, 0], w), F.linear(x[:, 0], w), rtol=0, atol=1e-12)
    assert decode.rows_linear(x, w).is_contiguous()
    B, nh, nkv, S, hd = 4, 6, 2, 11, 8
    q, k, v = rnd(B, 1, nh, hd).transpose(1, 2), rnd(B, nkv, S, hd), rnd(B, nkv, S, hd)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.float64)
    mask[1, ..., :4] = float("-inf")  # a left-padded row
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(decode.single_query_attention(q, k, v, mask), ref, rtol=0, atol=1e-12)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(decode.single_query_attention(q, k, v), ref, rtol=0, atol=1e-12)
    h, emb = rnd(32, 64, dtype=torch.float32), rnd(3000, 64, dtype=torch.float32)
    ref = F.linear(h, emb)
    got = decode.output_logits(h, emb)
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_greedy_equals_no_cache_every_family(family, tiny_dirs):
    """The decode step (single-query attention, few-row products, biases, q/k norms, untied output layer) against
    full forwards without a cache, greedy, in float64, for every family."""
    model = M.Transformer.from_pretrained(tiny_dirs[family], dtype=torch.float64).eval()
    ids, mask, _ = sampler.generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_token_ids=[])
    for r, p in enumerate(PROMPTS):
        assert ids[r].tolist() == greedy_without_cache(model, p, 12, eos=-1)


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny64):
    greedy = sampler.generate(
        tiny64, PROMPTS, group_size=2, max_new_tokens=8, temperature=0, eos_token_ids=(2,)
    )[0]
    k1 = sampler.generate(
        tiny64, PROMPTS, group_size=2, max_new_tokens=8, temperature=1.3, top_k=1, seed=3, eos_token_ids=(2,)
    )[0]
    p0 = sampler.generate(
        tiny64,
        PROMPTS,
        group_size=2,
        max_new_tokens=8,
        temperature=1.3,
        top_p=1e-9,
        seed=3,
        eos_token_ids=(2,),
    )[0]
    assert torch.equal(k1, greedy) and torch.equal(p0, greedy)


def test_sampling_distribution_matches_softmax_with_temperature_top_k_top_p(tiny64):
    """One step, 4000 samples from one prompt: empirical frequencies against the distribution computed here
    independently. Tolerance 0.03: 4 standard errors of a frequency (sqrt(0.25 / 4000) = 0.008)."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        logits = tiny64(torch.tensor([prompt]))[0, -1]
    n = 4000
    for T, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.5, 0, 0.6)]:
        p = torch.softmax(logits / T, -1)
        if top_k:
            p = torch.where(p >= p.topk(top_k).values[-1], p, 0.0)
        if top_p < 1:
            order = p.argsort(descending=True)
            keep = (p[order].cumsum(0) - p[order]) < top_p
            p = torch.zeros_like(p).index_put_((order[keep],), p[order][keep])
        p = p / p.sum()
        ids, _, logp = sampler.generate(tiny64, [prompt], group_size=n, max_new_tokens=1, temperature=T, top_k=top_k,
                                  top_p=top_p, seed=5, eos_token_ids=(2,))  # fmt: skip
        freq = torch.bincount(ids[:, 0], minlength=p.numel()).double() / n
        assert (freq - p).abs().max() < 0.03, (T, top_k, top_p)
        assert freq[p == 0].sum() == 0  # nothing outside the top-k / top-p set
        # the returned log-prob is log softmax(logits / T) over the full vocabulary at the sampled token
        # (the sampler works in float32: 1e-5 covers float32 round-off of log-probs of size ~10)
        full = torch.log_softmax(logits / T, -1)
        assert torch.allclose(logp[:, 0].double(), full[ids[:, 0]], atol=1e-5)


def test_sampling_logprobs_equal_recomputed_full_forward(tiny64):
    """What the trainer recomputes (one forward over prompt + completion, logits / T) equals what the cached
    sampler reported: the temperature and position rules agree between the two paths."""
    T = 0.8
    ids, mask, logp = sampler.generate(tiny64, PROMPTS, group_size=2, max_new_tokens=9, temperature=T, seed=9,
                                 eos_token_ids=[3])  # fmt: skip
    for r in range(ids.shape[0]):
        p = PROMPTS[r // 2]
        n = int(mask[r].sum())
        seq = torch.tensor([p + ids[r, :n].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(tiny64(seq)[0, len(p) - 1 : -1] / T, -1)
        assert torch.allclose(lp.gather(-1, ids[r, :n, None])[:, 0], logp[r, :n].double(), atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------------------------


def one_line_error(fn, *match):
    with pytest.raises(M.ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_errors_are_one_line_and_name_the_problem(tiny_dirs, tmp_path):
    one_line_error(lambda: M.Transformer.from_pretrained(tmp_path / "nope"), "nope", "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: M.Transformer.from_pretrained(tmp_path / "empty"), "config.json", "not found")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(lambda: M.Transformer.from_pretrained(bad), "unsupported model_type", "gpt2")
    # a tensor of the wrong shape: claim a bigger intermediate size than the weights have
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    src = tiny_dirs["llama_tied"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    one_line_error(lambda: M.Transformer.from_pretrained(wrong), "mlp", "shape", "(128, 64)")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: M.Transformer.from_pretrained(noweights), "no model.safetensors")


def test_builtin_cache_is_converted_once_and_half_written_is_redone(tmp_path, monkeypatch):
    """The caching logic around the (slow) conversion, with the conversion replaced by a fast fake."""
    calls = []

    def fake_convert(gguf_path, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "convert_gguf", fake_convert)
    d = builtin.builtin_model_dir()
    assert builtin.builtin_model_dir() == d and len(calls) == 1  # second call: no-op
    (tmp_path / builtin.BUILTIN_NAME / ".converted-from").unlink()  # as if the process died before finishing
    assert builtin.builtin_model_dir() == d and len(calls) == 2
    assert not any(p.name.startswith(f"{builtin.BUILTIN_NAME}.tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("candidates", [3, 40, 1024])
def test_nucleus_from_top_candidates_equals_full_sort(candidates, monkeypatch):
    """Top-p from the k most likely tokens (falling back to a full sort when they hold less than p) keeps exactly the
    tokens an independent full-sort nucleus keeps, with the same probabilities."""
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 500, generator=g) * torch.linspace(0.5, 6, 64)[:, None], -1)
    for top_p in (0.3, 0.9):
        cand_p, cand_ids = sampler.nucleus(probs, top_p)
        got = torch.zeros_like(probs).scatter_(-1, cand_ids, cand_p)
        want = torch.zeros_like(probs)
        for r in range(64):
            order = sorted(range(500), key=lambda v: -probs[r, v].item())
            mass = 0.0
            for v in order:  # keep tokens until the ones before reach top_p
                if mass >= top_p:
                    break
                want[r, v] = probs[r, v]
                mass += probs[r, v].item()
        assert torch.equal(got > 0, want > 0) and torch.allclose(got, want)


def test_rotary_frequencies_stay_fp32_in_bf16_and_long_positions_agree():
    """Every way the code puts a model in bf16 (loading in bf16, model.to, fp32 masters beside a bf16 model, the
    LoRA base cast) keeps inv_freq in fp32: rounded to bf16 (8 bits of mantissa) the phase at position p is off by
    up to p * inv_freq * 2^-9, radians by 2k tokens. q and k weights of std 0.2 make attention depend sharply on
    the relative position. At positions 1984-2047 the bf16 model's logits stay within 15% (mean absolute
    difference over the mean absolute logit) of the fp32 model's: bf16 weights and activations alone measured 4%;
    the same model with bf16-rounded frequencies measured 39%, and the test shows it exceeds the bound."""
    import distributed

    cfg = M.ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                        max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    fp32 = M.Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in fp32.named_parameters():
            std = 0.2 if "q_proj" in n or "k_proj" in n else 0.05
            p.copy_(std * torch.randn_like(p) + (1.0 if p.dim() == 1 else 0.0))  # norms ~1
    expected = M.rope_inv_freq(cfg)
    casts = {
        "model.to": lambda m: m.to(torch.bfloat16),
        "bfloat16()": lambda m: m.bfloat16(),
        "fp32 masters": lambda m: distributed.keep_master_weights(m, torch.bfloat16) or m,
    }
    for name, cast in casts.items():
        m = cast(copy.deepcopy(fp32))
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, expected), name
        assert m.model.embed_tokens.weight.dtype == torch.bfloat16, name

    ids = torch.randint(0, 97, (1, 2048), generator=torch.Generator().manual_seed(1))

    def late_error(model):
        with torch.no_grad():
            ref, got = fp32(ids)[0, -64:], model(ids)[0, -64:].float()  # (64, V) each
        return ((got - ref).abs().mean() / ref.abs().mean()).item()

    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert late_error(bf16) < 0.15
    bf16.inv_freq = expected.to(torch.bfloat16).float()  # what model.to(bf16) did before
    assert late_error(bf16) > 0.15


def test_stop_string_tables_are_built_once_per_tokenizer_and_dropped_with_it():
    """The tables are cached per tokenizer object (not per id(), which a later object can reuse) and leave the cache
    when the tokenizer is gone."""
    import gc

    class Tok:
        calls = 0

        def batch_decode(self, ids, skip_special_tokens=False):
            Tok.calls += 1
            return ["<", "/", "a", ">", "x"][: len(ids)]

    tok = Tok()
    sampler.StopStrings(tok, ["</a>"], 5, 2, "cpu")
    sampler.StopStrings(tok, ["</a>"], 5, 3, "cpu")
    assert Tok.calls == 1  # built once for this tokenizer
    n = len(sampler.StopStrings._tables)
    del tok
    gc.collect()
    assert len(sampler.StopStrings._tables) == n - 1
