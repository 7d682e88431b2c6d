"""The plumbing grpo.py shares across its stages, kept out of the training loop so the loop reads as the algorithm:

  0. flags       grpo.Config's fields -> argparse (as nanoGPT's configurator.py: the defaults stay in grpo.py)
  1. processes   torchrun's environment -> (rank, world, device); sums and gathers across ranks
  2. memory      hand memory the C allocator still holds back to the OS before each forward and backward
  3. weights     which weights a stage starts from; the policy and the frozen reference
  4. checkpoints the Hugging Face layout plus trainer_state.pt, written atomically; the run's log files
"""
import argparse
import ctypes
import json
import math
import os
import random
import shutil
from dataclasses import asdict, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from model import ModelError, Transformer, add_lora, load_tokenizer, lora_merged

# ----------------------------------------------------------------------------------------------------------------
# 0. Flags: one per field of the config dataclass, its help from the field's metadata


def flag(default, help, **argparse_options):
    """One field of the config dataclass: its default, its --help text, and argparse options such as choices."""
    return field(default=default, metadata=dict(help=help, **argparse_options))


def config_parser(config_cls, stage_defaults, description):
    """argparse for a dataclass whose fields carry metadata help=... (and argparse options such as choices). A
    per-stage field parses to None when not given, and its help lists the default of every stage."""
    p = argparse.ArgumentParser(description=description)
    for f in fields(config_cls):
        name, options = "--" + f.name.replace("_", "-"), dict(f.metadata)
        text = options.pop("help")
        if options.pop("per_stage", False):
            by_stage = ", ".join(f"{d[f.name]} in stage {s}" for s, d in stage_defaults.items())
            p.add_argument(name, type=type(f.default), default=None, help=f"{text} (default: {by_stage})")
        elif isinstance(f.default, bool):
            p.add_argument(name, action="store_true", help=text)
        else:
            p.add_argument(name, type=type(f.default) if f.default is not None else str, default=f.default,
                           help=text if f.default is None else f"{text} (default: {f.default})", **options)
    return p


# ----------------------------------------------------------------------------------------------------------------
# 1. Processes: torchrun sets RANK / WORLD_SIZE; each process holds whole groups (batch_prompts prompts x G rows)


def setup_distributed(seed=0):
    """-> (rank, world, device), with torch's and Python's RNG seeded. gloo on CPU, nccl on GPU."""
    torch.manual_seed(seed)
    random.seed(seed)
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


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if distributed():
        dist.barrier()


def shutdown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x):
    if distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x):
    if distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class StepMetrics:
    """Metrics of one optimizer step over its micro-batches and ranks, by name: "...max" keys are maxima, ".../min"
    minima, the rest token-weighted means. The keys are fixed up front, so every rank reduces the same tensors even
    when one of them has no rows this step."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.sign = torch.tensor([1.0 if k.endswith("max") else -1.0 if k.endswith("/min") else 0.0 for k in keys],
                                 dtype=torch.float64)  # +1 max, -1 min (the max of the negated values), 0 mean
        self.sums = torch.zeros(len(keys), dtype=torch.float64)
        self.extremes = torch.full((len(keys),), -math.inf, dtype=torch.float64)

    def add(self, metrics, tokens):
        v = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64) for k in self.keys])
        self.sums += v * float(tokens)
        self.extremes = torch.maximum(self.extremes, self.sign * v)

    def reduce(self, num_tokens) -> dict:
        means = all_reduce_sum(self.sums) / max(num_tokens, 1.0)
        extremes = all_reduce_max(self.extremes) * self.sign
        return {k: (means[i] if self.sign[i] == 0 else extremes[i]).item() for i, k in enumerate(self.keys)}


def all_gather_cat(x):
    """(n, ...) on each rank -> (world * n, ...) in rank order (every rank holds the same n)."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sync_gradients(params):
    """Data parallel: sum the gradients of all ranks (each rank's loss is already divided by the global token or
    sequence count, so the sum is the gradient of the whole step's loss)."""
    if not distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all of them
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off : off + g.numel()].view_as(g).clone()
        off += g.numel()


# ----------------------------------------------------------------------------------------------------------------
# 2. Memory

_malloc_trim = None


def release_freed_memory():
    """Give memory that was freed but is still held by the C allocator back to the OS: glibc's malloc_trim(0), a
    no-op where there is no glibc. glibc serves blocks below its mmap threshold (every activation and cache tensor of
    a small model) from heaps it keeps, and a heap only shrinks from its top, so freed blocks between live ones stay
    resident and the next forward only partly reuses them (effect measured in bench/README-vs-trl.md)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False  # no glibc (macOS, musl): nothing to do
    if _malloc_trim:
        _malloc_trim(0)


# ----------------------------------------------------------------------------------------------------------------
# 3. Weights


def find_checkpoint(path) -> Path | None:
    """A run directory holds its weights in checkpoint/ (checkpoint.old/ only during the swap of a save)."""
    p = Path(path)
    for cand in (p, p / "checkpoint", p / "checkpoint.old"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def resolve_init(cfg, log=print) -> str:
    """The weights a stage starts from: --init, else the previous stage's checkpoint beside --out (stage 1 after
    the warm-up, stage 2 after stage 1), else --model."""
    if cfg.init is not None:
        log(f"[init] starting from --init {cfg.init}")
        return cfg.init
    if cfg.stage > 0:
        before = Path(cfg.out).parent / f"stage{cfg.stage - 1}"
        found = find_checkpoint(before)
        if found is not None:
            log(f"[init] stage {cfg.stage} starts from the stage-{cfg.stage - 1} checkpoint {found}")
            return str(found)
        log(f"[init] no checkpoint under {before}: stage {cfg.stage} starts from --model {cfg.model}")
    else:
        log(f"[init] starting from --model {cfg.model}")
    return cfg.model


def load_models(cfg, weights, init, device):
    """-> (policy, reference or None). The policy starts from `weights` (init, or a checkpoint when resuming).
    The reference is the frozen start of this stage, `init` (or `--ref`): with LoRA the same module with adapters
    off; otherwise a frozen copy, and none at all when beta == 0."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    policy = Transformer.from_pretrained(weights, dtype=dtype, device=device)
    reference = None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # adapter init is part of the seeded run
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        policy.to(device)
    elif cfg.beta > 0:
        reference = Transformer.from_pretrained(cfg.ref or init, dtype=dtype, device=device)
        reference.eval().requires_grad_(False)
        if reference.config.vocab_size != policy.config.vocab_size:  # log-probs of the same ids must mean the same
            raise ModelError(f"--ref {cfg.ref}: its vocabulary has {reference.config.vocab_size} tokens, the "
                             f"policy's {policy.config.vocab_size}; the KL needs the policy's tokenizer")
    if cfg.grad_checkpoint:
        policy.gradient_checkpointing = True
    return policy, reference


