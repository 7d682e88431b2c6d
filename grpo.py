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
import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

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


# ----------------------------------------------------------------------------------------------------------------
# Everything below is the trainer: config, processes, model (+ LoRA), sampling, log-probs, one step, checkpoints.



@dataclass
class Config:
    stage: int = 1                  # 1: format + answer + citation rewards on answerable questions; 2: + refusal
    model: str = "builtin"          # base model: "builtin" (SmolLM2-135M-Instruct) or a Hugging Face model directory
    init: str | None = None         # weights to start from; stage 2 default: the stage-1 output if present, else model
    data: str = "builtin"           # "builtin" synthetic grounded QA, or an ALCE / Trust-Score JSON(L) file
    out: str | None = None          # run directory; default runs/stage{N}
    steps: int = 40                 # sampling rounds; each does `mu` optimizer steps (stage 2 default: 30)
    batch_prompts: int = 4          # prompts per sampling round per process (stage 2 default: 2, see STAGE_DEFAULTS)
    group_size: int = 8             # G completions per prompt (stage 2 default: 16)
    max_new_tokens: int = 64        # completion budget (the built-in task's answers need ~35 tokens)
    max_prompt_tokens: int = 1024   # prompts longer than this are cut by data.build_prompt
    temperature: float = 0.7        # sampling temperature; log-probs from logits / temperature (stage 2: 1.0)
    top_p: float = 1.0
    lr: float = 2e-5                # peak AdamW lr; at 5e-5 the demo stopped exploring (entropy 0.55 -> 0.1 in 3 steps)
    warmup_steps: int = 2           # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta: float = 0.0               # KL penalty weight; 0 = no reference model is computed at all
    ref: str | None = None          # KL reference weights; default: init, the frozen start of this stage
    kl: str = "k3"
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: str = "token-mean"
    scale_rewards: str = "group"
    mu: int = 1                     # inner optimizer steps per sampled batch (old log-probs stored once)
    micro_batch: int = 16           # completions per forward/backward (gradient accumulation over the batch)
    grad_clip: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    grad_checkpoint: bool = False
    drop_zero_std_groups: bool = False
    lora_rank: int = 0
    lora_alpha: float = 32.0
    resume: bool = False
    save_every: int = 10
    log_samples: int = 4            # completions written to samples.jsonl per step
    stop_after: int = 0             # stop (with a checkpoint) after this many steps of the schedule; 0 = run all
    no_progress: bool = False


# Stage 2 samples wider, at the same 32 completions per step: a stage-1 model of an earlier design refused ~3% of
# unanswerable questions (measured at T = 0.7 and 1.0 on 16 eval questions x 4), so a group of 8 would hold a
# refusal ~1 time in 5 and a group of 16 at T = 1.0 ~2 in 5. The current stage-1 model refuses none (README:
# stage 2 then has no refusal to reinforce on the built-in task). Stage 1 runs 40 steps: at 30 the built-in
# demo's reward rose 0.85 (59% right answers over the last 5 steps), at 40 it rose 1.04 (75%; 20 min, measured).
STAGE_DEFAULTS = {1: dict(steps=40, batch_prompts=4, group_size=8, temperature=0.7),
                  2: dict(steps=30, batch_prompts=2, group_size=16, temperature=1.0)}

