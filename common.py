"""The plumbing grpo.py shares across its stages, kept out of the training loop so the loop reads as the algorithm:

0. flags       grpo.Config's fields -> argparse (as nanoGPT's configurator.py: the defaults stay in grpo.py)
1. processes   torchrun's environment -> (rank, world, device); sums and gathers across ranks
2. memory      hand memory the C allocator still holds back to the OS before each forward and backward; under
               torchrun, large blocks mapped so that freeing them returns them
3. weights     which weights a stage starts from; the policy and the frozen reference
4. checkpoints the Hugging Face layout, trainer_state.pt and each rank's optimizer state, written atomically;
               the run's log files
5. precision   bf16 compute with fp32 master weights; FSDP2 sharding across processes
6. memory plan what each rank will hold, from the model's config, checked before loading
"""

import argparse
import contextlib
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model import (
    ModelConfig,
    ModelError,
    Transformer,
    add_lora,
    load_tokenizer,
    read_json,
    resolve_model_path,
)

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
            p.add_argument(
                name,
                type=type(f.default) if f.default is not None else str,
                default=f.default,
                help=text if f.default is None else f"{text} (default: {f.default})",
                **options,
            )
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
        keep_large_blocks_mapped()
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
        self.sign = torch.tensor(
            [1.0 if k.endswith("max") else -1.0 if k.endswith("/min") else 0.0 for k in keys],
            dtype=torch.float64,
        )  # +1 max, -1 min (the max of the negated values), 0 mean
        self.sums = torch.zeros(len(keys), dtype=torch.float64)
        self.extremes = torch.full((len(keys),), -math.inf, dtype=torch.float64)

    def add(self, metrics, tokens):
        if float(tokens) == 0:  # no tokens: nothing to average, and no extremes (e.g. a padded micro-batch)
            return
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

_libc = None


def glibc():
    """-> glibc (ctypes), or False where there is none (macOS, musl): the memory calls below are then no-ops."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc


def release_freed_memory():
    """Give memory that was freed but is still held by the C allocator back to the OS: glibc's malloc_trim(0). glibc
    serves blocks below its mmap threshold (every activation and cache tensor of a small model) from heaps it keeps,
    and a heap only shrinks from its top, so freed blocks between live ones stay resident and the next forward only
    partly reuses them (effect measured in bench/README-vs-trl.md)."""
    if glibc():
        glibc().malloc_trim(0)


def keep_large_blocks_mapped(threshold=128 * 1024):
    """glibc's mallopt(M_MMAP_THRESHOLD): blocks from 128 KiB up mapped, and unmapped when freed. Left to itself
    glibc raises the threshold (to 32 MB at most) each time a mapped block is freed; FSDP2's gathered blocks and
    unsharded gradients, allocated and freed in every forward and backward, then come from its heaps and stay
    resident (docs/EXPERIMENTS.md, FSDP2 peak memory)."""
    if glibc():
        glibc().mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD in malloc.h


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
    off; otherwise a frozen copy, and none at all when beta == 0. Trained weights load in fp32 and stay fp32 (the
    master copy: fp32 shards under FSDP, else fp32 copies beside a bf16 model); frozen weights load in --dtype."""
    dtype = DTYPES[cfg.dtype or default_dtype(device)]
    policy = Transformer.from_pretrained(weights, dtype=torch.float32, device=device)
    reference = None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # adapter init is part of the seeded run
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        for p in policy.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)  # the frozen base: no master copy
        policy.to(device)
    elif cfg.beta > 0:
        reference = Transformer.from_pretrained(cfg.ref or init, dtype=dtype, device=device)
        reference.eval().requires_grad_(False)
        if (
            reference.config.vocab_size != policy.config.vocab_size
        ):  # log-probs of the same ids must mean the same
            raise ModelError(
                f"--ref {cfg.ref}: its vocabulary has {reference.config.vocab_size} tokens, the "
                f"policy's {policy.config.vocab_size}; the KL needs the policy's tokenizer"
            )
    if cfg.grad_checkpoint:
        policy.gradient_checkpointing = True
    if distributed():
        shard(policy, dtype)
        if reference is not None:
            shard(reference, dtype)
    elif dtype != torch.float32:
        keep_master_weights(policy, dtype)
    return policy, reference


