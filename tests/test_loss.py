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
from grpo import grpo_loss, group_advantages  # noqa: E402

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLS = ["k1", "k2", "k3"]
CLIPS = [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)]


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, agg):
    """Element by element in Python floats (float64): the definitions of grpo-notes.md, nothing shared with grpo.py."""
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
    old = [[x + g.gauss(0, 0.4) for x in row] for row in logp]          # ratios spread across both clip edges
    ref = [[x + g.gauss(0, 0.6) for x in row] for row in logp]
    adv = [g.gauss(0, 1) for _ in range(B)]
    lens = [g.randint(0, T) for _ in range(B)]                            # completions end at different places
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


@pytest.mark.parametrize("agg,expected", [("token-mean", 0.380121), ("seq-mean-token-mean", 0.699978),
                                          ("seq-mean-token-sum-norm", 0.316768)])
def test_hand_computed_2x3(agg, expected):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND.items()}
    loss, m = grpo_loss(t["logp"], t["old"], t["ref"], t["adv"], t["mask"], eps_low=0.2, eps_high=0.2, beta=0.1,
                        kl="k3", agg=agg)
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
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)   # ~1e-7 relative per op, 64 terms


def test_gradient_matches_finite_differences():
    # The gradient flows through logp only (old and ref are constants); gradcheck compares autograd with
    # central finite differences in float64. Random values stay away from the kinks of min / clamp.
    for agg, kl in itertools.product(AGGS, KLS):
        _, (logp, old, ref, adv, mask) = random_case(7, B=3, T=4)
        logp.requires_grad_(True)
        f = lambda x: grpo_loss(x, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.3, kl=kl, agg=agg)[0]
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
            part, _ = grpo_loss(lp[sl], old[sl], ref[sl], adv[sl], mask[sl], num_tokens=mask.sum(), num_seqs=7, **kw)
            part.backward()
            total += part.item()
            start += size
        assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-14)   # float64: summation order only
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
        loss, m = grpo_loss(logp, None, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3),
                            beta=0.1, agg=agg)
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
# group_advantages

def test_group_advantages_reference():
    g = random.Random(0)
    G = 4
    rewards = [g.choice([0.0, 0.25, 0.5, 1.0, 2.0]) for _ in range(6 * G)]
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
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
    assert (group_advantages(torch.tensor([0.5, 0.7]), 1) == 0).all()      # G = 1: nothing to compare, no NaN
