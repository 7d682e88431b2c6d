"""Attention as CUDA runs it, checked on CPU: the packed mask built from segment ids where they live, the fused-only
SDPA call (its allowed kernels, K/V repeated when grouped heads are not taken, a one-line error instead of the math
fallback), the whole packed scorer through that route, and the decode step's folded single-query attention."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import logprobs  # noqa: E402
import model as M  # noqa: E402
from kernels import decode  # noqa: E402


def host_packed_mask(seg):
    """The mask pack_groups built on the host before it moved to the device: the reference."""
    S = seg.shape[1]
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0) & (q_seg >= 0)
    mask |= torch.eye(S, dtype=torch.bool)
    return mask[:, None]


def random_packing(seed, P=3, G=4, M=7):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()]
    prompts += [torch.randint(3, 60, (5,), generator=g).tolist() for _ in range(P - 1)]
    comp = torch.randint(3, 60, (P * G, M), generator=g)
    lengths = torch.randint(0, M + 1, (P * G,), generator=g)  # rows of length 0 and 1 too
    return prompts, comp, lengths, torch.arange(P * G) // G


@pytest.mark.parametrize("seed", range(4))
def test_packed_mask_from_segment_ids_equals_the_host_mask(seed):
    prompts, comp, lengths, rows_prompt = random_packing(seed)
    _, _, seg, _ = logprobs.pack_groups(prompts, comp, lengths, rows_prompt)
    assert torch.equal(M.packed_attention_mask(seg), host_packed_mask(seg))


def test_packed_mask_is_built_where_the_segment_ids_are():
    # a meta tensor has no data: any host tensor inside the construction would fail or land elsewhere
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]], device="meta")
    mask = M.packed_attention_mask(seg)
    assert mask.device.type == "meta" and mask.shape == (1, 1, 6, 6)
    bias = M.additive_mask(mask, torch.bfloat16, M.MASK_ALIGN)
    assert bias.device.type == "meta" and bias.shape == (1, 1, 6, 6)


def test_additive_mask_rows_are_aligned_for_the_fused_kernels():
    """With align 16 the rows are stored 16 elements apart (what the memory-efficient kernel takes without a copy),
    the values are those of the contiguous mask, and the storage is what memory.memory_plan counts."""
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3], [0, 0, 1, 2, 2, -1, -1, -1, -1]])
    allowed = M.packed_attention_mask(seg)  # (2, 1, 9, 9)
    plain, aligned = M.additive_mask(allowed, torch.float32), M.additive_mask(allowed, torch.float32, 16)
    assert plain.is_contiguous() and aligned.stride() == (9 * 16, 9 * 16, 16, 1)
    assert torch.equal(plain, aligned)
    assert torch.equal(plain == 0, allowed) and (plain[~allowed] == float("-inf")).all()
    assert aligned.untyped_storage().nbytes() == 2 * 9 * 16 * 4  # prompts * S * S_stored * b


def test_fused_backends_never_allow_math_and_take_a_mask_when_there_is_one():
    masked, unmasked = M.fused_backends(True), M.fused_backends(False)
    assert set(masked) == {SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION}  # flash takes no mask
    assert set(unmasked) == set(masked) | {SDPBackend.FLASH_ATTENTION}
    assert SDPBackend.MATH not in masked + unmasked


def qkv_mask(dtype, B=2, nh=6, n_kv=2, T=9, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, hd, generator=g, dtype=dtype) for n in (nh, n_kv, n_kv))
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3], [0, 0, 1, 2, 2, -1, -1, -1, -1]])
    mask = M.additive_mask(M.packed_attention_mask(seg), dtype, M.MASK_ALIGN)  # (B, 1, T, T), rows 16 apart
    return q, k, v, mask


def reference(q, k, v, mask, is_causal=False):
    """Today's CPU call, in float64 by the math backend."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            q.double(),
            k.double(),
            v.double(),
            attn_mask=None if mask is None else mask.double(),
            is_causal=is_causal,
            enable_gqa=True,
        )


