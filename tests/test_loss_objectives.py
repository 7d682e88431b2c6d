"""grpo_loss's objectives (CISPO, SAPO) and masks (sampler importance sampling truncate / mask at token or sequence
level, off-policy sequence masking) against a float64 reference written here from the papers' equations in plain
Python math: value, and the gradient with respect to logp (torch.autograd on float64 against the reference's
analytic gradient: CISPO's stop-gradient makes finite differences of the value useless)."""

import itertools
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import grpo_loss  # noqa: E402

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
EPS_LOW, EPS_HIGH, TAU_POS, TAU_NEG, BETA = 0.2, 0.28, 1.0, 1.05, 0.1


def reference(
    logp, old, ref, adv, mask, sampler, agg, objective="clip", is_level="token", tis=None, delta=None
):
    """-> (loss, d loss / d logp as a B x T list). loss_t = -(m_i w_t phi_t) + beta k3_t, aggregated by agg.
    phi_t: clip min(rA, clip(r)A) (PPO); CISPO sg(clip(r)) A log pi (arXiv 2506.13585 eq. 4-5); SAPO
    (4 / tau) sigmoid(tau (r - 1)) A, tau by the sign of A (arXiv 2511.20347 eq. 5-6). r per token, or GSPO's
    exp(mean log-ratio) per sequence. w_t: the sampler weight rho = pi_old / pi_sampler per token or per sequence
    (product), truncated to [lo, hi] or kept inside [lo, hi] and 0 outside. m_i: 0 for A_i < 0 and
    mean_t log(pi_sampler / pi_theta) > delta (DeepSeek-V3.2), else 1."""
    B, T = len(logp), len(logp[0])
    n_all = sum(map(sum, mask))
    grad = [[0.0] * T for _ in range(B)]
    total = 0.0
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        n = len(toks)
        A = adv[i]
        c = {"token-mean": 1 / max(n_all, 1), "seq-mean-token-mean": 1 / (B * max(n, 1))}.get(
            agg, 1 / (B * T)
        )
        m = 1.0
        if delta is not None and A < 0 and sum(sampler[i][t] - logp[i][t] for t in toks) / max(n, 1) > delta:
            m = 0.0
        seq_r = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / max(n, 1))
        seq_rho = math.exp(sum(old[i][t] - sampler[i][t] for t in toks))
        for t in toks:
            r = seq_r if is_level == "sequence" else math.exp(logp[i][t] - old[i][t])
            w = 1.0
            if tis is not None:
                rho = seq_rho if tis["level"] == "sequence" else math.exp(old[i][t] - sampler[i][t])
                lo, hi = tis.get("lo") or 0.0, tis["hi"]
                w = min(max(rho, lo), hi) if tis["mode"] == "truncate" else (rho if lo <= rho <= hi else 0.0)
            clipped = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
            if objective == "clip":
                phi = min(r * A, clipped * A)
                dphi_dr = A if (1 - EPS_LOW <= r <= 1 + EPS_HIGH or r * A < clipped * A) else 0.0
            elif objective == "sapo":
                tau = TAU_POS if A > 0 else TAU_NEG
                s = 1 / (1 + math.exp(-tau * (r - 1)))
                phi, dphi_dr = 4 / tau * s * A, 4 * s * (1 - s) * A
            else:  # CISPO: the weight is a constant, the gradient goes through log pi_t only
                phi, dphi_dr = clipped * A * logp[i][t], 0.0
                grad[i][t] += c * -(m * w * clipped * A)
            d = ref[i][t] - logp[i][t]
            total += c * (-(m * w * phi) + BETA * (math.exp(d) - d - 1))
            grad[i][t] += c * BETA * (1 - math.exp(d))  # d k3 / d logp_t
            # d r / d logp_u: r for u = t at token level; r / |o_i| for every u of the sequence at sequence level
            for u in toks if is_level == "sequence" else [t]:
                grad[i][u] += c * -(m * w * dphi_dr) * (r / n if is_level == "sequence" else r)
    return total, grad