HELP = {
    "stage": "1: tag/format/answer/citation rewards on answerable questions; 2: adds the refusal reward on a 50/50 "
             "answerable/unanswerable mix",
    "model": "base model: 'builtin' (SmolLM2-135M-Instruct converted from its GGUF) or a Hugging Face model dir",
    "init": "weights to start from (default: --model; in stage 2 the stage-1 output <out of stage 1>/checkpoint "
            "when it exists)",
    "data": "'builtin' (synthetic grounded QA) or an ALCE / Trust-Score JSON or JSONL file",
    "out": "run directory (default runs/stage{N}): metrics.jsonl, samples.jsonl, config.json, checkpoint/",
    "steps": "sampling rounds (each one: sample, score, then --mu optimizer steps; default: 40 in stage 1, 30 in "
             "stage 2)",
    "batch_prompts": "prompts per sampling round and process (default: 4 in stage 1, 2 in stage 2)",
    "group_size": "completions sampled per prompt, G (default: 8 in stage 1, 16 in stage 2)",
    "max_new_tokens": "completion length budget in tokens",
    "max_prompt_tokens": "longest prompt in tokens (passed to data.build_prompt)",
    "temperature": "sampling temperature (> 0); log-probs are recomputed from logits / temperature (default: 0.7 "
                   "in stage 1, 1.0 in stage 2)",
    "top_p": "nucleus sampling threshold (1 = off)",
    "lr": "peak learning rate of AdamW",
    "warmup_steps": "optimizer steps of linear warm-up before the cosine decay",
    "min_lr_ratio": "the cosine decays to lr * min_lr_ratio",
    "weight_decay": "AdamW weight decay",
    "beta": "weight of the KL penalty to the frozen reference (0 = none, and no reference forward at all)",
    "ref": "weights of the frozen KL reference (default: --init, the start of this stage; e.g. 'builtin' in stage 2 "
           "keeps the pull toward the untrained model, whose refusals stage 1 removed); not with --lora-rank",
    "kl": "KL estimator: k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1",
    "eps_low": "ratio clipped below at 1 - eps_low",
    "eps_high": "ratio clipped above at 1 + eps_high (DAPO 'clip higher': 0.28)",
    "loss_agg": "token-mean (DAPO), seq-mean-token-mean (GRPO paper), seq-mean-token-sum-norm (Dr. GRPO)",
    "scale_rewards": "advantage scaling: group std (GRPO), batch std, none (Dr. GRPO)",
    "mu": "optimizer steps per sampled batch; > 1 reuses the old log-probs stored right after sampling",
    "micro_batch": "completions per forward/backward pass; gradients are accumulated over the batch",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "dtype": "parameter dtype",
    "seed": "seed of data order, sampling and LoRA init",
    "grad_checkpoint": "recompute each transformer block in backward instead of storing its activations",
    "drop_zero_std_groups": "leave groups whose rewards are all equal out of the loss (they have zero advantage)",
    "lora_rank": "0 = full fine-tune; > 0 = LoRA adapters of this rank on every linear layer of the blocks, "
                 "and the reference is the same weights with the adapters switched off",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / rank) * B @ A",
    "resume": "continue from <out>/checkpoint: weights, optimizer, schedule, RNG and data position (starts fresh "
              "when there is none; without --resume an --out that holds a checkpoint is an error, not overwritten)",
    "save_every": "write a checkpoint every this many steps (and at the end)",
    "log_samples": "completions per step written to samples.jsonl",
    "stop_after": "stop after this many steps (saving a checkpoint) without changing the schedule of --steps; "
                  "for testing --resume",
    "no_progress": "no tqdm progress bar",
}


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description="GRPO for grounded, cited answers (two stages).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"stage": [1, 2], "kl": ["k1", "k2", "k3"], "dtype": ["float32", "bfloat16"],
               "loss_agg": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
               "scale_rewards": ["group", "batch", "none"]}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            typ = {int: int, float: float}.get(f.type, str) if not isinstance(f.type, str) else \
                {"int": int, "float": float}.get(f.type, str)
            # per-stage defaults: absent from the namespace unless given, filled in below
            default = argparse.SUPPRESS if f.name in STAGE_DEFAULTS[1] else f.default
            p.add_argument(flag, type=typ, default=default, choices=choices.get(f.name), help=HELP[f.name])
    args = vars(p.parse_args(argv))
    cfg = Config(**{**STAGE_DEFAULTS[args["stage"]], **args})
    if cfg.out is None:
        cfg.out = f"runs/stage{cfg.stage}"
    if cfg.temperature <= 0:
        p.error("--temperature must be > 0 (the policy is softmax(logits / temperature))")
    if cfg.group_size < 2:
        p.error("--group-size must be >= 2 (advantages compare completions of the same prompt)")
    if cfg.ref is not None and cfg.lora_rank > 0:
        p.error("--ref needs a full fine-tune: with --lora-rank the reference is the policy with adapters off")
    if cfg.ref is not None and cfg.beta == 0:
        p.error("--ref is the KL reference: it needs --beta > 0")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE; each process holds whole groups (batch_prompts prompts x G rows)

def setup_distributed():
    """-> (rank, world, device). gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(x):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_cat(x):
    """(n, ...) on each rank -> (world * n, ...) in rank order (every rank holds the same n)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------------
# LoRA: W x + (alpha / r) * B (A x), A (r, in), B (out, r) = 0 at start, so training starts from the base model

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        self.enabled = True                                  # False: exactly the base layer (the reference policy)

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale    # (..., out)
        return y

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A, for saving in the Hugging Face layout."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        dtype=self.base.weight.dtype, device=self.base.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def add_lora(model, rank, alpha):
    """Freeze every parameter, then wrap each nn.Linear inside the transformer blocks with a LoRA adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model):
    """The reference policy under LoRA: the same module with the adapters switched off (no second copy)."""
    mods = lora_modules(model)
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


@contextlib.contextmanager
def lora_merged(model):
    """Temporarily swap every LoRALinear for its merged nn.Linear, so state_dict() has the Hugging Face names."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                swaps.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