def load_run_models(cfg, ckpt, device, log=print):
    """-> (policy, reference or None, tokenizer, init). A full fine-tune resumes from the checkpoint's weights;
    LoRA reloads the base (init) and gets its adapters back from the trainer state."""
    init = resolve_init(cfg, log)
    weights = str(ckpt) if ckpt is not None and cfg.lora_rank == 0 else init
    cfg.dtype = cfg.dtype or default_dtype(device)
    world = dist.get_world_size() if distributed() else 1
    plan = memory_plan(read_json(Path(resolve_model_path(weights)) / "config.json"), cfg, world)
    for line in format_plan(plan, cfg, world):
        log(line)
    check_fit(plan, device)  # before any weight is loaded
    policy, reference = load_models(cfg, weights, init, device)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(
        f"[model] {weights}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
        f"{trained / 1e6:.2f}M trained ({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}), "
        f"reference: {'none (beta = 0)' if cfg.beta == 0 else 'adapters off' if cfg.lora_rank else cfg.ref or init}"
        f"; {world} process(es) on {device}{', FSDP2' if world > 1 else ''}, {cfg.dtype}"
    )
    return policy, reference, load_tokenizer(ckpt or init), init


# ----------------------------------------------------------------------------------------------------------------
# 4. Checkpoints: Hugging Face layout + trainer_state.pt (plain tensors, dicts, lists: torch.load weights_only=True)
# + the optimizer state, one safetensors file per rank


def save_checkpoint(out, model, tokenizer, optimizer, step, opt_step, data_pos, cfg):
    """Write <out>/checkpoint atomically: into a temporary directory, then renamed. A crash mid-save leaves the
    previous checkpoint (as checkpoint/ or, between the two renames, checkpoint.old/) intact. Every rank calls it:
    the weights are gathered to rank 0, which writes them; each rank writes its own part of the optimizer state."""
    out = Path(out)
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    weights = full_state_dict(model)  # fp32 masters, adapters unmerged
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file(
        optimizer_shards(model, optimizer), str(tmp / f"optimizer-{rank:05d}-of-{world:05d}.safetensors")
    )
    barrier()
    if rank != 0:
        return final
    model.save_pretrained(tmp, tokenizer=tokenizer, state=merge_lora(model, weights))
    state = {
        "step": step, "opt_step": opt_step, "data_pos": list(data_pos),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "lora": {n: t for n, t in weights.items() if "lora_" in n},
        "config": asdict(cfg),
    }  # fmt: skip
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_shards(model, optimizer):
    """{"<parameter>.<exp_avg|exp_avg_sq|step>": this rank's part}: under FSDP its dim-0 shard, so no rank ever
    holds the whole optimizer state (a full gather would put 8 bytes per parameter on rank 0: 64 GB for 8B)."""
    return {
        f"{n}.{k}": (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
        for n, p in named_trained_parameters(model)
        for k, v in optimizer.state[p].items()
    }


def restore_optimizer(ckpt, model, optimizer):
    """The AdamW state from the optimizer-*-of-N files of a run over N ranks, onto this run's ranks (any number):
    each tensor put together from its N dim-0 shards, then cut to this rank's shard, one tensor at a time."""
    paths = sorted(Path(ckpt).glob("optimizer-*-of-*.safetensors"))
    if not paths or len(paths) != int(paths[0].stem.rsplit("-", 1)[1]):
        raise ModelError(
            f"{ckpt}: {len(paths)} optimizer-R-of-N.safetensors files, not N: an incomplete checkpoint"
        )
    files = [safe_open(str(f), framework="pt") for f in paths]
    for n, p in named_trained_parameters(model):
        state = {}
        for k in [key[len(n) + 1 :] for key in files[0].keys() if key.rsplit(".", 1)[0] == n]:
            parts = [f.get_tensor(f"{n}.{k}") for f in files]
            full = (
                parts[0] if parts[0].dim() == 0 else torch.cat(parts)
            )  # a step count is the same on every rank
            if isinstance(p, DTensor) and full.dim() > 0:
                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            state[k] = full.to(p.device)
        optimizer.state[p] = state


def checkpoint_to_resume(cfg, log=print):
    """The checkpoint in --out to continue from, or None. One there without --resume is an error: a finished or
    interrupted run is never overwritten silently."""
    ckpt = find_checkpoint(cfg.out)
    if ckpt is not None and not cfg.resume:
        raise FileExistsError(
            f"{ckpt} holds an earlier run: pass --resume to continue it, or choose another --out "
            "(or delete it) to start over"
        )
    if cfg.resume and ckpt is None:
        log(f"[resume] no checkpoint in {cfg.out}: starting from the beginning")
    return ckpt


def load_trainer_state(ckpt):
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True, map_location="cpu")


