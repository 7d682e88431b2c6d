"""The trainer's per-step reports: the metrics of one optimizer step, of one sampled batch, and the end-of-run
summary table (grpo.py).

    StepMetrics       the loss metrics of one optimizer step over its micro-batches and ranks, on the device
    batch_metrics     reward, reward components, lengths, clipping and refusal shares of one global batch
    training_summary  the end-of-run table: first and last step, means of the first and last 5 steps

Plain arithmetic on tensors and logged dicts. The rewards themselves are rewards.py's; plotting a run's
metrics.jsonl and the Trust-Score evaluation of a checkpoint are eval.py's.
"""

import math

import torch

from distributed import all_reduce_max, all_reduce_sum


class StepMetrics:
    """Metrics of one optimizer step over its micro-batches and ranks, by name: "...max" keys are maxima, ".../min"
    minima, the rest token-weighted means. The keys are fixed up front, so every rank reduces the same tensors even
    when one of them has no rows this step. Kept on the device the metrics come from: no copy per micro-batch."""

    def __init__(self, keys, device):
        self.keys = list(keys)
        signs = [1.0 if k.endswith("max") else -1.0 if k.endswith("/min") else 0.0 for k in self.keys]
        self.sign = torch.tensor(
            signs, dtype=torch.float64, device=device
        )  # +1 max, -1 min (max of -x), 0 mean
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.extremes = torch.full((len(self.keys),), -math.inf, dtype=torch.float64, device=device)

    def add(self, metrics, tokens):
        """metrics {key: 0-dim tensor or float} of one micro-batch of `tokens` completion tokens."""
        if float(tokens) == 0:  # no tokens: nothing to average, and no extremes (e.g. a padded micro-batch)
            return
        device = self.sums.device
        v = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=device) for k in self.keys])
        self.sums += v * float(tokens)
        self.extremes = torch.maximum(self.extremes, self.sign * v)

    def reduce(self, num_tokens) -> dict:
        means = all_reduce_sum(self.sums) / max(num_tokens, 1.0)
        extremes = all_reduce_max(self.extremes) * self.sign
        values = torch.where(self.sign == 0, means, extremes).tolist()  # one copy to the host
        return dict(zip(self.keys, values))


def batch_metrics(lengths, rewards, components, truncated, answerable, G):
    """Reward and length statistics of a global batch: lengths (R,) completion tokens, rewards (R,), components
    {name: (R,)} from rewards.stage_reward, truncated (R,) cut at the budget, answerable (R,), groups of G rows."""
    per_group = rewards.view(-1, G)
    m = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": (per_group.max(1).values == per_group.min(1).values).float().mean().item(),
        "completion_len_mean": lengths.mean().item(),
        "completion_len_min": lengths.min().item(),
        "completion_len_max": lengths.max().item(),
        "clipped_share": truncated.float().mean().item(),
    }
    for k, v in components.items():
        m[f"reward/{k}"] = v.mean().item()
    if "em" in components:  # share of completions whose answer holds a gold answer ("answer right")
        m["answer_right"] = (components["em"] > 0).float().mean().item()
    if "refused" in components:  # what stage 2 teaches: refuse the unanswerable, answer the answerable
        for name, rows in (("refused_answerable", answerable), ("refused_unanswerable", ~answerable)):
            if rows.any():
                m[name] = components["refused"][rows].mean().item()
    return m


def training_summary(stage, history, wall):
    """Lines of the end-of-run table: the first and last step and the means of the first and last 5 steps."""
    if not history:
        return ["[done] no steps run"]
    first, last = history[0], history[-1]
    k = min(5, len(history))
    mean_of = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    lines = [
        f"GRPO stage {stage}: {len(history)} steps logged, wall time {wall / 60:.1f} min "
        f"({wall / max(1, len(history)):.1f} s/step)",
        f"{'':32s}{'step ' + str(first['step']):>12s}{'step ' + str(last['step']):>12s}"
        f"{'first ' + str(k):>12s}{'last ' + str(k):>12s}",
    ]
    # diagnostics present in every logged step (a stage-2 batch may lack one kind of question)
    extra = [
        key
        for key in ("answer_right", "refused_answerable", "refused_unanswerable")
        if all(key in row for row in history)
    ]
    keys = (
        ["reward_mean"]
        + [key for key in first if key.startswith("reward/")]
        + extra
        + ["frac_reward_zero_std", "completion_len_mean", "clipped_share"]
        + [key for key in ("nll", "entropy") if all(key in row for row in history)]
    )  # the warm-up's loss: nll
    for key in keys:
        lines.append(
            f"{key:32s}{first[key]:12.3f}{last[key]:12.3f}{mean_of(history[:k], key):12.3f}"
            f"{mean_of(history[-k:], key):12.3f}"
        )
    diff = (
        "sampling/sampling_logp_difference/max"  # the sampler against the trainer: ~1e-6 in fp32, else a bug
    )
    if all(diff in row for row in history):
        worst = max(history, key=lambda row: row[diff])
        ratios = [row["sampling/importance_sampling_ratio/" + s] for row in history for s in ("min", "max")]
        lines.append(
            f"sampler vs trainer log-probs: largest |difference| {worst[diff]:.2e} (step {worst['step']}), "
            f"importance ratios in [{min(ratios):.4f}, {max(ratios):.4f}]"
        )
    return lines
