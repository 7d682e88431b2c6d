"""Test oracle: the pure math of TRL's GRPOTrainer loss, transcribed (plumbing stripped: no model, no accelerator,
no gathering across processes), not copied.

Upstream: huggingface/trl, trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss (loss_type "cispo", "sapo", the
clip family, off_policy_mask_threshold through get_off_policy_mask) and _generate_and_score_completions
(vllm_importance_sampling_mode token_truncate / token_mask / sequence_truncate / sequence_mask with
vllm_importance_sampling_clip_min / _clip_max, and the sampling/importance_sampling_ratio/* metrics).
Copyright 2020-2025 The HuggingFace Team, Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
Commit: the code-search index's stored copy of that path (commit d2b69d769dab6f77acbfd33252bcd7d22765571b)
predates these options; the transcription follows the versions of _compute_loss that have them (loss_type list
"grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"), read in the index without a pinned commit.
Each line keeps TRL's operation and its order; names are TRL's where they help comparison.
"""

import math

import torch


def importance_sampling_ratio(old_logps, sampling_logps, mask, mode, clip_min=None, clip_max=3.0):
    """-> (B, T) for token_* modes, (B, 1) for sequence_* modes; TRL's default mode is sequence_mask, cap 3."""
    diff = (old_logps - sampling_logps) * mask
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)  # product of the token ratios
    ratio = torch.exp(diff)  # no clamp of the log-ratio
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)  # kept tokens keep their ratio


def importance_sampling_metrics(ratio, mask, mode):
    """min / mean / max: over every sequence (an empty one included) at sequence level, else over tokens."""
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask.bool()]
    if flat.numel() == 0:
        return 0.0, 0.0, 0.0
    return flat.min().item(), flat.mean().item(), flat.max().item()


def off_policy_mask(advantages, per_token_logps, sampling_logps, mask, threshold):
    """(B, 1): keep when A >= 0 or the mean of (sampling - current) log-probs is at most the threshold."""
    kl = sampling_logps - per_token_logps.detach()
    seq_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (seq_kl <= threshold)).to(mask.dtype)


def per_token_policy_loss(loss_type, logps, old_logps, advantages, mask, eps_low, eps_high, level="token",
                          tau_pos=1.0, tau_neg=1.05, delta=None):  # fmt: skip
    """advantages (B, 1). The policy part of per_token_loss before masks, IS weights and KL."""
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    if loss_type == "cispo":  # capped above at epsilon_high itself, no lower clip
        return -torch.clamp(coef_1, max=eps_high).detach() * advantages * logps
    if loss_type == "sapo":
        tau = torch.where(advantages > 0, tau_pos, tau_neg)
        return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * advantages
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:  # INTELLECT-2's two-sided clip
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def loss(loss_type, logps, old_logps, ref_logps, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.0,
         level="token", tau_pos=1.0, tau_neg=1.05, is_ratio=None, opsm=None, max_completion_length=None):  # fmt: skip
    """One process, one micro-batch: num_items_in_batch = this batch's tokens. advantages (B,)."""
    A = advantages.unsqueeze(1)
    per_token = per_token_policy_loss(
        loss_type, logps, old_logps, A, mask, eps_low, eps_high, level, tau_pos, tau_neg
    )
    if opsm is not None:
        per_token = per_token * opsm
    if is_ratio is not None:
        per_token = per_token * is_ratio
    if beta != 0.0:  # k3, not clamped
        per_token = per_token + beta * (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # cispo, dapo: / num_items_in_batch