def case(seed, B=5, T=7):
    """Ragged rows (one empty), advantages of both signs, log-ratios to the old policy of +-3 and more (ratios
    far outside any clip range), a per-row shift so sequence-level ratios leave it too, and a sampler that
    differs from the old policy by up to ~e^1 per token."""
    g = random.Random(seed)
    logp = [[-3.0 * g.random() - 0.05 for _ in range(T)] for _ in range(B)]
    shift = [g.choice([-1.0, 1.0]) * g.uniform(0.3, 1.2) for _ in range(B)]
    old = [[x + shift[i] + g.gauss(0, 1.3) for x in row] for i, row in enumerate(logp)]
    ref = [[x + g.gauss(0, 0.5) for x in row] for row in logp]
    sampler = [[x + g.gauss(0, 0.5) for x in row] for row in old]
    adv = [g.choice([-1.0, 1.0]) * g.uniform(0.2, 2.0) for _ in range(B)]
    adv[0], adv[1] = abs(adv[0]), -abs(adv[1])  # both signs, always
    lens = [g.randint(1, T) for _ in range(B)]
    lens[-1] = 0  # an empty completion
    mask = [[1 if t < n else 0 for t in range(T)] for n in lens]
    return logp, old, ref, adv, mask, sampler


CONFIGS = {  # name: (grpo_loss keywords, reference keywords)
    "cispo": (dict(objective="cispo"), dict(objective="cispo")),
    "cispo_gspo": (
        dict(objective="cispo", is_level="sequence"),
        dict(objective="cispo", is_level="sequence"),
    ),
    "sapo": (dict(objective="sapo"), dict(objective="sapo")),
    "sapo_gspo": (dict(objective="sapo", is_level="sequence"), dict(objective="sapo", is_level="sequence")),
    "tis_mask_token": (
        dict(tis_cap=1.5, tis_min=0.5, tis_mode="mask"),
        dict(tis=dict(mode="mask", level="token", lo=0.5, hi=1.5)),
    ),
    "tis_mask_sequence": (
        dict(tis_cap=3.0, tis_mode="mask", tis_level="sequence"),
        dict(tis=dict(mode="mask", level="sequence", hi=3.0)),
    ),
    "tis_truncate_min": (
        dict(tis_cap=1.4, tis_min=0.7),
        dict(tis=dict(mode="truncate", level="token", lo=0.7, hi=1.4)),
    ),
    "gspo_token_tis": (  # a sequence-level ratio with a token-level sampler correction
        dict(is_level="sequence", tis_cap=1.5, tis_level="token"),
        dict(is_level="sequence", tis=dict(mode="truncate", level="token", hi=1.5)),
    ),
    "token_ratio_sequence_tis": (
        dict(tis_cap=2.0, tis_mode="mask", tis_level="sequence"),
        dict(tis=dict(mode="mask", level="sequence", hi=2.0)),
    ),
    "off_policy_mask": (dict(off_policy_mask=0.3), dict(delta=0.3)),
    "all_cispo": (
        dict(objective="cispo", tis_cap=2.0, tis_min=0.5, tis_mode="mask", off_policy_mask=0.2),
        dict(objective="cispo", tis=dict(mode="mask", level="token", lo=0.5, hi=2.0), delta=0.2),
    ),
    "all_sapo": (
        dict(objective="sapo", tis_cap=1.5, tis_level="sequence", off_policy_mask=0.0),
        dict(objective="sapo", tis=dict(mode="truncate", level="sequence", hi=1.5), delta=0.0),
    ),
}


@pytest.mark.parametrize("name,agg", list(itertools.product(CONFIGS, AGGS)))
def test_matches_float64_reference_value_and_gradient(name, agg):
    kw, ref_kw = CONFIGS[name]
    for seed in range(5):
        lp, old, ref, adv, mask, sampler = case(seed * 13 + 1)
        logp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        loss, _ = grpo_loss(
            logp, t(old), t(ref), t(adv), t(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, agg=agg,
            sampler_logp=t(sampler), **kw,
        )  # fmt: skip
        loss.backward()
        want, want_grad = reference(lp, old, ref, adv, mask, sampler, agg, **ref_kw)
        # float64 both sides, a few hundred operations: 1e-12 leaves room for summation order only
        assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12), (name, agg, seed)
        assert torch.allclose(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-13)


