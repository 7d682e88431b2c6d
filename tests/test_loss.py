"""grpo_loss and group_advantages against an independent float64 reference written here with plain Python math."""

import itertools
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import group_advantages, grpo_loss  # noqa: E402

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLS = ["k1", "k2", "k3"]
CLIPS = [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)]


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, agg):
    """Element by element in Python floats (float64): the definitions (docs/METHOD.md), nothing shared with grpo.py."""
    B, T = len(logp), len(logp[0])
    per_seq_sum, per_seq_len = [], []
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            ratio = math.exp(max(-20.0, min(20.0, logp[i][t] - old[i][t])))
            clipped_ratio = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
            surrogate = min(ratio * adv[i], clipped_ratio * adv[i])
            d = max(-20.0, min(20.0, ref[i][t] - logp[i][t]))
            k = {"k1": -d, "k2": d * d / 2.0, "k3": math.exp(d) - d - 1.0}[kl]
            s += -(surrogate - beta * k)
            n += 1
        per_seq_sum.append(s)
        per_seq_len.append(n)
    if agg == "token-mean":
        return sum(per_seq_sum) / max(sum(per_seq_len), 1)
    if agg == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_len)) / B
    return sum(per_seq_sum) / (B * T)


def random_case(seed, B=None, T=None, dtype=torch.float64):
    g = random.Random(seed)
    B = B or g.randint(1, 5)
    T = T or g.randint(1, 7)
    logp = [[-3.0 * g.random() for _ in range(T)] for _ in range(B)]
    old = [[x + g.gauss(0, 0.4) for x in row] for row in logp]  # ratios spread across both clip edges
    ref = [[x + g.gauss(0, 0.6) for x in row] for row in logp]
    adv = [g.gauss(0, 1) for _ in range(B)]
    lens = [g.randint(0, T) for _ in range(B)]  # completions end at different places
    mask = [[1 if t < n else 0 for t in range(T)] for n in lens]
    tensors = [torch.tensor(x, dtype=dtype) for x in (logp, old, ref, adv, mask)]
    return (logp, old, ref, adv, mask), tensors


# Hand-computed 2x3 example. eps_low = eps_high = 0.2, beta = 0.1, k3, A = [+1, -2].
#   row 0: logp = [-1.0, -2.0, -1.5], old = [-1.0, -2.5, -1.0], ref = [-1.0, -1.0, -2.5], mask [1, 1, 1]
#          log-ratio = [0, 0.5, -0.5] -> ratio = [1, 1.648721, 0.606531]
#          A = +1: unclipped = ratio, clipped = [1, 1.2, 0.8]; min = [1, 1.2, 0.606531]   (t=1 clipped high)
#          d = ref - logp = [0, 1, -1]; k3 = e^d - d - 1 = [0, 0.718282, 0.367879]
#   row 1: logp = [-0.7, -1.4, -3.0], old = [-0.4, -1.8, -8.0], ref = [-0.2, -1.4, -0.1], mask [1, 1, 0]
#          log-ratio = [-0.3, 0.4, (5.0 masked)] -> ratio = [0.740818, 1.491825]
#          A = -2: unclipped = [-1.481636, -2.983649], clipped = [-1.6, -2.4]; min = [-1.6, -2.983649]
#          (t=0 clipped low; t=1 not clipped: the min keeps the unclipped, more pessimistic term)
#          d = [0.5, 0]; k3 = [e^0.5 - 1.5, 0] = [0.148721, 0]
#   surrogate sum = 1 + 1.2 + 0.606531 - 1.6 - 2.983649 = -1.777118;  k3 sum = 1.234882
#   loss sum = 1.777118 + 0.1 * 1.234882 = 1.900606
#   token-mean              = 1.900606 / 5 tokens = 0.380121
#   seq-mean-token-mean     : row 0 = (-2.806531 + 0.108616) / 3 = -0.899305; row 1 = (4.583649 + 0.014872) / 2 = 2.299261
#                             mean = 0.699978
#   seq-mean-token-sum-norm = 1.900606 / (2 * 3) = 0.316768
#   clip fractions over 5 tokens: low 1/5 (row 1, t=0), high 1/5 (row 0, t=1)
HAND = dict(
    logp=[[-1.0, -2.0, -1.5], [-0.7, -1.4, -3.0]],
    old=[[-1.0, -2.5, -1.0], [-0.4, -1.8, -8.0]],
    ref=[[-1.0, -1.0, -2.5], [-0.2, -1.4, -0.1]],
    adv=[1.0, -2.0],
    mask=[[1, 1, 1], [1, 1, 0]],
)


