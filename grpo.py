"""GRPO (Group Relative Policy Optimization) for grounded, cited answers, in one file read top to bottom.

    python grpo.py --stage 0   # supervised warm-up: the same update on one rule-written gold completion each
    python grpo.py --stage 1   # answerable questions; rewards: tags, format, exact match, citations
    python grpo.py --stage 2   # + the refusal reward, half unanswerable, from stage 1's checkpoint
    torchrun --nproc_per_node 2 grpo.py --stage 1   # several processes, FSDP2

One step of the loop in `main`, and the function that does each part:
  1. B prompts, G completions sampled for each (each prompt prefilled once)     sample_rollout -> sampler.py
  2. a rule reward for every completion: r_ij = reward_fn(completion, record)  score_rollout -> rewards.py
  3. advantages within each group: A_ij = (r_ij - mean_j r_i.) / (std_j r_i. + eps)      group_advantages
  4. log-probs of the completion tokens from logits / temperature, each prompt run once with its completions
     packed behind it (policy; sampling policy if --mu > 1; reference if --beta > 0)   logprobs.py
  5. clipped surrogate minus beta * KL, averaged over the tokens of the whole step        grpo_loss
  6. backward over micro-batches, clip the gradient norm, AdamW, learning-rate schedule   policy_update, lr_at
  7. metrics and samples to the run directory, a checkpoint every --save-every steps      checkpoint.py
Left out, on purpose: a separate inference engine (sampling runs on the training weights: nothing to sync); a
value or reward model (rewards are rules, advantages group-relative); a reference model when beta = 0 (the
default, as in DAPO and Dr. GRPO); resampling groups whose rewards are all equal (DAPO's dynamic sampling:
they are counted, and --drop-zero-std-groups leaves them out); entropy bonuses (not in the method).

Host and device: sampling and the update run on the model's device; decoding text and scoring it, on the host.
A rollout is built on the host and crosses to the device once (Rollout.to), as do the advantages.

`grpo_loss` and `group_advantages` depend on torch only: copy them into other projects.
"""

import contextlib
import functools
import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import distributed
import memory
import rewards
from data import (
    MIXES,
    STOP_STRINGS,
    DataError,
    gold_completion,
    load_gold_completions,
    next_records,
    training_prompt,
    training_records,
)
from flags import config_parser, flag
from logprobs import completion_logprobs, micro_batches, same_count
from memory import DTYPES
from metrics import StepMetrics, batch_metrics, training_summary
from model import ModelError, adapters_off
from sampler import eos_token_ids, generate

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: bounds ratios and KL so a wild token cannot overflow to inf / NaN
SAMPLER_METRICS = (
    "sampling/sampling_logp_difference/mean",
    "sampling/sampling_logp_difference/max",  # TRL's names
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
)

# ---- The loss (torch only) ---------------------------------------------------------------------------------

OBJECTIVES = ("clip", "cispo", "sapo")
TIS_MODES = ("truncate", "mask")


def clip_surrogate(ratio, A, eps_low, eps_high, clip_ratio_c=None):
    """PPO / GRPO clipped surrogate (DeepSeekMath arXiv 2402.03300; TRL loss_type grpo/dapo, verl vanilla)."""
    # surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A)
    if clip_ratio_c is not None:
        # dual clip: for A < 0, surrogate_t = max(surrogate_t, c * A), so -surrogate_t <= c * |A|
        surrogate = torch.where(A < 0, torch.maximum(surrogate, clip_ratio_c * A), surrogate)
    return surrogate


def cispo_surrogate(ratio, A, logp, eps_low, eps_high):
    """CISPO (MiniMax-M1 arXiv 2506.13585 eq. 4-5; TRL loss_type="cispo", verl loss_mode=cispo): the clipped
    ratio is a constant weight, so every token keeps its gradient sg(clip(r)) * A * grad log pi; value and
    gradient are those of verl's and TRL's -sg(clip(r)) * A * logp. TRL clips above only, at eps_high."""
    # surrogate_t = sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * log pi_t
    return torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high).detach() * A * logp


def sapo_gate(ratio, A, tau_pos, tau_neg):
    """SAPO's soft gate in place of the clip (arXiv 2511.20347 eq. 5-6; TRL loss_type="sapo", verl sapo):
    f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos for A > 0 else tau_neg. df/dr = 4 s (1 - s) is 1 at
    r = 1 and decays smoothly off-policy, faster for A < 0 (tau_neg > tau_pos)."""
    tau = torch.where(A > 0, A.new_tensor(tau_pos), A.new_tensor(tau_neg))  # (B, 1)
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)  # f(r)


def check_loss_options(
    objective="clip",
    clip_ratio_c=None,
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    is_level="token",
    tis_cap=None,
    tis_min=None,
    tis_mode="truncate",
    tis_level=None,
    off_policy_mask=None,
):
    """Raise ValueError, one line, for a value the command line would refuse (None = off everywhere)."""
    ok = lambda x: x is None or (isinstance(x, (int, float)) and math.isfinite(x))  # a bool is an int; fine
    positive = lambda x: x is None or (ok(x) and x > 0)
    for ok_, message in (
        (objective in OBJECTIVES, f"objective must be clip, cispo or sapo, got {objective!r}"),
        (is_level in ("token", "sequence"), f"is_level must be token or sequence, got {is_level!r}"),
        (tis_level in (None, "token", "sequence"), f"tis_level must be token or sequence, got {tis_level!r}"),
        (tis_mode in TIS_MODES, f"tis_mode must be truncate or mask, got {tis_mode!r}"),
        (clip_ratio_c is None or clip_ratio_c > 1.0, f"clip_ratio_c must be > 1, got {clip_ratio_c}"),
        (clip_ratio_c is None or objective == "clip", "clip_ratio_c is the dual clip of objective clip"),
        (
            sapo_tau_pos > 0 and sapo_tau_neg > 0,
            f"sapo temperatures must be > 0: {sapo_tau_pos}, {sapo_tau_neg}",
        ),
        # a weight of 0 or below would drop or flip the policy term (verl raises for a threshold <= 0)
        (positive(tis_cap), f"tis_cap must be > 0 (None = off), got {tis_cap}"),
        (
            ok(tis_min) and (tis_min is None or tis_min >= 0),
            f"tis_min must be >= 0 (None = off), got {tis_min}",
        ),
        (tis_min is None or tis_cap is not None, "tis_min needs tis_cap"),
        (
            tis_min is None or tis_cap is None or tis_min < tis_cap,
            f"tis_min must be < tis_cap, got {tis_min}",
        ),
        (
            ok(off_policy_mask) and (off_policy_mask is None or off_policy_mask >= 0),
            "off_policy_mask must be >= 0",
        ),
    ):
        if not ok_:
            raise ValueError(f"grpo_loss: {message}")