# ----------------------------------------------------------------------------------------------------------------
# Model, reference, tokenizer

def find_checkpoint(path) -> Path | None:
    """A run directory holds its weights in checkpoint/ (checkpoint.old/ only during the swap of a save)."""
    p = Path(path)
    for cand in (p, p / "checkpoint", p / "checkpoint.old"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def resolve_init(cfg, log=print) -> str:
    if cfg.init is not None:
        log(f"[init] starting from --init {cfg.init}")
        return cfg.init
    if cfg.stage == 2:
        stage1 = find_checkpoint(Path(cfg.out).parent / "stage1")
        if stage1 is not None:
            log(f"[init] stage 2 starts from the stage-1 checkpoint {stage1}")
            return str(stage1)
        log(f"[init] no stage-1 checkpoint under {Path(cfg.out).parent / 'stage1'}: stage 2 starts from --model "
            f"{cfg.model}")
    else:
        log(f"[init] starting from --model {cfg.model}")
    return cfg.model


def load_models(cfg, weights, init, device):
    """-> (policy, reference or None). The policy starts from `weights` (init, or a checkpoint when resuming).
    The reference is the frozen start of this stage, `init` (or `--ref`): with LoRA the same module with adapters
    off; otherwise a frozen copy, and none at all when beta == 0."""
    from model import Transformer
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    policy = Transformer.from_pretrained(weights, dtype=dtype, device=device)
    reference = None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)                       # adapter init is part of the seeded run
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        policy.to(device)
    elif cfg.beta > 0:
        reference = Transformer.from_pretrained(cfg.ref or init, dtype=dtype, device=device)
        reference.eval().requires_grad_(False)
        if reference.config.vocab_size != policy.config.vocab_size:   # log-probs of the same ids must mean the same
            from model import ModelError
            raise ModelError(f"--ref {cfg.ref}: its vocabulary has {reference.config.vocab_size} tokens, the "
                             f"policy's {policy.config.vocab_size}; the KL needs the policy's tokenizer")
    if cfg.grad_checkpoint:
        policy.gradient_checkpointing = True
    return policy, reference