@pytest.mark.parametrize(
    "agg,expected",
    [("token-mean", 0.380121), ("seq-mean-token-mean", 0.699978), ("seq-mean-token-sum-norm", 0.316768)],
)
def test_hand_computed_2x3(agg, expected):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND.items()}
    loss, m = grpo_loss(
        t["logp"],
        t["old"],
        t["ref"],
        t["adv"],
        t["mask"],
        eps_low=0.2,
        eps_high=0.2,
        beta=0.1,
        kl="k3",
        agg=agg,
    )
    # the hand values are rounded to 6 decimals, so agreement to 2e-6 is all they can show
    assert loss.item() == pytest.approx(expected, abs=2e-6)
    assert m["clip_frac_low"].item() == pytest.approx(0.2, abs=1e-12)
    assert m["clip_frac_high"].item() == pytest.approx(0.2, abs=1e-12)
    assert m["kl"].item() == pytest.approx(1.234882 / 5, abs=2e-6)
    assert m["surrogate"].item() == pytest.approx(-1.777118 / 5, abs=2e-6)
    assert m["tokens"].item() == 5


@pytest.mark.parametrize("agg,kl,clip", list(itertools.product(AGGS, KLS, CLIPS)))
def test_matches_float64_reference(agg, kl, clip):
    for seed in range(12):
        (lp, old, ref, adv, mask), t = random_case(seed * 31 + len(agg))
        beta = [0.0, 0.04, 0.5][seed % 3]
        loss, _ = grpo_loss(*t, eps_low=clip[0], eps_high=clip[1], beta=beta, kl=kl, agg=agg)
        expected = reference_loss(lp, old, ref, adv, mask, clip[0], clip[1], beta, kl, agg)
        # float64 both sides, a few dozen operations: 1e-12 leaves room for summation order only
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (seed, agg, kl, clip)


@pytest.mark.parametrize("agg", AGGS)
def test_float32_input_matches_reference(agg):
    # The training loop feeds float32 log-probs: the loss must stay within float32 rounding of the reference.
    for seed in range(5):
        (lp, old, ref, adv, mask), t = random_case(100 + seed, B=4, T=16, dtype=torch.float32)
        loss, _ = grpo_loss(*t, eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", agg=agg)
        expected = reference_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, "k3", agg)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)  # ~1e-7 relative per op, 64 terms


def test_gradient_matches_finite_differences():
    # The gradient flows through logp only (old and ref are constants); gradcheck compares autograd with
    # central finite differences in float64. Random values stay away from the kinks of min / clamp.
    for agg, kl in itertools.product(AGGS, KLS):
        _, (logp, old, ref, adv, mask) = random_case(7, B=3, T=4)
        logp.requires_grad_(True)
        f = lambda x: grpo_loss(x, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.3, kl=kl, agg=agg)[
            0
        ]
        assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-7)


def test_mu1_gradient_is_advantage_times_score():
    # With old_logp = logp.detach() the ratio is 1 in value, and d loss / d logp_t = -A_i / num_tokens per token.
    _, (logp, _, _, adv, mask) = random_case(3, B=4, T=5)
    logp.requires_grad_(True)
    loss, m = grpo_loss(logp, None, None, adv, mask)
    loss.backward()
    n = mask.sum()
    expected = -adv.unsqueeze(1) * mask / n
    assert torch.allclose(logp.grad, expected, atol=1e-15)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-15) or n == 0
    assert loss.item() == pytest.approx(-(adv.unsqueeze(1) * mask).sum().item() / max(n.item(), 1), abs=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_invariant_to_micro_batch_split(agg):
    # Summing micro-batch losses normalized by the whole step's token / sequence count gives the full-batch loss
    # and the full-batch gradient, whatever the split (this is what makes gradient accumulation and DDP exact).
    _, (logp, old, ref, adv, mask) = random_case(11, B=7, T=6)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg=agg)
    full_lp = logp.clone().requires_grad_(True)
    full, _ = grpo_loss(full_lp, old, ref, adv, mask, **kw)
    full.backward()
    for splits in ([3, 4], [1, 1, 5], [2, 2, 2, 1]):
        lp = logp.clone().requires_grad_(True)
        total, start = 0.0, 0
        for size in splits:
            sl = slice(start, start + size)
            part, _ = grpo_loss(
                lp[sl], old[sl], ref[sl], adv[sl], mask[sl], num_tokens=mask.sum(), num_seqs=7, **kw
            )
            part.backward()
            total += part.item()
            start += size
        assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-14)  # float64: summation order only
        assert torch.allclose(lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)