def load_run_models(cfg, ckpt, device, log=print):
    """-> (policy, reference or None, tokenizer, init). A full fine-tune resumes from the checkpoint's weights;
    LoRA reloads the base (init) and gets its adapters back from the trainer state."""
    init = resolve_init(cfg, log)
    weights = str(ckpt) if ckpt is not None and cfg.lora_rank == 0 else init
    policy, reference = load_models(cfg, weights, init, device)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"[model] {weights}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
        f"{trained / 1e6:.2f}M trained ({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}), "
        f"reference: {'none (beta = 0)' if cfg.beta == 0 else 'adapters off' if cfg.lora_rank else cfg.ref or init}"
        f"; {dist.get_world_size() if distributed() else 1} process(es) on {device}")
    return policy, reference, load_tokenizer(ckpt or init), init


# ----------------------------------------------------------------------------------------------------------------
# 4. Checkpoints: Hugging Face layout + trainer_state.pt (plain tensors, dicts, lists: torch.load weights_only=True)


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
    }  # fmt: skip
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_to_resume(cfg, log=print):
    """The checkpoint in --out to continue from, or None. One there without --resume is an error: a finished or
    interrupted run is never overwritten silently."""
    ckpt = find_checkpoint(cfg.out)
    if ckpt is not None and not cfg.resume:
        raise FileExistsError(f"{ckpt} holds an earlier run: pass --resume to continue it, or choose another --out "
                              "(or delete it) to start over")
    if cfg.resume and ckpt is None:
        log(f"[resume] no checkpoint in {cfg.out}: starting from the beginning")
    return ckpt


def load_trainer_state(ckpt):
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True, map_location="cpu")


def restore_trainer_state(ckpt, model, optimizer, log=print):
    """Optimizer, RNG and (LoRA) adapters from a checkpoint -> (step, opt_step, data_pos) to continue from."""
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["lora"].items():  # empty for a full fine-tune: its weights came with the checkpoint
            named[n].copy_(t)
    log(f"[resume] {ckpt}: continuing at step {state['step']} (optimizer step {state['opt_step']}, data position "
        f"{state['data_pos']})")
    return state["step"], state["opt_step"], list(state["data_pos"])


def read_jsonl_upto(path, step):
    """Lines of a previous run with "step" < step (a resumed run rewrites what came after its checkpoint)."""
    if not Path(path).is_file():
        return []
    return [line for line in Path(path).read_text().splitlines() if line and json.loads(line)["step"] < step]


def open_run_logs(out, step, config):
    """Write config.json; keep the lines of metrics.jsonl and samples.jsonl before `step` (all of them when fresh:
    none). -> the kept metrics, the start of the run's history."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = {}
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept[name] = read_jsonl_upto(out / name, step)
        (out / name).write_text("".join(line + "\n" for line in kept[name]))
    (out / "config.json").write_text(json.dumps(dict(config, torch=torch.__version__), indent=2))
    return [json.loads(line) for line in kept["metrics.jsonl"]]


def gather_rollout(batch):
    """The numbers of every completion of the global batch, in rank order, as eval.batch_metrics takes them."""
    keys = sorted(batch["components"][0])
    parts = dict(rewards=batch["rewards"].double(), truncated=batch["truncated"].long(),
                 answerable=batch["answerable"].long(), lengths=batch["comp_mask"].sum(1).double(),
                 components=torch.tensor([[float(c.get(k, 0.0)) for k in keys] for c in batch["components"]],
                                         dtype=torch.float64))
    g = {name: all_gather_cat(x) for name, x in parts.items()}
    return dict(rewards=g["rewards"], lengths=g["lengths"], truncated=g["truncated"].bool(),
                answerable=g["answerable"].bool(), components=dict(zip(keys, g["components"].T)))


def log_samples(path, step, batch, records, advantages, n, group_size):
    """n completions of this step, spread over the groups, with their rewards, to samples.jsonl."""
    R = len(batch["texts"])
    rows = [r * max(1, R // max(1, n)) % R for r in range(min(n, R))]
    append_jsonl(path, [dict(step=step, record=records[row // group_size].id,
                             completion=batch["prefills"][row // group_size] + batch["texts"][row],
                             reward=batch["rewards"][row].item(), advantage=advantages[row].item(),
                             components=batch["components"][row]) for row in rows])


def append_jsonl(path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