def make_optimizer(params, cfg):
    """AdamW, betas 0.9 / 0.99. fused=True: a fused kernel updates each tensor's moments and weights in place,
    where the default multi-tensor (foreach) path allocates temporaries as large as the trained weights (sqrt(v),
    ...) on top of the weights, gradients and moments: the optimizer step added ~210 MB above the RSS before it
    on SmolLM2 (bench/vs_trl.py --phases), now nothing. Same update up to float rounding (tests/test_grpo.py);
    also what transformers' Trainer (and so TRL) uses by default with torch >= 2.8."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then cosine decay to min_lr_ratio * lr (a pure function of the step: nothing to
# restore on resume but the step number)

def lr_at(it, total, cfg):
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    progress = min(1.0, (it - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch; a position (epoch, index) is all a resume needs

def epoch_order(n, seed, epoch):
    g = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    g.shuffle(order)
    return order


def next_records(records, pos, count, seed):
    """Take `count` records from position pos = [epoch, index]; returns (records, new pos)."""
    epoch, idx = pos
    out = []
    while len(out) < count:
        order = epoch_order(len(records), seed, epoch)
        take = min(count - len(out), len(records) - idx)
        out += [records[order[i]] for i in range(idx, idx + take)]
        idx += take
        if idx == len(records):
            epoch, idx = epoch + 1, 0
    return out, [epoch, idx]


# ----------------------------------------------------------------------------------------------------------------
# Log-probs of completion tokens only. The G completions of a prompt share that prompt, so it is run once: each
# prompt and the inputs of its completions go side by side into one packed sequence with a block mask,
#
#     [ q_0 .. q_{L-1} | o^1_0 .. o^1_{m_1-2} | o^2_0 .. o^2_{m_2-2} | ... ]      (o^r_{m_r-1}, the last token of a
#                                                                                  row, predicts nothing: not an input)
#
# where a completion token sees the whole prompt and the earlier tokens of its own completion, at positions L, L+1,
# ... as if it followed the prompt alone. Same numbers as G separate sequences (tested), with the prompt computed
# once, no padding inside a row and no key/value copies; gradients reach the prompt's keys and values from every
# completion through the one packed forward.

def pack_groups(prompts, comp_ids, lengths, rows_prompt, pad_id=0):
    """prompts: P token lists; comp_ids (R, M); lengths (R,) real tokens per row; rows_prompt (R,) prompt of each row.
    -> ids (P, S), positions (P, S), mask (P, 1, S, S) bool (True = may attend), index (R, M) into the flattened
    (P * S) outputs: the position whose output predicts completion token t of row r (0 where t >= lengths[r])."""
    R, M = comp_ids.shape
    seqs, segs, poss = [], [], []
    index = torch.zeros(R, M, dtype=torch.long)
    for p, prompt in enumerate(prompts):
        L = len(prompt)
        ids, seg, pos = list(prompt), [0] * L, list(range(L))
        for r in (rows_prompt == p).nonzero().flatten().tolist():
            m = int(lengths[r])
            if m == 0:
                continue
            start = len(ids)
            ids += comp_ids[r, :m - 1].tolist()                  # inputs o_0 .. o_{m-2}
            seg += [r + 1] * (m - 1)                               # segment r + 1: this row's own tokens
            pos += list(range(L, L + m - 1))
            index[r, 0] = L - 1                                    # the last prompt token predicts o_0
            index[r, 1:m] = torch.arange(start, start + m - 1)    # o_{t-1} predicts o_t
        seqs.append(ids), segs.append(seg), poss.append(pos)
    S = max(len(x) for x in seqs)
    pad = lambda rows, v: torch.tensor([x + [v] * (S - len(x)) for x in rows])
    ids, seg, pos = pad(seqs, pad_id), pad(segs, -1), pad(poss, 0)               # (P, S) each; seg -1 = padding
    for p in range(len(prompts)):
        index[rows_prompt == p] += p * S
    index[torch.arange(M)[None, :] >= lengths[:, None]] = 0
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]                               # (P, S, 1), (P, 1, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()                            # key at or before the query
    # a key is visible if it is earlier and in the prompt or in the query's own row; padding sees only itself
    mask = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0) & (q_seg >= 0)
    mask |= torch.eye(S, dtype=torch.bool)
    return ids, pos, mask[:, None], index


def completion_logprobs(model, prompts, comp_ids, comp_mask, rows_prompt, temperature, share_prompt=True,
                        return_entropy=False):
    """log pi(o_t | q, o_<t) for every completion token, from logits / temperature.

    prompts     list of P token lists (the distinct prompts of this micro-batch)
    comp_ids    (R, M) completions; comp_mask (R, M) 1 up to and including the first EOS
    rows_prompt (R,) index into prompts of each row
    share_prompt: one packed sequence per prompt (pack_groups); False runs the R full (prompt + completion)
        sequences, left-padded: G times the prompt compute, kept as the plain reference the packed path is tested
        against.
    -> logp (R, M) float32 (0 where masked) [, entropy (R, M) float32 detached]
    """
    from kernels import fused_linear_logprobs
    from model import left_pad
    device = comp_ids.device
    R, M_full = comp_ids.shape
    # positions after the longest completion of this micro-batch are padding: causal attention lets us cut them
    M = max(1, int(comp_mask.sum(1).max().item()))
    comp_ids, comp_mask = comp_ids[:, :M], comp_mask[:, :M]
    if share_prompt:
        ids, pos, mask, index = pack_groups(prompts, comp_ids.cpu(), comp_mask.sum(1).cpu(), rows_prompt.cpu())
        hidden = model(ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       return_hidden=True)                               # (P, S, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[index.to(device)]  # (R, M, H)
    else:
        p_ids, p_mask = left_pad(prompts, 0, device)                     # (P, L)
        L = p_ids.shape[1]
        attn = torch.cat([p_mask[rows_prompt], comp_mask.to(p_mask.dtype)], 1)                  # (R, L + M)
        ids = torch.cat([p_ids[rows_prompt], comp_ids], 1)[:, :-1]     # (R, L + M - 1)
        hidden = model(ids, attention_mask=attn[:, :-1], return_hidden=True)[:, L - 1:]         # (R, M, H)
    labels = comp_ids.masked_fill(comp_mask == 0, -100)               # ignored rows give 0 and no gradient
    out = fused_linear_logprobs(hidden.reshape(R * M, -1), model.lm_head_weight, labels.reshape(-1),
                                temperature=temperature, return_entropy=return_entropy)
    pad = lambda x: torch.nn.functional.pad(x.view(R, M), (0, M_full - M))          # back to (R, M_full)
    if return_entropy:
        return pad(out[0]), pad(out[1])
    return pad(out)


def micro_batches(rows, micro_batch, group_size):
    """Split the kept row indices into chunks of at most micro_batch rows; -> list of (rows, prompt indices, row ->
    local prompt index). A group may straddle two chunks: its prompt is then run in both (still exact)."""
    chunks = []
    for s in range(0, len(rows), micro_batch):
        r = rows[s:s + micro_batch]
        pids = sorted({i // group_size for i in r})
        local = {p: j for j, p in enumerate(pids)}
        chunks.append((r, pids, torch.tensor([local[i // group_size] for i in r])))
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# Sampling and scoring

STOP_STRINGS = ["</answer>"]   # the model keeps writing after its answer block; stop the row right there


def training_prompt(record, tokenizer, cfg):
    """(prompt_ids, prefill) of one record: the same prompt in both stages and in eval.py, with the refusal example.
    Without it the untrained model never refuses (0/40 measured in data.py). Shown only in stage 2, stage 1 trained
    a model that refused ~3% of unanswerable questions under the stage-2 prompt and 0 of ~130 samples in a stage-2
    run (measured), which left the refusal reward nothing to reinforce. In stage 1 a refusal scores like a wrong
    answer."""
    from data import build_prompt
    return build_prompt(record, tokenizer, max_prompt_tokens=cfg.max_prompt_tokens, refusal_example=True)


def sample_and_score(model, tokenizer, records, cfg, seed):
    """B records -> B*G completions with rewards. Rows [i*G:(i+1)*G] belong to records[i]."""
    from model import generate
    from rewards import stage_reward
    G = cfg.group_size
    built = [training_prompt(r, tokenizer, cfg) for r in records]
    prompts = [ids for ids, _ in built]
    cfg_eos = model.config.eos_token_id                    # int, list or None in Hugging Face configs
    eos = sorted({tokenizer.eos_token_id} | set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]) - {None})
    model.eval()
    comp_ids, comp_mask, _ = generate(model, prompts, group_size=G, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p, eos_token_ids=tuple(eos),
                                      seed=seed, stop_strings=STOP_STRINGS, tokenizer=tokenizer)
    model.train()
    # generate runs under inference_mode; clones are ordinary tensors that autograd may save for backward
    comp_ids, comp_mask = comp_ids.clone(), comp_mask.clone()
    texts, rewards, comps = [], [], []
    for row in range(comp_ids.shape[0]):
        n = int(comp_mask[row].sum())
        text = tokenizer.decode(comp_ids[row, :n].tolist(), skip_special_tokens=True)
        # the reward sees what the assistant wrote: the prefilled "<think>" plus the sampled completion
        total, components = stage_reward(built[row // G][1] + text, records[row // G], cfg.stage)
        texts.append(text)
        rewards.append(float(total))
        comps.append(components)
    lengths = comp_mask.sum(1)                                                       # (B*G,)
    ended = torch.tensor([bool(comp_ids[r, int(lengths[r]) - 1].item() in eos) or STOP_STRINGS[0] in texts[r]
                          for r in range(len(texts))])
    answerable = torch.tensor([records[r // G].answerable for r in range(len(texts))])
    return dict(prompts=prompts, prefills=[p for _, p in built], comp_ids=comp_ids, comp_mask=comp_mask,
                texts=texts, rewards=torch.tensor(rewards), components=comps, truncated=~ended,
                answerable=answerable)


# ----------------------------------------------------------------------------------------------------------------
# The policy update: mu optimizer steps on one sampled batch

def batch_logprobs(model, batch, chunks, cfg, grad=False):
    """No-grad log-probs of all kept rows (old policy right after sampling, or the reference): (R_kept, M)."""
    out = []
    with torch.no_grad():
        for rows, pids, rows_prompt in chunks:
            out.append(completion_logprobs(model, [batch["prompts"][p] for p in pids], batch["comp_ids"][rows],
                                           batch["comp_mask"][rows], rows_prompt, cfg.temperature))
    return torch.cat(out)


def release_freed_memory():
    """Give memory that was freed but is still held by the C allocator back to the OS: glibc's malloc_trim(0), a
    no-op where there is no glibc. glibc serves blocks below its mmap threshold (up to 32 MiB: every activation,
    KV-cache and chunk tensor of a small model) from heaps that it keeps, and a heap is only shrunk from its top,
    so freed blocks between live ones stay resident. After a step of the built-in model on CPU, RSS was 0.9-1.7 GB
    above the live tensors; the next forward and backward only partly reuse those holes and add to them.
    policy_update calls this before each micro-batch's forward and before its backward (bench/vs_trl.py --phases:
    peak 4533 -> 4306 MB with both calls, 4485 / 4407 MB with only the first / the second)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False                                  # no glibc (macOS, musl): nothing to do
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def sync_gradients(params):
    """Data parallel: sum the gradients of all ranks (each rank's loss is already divided by the global token or
    sequence count, so the sum is the gradient of the whole step's loss)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off:off + g.numel()].view_as(g).clone()
        off += g.numel()


def policy_update(model, reference, optimizer, batch, advantages, keep_rows, cfg, opt_step, total_opt_steps,
                  log=print):
    """-> list of per-inner-iteration metric dicts. keep_rows: the rows that enter the loss (all, or those of
    groups with non-zero reward spread under --drop-zero-std-groups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = micro_batches(keep_rows, cfg.micro_batch, cfg.group_size)
    mask = batch["comp_mask"][keep_rows]                                           # (R_kept, M)
    adv = advantages[keep_rows]                                                    # (R_kept,)
    # normalizers of the whole optimizer step: all micro-batches, all ranks
    num_tokens = all_reduce_sum(mask.sum().double().clone()).item()
    num_seqs = int(all_reduce_sum(torch.tensor(float(len(keep_rows)), dtype=torch.float64)).item())

    old_logp = batch_logprobs(model, batch, chunks, cfg) if cfg.mu > 1 and keep_rows else None
    ref_logp = None
    if cfg.beta > 0 and keep_rows:
        if reference is not None:
            ref_logp = batch_logprobs(reference, batch, chunks, cfg)
        else:
            with adapters_off(model):
                ref_logp = batch_logprobs(model, batch, chunks, cfg)

    history = []
    if num_seqs == 0:        # every group was dropped (all-equal rewards everywhere): nothing to learn this step
        log(f"[info] optimizer step {opt_step}: no rows with a reward spread; update skipped")
        return [{"loss": 0.0, "policy_loss": 0.0, "surrogate": 0.0, "kl": 0.0, "ratio_mean": 1.0,
                 "clip_frac_low": 0.0, "clip_frac_high": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0,
                 "lr": lr_at(opt_step, total_opt_steps, cfg), "skipped": 1}]
    for it in range(cfg.mu):
        lr = lr_at(opt_step + it, total_opt_steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = {}                                          # token-weighted sums of the loss metrics on this rank
        loss_total = torch.zeros((), dtype=torch.float64)
        start = 0
        for rows, pids, rows_prompt in chunks:
            sl = slice(start, start + len(rows))
            start += len(rows)
            release_freed_memory()      # what sampling, the no-grad passes and the last step freed: RSS = live
            logp, ent = completion_logprobs(model, [batch["prompts"][p] for p in pids], batch["comp_ids"][rows],
                                            batch["comp_mask"][rows], rows_prompt, cfg.temperature, return_entropy=True)
            loss, m = grpo_loss(logp, None if old_logp is None else old_logp[sl],
                                None if ref_logp is None else ref_logp[sl], adv[sl], mask[sl],
                                eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl=cfg.kl,
                                agg=cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
            release_freed_memory()      # the forward's freed temporaries, before gradients are allocated
            loss.backward()
            loss_total += loss.detach().double()
            n = m["tokens"].double()
            m["entropy"] = (ent * mask[sl]).sum() / torch.clamp(mask[sl].sum(), min=1)
            for k in ("policy_loss", "surrogate", "kl", "ratio_mean", "clip_frac_low", "clip_frac_high",
                      "clip_frac", "entropy"):
                sums[k] = sums.get(k, 0.0) + m[k].double() * n
        sync_gradients(params)
        loss_total = all_reduce_sum(loss_total)
        keys = ["policy_loss", "surrogate", "kl", "ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac",
                "entropy"]
        stacked = all_reduce_sum(torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64)
                                              for k in keys]))
        metrics = {k: (stacked[i] / max(num_tokens, 1.0)).item() for i, k in enumerate(keys)}
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([
                torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None] or [torch.zeros(())]))
        skipped = not (torch.isfinite(loss_total) and torch.isfinite(grad_norm))
        if skipped:
            # every rank sees the same all-reduced loss and gradient, so every rank skips together
            log(f"[warn] optimizer step {opt_step + it}: non-finite loss ({loss_total.item()}) or gradient norm "
                f"({grad_norm.item()}); step skipped")
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        metrics.update(loss=loss_total.item(), grad_norm=grad_norm.item(), lr=lr, skipped=int(skipped))
        history.append(metrics)
    optimizer.zero_grad(set_to_none=True)
    return history


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: Hugging Face layout + trainer_state.pt (plain tensors, dicts, lists: torch.load weights_only=True)