def test_extreme_log_ratios_stay_finite():
    # A log-ratio of +-500 would overflow exp; the clamp at +-20 keeps loss, KL and gradient finite.
    logp = torch.tensor([[-0.1, -600.0, -1.0]], dtype=torch.float32, requires_grad=True)
    old = torch.tensor([[-600.0, -0.1, -1.0]])
    ref = torch.tensor([[-700.0, -0.1, 0.0]])
    for kl in KLS:
        loss, m = grpo_loss(logp, old, ref, torch.tensor([1.5]), torch.ones(1, 3), beta=0.1, kl=kl)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(m["kl"])
        logp.grad = None


def test_empty_mask_gives_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    for agg in AGGS:
        loss, m = grpo_loss(
            logp, None, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3), beta=0.1, agg=agg
        )
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_bad_arguments_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(x, x, x, torch.zeros(1), x, agg="sum")
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(x, x, x, torch.zeros(1), x, beta=0.1, kl="k4")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, None, torch.zeros(1), x, beta=0.1)


# ----------------------------------------------------------------------------------------------------------------
# The options added later (GSPO sequence ratios, dual clip, truncated importance sampling against the sampler, the
# sampler / trainer mismatch metrics): an independent float64 reference, and the defaults against today's code.


def reference_loss_ext(
    logp,
    old,
    ref,
    adv,
    mask,
    eps_low,
    eps_high,
    beta,
    kl,
    agg,
    is_level="token",
    clip_c=None,
    sampler=None,
    tis_cap=None,
):
    """Element by element in Python floats, from the definitions: GSPO s_i = exp(mean_t log(pi / pi_old)) clipped
    per sequence (arXiv 2507.18071); dual clip for A < 0, loss_t <= c |A| (arXiv 1912.09729, verl's clip_ratio_c);
    truncated importance sampling w = min(pi_old / pi_sampler, C) on the policy term, per token or, at sequence
    level, from the product of the token ratios (TRL's token_truncate / sequence_truncate)."""
    B, T = len(logp), len(logp[0])
    clamp = lambda x: max(-20.0, min(20.0, x))
    per_seq_sum, per_seq_len = [], []
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        if is_level == "sequence":
            seq_lr = sum(clamp(logp[i][t] - old[i][t]) for t in toks) / max(len(toks), 1)
        if sampler is not None and is_level == "sequence":
            seq_w = math.exp(clamp(sum(old[i][t] - sampler[i][t] for t in toks)))
        s = 0.0
        for t in toks:
            ratio = math.exp(seq_lr) if is_level == "sequence" else math.exp(clamp(logp[i][t] - old[i][t]))
            clipped_ratio = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
            surrogate = min(ratio * adv[i], clipped_ratio * adv[i])
            if clip_c is not None and adv[i] < 0:
                surrogate = max(surrogate, clip_c * adv[i])
            if tis_cap is not None:
                w = seq_w if is_level == "sequence" else math.exp(clamp(old[i][t] - sampler[i][t]))
                surrogate *= min(w, tis_cap)
            d = clamp(ref[i][t] - logp[i][t])
            k = {"k1": -d, "k2": d * d / 2.0, "k3": math.exp(d) - d - 1.0}[kl]
            s += -(surrogate - beta * k)
        per_seq_sum.append(s)
        per_seq_len.append(len(toks))
    if agg == "token-mean":
        return sum(per_seq_sum) / max(sum(per_seq_len), 1)
    if agg == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_len)) / B
    return sum(per_seq_sum) / (B * T)


def random_ext_case(seed, B=4, T=6):
    """random_case plus a per-row shift of the old log-probs (so whole sequences leave the clip range, for GSPO) and
    sampler log-probs scattered around the old ones."""
    (lp, old, ref, adv, mask), t = random_case(seed, B=B, T=T)
    g = random.Random(seed + 1)
    old = [[x + shift for x in row] for row, shift in zip(old, (g.gauss(0, 0.4) for _ in old))]
    sampler = [[x + g.gauss(0, 0.3) for x in row] for row in old]
    mask = [[1 if t < max(n, 1) else 0 for t in range(T)] for n in (sum(r) for r in mask)]  # no empty row
    t = [t[0], torch.tensor(old, dtype=torch.float64), t[2], t[3], torch.tensor(mask, dtype=torch.float64)]
    return (lp, old, ref, adv, mask, sampler), t + [torch.tensor(sampler, dtype=torch.float64)]


