"""grpo_loss against its peers' own math where they share a definition (TRL's GRPOTrainer, verl's policy losses
and rollout correction, transcribed as oracles under tests/oracles/), then every place where they differ from each
other or from us, pinned one by one. Value and gradient in float64."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import grpo_loss  # noqa: E402
from tests.oracles import trl_grpo_math as trl  # noqa: E402
from tests.oracles import verl_policy_loss as verl  # noqa: E402

F64 = torch.float64


def case(seed, B=6, T=6, empty_row=False):
    """Ragged non-empty rows (verl's seq-mean divides by row length), A of both signs, log-ratios to the old
    policy of +-3 (ratios far outside any clip), a sampler up to ~e^1 per token away from the old policy."""
    g = random.Random(seed)
    logp = torch.tensor([[-3.0 * g.random() - 0.05 for _ in range(T)] for _ in range(B)], dtype=F64)
    old = logp + torch.tensor([[g.gauss(0, 1.3) for _ in range(T)] for _ in range(B)], dtype=F64)
    sampler = old + torch.tensor([[g.gauss(0, 0.5) for _ in range(T)] for _ in range(B)], dtype=F64)
    ref = logp + torch.tensor([[g.gauss(0, 0.5) for _ in range(T)] for _ in range(B)], dtype=F64)
    adv = torch.tensor([(-1) ** i * g.uniform(0.2, 2.0) for i in range(B)], dtype=F64)
    lens = [g.randint(1, T) for _ in range(B)]
    if empty_row:
        lens[-1] = 0
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lens], dtype=F64)
    return logp, old, ref, adv, mask, sampler


def value_and_grad(f, logp):
    x = logp.clone().requires_grad_(True)
    out = f(x)
    out.backward()
    return out.detach(), x.grad


def same(f, g, logp):
    (a, ga), (b, gb) = value_and_grad(f, logp), value_and_grad(g, logp)
    assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-13)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_cispo_equals_verl_and_trl(seed):
    """verl: -sg(clip(r, 1 - low, 1 + high)) A logp, token-mean: ours with the same eps. TRL caps at epsilon_high
    itself with no lower clip: ours with eps_low = 1 (clip below at 0, a no-op) and eps_high = TRL's - 1."""
    logp, old, _, adv, mask, _ = case(seed)
    A = adv.unsqueeze(1).expand_as(logp)
    ours = lambda eps_low, eps_high: (
        lambda x: grpo_loss(  # noqa: E731
            x, old, None, adv, mask, eps_low=eps_low, eps_high=eps_high, objective="cispo"
        )[0]
    )
    same(ours(0.2, 0.28), lambda x: verl.cispo(old, x, A, mask, 0.2, 0.28), logp)
    same(ours(1.0, 4.0), lambda x: trl.loss("cispo", x, old, None, adv, mask, eps_high=5.0), logp)


@pytest.mark.parametrize("seed", range(4))
def test_sapo_equals_verl_and_trl(seed):
    """All three: -(4 / tau) sigmoid(tau (r - 1)) A, tau by the sign of A, sequence mean of token means (verl's
    default agg for sapo, TRL's for loss_type sapo). tau_neg = 1.25: TRL builds its temperatures with
    torch.where on Python floats, a float32 tensor, so 1.05 would differ from ours in the 8th digit in float64."""
    logp, old, _, adv, mask, _ = case(seed)
    A = adv.unsqueeze(1).expand_as(logp)
    kw = dict(agg="seq-mean-token-mean", objective="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.25)
    ours = lambda x: grpo_loss(x, old, None, adv, mask, **kw)[0]  # noqa: E731
    same(ours, lambda x: verl.sapo(old, x, A, mask, 1.0, 1.25), logp)
    same(ours, lambda x: trl.loss("sapo", x, old, None, adv, mask, tau_pos=1.0, tau_neg=1.25), logp)


@pytest.mark.parametrize(
    "mode,clip_min,clip_max",
    [("token_truncate", None, 2.0), ("token_truncate", 0.5, 1.5), ("token_mask", 0.5, 1.5),
     ("sequence_truncate", None, 3.0), ("sequence_mask", None, 3.0), ("sequence_mask", 0.3, 3.0)],
)  # fmt: skip
def test_sampler_correction_equals_trl(mode, clip_min, clip_max):
    """TRL's four vllm_importance_sampling_mode values are tis_mode x tis_level here, on a token-level ratio with
    the clip objective, dapo / token-mean aggregation, k3 KL (not weighted); and the
    sampling/importance_sampling_ratio/{min,mean,max} metrics mean the same (over sequences at sequence level,
    an empty row counted with ratio 1)."""
    for seed in range(3):
        logp, old, ref, adv, mask, sampler = case(seed + 10, empty_row=True)
        level, tis_mode = mode.split("_")
        kw = dict(
            eps_low=0.2, eps_high=0.28, beta=0.04, sampler_logp=sampler, tis_cap=clip_max, tis_min=clip_min
        )
        kw.update(tis_mode=tis_mode, tis_level=level)
        w = trl.importance_sampling_ratio(old, sampler, mask, mode, clip_min, clip_max)
        same(
            lambda x: grpo_loss(x, old, ref, adv, mask, **kw)[0],
            lambda x: trl.loss("dapo", x, old, ref, adv, mask, eps_high=0.28, beta=0.04, is_ratio=w),
            logp,
        )
        _, m = grpo_loss(logp, old, ref, adv, mask, **kw)
        names = [f"sampling/importance_sampling_ratio/{k}" for k in ("min", "mean", "max")]
        assert [m[k].item() for k in names] == pytest.approx(trl.importance_sampling_metrics(w, mask, mode))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampler_correction_equals_verl(level):
    """verl's rollout_is (truncate at the threshold) is tis_mode truncate; its rollout_rs (reject outside
    [lower, upper]) combined with rollout_is at the same upper bound is tis_mode mask with tis_min = lower; the
    masked fractions are verl's rollout_rs_masked_fraction / rollout_rs_seq_masked_fraction."""
    for seed in range(3):
        logp, old, _, adv, mask, sampler = case(seed + 20)
        A = adv.unsqueeze(1).expand_as(logp)
        kw = dict(eps_low=0.2, eps_high=0.28, objective="cispo", sampler_logp=sampler, tis_level=level)
        w = verl.rollout_is_weights(old, sampler, mask, level, 1.5)
        same(
            lambda x: grpo_loss(x, old, None, adv, mask, tis_cap=1.5, **kw)[0],
            lambda x: verl.cispo(old, x, A, mask, 0.2, 0.28, rollout_is_weights=w),
            logp,
        )
        rs_mask, rs_metrics = verl.rollout_rs(old, sampler, mask, level, upper=1.5, lower=0.6)
        same(
            lambda x: grpo_loss(x, old, None, adv, mask, tis_cap=1.5, tis_min=0.6, tis_mode="mask", **kw)[0],
            # verl's token-mean divides by the kept tokens: rescale to ours, which divides by all of them
            lambda x: (
                verl.cispo(old, x, A, rs_mask, 0.2, 0.28, rollout_is_weights=w) * rs_mask.sum() / mask.sum()
            ),
            logp,
        )
        _, m = grpo_loss(logp, old, None, adv, mask, tis_cap=1.5, tis_min=0.6, tis_mode="mask", **kw)
        for k, v in rs_metrics.items():
            assert m[f"rollout_corr/{k}"].item() == pytest.approx(v), k


@pytest.mark.parametrize("seed", range(4))
def test_off_policy_mask_equals_trl(seed):
    """TRL's off_policy_mask_threshold, against the sampler's log-probs, with its sequence_mask correction and
    the clip objective: the whole loss, mask and weights composed as TRL composes them."""
    logp, old, ref, adv, mask, sampler = case(seed + 30)
    drift = torch.tensor([[0.5 * (-1) ** (i + 1)] for i in range(len(adv))], dtype=F64)  # +0.5 where A < 0
    sampler = sampler + drift
    w = trl.importance_sampling_ratio(old, sampler, mask, "sequence_mask", None, 3.0)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, sampler_logp=sampler, tis_cap=3.0, tis_mode="mask")
    kw.update(tis_level="sequence", off_policy_mask=0.3)
    for x0 in (logp, old):  # off-policy, and mu = 1 (current = old) where only the sampler drift masks
        opsm = trl.off_policy_mask(adv.unsqueeze(1), x0, sampler, mask, 0.3)
        assert 0 < opsm.sum() < len(adv)  # some sequences dropped, not all
        same(
            lambda x: grpo_loss(x, old, ref, adv, mask, **kw)[0],
            lambda x: trl.loss(
                "dapo", x, old, ref, adv, mask, eps_high=0.28, beta=0.04, is_ratio=w, opsm=opsm
            ),
            x0,
        )


def test_where_the_peers_differ():
    """Every difference between TRL, verl and this code in the options above, each pinned by an assertion:

    1. CISPO's clip: TRL caps the weight at epsilon_high itself, above only (TRL suggests a large value); verl
       and this code clip to [1 - eps_low, 1 + eps_high] (the paper's eq. 5). Same numbers, different losses.
    2. Masking against the sampler: TRL's *_mask modes and this code's tis_mode="mask" keep the ratio as the
       weight of a kept token; verl's rollout_rs alone keeps weight 1 (rejection without reweighting).
    3. The lower bound: verl's rollout_rs defaults it to 1 / upper; TRL's clip_min and this code's tis_min
       default to none.
    4. verl's token-mean divides by the tokens left after rejection; TRL and this code divide by all completion
       tokens (a masked token counts as a zero).
    5. Aggregation is tied to the objective in TRL (sapo: sequence mean of token means, cispo / dapo: tokens of
       the step) and verl (sapo defaults to seq-mean-token-mean); here agg is separate, token-mean by default.
    6. The log-ratio is clamped to +-20 before exp by verl and here, not by TRL: a 25-nat sampler mismatch
       gives TRL a weight of e^25 at sequence level where ours and verl's stop at e^20, which only shows in a
       truncation cap above e^20.
    7. TRL reports the sampling/importance_sampling_ratio metrics of an empty batch as 0; here they are 1.
    """
    logp, old, _, adv, mask, sampler = case(3)
    A = adv.unsqueeze(1).expand_as(logp)
    # 1
    ours = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=4.0, objective="cispo")[0]
    assert ours.item() != pytest.approx(trl.loss("cispo", logp, old, None, adv, mask, eps_high=4.0).item())
    assert ours.item() == pytest.approx(verl.cispo(old, logp, A, mask, 0.2, 4.0).item(), rel=1e-12)
    # 2, 4: verl rollout_rs alone against ours (rescaled to verl's normalizer) and against verl rs + is
    rs_mask, _ = verl.rollout_rs(old, sampler, mask, "token", upper=1.5, lower=0.6)
    kw = dict(eps_low=0.2, eps_high=0.28, objective="cispo", sampler_logp=sampler, tis_cap=1.5, tis_min=0.6)
    masked = grpo_loss(logp, old, None, adv, mask, tis_mode="mask", **kw)[0] * mask.sum() / rs_mask.sum()
    assert masked.item() != pytest.approx(verl.cispo(old, logp, A, rs_mask, 0.2, 0.28).item())
    # 3: the same upper bound with each side's default lower bound rejects different tokens
    rs_default, _ = verl.rollout_rs(old, sampler, mask, "token", upper=1.5)
    kept = trl.importance_sampling_ratio(old, sampler, mask, "token_mask", None, 1.5) > 0
    assert not torch.equal(rs_default.bool(), kept & mask.bool())
    # 5
    sapo_default = grpo_loss(logp, old, None, adv, mask, objective="sapo", sapo_tau_neg=1.25)[0]
    assert sapo_default.item() != pytest.approx(
        trl.loss("sapo", logp, old, None, adv, mask, tau_neg=1.25).item()
    )
    # 6
    big = torch.zeros(1, 2, dtype=F64)
    w_trl = trl.importance_sampling_ratio(
        big, big - 12.5, torch.ones(1, 2, dtype=F64), "sequence_truncate", None, 1e12
    )
    w_verl = verl.rollout_is_weights(big, big - 12.5, torch.ones(1, 2, dtype=F64), "sequence", 1e12)
    assert w_trl.item() == pytest.approx(torch.exp(torch.tensor(25.0, dtype=F64)).item())
    assert w_verl[0, 0].item() == pytest.approx(torch.exp(torch.tensor(20.0, dtype=F64)).item())
    # 7
    empty = torch.zeros(1, 2, dtype=F64)
    _, m = grpo_loss(empty, empty, None, torch.ones(1, dtype=F64), empty, sampler_logp=empty - 1.0)
    assert m["sampling/importance_sampling_ratio/mean"].item() == 1.0
    assert trl.importance_sampling_metrics(torch.ones(1, 2, dtype=F64), empty, "token_mask") == (
        0.0,
        0.0,
        0.0,
    )
