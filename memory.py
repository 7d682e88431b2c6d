"""Memory: what each rank will hold, planned from the model's config.json before anything is loaded, and giving
memory the C allocator holds back to the OS.

    memory_plan  {term: bytes per rank} and the peak: weights, fp32 masters, AdamW, the reference, then the larger of
                 the sampling phase (gathered weights, KV cache, logits) and the training phase (gradients,
                 activations), or the load if it is larger; grpo.py prints it and checks it fits before loading
                 (bench/memory_table.py uses it too)
    glibc        malloc_trim before each forward and backward; under torchrun, large blocks mapped so that freeing
                 them returns them (no-ops without glibc)

Where the bytes actually go is decided elsewhere: the precision and sharding in distributed.py, the cache in
sampler.py, the packed micro-batches in logprobs.py. This module only counts them.
"""

import ctypes
from pathlib import Path

import torch

from model import MASK_ALIGN, ModelConfig, ModelError, Transformer, add_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ----------------------------------------------------------------------------------------------------------------
# Giving memory back to the OS

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
    """glibc's malloc_trim(0): freed blocks between live ones in glibc's heaps go back to the OS, so the resident
    size is what is live (bench/README-vs-trl.md measures the effect)."""
    if glibc():
        glibc().malloc_trim(0)


def keep_large_blocks_mapped(threshold=128 * 1024):
    """glibc's mallopt(M_MMAP_THRESHOLD): blocks from 128 KiB up mapped, so FSDP2's per-block gathers and
    gradients are unmapped when freed instead of staying resident in glibc's heaps (docs/EXPERIMENTS.md)."""
    if glibc():
        glibc().mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD in malloc.h


# ----------------------------------------------------------------------------------------------------------------
# The memory plan. Persistent: weights (trained ones in fp32, frozen ones in --dtype; 1/world of them each under
# FSDP), fp32 masters beside a bf16 model in one process, AdamW's two fp32 moments, the reference. Then the larger
# of two phases: sampling (under FSDP the whole model gathered, the KV cache of the round, its logits) and training
# (fp32 gradients, what autograd keeps of one micro-batch). Activations and the runtime are rough terms.

# a checkpoint's weights are written in safetensors files of at most this many bytes (distributed.save_weights)
SAVE_FILE_BYTES = 2e9
RUNTIME_BYTES = 0.5e9  # the Python process, torch's libraries, the tokenizer and data (CPU); a CUDA context


def model_numels(hf, lora_rank=0):
    """-> (parameters, adapters included; trained parameters) of a config.json dict, counted on the meta device."""
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_hf(hf))
        if lora_rank:
            add_lora(m, lora_rank, 1.0)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)


def memory_plan(hf, cfg, world=1, dtype=None) -> dict:
    """-> {term: bytes per rank}, "peak" their sum at the fuller phase. cfg: the run's flags (grpo.Config); dtype:
    the compute dtype's name, default cfg.dtype."""
    c = ModelConfig.from_hf(hf)
    b = DTYPES[dtype or cfg.dtype].itemsize
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
    # on CUDA, K/V repeated to every query head where the masked fused kernels do not take grouped heads (model.py)
    kept += 2 * (q - kv)
    S_stored = -(-S // MASK_ALIGN) * MASK_ALIGN  # the mask's rows as stored for the fused kernels
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
        + prompts * S * S_stored * b,  # + the packed mask (P, 1, S, S), additive, built on the device
        runtime=RUNTIME_BYTES,
    )
    persistent = sum(plan[k] for k in ("weights", "masters", "optimizer", "reference", "runtime"))
    sampling = plan["sampling_gathered"] + plan["kv_cache"] + plan["sampling_logits"]
    # backward frees activations as it allocates gradients: the output layer's gradient comes first, at the fullest
    head = c.vocab_size * c.hidden_size * 4 / n if cfg.lora_rank == 0 else 0
    # loading, before the optimizer exists: under FSDP each rank reads one tensor's rows at a time (the file's pages
    # mapped for them, and the tensor read out of them, at most the largest tensor's); one process reads every
    # tensor whole (the mapped file beside the tensors it was copied into) and casts them to fp32 when the file is not
    file_b = DTYPES.get(hf.get("torch_dtype") or hf.get("dtype") or "float32", torch.float32).itemsize
    largest = c.vocab_size * c.hidden_size
    plan["load"] = 2 * largest * file_b / n if world > 1 else P * file_b + (P * 4 if file_b != 4 else 0)
    at_load = plan["weights"] + plan["reference"] + plan["runtime"] + plan["load"]
    # saving, beside the persistent terms. Under FSDP each rank serializes its rows of one file at a time (the
    # tensors and their bytes), then rank 0 puts one tensor at a time together from the ranks' files (the whole
    # tensor, a rank's rows read from its file, and the copy DCP slices out of them). One process holds every
    # tensor on the host at once (copied there from a GPU).
    saved_b = 4 if cfg.lora_rank == 0 else b  # fp32 masters; LoRA: the merged base, in its dtype
    file_bytes = min(SAVE_FILE_BYTES, P * saved_b)
    consolidate = largest * saved_b * (1 + 2 / n)
    plan["save"] = max(2 * file_bytes / n, consolidate) if world > 1 else P * saved_b
    plan["peak"] = max(
        persistent + max(sampling, plan["activations"] + head, plan["gradients"], plan["save"]), at_load
    )
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


def format_plan(plan, cfg, world, dtype):
    gb = lambda k: f"{plan[k] / 1e9:.2f}"
    what = (
        f"{'FSDP2 over ' + str(world) if world > 1 else '1 process'}, {dtype}, "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}"
    )
    return [
        f"[memory] plan per rank ({what}; GB): weights {gb('weights')}, fp32 masters {gb('masters')}, "
        f"optimizer {gb('optimizer')}, reference {gb('reference')}, runtime {gb('runtime')}; sampling: gathered "
        f"weights {gb('sampling_gathered')}, KV cache {gb('kv_cache')}, logits {gb('sampling_logits')}; "
        f"training: gradients {gb('gradients')}, activations ~{gb('activations')}; load: file read {gb('load')}; "
        f"save {gb('save')} -> peak ~{gb('peak')} GB"
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