OPTIONS = {  # each new option alone, and all of them together
    "gspo": dict(is_level="sequence"),
    "dual_clip": dict(clip_ratio_c=1.5),
    "tis_token": dict(tis_cap=1.2),
    "tis_sequence": dict(is_level="sequence", tis_cap=1.5),
    "all": dict(is_level="sequence", clip_ratio_c=2.0, tis_cap=1.3),
    "all_token": dict(clip_ratio_c=2.0, tis_cap=1.3),
}


@pytest.mark.parametrize("agg,option", list(itertools.product(AGGS, OPTIONS)))
def test_new_options_match_float64_reference_value_and_gradient(agg, option):
    kw = OPTIONS[option]
    for seed in range(6):
        (lp, old, ref, adv, mask, sampler), (logp, old_t, ref_t, adv_t, mask_t, sampler_t) = random_ext_case(
            seed * 7
        )
        beta = [0.0, 0.1][seed % 2]
        logp = logp.clone().requires_grad_(True)
        loss, m = grpo_loss(
            logp,
            old_t,
            ref_t,
            adv_t,
            mask_t,
            eps_low=0.2,
            eps_high=0.28,
            beta=beta,
            kl="k3",
            agg=agg,
            sampler_logp=sampler_t,
            **kw,
        )
        ref_kw = dict(
            is_level=kw.get("is_level", "token"),
            clip_c=kw.get("clip_ratio_c"),
            sampler=sampler,
            tis_cap=kw.get("tis_cap"),
        )
        expected = reference_loss_ext(lp, old, ref, adv, mask, 0.2, 0.28, beta, "k3", agg, **ref_kw)
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (seed, agg, option)
        # gradient: central differences of the float64 reference (h = 1e-6: truncation error ~1e-12 away from the
        # kinks of min / clamp, which random values miss; 1e-6 absolute covers the 1e-10 round-off of the quotient)
        loss.backward()
        h = 1e-6
        for i in range(len(lp)):
            for t in range(len(lp[0])):
                up = [row[:] for row in lp]
                dn = [row[:] for row in lp]
                up[i][t] += h
                dn[i][t] -= h
                fd = (
                    reference_loss_ext(up, old, ref, adv, mask, 0.2, 0.28, beta, "k3", agg, **ref_kw)
                    - reference_loss_ext(dn, old, ref, adv, mask, 0.2, 0.28, beta, "k3", agg, **ref_kw)
                ) / (2 * h)
                assert logp.grad[i, t].item() == pytest.approx(fd, abs=1e-6), (seed, agg, option, i, t)


def test_options_reach_their_regimes():
    """The random cases above exercise what they test: GSPO clips whole sequences, the dual clip binds, the TIS
    weights are truncated. A test of an option that never acts would pass for a broken option too."""
    (lp, old, ref, adv, mask, sampler), t = random_ext_case(3, B=16, T=8)
    logp, old_t, ref_t, adv_t, mask_t, sampler_t = t
    _, plain = grpo_loss(logp, old_t, None, adv_t, mask_t, eps_high=0.28)
    _, dual = grpo_loss(logp, old_t, None, adv_t, mask_t, eps_high=0.28, clip_ratio_c=1.5)
    assert dual["policy_loss"] < plain["policy_loss"]  # some A < 0 token hit the c |A| bound
    _, tis = grpo_loss(logp, old_t, None, adv_t, mask_t, sampler_logp=sampler_t, tis_cap=1.2)
    assert tis["sampling/importance_sampling_ratio/max"].item() == pytest.approx(1.2)  # truncated at the cap
    _, seq = grpo_loss(logp, old_t, None, adv_t, mask_t, is_level="sequence")
    assert 0 < seq["clip_frac"] < 1  # some sequences clipped, not all