def restore_trainer_state(ckpt, model, optimizer, log=print):
    """Optimizer, RNG and (LoRA) adapters from a checkpoint -> (step, opt_step, data_pos) to continue from."""
    state = load_trainer_state(ckpt)
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    named, masters = dict(model.named_parameters()), getattr(model, "masters", {})
    with torch.no_grad():
        for n, t in state["lora"].items():  # empty for a full fine-tune: its weights came with the checkpoint
            if isinstance(named[n], DTensor):  # this rank's shard of the full tensor
                t = distribute_tensor(t.to(named[n].dtype), named[n].device_mesh, named[n].placements)
            named[n].copy_(t)
            if n in masters:
                masters[n].copy_(t)
    if "optimizer" not in state:
        restore_optimizer(ckpt, model, optimizer)
    elif isinstance(
        model, FSDPModule
    ):  # a checkpoint written before 2026-12-02 (the whole state in this file)
        set_optimizer_state_dict(
            model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state["optimizer"])
    log(
        f"[resume] {ckpt}: continuing at step {state['step']} (optimizer step {state['opt_step']}, data position "
        f"{state['data_pos']})"
    )
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
    parts = dict(
        rewards=batch["rewards"].double(),
        truncated=batch["truncated"].long(),
        answerable=batch["answerable"].long(),
        lengths=batch["comp_mask"].sum(1).double(),
        components=torch.tensor(
            [[float(c.get(k, 0.0)) for k in keys] for c in batch["components"]], dtype=torch.float64
        ),
    )
    g = {name: all_gather_cat(x) for name, x in parts.items()}
    return dict(
        rewards=g["rewards"],
        lengths=g["lengths"],
        truncated=g["truncated"].bool(),
        answerable=g["answerable"].bool(),
        components=dict(zip(keys, g["components"].T)),
    )


