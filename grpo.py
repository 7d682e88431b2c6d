"""GRPO (Group Relative Policy Optimization) in one file, top to bottom.

    python grpo.py --stage 1          # format + answer + citation rewards, answerable questions only
    python grpo.py --stage 2          # + refusal reward, 50/50 answerable / unanswerable, starts from stage 1
    torchrun --nproc_per_node 2 grpo.py --stage 1    # data-parallel (gloo on CPU, nccl on GPU)

One optimizer step:
  1. take B prompts, sample G completions for each                     (model.generate)
  2. score every completion: r_ij                                      (rewards.stage_reward)
  3. advantage per completion: A_ij = (r_ij - mean_j r_i.) / (std_j r_i. + eps)   (group_advantages)
  4. per completion token: logp under the current policy, old_logp under the policy that sampled,
     ref_logp under the frozen reference, all from logits / temperature  (kernels.fused_linear_logprobs)
  5. clipped surrogate minus beta * KL, aggregated over completion tokens  (grpo_loss)
  6. backward (micro-batches, gradient accumulation), clip the gradient norm, AdamW, LR schedule.

The two functions `grpo_loss` and `group_advantages` depend on torch only and can be copied into other projects.
See ../shared/reference/grpo-notes.md for the algorithm and the bugs this file avoids.
"""
import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: bounds ratios and KL so a wild token cannot overflow to inf / NaN


# ----------------------------------------------------------------------------------------------------------------
# The loss (torch only)

def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3",
              agg="token-mean", num_tokens=None, num_seqs=None):
    """Clipped GRPO surrogate with an optional KL penalty to a reference policy.

    logp       (B, T) log-probs of the completion tokens under the current policy (with grad)
    old_logp   (B, T) under the policy that sampled them (no grad); None means logp.detach() (mu = 1)
    ref_logp   (B, T) under the frozen reference (no grad); may be None when beta == 0
    advantages (B,)   one advantage per completion
    mask       (B, T) 1 for completion tokens (up to and including the first EOS), 0 after
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio (DAPO "clip higher": eps_high = 0.28)
    kl: "k1" | "k2" | "k3" estimator of KL(policy || reference) per token
    agg: how per-token losses become one number
        "token-mean"              sum over tokens / num_tokens (DAPO; TRL's default)
        "seq-mean-token-mean"     mean over each sequence's tokens, then mean over sequences (GRPO paper)
        "seq-mean-token-sum-norm" sum over tokens / (num_seqs * T) (Dr. GRPO; T = the generation budget)
    num_tokens: completion tokens of the WHOLE optimizer step (all micro-batches, all ranks) for "token-mean";
        default mask.sum(), i.e. this batch is the whole step. Summing the losses of the micro-batches then gives
        exactly the loss of the whole step, whatever the split into micro-batches or processes.
    num_seqs: sequences of the whole step for the two "seq-mean" aggregations (default B), for the same reason.
    Returns (loss scalar, metrics dict of detached scalar tensors, token-means over this batch's completion tokens).
    """
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()                      # mu = 1: ratio = 1 in value, but not in gradient
    A = advantages.to(logp.dtype).unsqueeze(1)        # (B, 1), broadcast over tokens

    # ratio_t = exp(logp_t - old_logp_t), the log-ratio clamped so exp cannot overflow
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)    # (B, T)
    ratio = torch.exp(log_ratio)                                                   # (B, T)
    # surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    surrogate = torch.minimum(unclipped, clipped)                                  # (B, T)

    # KL(policy || reference) per token; d = ref_logp - logp, clamped like the ratio
    if beta != 0.0 or ref_logp is not None:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logp")
        d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)       # (B, T)
        if kl == "k1":
            kl_t = -d                                 # k1 = logp - ref_logp (unbiased, can be negative)
        elif kl == "k2":
            kl_t = 0.5 * d * d                        # k2 = (logp - ref_logp)^2 / 2
        elif kl == "k3":
            kl_t = torch.exp(d) - d - 1.0             # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, low variance
        else:
            raise ValueError(f"grpo_loss: kl must be k1, k2 or k3, got {kl!r}")
    else:
        kl_t = torch.zeros_like(logp)

    # loss_t = -(surrogate_t - beta * kl_t)
    per_token = -(surrogate - beta * kl_t)                                         # (B, T)

    B, T = logp.shape
    if agg == "token-mean":
        # sum_{i,t} mask * loss_t / (completion tokens of the whole step)
        n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = (per_token * mask).sum() / torch.clamp(n, min=1.0)
    elif agg == "seq-mean-token-mean":
        # (1 / num_seqs) sum_i [ sum_t mask * loss_t / |o_i| ]
        seq_len = torch.clamp(mask.sum(1), min=1.0)                                  # (B,) empty rows -> 0 loss
        n_seq = B if num_seqs is None else num_seqs
        loss = ((per_token * mask).sum(1) / seq_len).sum() / max(n_seq, 1)
    elif agg == "seq-mean-token-sum-norm":
        # (1 / (num_seqs * T)) sum_{i,t} mask * loss_t: a constant normalizer, no length bias
        n_seq = B if num_seqs is None else num_seqs
        loss = (per_token * mask).sum() / (max(n_seq, 1) * T)
    else:
        raise ValueError(f"grpo_loss: agg must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, "
                         f"got {agg!r}")

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


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Advantage of each completion relative to the other completions of its prompt.

    rewards (N*G,), rows grouped by prompt: rows [i*G:(i+1)*G] belong to prompt i.
    scale: "group" A = (r - mean_group) / (std_group + eps)  (GRPO)
           "batch" A = (r - mean_group) / (std_batch + eps)  (less noise from tiny groups)
           "none"  A =  r - mean_group                       (Dr. GRPO: no difficulty bias)
    A group whose rewards are all equal gets A = 0 exactly (it teaches nothing), never NaN.
    Returns (N*G,) float32.
    """
    r = rewards.detach().to(torch.float64).view(-1, group_size)                  # (N, G)
    centered = r - r.mean(dim=1, keepdim=True)                                    # r_ij - mean_j r_i.
    zero_std = (r.max(dim=1).values == r.min(dim=1).values)                       # (N,) all-equal groups
    centered = torch.where(zero_std.unsqueeze(1), torch.zeros_like(centered), centered)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])   # unbiased, (N, 1)
        adv = centered / (std + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros(())
        adv = centered / (std + eps)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"group_advantages: scale must be group, batch or none, got {scale!r}")
    return adv.view(-1).to(torch.float32)