def save_checkpoint(out, model, tokenizer, optimizer, step, opt_step, data_pos, cfg):
    """Write <out>/checkpoint atomically: into a temporary directory, then renamed. A crash mid-save leaves the
    previous checkpoint (as checkpoint/ or, between the two renames, checkpoint.old/) intact."""
    out = Path(out)
    final, tmp, old = out / "checkpoint", out / f"checkpoint.tmp-{os.getpid()}", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    with lora_merged(model):
        model.save_pretrained(tmp, tokenizer=tokenizer)
    state = {
        "step": step, "opt_step": opt_step, "data_pos": list(data_pos),
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "lora": {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n},
        "config": asdict(cfg),
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt):
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Logging

def read_jsonl_upto(path, step):
    """Lines of a previous run with "step" < step (a resumed run rewrites what came after its checkpoint)."""
    if not Path(path).is_file():
        return []
    return [line for line in Path(path).read_text().splitlines() if line and json.loads(line)["step"] < step]


def batch_metrics(batch, rewards, components, truncated, answerable, G):
    """Reward and length statistics over the global batch."""
    lengths = batch["lengths_all"]
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
    if "em" in components:        # share of completions whose answer holds a gold answer ("answer right")
        m["answer_right"] = (components["em"] > 0).float().mean().item()
    if "refused" in components:   # what stage 2 teaches: refuse the unanswerable, answer the answerable
        for name, rows in (("refused_answerable", answerable), ("refused_unanswerable", ~answerable)):
            if rows.any():
                m[name] = components["refused"][rows].mean().item()
    return m


