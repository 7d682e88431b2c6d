"""Processes, sharding and precision: how the trained model is laid out over ranks and dtypes.

    setup_distributed   torchrun's environment -> (rank, world, device); one process group with gloo for host
                        tensors and, on GPUs, NCCL for device tensors
    collectives         sums, maxima and gathers across ranks (no-ops in one process)
    fp32 masters        bf16 compute with fp32 master weights in one process: the optimizer steps the masters
    FSDP2               each block, then the root, sharded over all ranks; gathered once per sampling round
    load_models         the policy (and the frozen reference) in that layout; under FSDP built on the meta device,
                        sharded, then each rank reads only its rows of the safetensors (torch.distributed.checkpoint)

What is saved and when lives in checkpoint.py; how much memory all this takes, in memory.py.
"""

import contextlib
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.futures import Future

import memory
from builtin import resolve_model_path
from memory import DTYPES
from model import (
    ModelError,
    Transformer,
    add_lora,
    check_tensors,
    load_tokenizer,
    merge_lora,
    read_json,
    safetensors_shapes,
)

# ----------------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; each process holds whole groups (B prompts x G rows)


def setup_distributed(seed=0):
    """-> (rank, world, device), with torch's and Python's RNG seeded alike on every rank."""
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
        # Host bookkeeping (rewards, counts) is reduced where it is made, over gloo; the model's tensors over NCCL.
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        memory.keep_large_blocks_mapped()
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


def all_gather_cat(x):
    """(n, ...) on each rank -> (world * n, ...) in rank order (every rank holds the same n)."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_union(names):
    """The sorted union of a set of strings over all ranks."""
    if not distributed():
        return sorted(set(names))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(set(names)))
    return sorted(set().union(*parts))


# ----------------------------------------------------------------------------------------------------------------
# Precision. bf16 rounds an fp32 weight to 8 bits of mantissa, so an AdamW update of lr 1e-5 on a weight of 0.05 (a
# relative change of 2e-4 < 2^-8) mostly rounds away: the optimizer steps fp32 master weights, the model computes
# with their bf16 rounding, gradients are summed in fp32.


def compute_dtype(name, device) -> str:
    """--dtype, or where it is not given bf16 on CUDA and fp32 on CPUs (most have no bf16 units)."""
    if name is not None:
        return name
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def keep_master_weights(model, dtype):
    """One process: an fp32 copy of every trained parameter (model.masters, by name) for the optimizer, then the
    model cast to dtype. Each micro-batch's gradient is added into the master's fp32 .grad as soon as it is
    accumulated, and the low-precision one freed."""
    model.masters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.to(dtype)  # the rotary frequencies stay fp32 (Transformer._apply)
    named = dict(model.named_parameters())
    for n, master in model.masters.items():
        named[n].register_post_accumulate_grad_hook(lambda p, m=master: _add_to_master(m, p))


def _add_to_master(master, p):
    master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
    p.grad = None


def named_trained_parameters(model):
    """What the optimizer steps, by name: the fp32 masters when the model keeps them, else the trained parameters
    (under FSDP their fp32 shards, whose gradients FSDP has already summed over the ranks in backward)."""
    masters = getattr(model, "masters", None)
    if masters:
        return list(masters.items())
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


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


# ----------------------------------------------------------------------------------------------------------------
# FSDP2

_mesh = None


def shard(model, dtype, device=None):
    """FSDP2: each block, then the root (embeddings, final norm, head), sharded over all ranks; parameters are
    gathered in `dtype` for compute and gradients reduce-scattered in fp32. The gradients are summed, not averaged:
    each rank's loss is already divided by the whole step's token count. device: where the shards will live
    (default: where the parameters are; a model on the meta device needs it)."""
    global _mesh
    if _mesh is None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        _mesh = init_device_mesh(device.type, (dist.get_world_size(),))
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


def full_state_dict(model):
    """-> {name: CPU tensor} of one process's model, adapters unmerged, the fp32 masters in place of their bf16
    roundings."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({k: m.detach().cpu() for k, m in getattr(model, "masters", {}).items()})
    return state