def test_mismatch_metrics_hand_computed():
    # old - sampler = [[0.1, -0.2, (masked 5.0)], [0.0, 0.3, 0.05]]; 5 completion tokens
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.2, -1.0]], dtype=torch.float64)
    sampler = old - torch.tensor([[0.1, -0.2, 5.0], [0.0, 0.3, 0.05]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, m = grpo_loss(old.clone(), old, None, adv, mask, sampler_logp=sampler)
    assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx(
        (0.1 + 0.2 + 0 + 0.3 + 0.05) / 5
    )
    assert m["sampling/sampling_logp_difference/max"].item() == pytest.approx(0.3)
    w = [math.exp(x) for x in (0.1, -0.2, 0.0, 0.3, 0.05)]
    assert m["sampling/importance_sampling_ratio/min"].item() == pytest.approx(min(w))
    assert m["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(sum(w) / 5)
    assert m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(max(w))
    _, s = grpo_loss(
        old.clone(), old, None, adv, mask, sampler_logp=sampler, is_level="sequence", tis_cap=1.3
    )
    seq = [min(math.exp(0.1 - 0.2), 1.3), min(math.exp(0.0 + 0.3 + 0.05), 1.3)]  # rows: 0.905, capped 1.3
    assert s["sampling/importance_sampling_ratio/min"].item() == pytest.approx(seq[0])
    assert s["sampling/importance_sampling_ratio/max"].item() == pytest.approx(1.3)
    # TRL's meaning at sequence level: the mean over sequences, not over tokens ((2 * seq[0] + 3 * seq[1]) / 5)
    assert s["sampling/importance_sampling_ratio/mean"].item() == pytest.approx((seq[0] + seq[1]) / 2)


def grpo_loss_before(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    eps_low=0.2,
    eps_high=0.2,
    beta=0.0,
    kl="k3",
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
):
    """grpo_loss as of commit 6f23b25, verbatim but for this docstring and the name."""
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()  # mu = 1: ratio = 1 in value, but not in gradient
    A = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1), broadcast over tokens

    # ratio_t = exp(logp_t - old_logp_t), the log-ratio clamped so exp cannot overflow
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    # surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    surrogate = torch.minimum(unclipped, clipped)  # (B, T)

    # KL(policy || reference) per token; d = ref_logp - logp, clamped like the ratio
    if beta != 0.0 or ref_logp is not None:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logp")
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)  # (B, T)
        if kl == "k1":
            kl_t = -d  # k1 = logp - ref_logp (unbiased, can be negative)
        elif kl == "k2":
            kl_t = 0.5 * d * d  # k2 = (logp - ref_logp)^2 / 2
        elif kl == "k3":
            kl_t = torch.exp(d) - d - 1.0  # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, low variance
        else:
            raise ValueError(f"grpo_loss: kl must be k1, k2 or k3, got {kl!r}")
    else:
        kl_t = torch.zeros_like(logp)

    # loss_t = -(surrogate_t - beta * kl_t)
    per_token = -(surrogate - beta * kl_t)  # (B, T)

    B, T = logp.shape
    if agg == "token-mean":
        # sum_{i,t} mask * loss_t / (completion tokens of the whole step)
        n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = (per_token * mask).sum() / torch.clamp(n, min=1.0)
    elif agg == "seq-mean-token-mean":
        # (1 / num_seqs) sum_i [ sum_t mask * loss_t / |o_i| ]
        seq_len = torch.clamp(mask.sum(1), min=1.0)  # (B,) empty rows -> 0 loss
        n_seq = B if num_seqs is None else num_seqs
        loss = ((per_token * mask).sum(1) / seq_len).sum() / max(n_seq, 1)
    elif agg == "seq-mean-token-sum-norm":
        # (1 / (num_seqs * T)) sum_{i,t} mask * loss_t: a constant normalizer, no length bias
        n_seq = B if num_seqs is None else num_seqs
        loss = (per_token * mask).sum() / (max(n_seq, 1) * T)
    else:
        raise ValueError(
            f"grpo_loss: agg must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, got {agg!r}"
        )

    # Metrics: token-means over this batch's completion tokens. With mu = 1 the loss value is ~ -mean(A) ~ 0 by
    # construction, so the surrogate, the KL and the clip fractions are logged separately.
    with torch.no_grad():
        n_tok = torch.clamp(mask.sum(), min=1.0)
        mean = lambda x: (x * mask).sum() / n_tok
        # the clip is active (gradient zero) only on the side where it binds for the sign of A
        low = ((ratio < 1.0 - eps_low) & (A < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (A > 0)).to(logp.dtype)
        metrics = {
            "loss": loss.detach(),
            "policy_loss": mean(-surrogate),
            "surrogate": mean(surrogate),
            "kl": mean(kl_t),
            "ratio_mean": mean(ratio),
            "ratio_max": (ratio * mask).max() if mask.any() else torch.ones((), dtype=logp.dtype),
            "clip_frac_low": mean(low),
            "clip_frac_high": mean(high),
            "clip_frac": mean(low + high),
            "tokens": mask.sum(),
        }
    return loss, metrics


@pytest.mark.parametrize("agg,kl", list(itertools.product(AGGS, KLS)))
def test_defaults_bit_identical_to_before_the_options(agg, kl):
    """With the new options off, loss, gradient and every old metric equal the code of 6f23b25 (copied above) bit
    for bit; passing sampler_logp without tis_cap only adds the mismatch metrics."""
    for seed in range(4):
        _, (logp, old, ref, adv, mask) = random_case(seed + 50, B=5, T=7, dtype=torch.float32)
        for old_in in (old, None):
            a, b, c = (logp.clone().requires_grad_(True) for _ in range(3))
            kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl=kl, agg=agg, num_tokens=mask.sum() + 3)
            now, m_now = grpo_loss(a, old_in, ref, adv, mask, **kw)
            then, m_then = grpo_loss_before(b, old_in, ref, adv, mask, **kw)
            with_sampler, m_s = grpo_loss(c, old_in, ref, adv, mask, sampler_logp=old - 0.01, **kw)
            now.backward(), then.backward(), with_sampler.backward()
            assert torch.equal(now, then) and torch.equal(with_sampler, then)
            assert torch.equal(a.grad, b.grad) and torch.equal(c.grad, b.grad)
            for k, v in m_then.items():
                assert torch.equal(m_now[k], v) and torch.equal(m_s[k], v), k
            assert set(m_s) - set(m_then) == {
                "sampling/sampling_logp_difference/mean",
                "sampling/sampling_logp_difference/max",
                "sampling/importance_sampling_ratio/min",
                "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max",
            }


def test_new_options_bad_arguments_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="is_level"):
        grpo_loss(x, x, None, torch.zeros(1), x, is_level="word")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        grpo_loss(x, x, None, torch.zeros(1), x, clip_ratio_c=0.9)
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(x, x, None, torch.zeros(1), x, tis_cap=2.0)