def print_summary(cfg, history, wall, ckpt, log):
    if not history:
        log("[done] no steps run")
        return
    first, last = history[0], history[-1]
    k = min(5, len(history))
    mean_of = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    comp_keys = [key for key in first if key.startswith("reward/")]
    log("=" * 78)
    log(f"GRPO stage {cfg.stage}: {len(history)} steps logged, wall time {wall / 60:.1f} min "
        f"({wall / max(1, len(history)):.1f} s/step)")
    log(f"{'':32s}{'step ' + str(first['step']):>12s}{'step ' + str(last['step']):>12s}"
        f"{'first ' + str(k):>12s}{'last ' + str(k):>12s}")
    # diagnostics present in every logged step (a stage-2 batch may lack one kind of question)
    extra = [key for key in ("answer_right", "refused_answerable", "refused_unanswerable")
             if all(key in row for row in history)]
    for key in ["reward_mean"] + comp_keys + extra + ["frac_reward_zero_std", "completion_len_mean",
                                                      "clipped_share"]:
        log(f"{key:32s}{first[key]:12.3f}{last[key]:12.3f}{mean_of(history[:k], key):12.3f}"
            f"{mean_of(history[-k:], key):12.3f}")
    log(f"checkpoint: {ckpt}")
    log(f"metrics:    {Path(cfg.out) / 'metrics.jsonl'}   samples: {Path(cfg.out) / 'samples.jsonl'}")
    log("=" * 78)