def adapter_weights(model):
    """-> {name: whole CPU tensor} of the LoRA adapters ({} for a full fine-tune); under FSDP every rank takes part
    and every rank gets them (rank x features each: small)."""
    if isinstance(model, FSDPModule):
        return {n: p.full_tensor().cpu() for n, p in model.named_parameters() if ".lora_" in n}
    return {n: t for n, t in full_state_dict(model).items() if ".lora_" in n}


def save_weights(model, path, tokenizer):
    """The model as a Hugging Face directory at `path` (which exists), adapters merged. Under FSDP every rank takes
    part: each writes only its rows (torch.distributed.checkpoint's HuggingFaceStorageWriter), then rank 0 puts the
    tensors together from the ranks' files one tensor at a time (DCP's consolidation) and writes the config; no
    rank holds the whole model. One process writes its own tensors, fp32 masters in place of bf16 roundings."""
    path = Path(path)
    if not isinstance(model, FSDPModule):
        model.save_pretrained(path, tokenizer=tokenizer, state=merge_lora(model, full_state_dict(model)))
        return
    state = merge_lora(model, model.state_dict())  # {HF name: this rank's DTensor shard}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    index = file_index(state, memory.SAVE_FILE_BYTES)
    writer = HuggingFaceStorageWriter(
        str(path), fqn_to_index_mapping=index, save_distributed=True, enable_consolidation=True
    )
    dcp.save(state, storage_writer=writer)
    if dist.get_rank() == 0:
        shutil.rmtree(path / "sharded")
        if max(index.values()) == 1:  # one file: the name a single-file Hugging Face model has
            (path / "model-00001-of-00001.safetensors").rename(path / "model.safetensors")
            (path / "model.safetensors.index.json").unlink()
        model.save_config(path, state["model.embed_tokens.weight"].dtype, tokenizer)


def file_index(state, max_bytes):
    """{name: file number from 1}: the tensors in order, a new file when the next would take it past max_bytes
    (a rank serializes its rows of one file at once: the file size bounds what saving holds)."""
    index = {}
    size = 0
    file = 1
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_bytes:
            file += 1
            size = 0
        index[name] = file
        size += nbytes
    return index


# ----------------------------------------------------------------------------------------------------------------
# Loading the policy and the reference in this layout


def load_models(cfg, weights, init, device, dtype_name):
    """-> (policy, reference or None). The policy starts from `weights` (init, or a checkpoint when resuming).
    The reference is the frozen start of this stage, `init` (or `--ref`): with LoRA the same module with adapters
    off; otherwise a frozen copy, and none at all when beta == 0. Trained weights load in fp32 and stay fp32 (the
    master copy: fp32 shards under FSDP, else fp32 copies beside a bf16 model); frozen weights load in dtype.
    Under FSDP each rank reads only its shard of the file(s) (load_sharded_models)."""
    dtype = DTYPES[dtype_name]
    if distributed():
        return load_sharded_models(cfg, weights, init, device, dtype)
    policy = Transformer.from_pretrained(resolve_model_path(weights), dtype=torch.float32, device=device)
    reference = None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # adapter init is part of the seeded run
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        for p in policy.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)  # the frozen base: no master copy
        policy.to(device)
    elif cfg.beta > 0:
        reference = Transformer.from_pretrained(
            resolve_model_path(cfg.ref or init), dtype=dtype, device=device
        )
        reference.eval().requires_grad_(False)
        check_reference_vocabulary(cfg, policy, reference)
    if cfg.grad_checkpoint:
        policy.gradient_checkpointing = True
    if dtype != torch.float32:
        keep_master_weights(policy, dtype)
    return policy, reference


def check_reference_vocabulary(cfg, policy, reference):
    if reference.config.vocab_size != policy.config.vocab_size:  # log-probs of the same ids must agree
        raise ModelError(
            f"--ref {cfg.ref}: its vocabulary has {reference.config.vocab_size} tokens, the "
            f"policy's {policy.config.vocab_size}; the KL needs the policy's tokenizer"
        )