def grpo_loss(
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
    is_level="token",
    clip_ratio_c=None,
    sampler_logp=None,
    tis_cap=None,
    objective="clip",
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    tis_mode="truncate",
    tis_level=None,
    tis_min=None,
    off_policy_mask=None,
):
    """Clipped GRPO surrogate (or CISPO, SAPO) with an optional KL penalty to a reference policy.

    logp       (B, T) log-probs of the completion tokens under the current policy (with grad)
    old_logp   (B, T) under the policy that sampled them (no grad); None means logp.detach() (mu = 1)
    ref_logp   (B, T) under the frozen reference (no grad); may be None when beta == 0
    advantages (B,)   one advantage per completion
    mask       (B, T) 1 for completion tokens (up to and including the first EOS), 0 after
    eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high] (DAPO's clip higher: eps_high 0.28)
    kl: "k1" | "k2" | "k3" estimator of KL(policy || reference) per token
    agg: per-token losses to one number: "token-mean" (DAPO; TRL's default), "seq-mean-token-mean" (the GRPO
        paper), "seq-mean-token-sum-norm" (Dr. GRPO; T = the generation budget); the equations are at the code
    num_tokens, num_seqs: completion tokens ("token-mean") and sequences ("seq-mean-...") of the WHOLE
        optimizer step, all micro-batches and ranks (default: this batch's), so the micro-batches' losses add
        up to exactly the whole step's loss, however it is split into micro-batches or processes.
    is_level: "token", or "sequence": one ratio per completion, exp(its mean log-ratio) (GSPO, 2507.18071)
    clip_ratio_c: dual clip, for A < 0 the token loss is at most c * |A| (arXiv 1912.09729; verl clip_ratio_c)
    objective: the policy term per token: "clip" (PPO / GRPO), "cispo" (its weight clipped to
        [1 - eps_low, 1 + eps_high]) or "sapo" (soft gate, temperatures sapo_tau_pos, sapo_tau_neg)
    sampler_logp (B, T): the sampler's own log-probs of the tokens; adds the sampler / trainer mismatch
        metrics
    tis_cap: importance sampling against the sampler (TRL vllm_importance_sampling_correction, verl
        rollout_is / rollout_rs): the policy term times a weight w from r = pi_old / pi_sampler
        (sampler_weights). tis_mode "truncate": w = clip(r, tis_min, tis_cap); "mask": w = r inside
        [tis_min, tis_cap], else 0 (the token or sequence leaves the loss). tis_level: "token" or "sequence"
        (r of a sequence = the product of its tokens'); None = is_level.
    off_policy_mask: DeepSeek-V3.2's off-policy sequence masking, threshold delta (off_policy_keep)
    An option set to None is off. Returns (loss scalar, metrics dict of detached scalar tensors, token-means
    over this batch's completion tokens).
    """
    check_loss_options(
        objective, clip_ratio_c, sapo_tau_pos, sapo_tau_neg, is_level, tis_cap, tis_min, tis_mode, tis_level,
        off_policy_mask,
    )  # fmt: skip
    mask = mask.to(logp.dtype)
    # mu = 1: ratio = 1 in value, but not in gradient
    old_logp = logp.detach() if old_logp is None else old_logp
    A = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1), broadcast over tokens

    # ratio_t = exp(logp_t - old_logp_t), the log-ratio clamped so exp cannot overflow
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    if is_level == "sequence":
        # GSPO: s_i = exp((1 / |o_i|) sum_t log_ratio_t), one ratio for all tokens of completion i
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / torch.clamp(mask.sum(1, keepdim=True), min=1.0)
    ratio = torch.exp(log_ratio)  # (B, T), or (B, 1)
    if objective == "clip":
        surrogate = clip_surrogate(ratio, A, eps_low, eps_high, clip_ratio_c).expand_as(logp)  # (B, T)
    elif objective == "cispo":
        surrogate = cispo_surrogate(ratio, A, logp, eps_low, eps_high)  # (B, T)
    else:
        gate = sapo_gate(ratio, A, sapo_tau_pos, sapo_tau_neg)  # (B, T), or (B, 1)
        surrogate = (gate * A).expand_as(logp)  # surrogate_t = f(r_t) * A

    # KL(policy || reference) per token, from d = ref_logp - logp clamped like the ratio:
    # k1 = -d (unbiased, can be negative); k2 = d^2 / 2; k3 = exp(d) - d - 1 >= 0 (unbiased and low variance)
    kl_t = torch.zeros_like(logp)
    if beta != 0.0 or ref_logp is not None:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logp")
        if kl not in ("k1", "k2", "k3"):
            raise ValueError(f"grpo_loss: kl must be k1, k2 or k3, got {kl!r}")
        d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
        kl_t = -d if kl == "k1" else 0.5 * d * d if kl == "k2" else torch.exp(d) - d - 1.0

    # loss_t = -(m_i * w_t * surrogate_t - beta * kl_t): w_t the sampler weight (1 without tis_cap), m_i the
    # off-policy sequence mask (1 without off_policy_mask); neither touches the KL term (as in TRL)
    weight, sampler_metrics = sampler_weights(
        old_logp, sampler_logp, mask, tis_level or is_level, tis_cap, tis_mode, tis_min
    )
    policy = surrogate if tis_cap is None else weight * surrogate
    keep = None
    if off_policy_mask is not None:  # against the sampler's log-probs when there are, else pi_old's (TRL)
        behaviour = old_logp if sampler_logp is None else sampler_logp
        keep = off_policy_keep(logp, behaviour, A, mask, off_policy_mask)  # (B, 1)
        policy = keep * policy
    per_token = -(policy - beta * kl_t)  # (B, T)

    B, T = logp.shape
    n_seq = max(B if num_seqs is None else num_seqs, 1)
    if agg == "token-mean":  # sum_{i,t} mask * loss_t / (completion tokens of the whole step)
        n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = (per_token * mask).sum() / torch.clamp(n, min=1.0)
    elif agg == "seq-mean-token-mean":  # (1 / num_seqs) sum_i [sum_t mask * loss_t / |o_i|], empty rows 0
        loss = ((per_token * mask).sum(1) / torch.clamp(mask.sum(1), min=1.0)).sum() / n_seq
    elif agg == "seq-mean-token-sum-norm":  # (1 / (num_seqs * T)) sum_{i,t} mask * loss_t: no length bias
        loss = (per_token * mask).sum() / (n_seq * T)
    else:
        raise ValueError(
            f"grpo_loss: agg must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, got {agg!r}"
        )

    # Metrics: token-means over this batch's completion tokens. With mu = 1 the loss value is ~ -mean(A) ~ 0
    # by construction, so the surrogate, the KL and the clip fractions are logged separately.
    with torch.no_grad():
        n_tok = torch.clamp(mask.sum(), min=1.0)
        mean = lambda x: (x * mask).sum() / n_tok
        # the clip is active (gradient zero) only on the side where it binds for the sign of A
        low = ((ratio < 1.0 - eps_low) & (A < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (A > 0)).to(logp.dtype)
        metrics = dict(
            loss=loss.detach(),
            policy_loss=mean(-surrogate),
            surrogate=mean(surrogate),
            kl=mean(kl_t),
            ratio_mean=mean(ratio),
            clip_frac_low=mean(low),
            clip_frac_high=mean(high),
            ratio_max=(ratio * mask).max() if mask.any() else torch.ones((), dtype=logp.dtype),
            clip_frac=mean(low + high),
            tokens=mask.sum(),
            **sampler_metrics,
        )
        if objective == "cispo":  # TRL's name and meaning: ratio above the cap where A > 0
            metrics["cispo_clip_ratio"] = mean(high.expand_as(logp))
        if objective == "sapo":
            metrics["sapo/gate_mean"] = mean(gate.expand_as(logp))  # f(r): 2 / tau on-policy
        if keep is not None:
            dropped = (1.0 - keep) * (mask.sum(1, keepdim=True) > 0)  # (B, 1), non-empty rows only
            metrics[OFF_POLICY_MASK_METRICS[0]] = mean(dropped.expand_as(logp))  # share of tokens
            metrics[OFF_POLICY_MASK_METRICS[1]] = dropped.sum() / max(B, 1)  # share of sequences
    return loss, metrics


def extra_metric_names(objective="clip", tis_mode="truncate", tis_cap=None, off_policy_mask=None):
    """The metric names grpo_loss adds to LOSS_METRICS (and SAMPLER_METRICS) for these options, in order."""
    return (
        (("cispo_clip_ratio",) if objective == "cispo" else ())
        + (("sapo/gate_mean",) if objective == "sapo" else ())
        + (TIS_MASK_METRICS if tis_mode == "mask" and tis_cap is not None else ())
        + (OFF_POLICY_MASK_METRICS if off_policy_mask is not None else ())
    )


TIS_MASK_METRICS = (
    "rollout_corr/rollout_rs_masked_fraction",  # verl's names (TRL has none): share of tokens with w = 0
    "rollout_corr/rollout_rs_seq_masked_fraction",  # share of sequences with at least one such token
)
OFF_POLICY_MASK_METRICS = (
    "off_policy_mask/masked_fraction",  # share of completion tokens in dropped sequences (TRL logs none)
    "off_policy_mask/seq_masked_fraction",  # share of sequences dropped
)


def sampler_weights(
    old_logp, sampler_logp, mask, level="token", tis_cap=None, tis_mode="truncate", tis_min=None
):
    """-> (w, metrics). r = exp(old_logp - sampler_logp) per token or, at level "sequence", per completion
    from the sum of its log-ratios (TRL sequence_*, verl rollout_is=sequence); detached. tis_mode "truncate":
    w = clip(r, tis_min, tis_cap) (TRL token_truncate / sequence_truncate, verl rollout_is); "mask": w = r
    inside [tis_min, tis_cap], 0 outside (TRL token_mask / sequence_mask, IcePop). The metrics say how far the
    sampler's log-probs are from the trainer's: in exact arithmetic they are equal and w = 1, a correctness
    alarm. The importance_sampling_ratio ones run over tokens at level "token" and over sequences at
    "sequence" (TRL's meaning: an empty row counts, with r = 1)."""
    if sampler_logp is None:
        if tis_cap is not None:
            raise ValueError("grpo_loss: tis_cap needs sampler_logp")
        return None, {}
    with torch.no_grad():
        diff = (old_logp - sampler_logp) * mask  # (B, T)
        log_w = diff.sum(1, keepdim=True) if level == "sequence" else diff  # (B, 1) or (B, T)
        r = torch.exp(torch.clamp(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        cap = math.inf if tis_cap is None else tis_cap
        if tis_mode == "mask":
            inside = (r <= cap) & (r >= (0.0 if tis_min is None else tis_min))  # bounds kept, as TRL and verl
            w = torch.where(inside, r, torch.zeros_like(r))
        else:
            w = r.clamp(min=tis_min, max=cap)
        # an empty batch reports w = 1
        on = mask.bool() if mask.any() else torch.ones_like(mask, dtype=torch.bool)
        d = diff.abs()[on]  # (completion tokens,)
        # TRL's meaning of the importance_sampling_ratio metrics: over sequences at level "sequence"
        w_on = (
            w.flatten() if level == "sequence" and w.numel() else w.expand_as(diff)[on]
        )  # (B,) or (tokens,)
        metrics = dict(zip(SAMPLER_METRICS, (d.mean(), d.max(), w_on.min(), w_on.mean(), w_on.max())))
        if tis_mode == "mask" and tis_cap is not None:
            gone = (w == 0).expand_as(diff) & mask.bool()  # (B, T)
            n_seq = torch.clamp((mask.sum(1) > 0).sum(), min=1).to(mask.dtype)
            metrics[TIS_MASK_METRICS[0]] = gone.sum() / torch.clamp(mask.sum(), min=1.0)
            metrics[TIS_MASK_METRICS[1]] = gone.any(1).sum() / n_seq
    return w, metrics


def off_policy_keep(logp, behaviour_logp, A, mask, delta):
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556; TRL off_policy_mask_threshold):
    -> (B, 1), 0 for a sequence with A < 0 whose mean log(pi_behaviour / pi_theta) exceeds delta, else 1."""
    with torch.no_grad():
        n = torch.clamp(mask.sum(1, keepdim=True), min=1.0)  # (B, 1)
        divergence = ((behaviour_logp - logp.detach()) * mask).sum(1, keepdim=True) / n  # (B, 1)
        return ((A >= 0) | (divergence <= delta)).to(logp.dtype)


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Advantage of each completion relative to the other completions of its prompt.

    rewards (N*G,), rows grouped by prompt: rows [i*G:(i+1)*G] belong to prompt i.
    scale: "group" A = (r - mean_group) / (std_group + eps)  (GRPO)
           "batch" A = (r - mean_group) / (std_batch + eps)  (less noise from tiny groups)
           "none"  A =  r - mean_group                       (Dr. GRPO: no difficulty bias)
    A group whose rewards are all equal gets A = 0 exactly (it teaches nothing), never NaN.
    Returns (N*G,) float32.
    """
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (N, G)
    zero_std = (r.max(dim=1).values == r.min(dim=1).values).unsqueeze(1)  # (N, 1) all-equal groups
    centered = torch.where(zero_std, 0.0, r - r.mean(dim=1, keepdim=True))  # r_ij - mean_j r_i.
    if scale == "group":  # the unbiased std of each group, (N, 1)
        adv = centered / (
            (r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])) + eps
        )
    elif scale == "batch":
        adv = centered / ((r.std() if r.numel() > 1 else torch.zeros(())) + eps)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"group_advantages: scale must be group, batch or none, got {scale!r}")
    return adv.view(-1).to(torch.float32)