# ----------------------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # --- model, reference, tokenizer, optimizer
    from data import load_data, stage_records
    from model import load_tokenizer
    init = resolve_init(cfg, log)
    ckpt = find_checkpoint(out)
    if ckpt is not None and not cfg.resume:       # a finished or interrupted run is never overwritten silently
        raise FileExistsError(f"{ckpt} holds an earlier run: pass --resume to continue it, or choose another --out "
                              "(or delete it) to start over")
    if cfg.resume and ckpt is None:
        log(f"[resume] no checkpoint in {out}: starting from the beginning")
    # full fine-tune resumes from the checkpoint's weights; LoRA reloads the base and then the adapters
    weights = str(ckpt) if (ckpt is not None and cfg.lora_rank == 0) else init
    model, reference = load_models(cfg, weights, init, device)
    tokenizer = load_tokenizer(ckpt or init)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    n_train = sum(p.numel() for p in params)
    log(f"[model] {weights}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{n_train / 1e6:.2f}M trained ({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}), "
        f"reference: {'none (beta = 0)' if cfg.beta == 0 else 'adapters off' if cfg.lora_rank else cfg.ref or init}; "
        f"{world} process(es) on {device}")

    # --- data
    records = stage_records(load_data(cfg.data, split="train", seed=cfg.seed), cfg.stage, cfg.seed)
    log(f"[data] {cfg.data}: {len(records)} stage-{cfg.stage} records; {cfg.batch_prompts * world} prompts x "
        f"{cfg.group_size} completions per step")
    for r in records:       # every prompt once up front: one too long for --max-prompt-tokens stops the run now,
        training_prompt(r, tokenizer, cfg)   # not at the step that draws it (steps rebuild theirs: a few ms each)

    # --- state: fresh or resumed
    step, opt_step, data_pos = 0, 0, [0, 0]
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        step, opt_step, data_pos = state["step"], state["opt_step"], list(state["data_pos"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        if cfg.lora_rank > 0:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in state["lora"].items():
                    named[n].copy_(t)
        log(f"[resume] {ckpt}: continuing at step {step} (optimizer step {opt_step}, data position {data_pos})")
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
    history = []
    if rank == 0:
        kept = read_jsonl_upto(metrics_path, step)
        history = [json.loads(line) for line in kept]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        samples_path.write_text("".join(line + "\n" for line in read_jsonl_upto(samples_path, step)))
        (out / "config.json").write_text(json.dumps(
            {**asdict(cfg), "init_resolved": init, "world_size": world, "torch": torch.__version__}, indent=2))

    total_opt_steps = cfg.steps * cfg.mu
    last_step = min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    from tqdm import tqdm
    bar = tqdm(total=last_step, initial=step, disable=rank != 0 or cfg.no_progress, dynamic_ncols=True)
    while step < last_step:
        t0 = time.time()
        # 1. this step's prompts: the global batch in the seeded order, this rank's slice of whole groups
        global_records, data_pos = next_records(records, data_pos, cfg.batch_prompts * world, cfg.seed)
        local = global_records[rank * cfg.batch_prompts:(rank + 1) * cfg.batch_prompts]
        # 2. sample G completions per prompt and score them
        batch = sample_and_score(model, tokenizer, local, cfg, seed=(cfg.seed * 100_003 + step) * 1024 + rank)
        t_sample = time.time() - t0
        # 3. advantages over the global batch (group scaling only looks within a group, batch scaling at all)
        comp_keys = sorted(batch["components"][0])
        comp_local = torch.tensor([[float(c.get(k, 0.0)) for k in comp_keys] for c in batch["components"]],
                                  dtype=torch.float64)
        rewards_all = all_gather_cat(batch["rewards"].double())
        comps_all = all_gather_cat(comp_local)
        truncated_all = all_gather_cat(batch["truncated"].to(torch.int64))
        answerable_all = all_gather_cat(batch["answerable"].to(torch.int64)).bool()
        batch["lengths_all"] = all_gather_cat(batch["comp_mask"].sum(1).double())
        adv_all = group_advantages(rewards_all, cfg.group_size, cfg.scale_rewards)
        R = len(batch["texts"])
        advantages = adv_all[rank * R:(rank + 1) * R]
        keep = list(range(R))
        if cfg.drop_zero_std_groups:
            per_group = batch["rewards"].view(-1, cfg.group_size)
            spread = (per_group.max(1).values != per_group.min(1).values).tolist()
            keep = [r for r in range(R) if spread[r // cfg.group_size]]
        # 4. the update
        t1 = time.time()
        inner = policy_update(model, reference, optimizer, batch, advantages, keep, cfg, opt_step,
                              total_opt_steps, log)
        opt_step += cfg.mu
        step += 1
        t_train = time.time() - t1
        dt = time.time() - t0
        # 5. metrics: reward / length over the global batch, loss metrics averaged over the inner iterations
        m = {"step": step - 1, **batch_metrics(batch, rewards_all.float(), {k: comps_all[:, i] for i, k in
                                                                           enumerate(comp_keys)},
                                             truncated_all.bool(), answerable_all, cfg.group_size)}
        for k in inner[0]:
            m[k] = sum(h[k] for h in inner) / len(inner)
        if cfg.mu > 1:
            m["ratio_mean_last_iter"] = inner[-1]["ratio_mean"]
        m["kept_rows"] = len(keep)
        n_tokens = batch["lengths_all"].sum().item()
        m.update(tokens_per_s=n_tokens / dt, sample_time=t_sample, train_time=t_train, step_time=dt)
        if rank == 0:
            history.append(m)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            with open(samples_path, "a") as f:
                for r in range(min(cfg.log_samples, R)):
                    row = r * max(1, R // max(1, cfg.log_samples)) % R   # spread over the groups
                    f.write(json.dumps({"step": step - 1, "record": local[row // cfg.group_size].id,
                                        "completion": batch["prefills"][row // cfg.group_size] + batch["texts"][row],
                                        "reward": batch["rewards"][row].item(), "advantage": advantages[row].item(),
                                        "components": batch["components"][row]}) + "\n")
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", fmt=f"{m.get('reward/format', float('nan')):.2f}",
                        step_s=f"{dt:.1f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == last_step:
            if rank == 0:
                ckpt = save_checkpoint(out, model, tokenizer, optimizer, step, opt_step, data_pos, cfg)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    print_summary(cfg, history, time.time() - t_start, out / "checkpoint", log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


def cli(argv=None):
    """main() with bad input (a wrong path, a malformed record, an overlong prompt, mismatched models, an --out
    that holds a run, without --resume) reported in one line, as argparse reports a bad flag, not a traceback."""
    from data import DataError
    from model import ModelError
    try:
        return main(argv)
    except (DataError, ModelError, FileExistsError) as e:
        print(f"grpo.py: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None                             # argparse's exit status for bad input


if __name__ == "__main__":
    cli()