def load_sharded_models(cfg, weights, init, device, dtype):
    """load_models under FSDP2: each model built on the meta device, sharded, materialized empty on `device`, then
    filled with this rank's dim-0 shard of the safetensors (load_shards): no rank holds a whole copy. The LoRA
    adapters are drawn on the host as in one process (same seed, same draws) and each rank keeps its shard."""
    policy = Transformer.on_meta(resolve_model_path(weights), dtype=torch.float32)
    reference, adapters = None, {}
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # adapter init is part of the seeded run
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)  # no meta context: the adapters are drawn on the host
        adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        for p in policy.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)  # the frozen base: no master copy
        policy.to("meta")  # the adapters too, until every parameter is materialized as a shard
    elif cfg.beta > 0:
        reference = Transformer.on_meta(resolve_model_path(cfg.ref or init), dtype=dtype)
        reference.eval().requires_grad_(False)
        check_reference_vocabulary(cfg, policy, reference)
    if cfg.grad_checkpoint:
        policy.gradient_checkpointing = True
    for model, path in ((policy, weights), (reference, cfg.ref or init)):
        if model is None:
            continue
        shard(model, dtype, device)
        model.to_empty(device=device)  # this rank's shards, uninitialized; _apply recomputes inv_freq
        load_shards(model, resolve_model_path(path))
    named = dict(policy.named_parameters())
    with torch.no_grad():
        for n, t in adapters.items():  # every rank drew the same full tensor: each keeps its own rows
            p = named[n]
            p.copy_(distribute_tensor(t.to(device), p.device_mesh, p.placements, src_data_rank=None))
    return policy, reference


def load_shards(model, path):
    """Fill a sharded (FSDP2), materialized model from a Hugging Face directory: torch.distributed.checkpoint's
    HuggingFaceStorageReader reads each DTensor's local rows (safetensors slices) and casts them to its dtype. The
    names are the file's (a LoRA layer's base weight under its plain name); the adapters are not in the file."""
    path = Path(path)
    state = {n.replace(".base.", "."): t for n, t in model.state_dict().items() if ".lora_" not in n}
    shapes = {n: t.shape for n, t in state.items()}
    check_tensors(path, shapes, safetensors_shapes(path), model.config.tie_word_embeddings)
    dcp.load(state, storage_reader=TensorAtATimeReader(str(path)))


class TensorAtATimeReader(HuggingFaceStorageReader):
    """HuggingFaceStorageReader with the file opened for each tensor: the pages a tensor's rows were read from are
    unmapped before the next, so a rank holds one tensor's rows of the file at a time, not all of its rows (the
    stock reader keeps each file open, and its pages resident, until every tensor of it is read)."""

    def read_data(self, plan, planner):
        from safetensors import safe_open

        for req in plan.items:
            with safe_open(self.storage_data[req.storage_index].relative_path, framework="pt") as f:
                self._process_read_request(f, req, planner)
        done = Future()
        done.set_result(None)
        return done


def load_run_models(cfg, ckpt, init, device, dtype, world, log):
    """-> (policy, reference or None, tokenizer), after the memory plan says they fit. A full fine-tune resumes
    from the checkpoint's weights; LoRA reloads its base (init) and gets its adapters back from the trainer state."""
    weights = str(ckpt) if ckpt is not None and cfg.lora_rank == 0 else init
    hf_config = read_json(Path(resolve_model_path(weights)) / "config.json")
    plan = memory.memory_plan(hf_config, cfg, world, dtype)
    for line in memory.format_plan(plan, cfg, world, dtype):
        log(line)
    memory.check_fit(plan, device)  # before any weight is loaded
    policy, reference = load_models(cfg, weights, init, device, dtype)
    total = sum(p.numel() for p in policy.parameters())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    how = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full"
    ref = "none (beta = 0)" if cfg.beta == 0 else "adapters off" if cfg.lora_rank else cfg.ref or init
    fsdp = ", FSDP2" if world > 1 else ""
    log(
        f"[model] {weights}: {total / 1e6:.1f}M parameters, {trained / 1e6:.2f}M trained ({how}), reference: {ref}; "
        f"{world} process(es) on {device}{fsdp}, {dtype}"
    )
    return policy, reference, load_tokenizer(resolve_model_path(ckpt or init))