# ---- The configuration: one field per flag, its help beside it; the per-stage defaults in one table --------

STAGE_DEFAULTS = {
    0: dict(steps=40, batch_prompts=8, group_size=1, temperature=1.0, lr=1e-4),  # one gold each
    1: dict(steps=8, batch_prompts=4, group_size=8, temperature=0.7, lr=1e-5),  # short: unlearns refusal
    2: dict(steps=30, batch_prompts=2, group_size=16, temperature=1.0, lr=2e-5),  # samples wider
}


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # grpo_loss's agg
SCALES = ("group", "batch", "none")  # group_advantages' scale
LEVELS = ("token", "sequence")  # grpo_loss's is_level


def per_stage(name, help):
    """A field whose default depends on --stage: None until Config resolves it from STAGE_DEFAULTS."""
    return flag(None, help, per_stage=True, type=type(STAGE_DEFAULTS[1][name]))


@dataclass
class Config:
    # what to train, from what, on what
    stage: int = flag(1, "0: warm-up on gold; 1: GRPO, answerable; 2: + refusal, half not", choices=[0, 1, 2])
    model: str = flag("builtin", "base model: 'builtin' (SmolLM2-135M-Instruct) or a Hugging Face directory")
    init: str | None = flag(None, "start weights (default: the previous stage's checkpoint, else --model)")
    data: str = flag("builtin", "'builtin' (the synthetic grounded-QA task) or ALCE / Trust-Score JSON(L)")
    gold: str | None = flag(None, "stage 0: JSONL of {id, completion} to imitate (default: written by rule)")
    holdout: float = flag(
        0.0, "leave this share of --data out, per dataset and answerability (eval.py --holdout)"
    )
    mix: str = flag(
        "balanced",
        "stages 0, 2: balanced (half unanswerable) or natural (all of --data)",
        choices=list(MIXES),
    )
    out: str | None = flag(None, "run directory for metrics, samples and checkpoint/ (default runs/stage{N})")
    # sampling
    steps: int = per_stage("steps", "sampling rounds; each samples, scores, then takes --mu optimizer steps")
    batch_prompts: int = per_stage("batch_prompts", "prompts per sampling round and process (B)")
    group_size: int = per_stage("group_size", "completions sampled per prompt (G)")
    temperature: float = per_stage("temperature", "sampling temperature; log-probs from logits / temperature")
    top_p: float = flag(1.0, "nucleus sampling threshold (1 = off)")
    max_new_tokens: int = flag(64, "completion length budget in tokens")
    max_prompt_tokens: int = flag(1024, "longest prompt; longer ones get their document texts cut to fit")
    prompt_examples: bool = flag(False, "a worked and a refusal example in the prompt (no stage 0)")
    compile: bool = flag(
        False, "torch.compile the sampler's decode step (CUDA graphs on CUDA); compiles first"
    )
    # the loss
    eps_low: float = flag(0.2, "the ratio is clipped below at 1 - eps_low")
    eps_high: float = flag(0.28, "the ratio is clipped above at 1 + eps_high (DAPO's 'clip higher')")
    beta: float = flag(0.0, "weight of the KL penalty to the frozen reference (0: no reference forward)")
    kl: str = flag("k3", "KL estimator (k3: exp(ref - logp) - (ref - logp) - 1)", choices=["k1", "k2", "k3"])
    ref: str | None = flag(None, "weights of the KL reference (default: the start of the stage); not LoRA")
    loss_agg: str = flag("token-mean", "DAPO, GRPO paper, Dr. GRPO (grpo_loss)", choices=list(AGGREGATIONS))
    scale_rewards: str = flag("group", "advantages / std of: group, batch, none (Dr. GRPO)", choices=SCALES)
    is_level: str = flag("token", "the ratio per token (GRPO) or sequence (GSPO)", choices=LEVELS)
    clip_ratio_c: float | None = flag(None, "dual clip: for A < 0 the loss is <= c * |A|, c > 1", type=float)
    objective: str = flag("clip", "the policy term: clip (PPO), cispo, sapo (soft gate)", choices=OBJECTIVES)
    sapo_tau_pos: float = flag(1.0, "SAPO's gate temperature where A > 0")
    sapo_tau_neg: float = flag(1.05, "SAPO's gate temperature where A < 0")
    tis_cap: float | None = flag(None, "sampler weight pi_trainer / pi_sampler: upper bound", type=float)
    tis_min: float | None = flag(None, "... its lower bound (TRL's clip_min; needs --tis-cap)", type=float)
    tis_mode: str = flag("truncate", "out of bounds: truncate the weight or mask", choices=TIS_MODES)
    tis_level: str | None = flag(None, "sampler weight per token or sequence (--is-level)", choices=LEVELS)
    off_policy_mask: float | None = flag(None, "drop A < 0 rows: log(pi_sampler / pi) > DELTA", type=float)
    drop_zero_std_groups: bool = flag(False, "leave groups whose rewards are all equal out of the loss")
    mask_truncated: bool = flag(False, "completions cut at --max-new-tokens leave the loss")
    overlong_buffer: int = flag(0, "DAPO's soft overlong penalty over the budget's last L tokens (0 = off)")
    # the optimizer, memory and precision
    lr: float = per_stage("lr", "peak learning rate of AdamW")
    warmup_steps: int = flag(2, "optimizer steps of linear warm-up before the cosine decay")
    min_lr_ratio: float = flag(0.1, "the cosine decays to lr * min_lr_ratio")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)")
    mu: int = flag(1, "optimizer steps per sampled batch; > 1 reuses the log-probs kept after sampling")
    micro_batch: int = flag(16, "completions per forward / backward; gradients accumulate over the batch")
    dtype: str | None = flag(
        None, "compute dtype (default: bfloat16 on CUDA, float32 on CPU)", choices=DTYPES
    )
    grad_checkpoint: bool = flag(False, "recompute each block in backward instead of keeping its activations")
    lora_rank: int = flag(0, "0: full fine-tune; > 0: LoRA of this rank on the blocks' linear layers")
    lora_alpha: float = flag(32.0, "LoRA scale numerator: the update is (alpha / rank) * B @ A")
    # the run
    seed: int = flag(0, "seed of the data order, the sampling and the LoRA init")
    resume: bool = flag(False, "continue from <out>/checkpoint (fresh if none; without it, one is an error)")
    save_every: int = flag(10, "write a checkpoint every this many steps (and at the end)")
    stop_after: int = flag(
        0, "stop with a checkpoint after this many steps, on the --steps schedule (0: off)"
    )
    log_samples: int = flag(4, "completions per step written to samples.jsonl")
    no_progress: bool = flag(False, "no progress bar")

    def __post_init__(self):
        """Per-stage defaults for the fields not given, then every check: built in code or from the command
        line, a Config is the same, and a bad one raises ValueError naming the flag."""
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"--stage must be 0, 1 or 2, got {self.stage!r}")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.out is None:
            self.out = f"runs/stage{self.stage}"
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices and getattr(self, f.name) is not None:
                raise ValueError(
                    f"--{f.name.replace('_', '-')} must be one of {choices}, got {getattr(self, f.name)!r}"
                )
        counts = ("steps", "batch_prompts", "max_new_tokens", "mu", "micro_batch", "save_every")
        checks = (
            (self.temperature > 0, "--temperature must be > 0 (the policy is softmax(logits / T))"),
            (self.group_size >= 2 or self.stage == 0, "--group-size must be >= 2 (advantages compare)"),
            (self.group_size == 1 or self.stage > 0, "--stage 0 imitates one gold each: --group-size 1"),
            (self.gold is None or self.stage == 0, "--gold is for --stage 0"),
            (
                min(getattr(self, k) for k in counts) >= 1,
                f"--{', --'.join(counts)} must be >= 1".replace("_", "-"),
            ),
            (self.ref is None or self.lora_rank == 0, "--ref needs a full fine-tune (LoRA: adapters off)"),
            (self.ref is None or self.beta > 0, "--ref is the KL reference: it needs --beta > 0"),
            (self.tis_cap is None or self.stage > 0, "--tis-cap weighs sampled completions: stage 1 or 2"),
            (0 <= self.holdout < 1, "--holdout is a share of --data: 0 <= share < 1"),
            (self.mix == "balanced" or self.stage != 1, "--mix is for stages 0 and 2 (1: answerable only)"),
            (
                self.holdout == 0 or self.data != "builtin",
                "--holdout is for --data files (builtin has an eval split)",
            ),
            (0 <= self.overlong_buffer < self.max_new_tokens, "--overlong-buffer: 0 to max-new-tokens - 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        loss = self.loss_options()
        check_loss_options(**{k: loss[k] for k in inspect.signature(check_loss_options).parameters})

    def loss_options(self) -> dict:
        """The keywords of grpo_loss that the flags set."""
        names = ("eps_low", "eps_high", "beta", "kl", "is_level", "clip_ratio_c", "objective", "sapo_tau_pos")
        names += ("sapo_tau_neg", "tis_cap", "tis_min", "tis_mode", "tis_level", "off_policy_mask")
        return dict({k: getattr(self, k) for k in names}, agg=self.loss_agg)


def parse_args(argv=None) -> Config:
    p = config_parser(
        Config, STAGE_DEFAULTS, "GRPO for grounded, cited answers: python grpo.py --stage 0|1|2"
    )
    args = vars(p.parse_args(argv))
    try:
        return Config(**args)
    except ValueError as e:
        p.error(str(e))


# ---- The rollout: sample G completions per prompt, score each ----------------------------------------------


@dataclass
class Rollout:
    """One sampling round of this rank: B records, G completions each, scored. Rows [i*G:(i+1)*G] belong to
    records[i]. Built on the host, where text is decoded and scored; `to` moves what the update reads."""

    records: list  # (B,) data.Record
    prompts: list  # (B,) prompt token ids
    prefills: list  # (B,) the start of the answer the prompt already holds ("<think>")
    comp_ids: torch.Tensor  # (R, M) completion tokens, R = B * G
    comp_mask: torch.Tensor  # (R, M) 1 up to and including the first EOS or stop string
    sampler_logp: torch.Tensor | None  # (R, M) the sampler's log-probs of those tokens; None for gold ones
    texts: list  # (R,) decoded completions
    rewards: torch.Tensor  # (R,) float64
    components: list  # (R,) {name: amount} from the reward function
    truncated: torch.Tensor  # (R,) bool: cut at --max-new-tokens

    @property
    def group_size(self) -> int:
        return len(self.texts) // len(self.records)

    def to(self, device) -> "Rollout":
        """The tensors the update reads on `device`, one copy each."""
        logp = None if self.sampler_logp is None else self.sampler_logp.to(device)
        return replace(
            self, comp_ids=self.comp_ids.to(device), comp_mask=self.comp_mask.to(device), sampler_logp=logp
        )


def stage_reward_fn(stage):
    """The method's reward of a stage, as reward_fn(completion, record) -> (total, components); stage 0's gold
    completions are scored as stage 2 would (the metrics show what the warm-up teaches)."""
    return functools.partial(rewards.stage_reward, stage=stage or 2)


def sample_rollout(model, tokenizer, records, cfg, reward_fn, seed, first_row=0) -> Rollout:
    """B records -> B*G sampled completions with rewards. Row r draws from the seed of row first_row + r of
    the global batch, so the split over processes does not change the samples."""
    built = [training_prompt(r, tokenizer, cfg.max_prompt_tokens, cfg.prompt_examples) for r in records]
    eos = eos_token_ids(model, tokenizer)
    with distributed.sampling_weights(model):  # eval mode; under FSDP the weights gathered once for the round
        out = generate(
            model,
            [ids for ids, _ in built],
            eos_token_ids=eos,
            group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            stop_strings=STOP_STRINGS,
            tokenizer=tokenizer,
            first_row=first_row,
            compile=cfg.compile,
        )
    # to the host, as ordinary tensors (generate runs under inference_mode): text and rewards are host work
    comp_ids, comp_mask, sampler_logp = (x.to("cpu", copy=True) for x in out)  # (R, M) each
    return score_rollout(built, records, comp_ids, comp_mask, sampler_logp, tokenizer, eos, cfg, reward_fn)


def gold_rollout(tokenizer, records, cfg, gold, reward_fn) -> Rollout:
    """Stage 0, the warm-up: one gold completion per prompt in place of G samples (gold: {record id:
    completion}, the rest written by data.gold_completion)."""
    built = [training_prompt(r, tokenizer, cfg.max_prompt_tokens, cfg.prompt_examples) for r in records]
    ids = [
        tokenizer(gold.get(r.id) or gold_completion(r), add_special_tokens=False)["input_ids"]
        for r in records
    ]
    comp_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids], batch_first=True)  # (B, M)
    lengths = torch.tensor([len(x) for x in ids])  # (B,)
    comp_mask = (torch.arange(comp_ids.shape[1]) < lengths[:, None]).float()  # (B, M)
    return score_rollout(built, records, comp_ids, comp_mask, None, tokenizer, (), cfg, reward_fn)