def test_cases_reach_every_regime():
    """The random cases exercise what the test above claims: ratios beyond both clip edges for both signs of A,
    CISPO's clip binding, tokens and sequences masked by the sampler weight, sequences dropped by the off-policy
    mask, and the SAPO gate away from its on-policy value."""
    lp, old, ref, adv, mask, sampler = (torch.tensor(x, dtype=torch.float64) for x in case(1, B=16, T=8))
    r = torch.exp(lp - old)[mask.bool()]
    assert (r < 0.5).any() and (r > 3.0).any()
    kw = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, sampler_logp=sampler)
    _, m = grpo_loss(lp, old, None, adv, mask, objective="cispo", **kw)
    assert 0 < m["cispo_clip_ratio"] < 1
    _, m = grpo_loss(lp, old, None, adv, mask, objective="sapo", **kw)
    assert abs(m["sapo/gate_mean"] - 2.0) > 0.05
    for level in ("token", "sequence"):
        _, m = grpo_loss(
            lp, old, None, adv, mask, tis_cap=1.5, tis_min=0.6, tis_mode="mask", tis_level=level, **kw
        )
        assert 0 < m["rollout_corr/rollout_rs_masked_fraction"] < 1
        assert 0 < m["rollout_corr/rollout_rs_seq_masked_fraction"] < 1
    _, m = grpo_loss(lp, old, None, adv, mask, off_policy_mask=0.2, **kw)
    assert 0 < m["off_policy_mask/seq_masked_fraction"] < 1


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """Where the PPO clip zeroes a token's gradient (r beyond the clip on A's side), CISPO keeps
    -sg(clip(r)) * A / N on it: the point of the method."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)  # r = [e, 1]
    for objective, want in (("clip", [0.0, -0.5]), ("cispo", [-1.28 / 2, -0.5])):
        logp.grad = None
        grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), eps_high=0.28, objective=objective)[
            0
        ].backward()
        assert logp.grad[0].tolist() == pytest.approx(want), objective


def test_off_policy_mask_drops_only_negative_advantage_sequences():
    """Both rows diverge by 1 nat per token from the sampler; only the row with A < 0 leaves the loss, its KL term
    stays (as in TRL), and A = 0 is kept."""
    logp = torch.full((3, 2), -2.0, dtype=torch.float64, requires_grad=True)
    sampler = torch.full((3, 2), -1.0, dtype=torch.float64)  # mean log(pi_sampler / pi_theta) = 1 > 0.5
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    loss, m = grpo_loss(logp, None, None, adv, torch.ones(3, 2), sampler_logp=sampler, off_policy_mask=0.5)
    loss.backward()
    assert logp.grad[1].tolist() == [0.0, 0.0] and logp.grad[0].tolist() == pytest.approx([-1 / 6, -1 / 6])
    assert m["off_policy_mask/seq_masked_fraction"].item() == pytest.approx(1 / 3)
    assert m["off_policy_mask/masked_fraction"].item() == pytest.approx(1 / 3)


def test_bad_option_values_raise():
    x, s = torch.zeros(1, 2), torch.zeros(1, 2)
    call = lambda **kw: grpo_loss(x, x, None, torch.ones(1), torch.ones(1, 2), sampler_logp=s, **kw)  # noqa: E731
    for kw, word in (
        (dict(objective="ppo"), "objective"),
        (dict(tis_mode="drop", tis_cap=2.0), "tis_mode"),
        (dict(tis_level="word", tis_cap=2.0), "tis_level"),
        (dict(tis_cap=2.0, tis_min=2.0), "tis_min"),
        (dict(tis_min=0.5), "tis_min needs tis_cap"),
        (dict(off_policy_mask=-0.1), "off_policy_mask"),
        (dict(objective="sapo", sapo_tau_neg=0.0), "sapo"),
        (dict(objective="cispo", clip_ratio_c=3.0), "clip_ratio_c"),
    ):
        with pytest.raises(ValueError, match=word):
            call(**kw)