def test_bad_tis_values_raise():
    """tis_cap = 0 applied an uncapped weight (`tis_cap or math.inf`) and tis_cap = -1 made every weight -1,
    flipping the policy term's sign; given in code, such values must raise, as the command line refuses them."""
    x, s = torch.zeros(1, 2), torch.zeros(1, 2)
    for cap in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tis_cap"):
            grpo_loss(x, x, None, torch.ones(1), torch.ones(1, 2), sampler_logp=s, tis_cap=cap)
    with pytest.raises(ValueError, match="tis_min"):
        grpo_loss(x, x, None, torch.ones(1), torch.ones(1, 2), sampler_logp=s, tis_cap=2.0, tis_min=-0.5)


# ----------------------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_reference():
    g = random.Random(0)
    G = 4
    rewards = [g.choice([0.0, 0.25, 0.5, 1.0, 2.0]) for _ in range(6 * G)]
    groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
    batch_std = statistics.stdev(rewards)
    got = {s: group_advantages(torch.tensor(rewards), G, scale=s) for s in ("group", "batch", "none")}
    for i, grp in enumerate(groups):
        mu = statistics.fmean(grp)
        equal = len(set(grp)) == 1
        for j, r in enumerate(grp):
            k = i * G + j
            want_none = 0.0 if equal else r - mu
            want_group = 0.0 if equal else (r - mu) / (statistics.stdev(grp) + 1e-4)
            want_batch = 0.0 if equal else (r - mu) / (batch_std + 1e-4)
            # output is float32: 1e-6 relative
            assert got["none"][k].item() == pytest.approx(want_none, rel=1e-6, abs=1e-7)
            assert got["group"][k].item() == pytest.approx(want_group, rel=1e-6, abs=1e-7)
            assert got["batch"][k].item() == pytest.approx(want_batch, rel=1e-6, abs=1e-7)


def test_all_equal_groups_are_exactly_zero():
    # 0.1 + 0.1 + 0.1 is not 0.3 in floating point, so "r - mean" alone would leave ~1e-17 / (0 + eps) noise
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 3, scale=scale)
        assert torch.isfinite(adv).all()
        assert (adv[:6] == 0).all()
        assert adv[6] < 0 < adv[8]
    assert (group_advantages(torch.ones(8), 8) == 0).all()
    assert (group_advantages(torch.tensor([0.5, 0.7]), 1) == 0).all()  # G = 1: nothing to compare, no NaN