def score_rollout(
    built, records, comp_ids, comp_mask, sampler_logp, tokenizer, eos, cfg, reward_fn
) -> Rollout:
    """Decode and reward R completions (R / len(records) rows each) of (prompt ids, prefill) `built`."""
    G = comp_ids.shape[0] // len(records)
    lengths = comp_mask.sum(1).long().tolist()  # (R,)
    texts = [
        tokenizer.decode(comp_ids[r, :n].tolist(), skip_special_tokens=True) for r, n in enumerate(lengths)
    ]
    totals, components, ended = [], [], []
    for r, text in enumerate(texts):
        # the reward sees what the assistant wrote: the prefilled "<think>" plus the completion
        total, parts = reward_fn(built[r // G][1] + text, records[r // G])
        if cfg.overlong_buffer > 0:
            penalty = rewards.overlong_penalty(lengths[r], cfg.max_new_tokens, cfg.overlong_buffer)
            total, parts = total + penalty, dict(parts, overlong=penalty)
        totals.append(float(total))
        components.append(parts)
        ended.append(lengths[r] > 0 and comp_ids[r, lengths[r] - 1].item() in eos or STOP_STRINGS[0] in text)
    return Rollout(
        records=records,
        prompts=[ids for ids, _ in built],
        prefills=[prefill for _, prefill in built],
        comp_ids=comp_ids,
        comp_mask=comp_mask,
        sampler_logp=sampler_logp,
        texts=texts,
        rewards=torch.tensor(totals, dtype=torch.float64),
        components=components,
        truncated=~torch.tensor(ended, dtype=torch.bool),
    )


def gather_rollout(rollout):
    """The numbers of every completion of the global batch, in rank order, for metrics.batch_metrics."""
    keys = distributed.all_gather_union(k for parts in rollout.components for k in parts)
    G = rollout.group_size
    parts = dict(
        rewards=rollout.rewards,
        truncated=rollout.truncated.long(),
        answerable=torch.tensor(
            [rollout.records[r // G].answerable for r in range(len(rollout.texts))]
        ).long(),
        lengths=rollout.comp_mask.sum(1).double(),
        components=torch.tensor([[float(c.get(k, 0.0)) for k in keys] for c in rollout.components]).double(),
    )
    g = {name: distributed.all_gather_cat(x) for name, x in parts.items()}  # host tensors: gloo
    return dict(
        rewards=g["rewards"],
        lengths=g["lengths"],
        truncated=g["truncated"].bool(),
        answerable=g["answerable"].bool(),
        components=dict(zip(keys, g["components"].T)),
    )


def rows_in_loss(rollout, cfg):
    """The rows the loss sees: all, less the groups whose rewards are all equal with --drop-zero-std-groups
    (their advantage is 0 anyway) and the completions cut at the budget with --mask-truncated."""
    per_group = rollout.rewards.view(-1, rollout.group_size)  # (B, G)
    spread = (per_group.max(1).values != per_group.min(1).values).tolist()  # (B,) groups that teach
    keep = []
    for r in range(len(rollout.texts)):
        dropped = cfg.drop_zero_std_groups and cfg.stage > 0 and not spread[r // rollout.group_size]
        if not dropped and not (cfg.mask_truncated and rollout.truncated[r]):
            keep.append(r)
    return keep


# ---- The update: mu optimizer steps on one sampled batch ---------------------------------------------------


def lr_at(it, total, cfg):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr: a function of the step, nothing to restore."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    progress = min(1.0, (it - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, cfg):  # fused: in place, where the default allocates weight-sized temporaries
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay, fused=True)


LOSS_METRICS = tuple(
    "policy_loss surrogate kl ratio_mean ratio_max clip_frac_low clip_frac_high clip_frac entropy nll".split()
)


def policy_update(
    model, reference, optimizer, batch, advantages, keep_rows, cfg, opt_step, total_opt_steps, log=print
):
    """cfg.mu optimizer steps on one rollout -> a metrics dict per step. batch: the Rollout on the model's
    device (Rollout.to); advantages (R,) on that device; keep_rows: the rows in the loss (all, or fewer)."""
    device = batch.comp_ids.device
    # micro-batches, as many on every rank: under FSDP each forward and backward is a collective
    chunks = same_count(micro_batches(keep_rows, cfg.micro_batch, batch.group_size))
    mask, sampler_logp = batch.comp_mask, batch.sampler_logp  # (R, M) each
    # normalizers of the whole optimizer step: all micro-batches, all ranks
    num_tokens = distributed.all_reduce_sum(mask[keep_rows].sum().double()).item()
    num_seqs = int(distributed.all_reduce_sum(torch.tensor(len(keep_rows))).item())
    if num_seqs == 0:  # every row was left out (all-equal rewards everywhere): nothing to learn this step
        log(f"[info] optimizer step {opt_step}: no rows left for the loss; update skipped")
        metrics = dict.fromkeys(LOSS_METRICS, 0.0) | dict(ratio_mean=1.0, ratio_max=1.0)
        return [metrics | dict(loss=0.0, grad_norm=0.0, lr=lr_at(opt_step, total_opt_steps, cfg), skipped=1)]
    extra = extra_metric_names(cfg.objective, cfg.tis_mode, cfg.tis_cap, cfg.off_policy_mask)
    metric_names = LOSS_METRICS + extra + (SAMPLER_METRICS if sampler_logp is not None else ())
    old_logp, ref_logp, history = {}, {}, []  # per micro-batch: the sampling policy's and the reference's
    for it in range(cfg.mu):
        lr = lr_at(opt_step + it, total_opt_steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        stats = StepMetrics(metric_names, device)
        # the micro-batches' losses add up to the whole step's
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for c, (rows, pids, rows_prompt, w) in enumerate(chunks):
            memory.release_freed_memory()  # what sampling, the no-grad passes and the last step freed
            mrows = mask[rows] * w  # (r, M)
            prompts = [batch.prompts[p] for p in pids]
            inputs = (prompts, batch.comp_ids[rows], mrows, rows_prompt, cfg.temperature)
            # the frozen reference: a copy, or with LoRA the policy with its adapters off
            if cfg.beta > 0 and it == 0:
                ref_model = reference if reference is not None else model
                off = contextlib.nullcontext() if reference is not None else adapters_off(model)
                with torch.no_grad(), off:
                    ref_logp[c] = completion_logprobs(ref_model, *inputs)
            logp, ent = completion_logprobs(model, *inputs, return_entropy=True)  # (r, M) each
            sampler_rows = None if sampler_logp is None else sampler_logp[rows]
            loss, m = grpo_loss(
                logp, old_logp.get(c), ref_logp.get(c), advantages[rows], mrows, num_tokens=num_tokens,
                num_seqs=num_seqs, sampler_logp=sampler_rows, **cfg.loss_options(),
            )  # fmt: skip
            if cfg.mu > 1 and it == 0:  # the sampling policy = these weights before any step: kept for it > 0
                old_logp[c] = logp.detach()
            memory.release_freed_memory()  # the forward's freed temporaries, before gradients are allocated
            loss.backward()
            loss_total += loss.detach().double()
            # nll: the warm-up's loss, the mean -log p of the trained tokens
            n = torch.clamp(m["tokens"], min=1)
            nll = -(logp.detach() * mrows).sum() / n
            stats.add(dict(m, entropy=(ent * mrows).sum() / n, nll=nll), m["tokens"])
        # the gradients of the whole step's loss in fp32: FSDP has summed them over the ranks in backward
        params = distributed.trained_parameters(model)
        loss_total = distributed.all_reduce_sum(loss_total).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        ).item()
        skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
        if skipped:  # every rank sees the same all-reduced loss and gradient, so every rank skips together
            log(f"[warn] optimizer step {opt_step + it}: loss {loss_total}, grad norm {grad_norm}: skipped")
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        history.append(
            stats.reduce(num_tokens) | dict(loss=loss_total, grad_norm=grad_norm, lr=lr, skipped=int(skipped))
        )
    optimizer.zero_grad(set_to_none=True)
    return history


# ---- main: set up, then the step loop ----------------------------------------------------------------------


def main(argv=None, reward_fn=None):
    """Train one stage. reward_fn(completion, record) -> (total, {component: amount}): the stage's reward by
    default (stage_reward_fn); another one trains the same loop on another task."""
    cfg, t_start = parse_args(argv), time.time()
    reward_fn = reward_fn or stage_reward_fn(cfg.stage)
    rank, world, device = distributed.setup_distributed(cfg.seed)  # seeds torch and random on every rank
    dtype = distributed.compute_dtype(cfg.dtype, device)
    log = print if rank == 0 else (lambda *a, **k: None)
    out, ckpt = Path(cfg.out), checkpoint.checkpoint_to_resume(cfg, log)  # never overwrites a run silently
    init = checkpoint.resolve_init(cfg, resuming=ckpt is not None, log=log)  # the stage's start
    model, reference, tokenizer = distributed.load_run_models(cfg, ckpt, init, device, dtype, world, log)
    optimizer = make_optimizer(distributed.trained_parameters(model), cfg)
    distributed.with_master_weights(model, optimizer)
    # the data; every prompt built once now, so one over --max-prompt-tokens stops the run before step 0
    records = training_records(cfg.data, cfg.holdout, cfg.stage, cfg.seed, cfg.mix)
    log(f"[data] {cfg.data}: {len(records)} records; {cfg.batch_prompts * world} x {cfg.group_size} per step")
    for record in records:
        training_prompt(record, tokenizer, cfg.max_prompt_tokens, cfg.prompt_examples)
    gold = load_gold_completions(cfg.gold) if cfg.gold else {}
    # the state, fresh or resumed; the run's logs keep what came before the checkpoint's step
    step, opt_step, data_pos = 0, 0, [0, 0]
    if ckpt:
        step, opt_step, data_pos = checkpoint.restore_trainer_state(ckpt, model, optimizer, log)
    run_config = dict(asdict(cfg), dtype=dtype, init_resolved=init, world_size=world)
    history = [] if rank else checkpoint.open_run_logs(out, step, run_config)
    G, total_opt_steps = cfg.group_size, cfg.steps * cfg.mu
    last_step = min(cfg.steps, cfg.stop_after or cfg.steps)
    bar = tqdm(total=last_step, initial=step, disable=rank != 0 or cfg.no_progress, dynamic_ncols=True)
    while step < last_step:
        t0 = time.time()
        # 1-2. the global batch in the seeded order, this rank's slice of whole groups: G completions each
        global_records, data_pos = next_records(records, data_pos, cfg.batch_prompts * world, cfg.seed)
        local = global_records[rank * cfg.batch_prompts : (rank + 1) * cfg.batch_prompts]
        # the warm-up: this update on one gold each, advantage 1 and ratio 1, is its mean NLL
        if cfg.stage == 0:
            rollout = gold_rollout(tokenizer, local, cfg, gold, reward_fn)
        else:
            seed = (cfg.seed * 100_003 + step) * 1024
            first_row = rank * cfg.batch_prompts * G
            rollout = sample_rollout(model, tokenizer, local, cfg, reward_fn, seed, first_row)
        t_sample = time.time() - t0
        # 3. advantages over the global batch (group scaling looks within a group, batch scaling at all of it)
        gathered, R = gather_rollout(rollout), len(rollout.texts)
        advantages = torch.ones(R, device="cpu")  # (R,) stage 0; on the host, as the rewards
        if cfg.stage > 0:
            all_advantages = group_advantages(gathered["rewards"], G, cfg.scale_rewards)  # (R * world,)
            advantages = all_advantages[rank * R : (rank + 1) * R]
        keep = rows_in_loss(rollout, cfg)
        # 4-6. log-probs, loss, backward, optimizer step(s): what the update reads crosses to the device here
        t1 = time.time()
        batch, advantages_on_device = rollout.to(device), advantages.to(device)
        inner = policy_update(
            model,
            reference,
            optimizer,
            batch,
            advantages_on_device,
            keep,
            cfg,
            opt_step,
            total_opt_steps,
            log,
        )
        opt_step, step = opt_step + cfg.mu, step + 1
        t_train, dt = time.time() - t1, time.time() - t0
        # 7. metrics of the global batch, loss metrics averaged over the inner iterations; samples; checkpoint
        m = {"step": step - 1, **batch_metrics(**gathered, G=G)}
        m.update({k: sum(h[k] for h in inner) / len(inner) for k in inner[0]})
        if cfg.mu > 1:
            m["ratio_mean_last_iter"] = inner[-1]["ratio_mean"]
        m["kept_rows"] = int(distributed.all_reduce_sum(torch.tensor(len(keep))).item())
        tokens = gathered["lengths"].sum().item()
        m.update(sample_time=t_sample, tokens_per_s=tokens / dt, train_time=t_train, step_time=dt)
        if rank == 0:
            history.append(m)
            checkpoint.append_jsonl(out / "metrics.jsonl", [m])
            checkpoint.log_samples(out / "samples.jsonl", step - 1, rollout, advantages, cfg.log_samples)
        fmt = m.get("reward/format", float("nan"))
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", fmt=f"{fmt:.2f}", step_s=f"{dt:.1f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == last_step:
            checkpoint.save_checkpoint(out, model, tokenizer, optimizer, step, opt_step, data_pos, cfg)
            distributed.barrier()
    bar.close()
    log("=" * 78)
    for line in training_summary(cfg.stage, history, time.time() - t_start):
        log(line)
    log(f"checkpoint: {out / 'checkpoint'}\nmetrics: {out}/metrics.jsonl, samples: {out}/samples.jsonl")
    log("=" * 78)
    distributed.shutdown_distributed()
    return history


def cli(argv=None):
    """main() with bad input (a wrong path, a malformed record, an overlong prompt, mismatched models, an
    --out that holds a run, without --resume) reported in one line, as argparse reports a bad flag."""
    try:
        return main(argv)
    except (DataError, ModelError, FileExistsError) as e:
        print(f"grpo.py: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # argparse's exit status for bad input


if __name__ == "__main__":
    cli()