def log_samples(path, step, batch, records, advantages, n, group_size):
    """n completions of this step, spread over the groups, with their rewards, to samples.jsonl."""
    R = len(batch["texts"])
    rows = [r * max(1, R // max(1, n)) % R for r in range(min(n, R))]
    append_jsonl(
        path,
        [
            dict(
                step=step,
                record=records[row // group_size].id,
                completion=batch["prefills"][row // group_size] + batch["texts"][row],
                reward=batch["rewards"][row].item(),
                advantage=advantages[row].item(),
                components=batch["components"][row],
            )
            for row in rows
        ],
    )


def append_jsonl(path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# 5. Precision and sharding. bf16 rounds an fp32 weight to 8 bits of mantissa, so an AdamW update of lr 1e-5 on a
# weight of 0.05 (a relative change of 2e-4 < 2^-8) mostly rounds away: the optimizer steps fp32 master weights,
# the model computes with their bf16 rounding, gradients are summed in fp32.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device) -> str:
    """bf16 where the device computes in it (CUDA); fp32 on CPUs, most of which have no bf16 units."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def keep_master_weights(model, dtype):
    """One process: an fp32 copy of every trained parameter (model.masters, by name) for the optimizer, then the
    model cast to dtype. Each micro-batch's gradient is added into the master's fp32 .grad as soon as it is
    accumulated, and the low-precision one freed."""
    model.masters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.to(dtype)
    named = dict(model.named_parameters())
    for n, master in model.masters.items():
        named[n].register_post_accumulate_grad_hook(lambda p, m=master: _add_to_master(m, p))


def _add_to_master(master, p):
    master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
    p.grad = None


def named_trained_parameters(model):
    """What the optimizer steps, by name: the fp32 masters when the model keeps them, else the trained parameters
    (under FSDP their fp32 shards)."""
    masters = getattr(model, "masters", None)
    return (
        list(masters.items()) if masters else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    )


def trained_parameters(model):
    return [p for _, p in named_trained_parameters(model)]


def with_master_weights(model, optimizer):
    """After each optimizer step the model's weights become the rounding of the updated masters."""
    masters = getattr(model, "masters", None)
    if masters:
        named = dict(model.named_parameters())

        @torch.no_grad()
        def copy_back(*_):
            for n, m in masters.items():
                named[n].copy_(m)

        optimizer.register_step_post_hook(copy_back)
    return optimizer


def reduce_gradients(model):
    """-> the optimizer's parameters, their .grad the gradient of the whole step's loss (summed over ranks, fp32).
    FSDP has reduce-scattered them in backward; a replicated model sums them here."""
    params = trained_parameters(model)
    if not isinstance(model, FSDPModule):
        sync_gradients(params)
    return params


_mesh = None


def shard(model, dtype):
    """FSDP2: each block, then the root (embeddings, final norm, head), sharded over all ranks; parameters are
    gathered in `dtype` for compute and gradients reduce-scattered in fp32. The gradients are summed, not averaged:
    each rank's loss is already divided by the whole step's token count."""
    global _mesh
    if _mesh is None:
        _mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=_mesh, mp_policy=mp)
    fully_shard(model, mesh=_mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


@contextlib.contextmanager
def sampling_weights(model):
    """Eval mode for a sampling round; under FSDP every parameter gathered once for the whole round (not once per
    token), and freed at its end."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.eval()
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(
                m is not model, recurse=False
            )  # FSDP's default: the root stays gathered
        model.train()


def same_count(chunks):
    """Micro-batches as (rows, prompt ids, row -> prompt, weight), padded to the largest count over the ranks with
    weight-0 copies: under FSDP every forward and backward is a collective, so every rank must run as many."""
    n = int(all_reduce_max(torch.tensor(len(chunks))).item())
    pad = chunks[-1] if chunks else ([0], [0], torch.tensor([0]))  # row 0 of the batch, its mask zeroed
    return [(*c, 1.0) for c in chunks] + [(*pad, 0.0)] * (n - len(chunks))


def full_state_dict(model):
    """-> {name: CPU tensor}, adapters unmerged: gathered from the shards under FSDP (every rank takes part, rank 0
    receives, the others get {}), else this module's, with the fp32 masters in place of their bf16 roundings."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({k: m.detach().cpu() for k, m in getattr(model, "masters", {}).items()})
    return state


def merge_lora(model, state):
    """Hugging Face names: every adapted layer's weight as W + scale * B @ A (in fp32, stored in W's dtype)."""
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if ".base." in k:
            prefix, leaf = k.split(".base.")
            if leaf == "weight":
                A, B = state[prefix + ".lora_A"].float(), state[prefix + ".lora_B"].float()
                v = (v.float() + model.get_submodule(prefix).scale * B @ A).to(v.dtype)
            k = f"{prefix}.{leaf}"
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# 6. The memory plan: what each rank holds, from the model's config.json and the flags, before anything is loaded.
# Persistent: weights (trained ones in fp32, frozen ones in --dtype; 1/world of them each under FSDP), fp32 masters
# beside a bf16 model in one process, AdamW's two fp32 moments, the reference. Then the larger of two phases:
# sampling (under FSDP the whole model gathered, the KV cache of the round, its logits) and training (fp32
# gradients, what autograd keeps of one micro-batch). Activations and the runtime are rough terms.

RUNTIME_BYTES = 0.5e9  # the Python process, torch's libraries, the tokenizer and data (CPU); a CUDA context


def model_numels(hf, lora_rank=0):
    """-> (parameters, adapters included; trained parameters) of a config.json dict, counted on the meta device."""
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_hf(hf))
        if lora_rank:
            add_lora(m, lora_rank, 1.0)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)


def memory_plan(hf, cfg, world=1) -> dict:
    """-> {term: bytes per rank}, "peak" their sum at the fuller phase. cfg: the run's flags (grpo.Config)."""
    c = ModelConfig.from_hf(hf)
    b = DTYPES[cfg.dtype].itemsize
    P, Pt = model_numels(hf, cfg.lora_rank)
    n = world if world > 1 else 1
    single_bf16 = world == 1 and b < 4
    rows, seq = cfg.batch_prompts * cfg.group_size, cfg.max_prompt_tokens + cfg.max_new_tokens
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # a micro-batch: its rows' completions plus the prompts they share (packed), at most the prompt budget each
    mb = min(cfg.micro_batch, rows)
    prompts = min(-(-mb // cfg.group_size) + 1, cfg.batch_prompts)  # a group may straddle two micro-batches
    S = cfg.max_prompt_tokens + min(cfg.group_size, mb) * cfg.max_new_tokens  # one packed sequence
    tokens = mb * cfg.max_new_tokens + prompts * cfg.max_prompt_tokens  # every prompt budgeted at its maximum
    kept = (
        4 * c.hidden_size + 2 * q + 2 * kv + 2 * c.intermediate_size
    )  # what autograd keeps per token and layer
    layers_kept = 1 if cfg.grad_checkpoint else c.num_hidden_layers
    plan = dict(
        weights=(Pt * (b if single_bf16 else 4) + (P - Pt) * b) / n,
        masters=Pt * 4 if single_bf16 else 0,
        optimizer=Pt * 8 / n,
        reference=P * b / n if cfg.beta > 0 and cfg.lora_rank == 0 else 0,
        sampling_gathered=P * b if world > 1 else 0,
        kv_cache=2 * c.num_hidden_layers * kv * rows * seq * b,
        sampling_logits=3 * rows * c.vocab_size * 4,
        gradients=Pt * 4 / n,
        activations=tokens
        * (kept * layers_kept + (c.hidden_size * c.num_hidden_layers if cfg.grad_checkpoint else 0))
        * b
        + prompts * S * S * (b + 1),  # + the packed masks (P, 1, S, S), boolean and additive
        runtime=RUNTIME_BYTES,
    )
    persistent = sum(plan[k] for k in ("weights", "masters", "optimizer", "reference", "runtime"))
    sampling = plan["sampling_gathered"] + plan["kv_cache"] + plan["sampling_logits"]
    # backward frees activations as it allocates gradients: the output layer's gradient comes first, at the fullest
    head = c.vocab_size * c.hidden_size * 4 / n if cfg.lora_rank == 0 else 0
    plan["peak"] = persistent + max(sampling, plan["activations"] + head, plan["gradients"])
    plan["parameters"], plan["trained_parameters"] = P, Pt
    return plan


def device_bytes(device):
    """Memory a rank may use: the GPU's total, or the RAM the OS reports available; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return (
            int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")))
            * 1024
        )
    except (OSError, StopIteration, ValueError):
        return None


def format_plan(plan, cfg, world):
    gb = lambda k: f"{plan[k] / 1e9:.2f}"
    what = (
        f"{'FSDP2 over ' + str(world) if world > 1 else '1 process'}, {cfg.dtype}, "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}"
    )
    return [
        f"[memory] plan per rank ({what}; GB): weights {gb('weights')}, fp32 masters {gb('masters')}, "
        f"optimizer {gb('optimizer')}, reference {gb('reference')}, runtime {gb('runtime')}; sampling: gathered "
        f"weights {gb('sampling_gathered')}, KV cache {gb('kv_cache')}, logits {gb('sampling_logits')}; "
        f"training: gradients {gb('gradients')}, activations ~{gb('activations')} -> peak ~{gb('peak')} GB"
    ]


def check_fit(plan, device, available=None):
    """A one-line error when the plan clearly cannot fit: its peak above what the device has."""
    available = available if available is not None else device_bytes(device)
    if available is not None and plan["peak"] > available:
        raise ModelError(
            f"the memory plan needs ~{plan['peak'] / 1e9:.1f} GB per rank, more than the "
            f"{available / 1e9:.1f} GB {torch.device(device).type} has: try --lora-rank, more "
            f"processes (FSDP2), --dtype bfloat16, --grad-checkpoint or a smaller --micro-batch"
        )