@pytest.mark.parametrize("grouped", [True, False], ids=["gqa-taken", "kv-repeated"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("masked", [True, False])
def test_fused_attention_equals_todays_call(monkeypatch, grouped, dtype, tol, masked):
    """fused_attention, run on CPU by the one fused kernel SDPA has there (flash, which takes a mask on CPU), against
    the float64 math call, output and gradients; with K/V heads handed over grouped (a kernel takes enable_gqa) or
    repeated (none does). Tolerances: float64 1e-12, float32 1e-5 absolute (values and gradients are O(1))."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], kw["enable_gqa"]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(M, "takes_grouped_kv", lambda *a: grouped)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, mask = qkv_mask(dtype)
    mask = mask if masked else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y = M.fused_attention(q, k, v, mask, is_causal=not masked, backends=[SDPBackend.FLASH_ATTENTION])
    assert calls == (
        [(2, True)] if grouped else [(6, False)]
    )  # K/V repeated only when no kernel takes groups
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(qd, kd, vd, mask, is_causal=not masked)
    assert y.dtype == dtype and (y.double() - ref).abs().max() < tol
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in ((q, qd), (k, kd), (v, vd)):  # repeat's backward sums each group into its K/V head
        assert (got.grad.double() - want.grad).abs().max() < tol


def test_no_fused_kernel_is_a_one_line_model_error():
    """On CPU the CUDA kernels cannot run: where SDPA would fall back to math, fused_attention says so in one line
    naming the fix. Without the kernel restriction this call would return math's result instead."""
    q, k, v, mask = qkv_mask(torch.float32)
    for m, backends in ((mask, None), (None, [SDPBackend.EFFICIENT_ATTENTION])):
        with pytest.raises(M.ModelError) as e:
            M.fused_attention(q, k, v, m, is_causal=m is None, backends=backends)
        msg = str(e.value)
        assert "\n" not in msg and "no fused kernel" in msg and "--micro-batch" in msg, msg
        assert "(2, 6, 9, 8) float32" in msg
    with pytest.raises(RuntimeError, match="same dtype"):  # any other error is not reworded
        M.fused_attention(q, k.double(), v, None, backends=[SDPBackend.FLASH_ATTENTION])


def tiny_gqa_model(seed=0):
    torch.manual_seed(seed)
    cfg = M.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qk_norm=True,
    )
    return M.Transformer(cfg).double()


def test_packed_scorer_through_the_cuda_route_equals_the_cpu_route(monkeypatch):
    """completion_logprobs with the model routed as on CUDA (fused_attention, flash standing in for the CUDA
    kernels, K/V repeated since torch answers no kernel takes groups on CPU, the mask's rows 16 apart) against the
    CPU route, float64: log-probs and gradients within 1e-10. The model gets (P, S) segment ids, never an S x S
    tensor: the mask is built inside forward, where the ids are."""
    model = tiny_gqa_model()
    prompts, comp, lengths, rows_prompt = random_packing(5, P=2, G=3, M=6)
    comp_mask = (torch.arange(6)[None, :] < lengths[:, None]).double()
    seen, masks = [], []
    forward = model.forward

    def spy(*args, **kw):
        seen.extend(t.shape for t in [*args, *kw.values()] if isinstance(t, torch.Tensor))
        return forward(*args, **kw)

    sdpa = F.scaled_dot_product_attention

    def record(q, k, v, **kw):
        masks.append((kw["attn_mask"].stride(), k.shape[1]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model, "forward", spy)
    outs = []
    for route in ("cpu", "cuda"):
        if route == "cuda":
            monkeypatch.setattr(M, "fused_kernels_only", lambda device: True)
            monkeypatch.setattr(M, "fused_backends", lambda masked: [SDPBackend.FLASH_ATTENTION])
            monkeypatch.setattr(F, "scaled_dot_product_attention", record)
        model.zero_grad()
        lp = logprobs.completion_logprobs(model, prompts, comp, comp_mask, rows_prompt, 0.8)
        (lp * comp_mask).sum().backward()
        outs.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    assert all(len(s) <= 2 for s in seen), seen  # ids, positions, segment ids: no (P, 1, S, S) mask
    S = seen[0][1]
    assert masks and all(m == ((S * 16, S * 16, 16, 1), 4) for m in masks), (
        masks,
        S,
    )  # aligned, K/V repeated
    (lp0, g0), (lp1, g1) = outs
    assert (lp0 - lp1).abs().max() < 1e-10
    assert max((a - b).abs().max() for a, b in zip(g0, g1)) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_decode_attention_equals_sdpa_with_grouped_heads(dtype, tol):
    """The decode step's attention (query heads of a K/V head folded into one product, the cache's mask additive)
    against F.scaled_dot_product_attention(enable_gqa=True), on a cache view (B, n_kv, S of S_max, hd) as the
    sampler hands it over. Tolerances: float64 1e-12, float32 1e-6 absolute."""
    g = torch.Generator().manual_seed(0)
    B, nh, n_kv, S, S_max, hd = 3, 8, 2, 13, 20, 16
    q = torch.randn(B, 1, nh, hd, generator=g, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(B, n_kv, S_max, hd, generator=g, dtype=dtype)[:, :, :S] for _ in range(2))
    real = torch.ones(B, S, dtype=torch.long)
    real[1, :5] = 0  # a left-padded row
    mask = M.additive_mask(M.attention_mask_4d(real, S - 1, 1), dtype, M.MASK_ALIGN)  # (B, 1, 1, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (decode.single_query_attention(q, k, v, mask) - ref).abs().max() < tol


def test_decode_fp32_scores_keep_16_bit_attention_close(monkeypatch):
    """fp32_scores (the CUDA path for bf16 models): bmm's out_dtype overload runs on CUDA only, so it is emulated
    here by an exact float32 product of the bf16 inputs. Large scores (|s| ~ 30) are where bf16 scores lose the
    softmax: against the float64 reference of the same bf16 inputs, fp32 scores stay within 2e-2 (the bf16 rounding
    of the probabilities and the output), while scores in bf16 are off by more than that."""
    real_bmm = torch.bmm

    def bmm(a, b, out_dtype=None):
        assert out_dtype == torch.float32 and a.dtype == b.dtype == torch.bfloat16
        return real_bmm(a.float(), b.float())

    g = torch.Generator().manual_seed(0)
    B, nh, n_kv, S, hd = 4, 8, 2, 64, 64
    q = (torch.randn(B, 1, nh, hd, generator=g) * 6).bfloat16().transpose(1, 2)
    k = torch.randn(B, n_kv, 80, hd, generator=g).bfloat16()[:, :, :S]
    v = torch.randn(B, n_kv, 80, hd, generator=g).bfloat16()[:, :, :S]
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bfloat16)
    mask[2, ..., :9] = float("-inf")
    ref = reference(q, k, v, mask)
    monkeypatch.setattr(torch, "bmm", bmm)
    got = decode.single_query_attention(q, k, v, mask, fp32_scores=True)
    assert got.dtype == torch.bfloat16 and (got.double() - ref).abs().max() < 2e-2
    bf16_scores = decode.single_query_attention(q, k, v, mask)
    assert (bf16_scores.double() - ref).abs().max() > 2e-2
