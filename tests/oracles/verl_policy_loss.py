"""Test oracle: the pure math of verl's CISPO and SAPO policy losses, loss aggregation and rollout correction
(truncated importance weights rollout_is, rejection sampling rollout_rs), transcribed (plumbing stripped: no
config objects, no registry, no global batch info), not copied.

Upstream: volcengine/verl, verl/trainer/ppo/core_algos.py (compute_policy_loss_cispo, compute_policy_loss_sapo,
agg_loss) and verl/trainer/ppo/rollout_corr_helper.py (compute_rollout_correction_weights,
compute_rollout_rejection_mask). Copyright 2024 Bytedance Ltd. and/or its affiliates, Apache License 2.0
(http://www.apache.org/licenses/LICENSE-2.0). Commit: the code-search index's stored copy of core_algos.py
(commit 26b5d6b2bbf0202683e49d9999f9174179ab5af3) predates these functions; the transcription follows the
versions that have them, read in the index without a pinned commit. Each line keeps verl's operation and order.
"""

import torch

SAFETY_BOUND = 20.0  # verl clamps log-ratios to +-20 before exp


def masked_mean(x, mask, axis=None):
    return (x * mask).sum(axis) / mask.sum(axis) if axis is not None else (x * mask).sum() / mask.sum()


def agg_loss(loss_mat, mask, mode):
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-mean":  # rows must be non-empty
        return ((loss_mat * mask).sum(-1) / mask.sum(-1)).mean()
    raise ValueError(mode)


def cispo(
    old_log_prob, log_prob, advantages, mask, clip_low, clip_high, agg="token-mean", rollout_is_weights=None
):
    """advantages (B, T). -sg(clip(r, 1 - low, 1 + high)) * A * log_prob, r from a log-ratio clamped to +-20."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    pg_losses = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach() * advantages * log_prob
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return agg_loss(pg_losses, mask, agg)


def sapo(old_log_prob, log_prob, advantages, mask, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
         rollout_is_weights=None):  # fmt: skip
    """advantages (B, T). -(4 / tau) sigmoid(tau (r - 1)) * A, tau by the sign of A, log-ratio clamped to +-20."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    taus = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=advantages.dtype),
                       torch.as_tensor(tau_neg, dtype=advantages.dtype))  # fmt: skip
    pg_losses = -(torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)) * advantages
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return agg_loss(pg_losses, mask, agg)


def _weights(log_ratio, mask, level):
    if level == "token":
        return torch.exp(torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND))
    if level == "sequence":  # product of the token ratios
        s = (log_ratio * mask).sum(-1, keepdim=True)
    else:  # "geometric": exp of the mean log-ratio
        s = masked_mean(log_ratio, mask, axis=-1).unsqueeze(-1)
    return torch.exp(torch.clamp(s, -SAFETY_BOUND, SAFETY_BOUND)).expand_as(log_ratio)


def rollout_is_weights(old_log_prob, rollout_log_prob, mask, level, threshold):
    """Truncated importance weights min(pi_old / pi_rollout, threshold), 0 on padding."""
    if threshold <= 0:
        raise ValueError(f"rollout_is_threshold must be positive, got {threshold}.")
    w = _weights(old_log_prob - rollout_log_prob, mask, level) * mask
    return w.clamp(max=threshold)


def rollout_rs(old_log_prob, rollout_log_prob, mask, level, upper, lower=None):
    """-> (modified response mask, metrics). Tokens / sequences with a weight outside [lower, upper] (inclusive)
    leave the mask; the kept ones keep weight 1 (rejection, not reweighting). lower defaults to 1 / upper."""
    lower = 1.0 / upper if lower is None else lower
    w = _weights(old_log_prob - rollout_log_prob, mask, level)
    keep = ((w >= lower) & (w <= upper)).to(mask.dtype)
    metrics = {"rollout_rs_masked_fraction": masked_mean(1 - keep, mask).item()}
    if level == "token":  # a sequence counts as rejected when any of its tokens is
        metrics["rollout_rs_seq_masked_fraction"] = (((1 - keep) * mask).sum(-1) > 0).float().mean().item()
    else:
        metrics["rollout_rs_seq_masked_fraction"] = (1 - keep[:, 0]).mean().item()
    return mask * keep, metrics
