"""The first GPU run: grpo.main end to end on random-weight checkpoints written here, plus the checks and numbers.

    python bench/gpu_check.py                  # CUDA, <= 8 minutes on one H100 / H200 -> bench/gpu_check.json
    python bench/gpu_check.py --sections checks,decode       # a subset (names below)
    python bench/gpu_check.py --tiny           # every section on tiny shapes on CPU (fp32), for CI

Needs torch, transformers (its `tokenizers`), safetensors, numpy, tqdm; triton on CUDA. No network, no built-in
model: a byte-level BPE tokenizer is trained here on the built-in task's text (2 s) and saved, with a ChatML chat
template and its EOS, into each checkpoint written here; the models' Qwen vocabulary (151936) holds it, and the ids
past it are never written by the tokenizer (sampled ones decode to nothing). A random model never writes the answer
format, so every run gets `varied_reward` (the share of letters), whose groups are not all equal.

Sections, in order, each in its own try/except (traceback kept); the JSON is rewritten (temp file + rename) after
every one; a global deadline (--budget-s, 480) skips what no longer fits and stops a section that runs past it:
  env          device, versions, free disk
  checks       the log-prob kernels against float64, bf16 logits against fp32, greedy decoding with = without cache
  checkpoint   the tokenizer, and a random Qwen2.5-1.5B-shaped checkpoint (bf16 on disk)
  load_bf16    that checkpoint loaded the way grpo.py loads it (bf16, fp32 masters): inv_freq must stay fp32
  train_step   grpo.sample_rollout + grpo.policy_update under torch.profiler: which SDPA kernels ran (the math
               backend on CUDA fails it); training tokens / s, MFU, peak memory
  decode       sampler.generate at 32 and 256 rows: ms per decode step, tokens / s; compiled if generate can
  grpo_stage0, grpo_stage1, grpo_stage2
               grpo.main, 2 steps of each stage, each starting from the one before (runs .../q-stage{N}): step
               times, tokens / s, peak memory, the sampler-vs-trainer log-prob mismatch from metrics.jsonl
  fsdp_stage1  stage 1 under torchrun over every visible GPU, FSDP2 (skipped on one GPU; 2 gloo processes --tiny)
  logprob_7b   the fused log-prob kernel against naive at N = 8192, H = 3584, V = 152064 (bf16, fwd + bwd)
  lora_stage1  a random Qwen3-8B-shaped checkpoint (bf16, 16 GB on disk), grpo.main stage 1 with LoRA rank 16
"""

import argparse
import gc
import inspect
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import distributed  # noqa: E402
import grpo  # noqa: E402
import kernels  # noqa: E402
from logprobs import micro_batches  # noqa: E402
from model import ModelConfig, Transformer, load_tokenizer, rope_inv_freq  # noqa: E402
from sampler import generate  # noqa: E402

QWEN25_1_5B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
)
# --tiny: the same two families on tiny shapes; a vocabulary past the tokenizer's 2048, as the real ones are
TINY_QWEN2 = dict(QWEN25_1_5B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TINY_QWEN2.update(num_attention_heads=4, num_key_value_heads=2)
TINY_QWEN3 = dict(QWEN3_8B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TINY_QWEN3.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY = dict(  # the checks' model
    model_type="qwen2",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
# The sizes of each mode. grpo: 2 steps a stage; rows = batch x group; decode: rows = prompts x group
FULL = dict(
    model=QWEN25_1_5B,
    lora_model=QWEN3_8B,
    lora_rank=16,
    steps=2,
    stage0_batch=8,
    batch=4,
    group=8,
    new_tokens=128,
    micro_batch=16,
    lora_batch=2,
    lora_new_tokens=64,
    decode=((4, 8), (16, 16)),
    decode_tokens=64,
    logprob=dict(N=8192, H=3584, V=152064, reps=3),
    tokenizer_records=300,
)
SMALL = dict(
    model=TINY_QWEN2,
    lora_model=TINY_QWEN3,
    lora_rank=4,
    steps=2,
    stage0_batch=2,
    batch=2,
    group=3,
    new_tokens=8,
    micro_batch=4,
    lora_batch=2,
    lora_new_tokens=8,
    decode=((4, 8), (16, 16)),
    decode_tokens=8,
    logprob=dict(N=64, H=32, V=1000, reps=1),
    tokenizer_records=100,
)
# Checkpoints and runs go to the repository's disk (runs/ is git-ignored), not /tmp (a tmpfs on some machines): up
# to ~40 GB at a time at full size. These subdirectories are the script's own, removed at the start and the end.
DEFAULT_WORKDIR = ROOT / "runs" / "gpu_check"
WORK_DIRS = (
    "q-init",
    "direct",
    "q-stage0",
    "q-stage1",
    "q-stage2",
    "q-fsdp-stage1",
    "lora-init",
    "lora-stage1",
)
# seconds a section is expected to need at full size: it is skipped, not started, with less left
NEEDS_S = dict(grpo_stage0=45, grpo_stage1=45, grpo_stage2=45, fsdp_stage1=60, lora_stage1=150)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks
FLOOR_BYTES_PER_ENTRY = (
    6  # bf16: forward reads a logits row once, backward reads it and writes the gradient once
)
# fp32 on float64 inputs: only float32 rounding of sums over H and V (the kernel tests' tolerance); bf16 inputs:
# the reference sees the same bf16 values, the returned gradients are rounded to bf16 (2^-8 relative) once
TOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-6}
# bf16 vs fp32 logits of a random 2-layer model: each product rounds its inputs to 8 bits (2^-9 relative), a few
# products deep: a mean error below 2% of the mean |logit| and the same argmax almost everywhere
LOGITS_MEAN_REL, ARGMAX_AGREE = 0.02, 0.95
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, EOS (Qwen's names)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class OutOfTime(BaseException):
    """The global deadline passed inside a section (SIGALRM): not an Exception, so no code under test catches it."""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(passed, value=None, **extra):
    return dict(passed=bool(passed), value=value, **extra)


def skipped_check(why, value=None):
    return dict(passed=None, skipped=why, value=value)


def varied_reward(completion, record):
    """A reward a random model's completions spread: the share of ASCII letters among the characters written."""
    text = completion.removeprefix(data.PREFILL)
    letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters / max(1, len(text)), {"letters": float(letters)}


# ---- the tokenizer and the checkpoints ---------------------------------------------------------------------------


def build_tokenizer(n_records):
    """A byte-level BPE tokenizer (2048 ids, any text encodes) trained on the built-in task's prompts and gold
    completions, with a ChatML template and <|im_end|> as EOS: what data.training_prompt and the sampler need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    records = data.synthetic_records("train", n_records) + data.synthetic_records("eval", n_records // 4)
    texts = [data.FORMAT_SENTENCE, data.PREFILL, data.STOP_STRINGS[0]]
    for r in records:
        user = data.render_user(r, [d["text"] for d in r.docs], data.INSTRUCTIONS[r.source], True, True)
        texts += [user, data.PREFILL + data.gold_completion(r)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def write_checkpoint(hf, path, tokenizer, device, dtype, seed=0):
    """A random model of config `hf` built on `device` in `dtype` (weights N(0, 0.02): flat logits, varied samples),
    saved with the tokenizer in the Hugging Face layout. -> (parameters, seconds to build, seconds to write)."""
    t0 = time.perf_counter()
    cfg = ModelConfig.from_hf(
        dict(hf, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    sync(device)
    built = time.perf_counter() - t0
    model.save_pretrained(path, tokenizer=tokenizer)
    n = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    return n, built, time.perf_counter() - t0 - built


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    """The device's peak allocated bytes since reset_peak; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return dict(peak_device_bytes=torch.cuda.max_memory_allocated(device))
    return dict(peak_host_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def matmul_params(model):
    """Parameters that take part in matrix products per token: all but an untied input embedding (a lookup)."""
    n = sum(p.numel() for p in model.parameters())
    return n if model.config.tie_word_embeddings else n - model.model.embed_tokens.weight.numel()


# ---- section 1: the old checks (kernels, model) -------------------------------------------------------------------


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def check_kernels(device, dtype, N=64, H=96, V=1000, T=0.8):
    """fused_linear_logprobs and logprobs_from_logits (forward, entropy, backward) against float64."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::7] = -100
    grad_out = torch.randn(N, generator=g).to(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = kernels.fused_linear_logprobs(h, w, labels, temperature=T, return_entropy=True)
    gh, gw = torch.autograd.grad((logp * grad_out).sum(), (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = torch.log_softmax(h64 @ w64.T / T, -1)
    keep = labels != -100
    ref = torch.where(keep, z.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    rent = torch.where(keep, -(z.exp() * z).sum(-1), 0.0)
    rgh, rgw = torch.autograd.grad((ref * grad_out.double()).sum(), (h64, w64))
    out = dict(
        fused_logp=max_rel(logp, ref),
        fused_entropy=max_rel(ent, rent),
        fused_grad_hidden=max_rel(gh, rgh),
        fused_grad_weight=max_rel(gw, rgw),
    )
    logits = (hidden.float() @ weight.float().T).to(dtype)
    x = logits.clone().requires_grad_()
    lp = kernels.logprobs_from_logits(x, labels, temperature=T)
    (gx,) = torch.autograd.grad((lp * grad_out).sum(), x)
    x64 = logits.double().requires_grad_()
    z = torch.log_softmax(x64 / T, -1)
    r = torch.where(keep, z.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    (rgx,) = torch.autograd.grad((r * grad_out.double()).sum(), x64)
    out.update(logits_logp=max_rel(lp, r), logits_grad=max_rel(gx, rgx))
    return {f"kernel_{k}_{str(dtype)[6:]}": check(v < TOL[dtype], v, tol=TOL[dtype]) for k, v in out.items()}


def check_model(device):
    """bf16 logits against fp32 on the same weights; greedy decoding with the cache against full forwards."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 if "embed" in name else 0.02)  # sharp logits: argmax well defined
    model.to(device)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = model(ids).double()
        got = model.to(torch.bfloat16)(ids).double()
        model.float()
        rel = ((got - ref).abs().mean() / ref.abs().mean()).item()
        agree = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
        cached, _, _ = generate(
            model, [ids[0].tolist()], max_new_tokens=12, temperature=0.0, eos_token_ids=()
        )
        seq = ids[:1]
        for _ in range(12):  # no cache: the whole sequence again for every token
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    same = torch.equal(cached[0], seq[0, ids.shape[1] :])
    return dict(
        model_logits_bf16_vs_fp32=check(rel < LOGITS_MEAN_REL, rel, tol=LOGITS_MEAN_REL),
        model_argmax_bf16_vs_fp32=check(agree >= ARGMAX_AGREE, agree, tol=ARGMAX_AGREE),
        greedy_cache_equals_no_cache=check(same, float(same)),
    )


def section_env(ctx):
    d = ctx["device"]
    free = shutil.disk_usage(ctx["workdir"]).free
    result = dict(
        device=torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu",
        gpus=torch.cuda.device_count(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=sys.version.split()[0],
        workdir=str(ctx["workdir"]),
        free_disk_bytes=free,
        peak_bf16_flops=peak_flops(d),
    )
    for mod in ("transformers", "triton", "tokenizers", "safetensors"):
        try:
            result[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            result[mod] = f"unavailable: {e}"
    return result, {}


def section_checks(ctx):
    checks = {}
    for dtype in (torch.float32, torch.bfloat16):
        checks.update(check_kernels(ctx["device"], dtype))
    checks.update(check_model(ctx["device"]))
    return {}, checks


# ---- sections 2-4: the checkpoint, loading it in bf16, one profiled step ------------------------------------------


def section_checkpoint(ctx):
    t0 = time.perf_counter()
    tok = build_tokenizer(ctx["sizes"]["tokenizer_records"])
    t_tok = time.perf_counter() - t0
    path = ctx["workdir"] / "q-init"
    n, t_build, t_write = write_checkpoint(ctx["sizes"]["model"], path, tok, ctx["device"], ctx["disk_dtype"])
    ctx["init"] = path
    loaded = load_tokenizer(path)
    record = data.stage_records(data.load_data("builtin"), 1)[0]
    ids, prefill = data.training_prompt(record, loaded)
    result = dict(
        path=str(path),
        parameters=n,
        tokenizer_size=len(loaded),
        tokenizer_s=t_tok,
        build_s=t_build,
        write_s=t_write,
        disk_bytes=sum(f.stat().st_size for f in path.iterdir()),
        prompt_tokens=len(ids),
    )
    vocab = ctx["sizes"]["model"]["vocab_size"]
    return result, dict(
        tokenizer_fits_the_vocabulary=check(len(loaded) <= vocab, len(loaded), vocab_size=vocab),
        chat_template_ends_in_the_prefill=check(loaded.decode(ids).endswith("assistant\n" + prefill)),
    )


def run_config(ctx, **kw):
    """grpo.Config of a stage-1 step on the written checkpoint, in the run's dtype."""
    s = ctx["sizes"]
    base = dict(
        stage=1,
        model=str(ctx["init"]),
        out=str(ctx["workdir"] / "direct"),
        batch_prompts=s["batch"],
        group_size=s["group"],
        max_new_tokens=s["new_tokens"],
        micro_batch=s["micro_batch"],
        dtype=ctx["dtype"],
        lr=1e-5,
        warmup_steps=0,
    )
    return grpo.Config(**(base | kw))


def loaded_model(ctx):
    """The written checkpoint as grpo.py loads it: distributed.load_models in bf16 (fp32 masters) on the device."""
    if "model" not in ctx:
        require(ctx, "init")
        cfg = run_config(ctx, dtype="bfloat16")
        model, _ = distributed.load_models(cfg, str(ctx["init"]), str(ctx["init"]), ctx["device"], "bfloat16")
        ctx["model"], ctx["tokenizer"] = model, load_tokenizer(ctx["init"])
    return ctx["model"], ctx["tokenizer"]


def require(ctx, key):
    if key not in ctx:
        raise RuntimeError(f"needs the '{key}' of an earlier section, which did not run or failed")


def inv_freq_checks(model, where):
    want = rope_inv_freq(model.config).to(model.inv_freq.device)
    return {
        f"inv_freq_fp32_{where}": check(model.inv_freq.dtype == torch.float32, str(model.inv_freq.dtype)),
        f"inv_freq_exact_{where}": check(torch.equal(model.inv_freq, want)),
    }


def section_load_bf16(ctx):
    t0 = time.perf_counter()
    model, _ = loaded_model(ctx)
    weight = model.model.layers[0].self_attn.q_proj.weight
    result = dict(
        load_s=time.perf_counter() - t0,
        weight_dtype=str(weight.dtype),
        inv_freq_dtype=str(model.inv_freq.dtype),
        masters=len(getattr(model, "masters", {})),
    )
    checks = inv_freq_checks(model, "after_load")
    checks["weights_bf16_with_fp32_masters"] = check(
        weight.dtype == torch.bfloat16 and all(m.dtype == torch.float32 for m in model.masters.values())
    )
    return result, checks


def attention_backends(prof):
    """{backend: [op or kernel names]} of the scaled-dot-product attention that ran under the profiler."""
    found = {}
    for name in sorted({e.key for e in prof.key_averages()}):
        low = name.lower()
        if low == "aten::scaled_dot_product_attention":  # the dispatcher: the backend it picks runs below it
            continue
        if "attention_math" in low or ("scaled_dot_product" in low and "math" in low):
            kind = "math"
        elif "flash" in low and ("attention" in low or "fwd" in low or "bwd" in low or "fmha" in low):
            kind = "flash"
        elif "efficient_attention" in low or "fmha" in low or "mem_eff" in low:
            kind = "efficient"
        elif "cudnn" in low and ("attention" in low or "sdpa" in low or "mha" in low):
            kind = "cudnn"
        elif "scaled_dot_product" in low:
            kind = "other"
        else:
            continue
        found.setdefault(kind, []).append(name)
    return found


def profiled(fn, device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        out = fn()
        sync(device)
    return out, attention_backends(prof)


def trained_tokens(batch, keep, cfg):
    """Tokens the update's forwards run: per micro-batch its prompts once, and each row's inputs (length - 1)."""
    lengths = batch.comp_mask.sum(1).long().tolist()
    total = 0
    for rows, pids, _ in micro_batches(keep, cfg.micro_batch, batch.group_size):
        total += sum(len(batch.prompts[p]) for p in pids) + sum(max(lengths[r] - 1, 0) for r in rows)
    return total


def section_train_step(ctx):
    """One sampling round and policy updates on it, grpo's own functions: the attention kernels of sampling and of
    training under the profiler, then two timed updates: training tokens / s, MFU, peak memory."""
    device = ctx["device"]
    model, tok = loaded_model(ctx)
    cfg = run_config(ctx, dtype="bfloat16", max_new_tokens=ctx["sizes"]["decode_tokens"])
    records = data.stage_records(data.load_data("builtin"), 1)[: cfg.batch_prompts]
    reset_peak(device)
    rollout, sample_kernels = profiled(
        lambda: grpo.sample_rollout(model, tok, records, cfg, varied_reward, seed=0), device
    )
    advantages = grpo.group_advantages(rollout.rewards, cfg.group_size)
    keep = list(range(len(rollout.texts)))
    batch, adv = rollout.to(device), advantages.to(device)  # as grpo.main moves them: once, here

    def update(step):
        return grpo.policy_update(
            model, None, model_optimizer(ctx, model, cfg), batch, adv, keep, cfg, step, 4
        )

    hist, train_kernels = profiled(lambda: update(0), device)
    tokens, times = trained_tokens(batch, keep, cfg), []
    for step in (1, 2):
        sync(device)
        t = time.perf_counter()
        hist = update(step)
        sync(device)
        times.append(time.perf_counter() - t)
    tps = tokens / min(times)
    full = cfg.lora_rank == 0
    flops = (6 if full else 4) * matmul_params(model) * tps  # forward + backward; attention's own left out
    peak = peak_flops(device)
    result = dict(
        rows=len(rollout.texts),
        completion_tokens=int(rollout.comp_mask.sum().item()),
        trained_tokens=tokens,
        update_s=min(times),
        training_tokens_per_s=tps,
        model_flops_per_s=flops,
        mfu=flops / peak if peak else None,
        grad_norm=hist[0]["grad_norm"],
        sampling_attention=sample_kernels,
        training_attention=train_kernels,
        **peak_bytes(device),
    )
    ran = sorted(set(sample_kernels) | set(train_kernels))
    checks = dict(inv_freq_checks(model, "after_updates"))
    checks["update_finite"] = check(
        math.isfinite(hist[0]["grad_norm"]) and hist[0]["grad_norm"] > 0, hist[0]["grad_norm"]
    )
    checks["rewards_vary"] = check(rollout.rewards.std().item() > 0, rollout.rewards.std().item())
    if device.type == "cuda":
        checks["attention_not_math"] = check(bool(ran) and "math" not in ran, ran)
    else:
        checks["attention_not_math"] = skipped_check("on CPU (recorded, not asserted)", ran)
    return result, checks


def model_optimizer(ctx, model, cfg):
    if "optimizer" not in ctx:
        ctx["optimizer"] = distributed.with_master_weights(
            model, grpo.make_optimizer(distributed.trained_parameters(model), cfg)
        )
    return ctx["optimizer"]


# ---- section 5: decoding ------------------------------------------------------------------------------------------


def section_decode(ctx):
    """generate at 32 and 256 rows: every row decodes all steps (no EOS). ms per decode step from two lengths (the
    difference leaves the prefill out); tokens / s over the whole call."""
    device = ctx["device"]
    model, tok = loaded_model(ctx)
    s = ctx["sizes"]
    n_tok = s["decode_tokens"]
    records = data.stage_records(data.load_data("builtin"), 1)
    can_compile = "compile" in inspect.signature(generate).parameters
    result, checks = dict(compiled="available" if can_compile else "not available in this build"), {}
    for compiled in (False, True) if can_compile else (False,):
        for prompts, G in s["decode"]:
            rows = prompts * G
            ids = [data.training_prompt(r, tok)[0] for r in records[:prompts]]
            kw = dict(group_size=G, temperature=1.0, eos_token_ids=(), seed=0)
            if compiled:
                kw["compile"] = True

            def timed(n):
                sync(device)
                t = time.perf_counter()
                out = generate(model, ids, max_new_tokens=n, **kw)
                sync(device)
                return time.perf_counter() - t, out

            timed(n_tok)  # warm-up: kernels, the allocator, a compile
            reset_peak(device)
            t_one, _ = timed(1)
            t_all, (out_ids, mask, _) = timed(n_tok)
            key = f"{'compiled' if compiled else 'eager'}_{rows}_rows"
            result[key] = dict(
                prompts=prompts,
                group_size=G,
                prompt_tokens=sum(map(len, ids)),
                new_tokens=n_tok,
                ms_per_decode_step=1e3 * (t_all - t_one) / (n_tok - 1),
                tokens_per_s=mask.sum().item() / t_all,
                prefill_s=t_one,
                **peak_bytes(device),
            )
            checks[f"{key}_all_rows_full"] = check(mask.sum().item() == rows * n_tok, mask.sum().item())
    return result, checks


# ---- sections 6-8: grpo.main end to end ------------------------------------------------------------------------


def grpo_args(ctx, stage, out, model, extra=()):
    s = ctx["sizes"]
    batch, group = (s["stage0_batch"], 1) if stage == 0 else (s["batch"], s["group"])
    flags = dict(stage=stage, model=model, out=out, data="builtin", steps=s["steps"], batch_prompts=batch)
    flags.update(group_size=group, max_new_tokens=s["new_tokens"], micro_batch=s["micro_batch"], lr=1e-5)
    flags.update(save_every=1000, log_samples=2)
    args = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return args + ["--no-progress", *extra]


def run_summary(out, steps, stage, wall, device=None):
    """Numbers of a finished run from its metrics.jsonl, and the checks every run must pass. Rates leave step 0
    out (kernels compiled, the allocator warmed up) when there are more steps."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((Path(out) / "config.json").read_text())
    rows_per_step = config["batch_prompts"] * config["group_size"] * config["world_size"]
    warm = rows[1:] or rows
    completion_tokens = sum(r["completion_len_mean"] * rows_per_step for r in warm)
    result = dict(
        steps=len(rows),
        wall_s=wall,
        started_from=config["init_resolved"],
        dtype=config["dtype"],
        step_time_s=[r["step_time"] for r in rows],
        sample_time_s=[r["sample_time"] for r in rows],
        train_time_s=[r["train_time"] for r in rows],
        save_and_load_s=wall - sum(r["step_time"] for r in rows),  # loading, the checkpoint, the rest
        tokens_per_s=completion_tokens / sum(r["step_time"] for r in warm),
        sampling_tokens_per_s=completion_tokens / sum(r["sample_time"] for r in warm),
        training_completion_tokens_per_s=completion_tokens / sum(r["train_time"] for r in warm),
        completion_len_mean=rows[-1]["completion_len_mean"],
        loss=[r["loss"] for r in rows],
        grad_norm=[r["grad_norm"] for r in rows],
        reward_std=[r["reward_std"] for r in rows],
    )
    for k in grpo.SAMPLER_METRICS:  # the extreme over the steps, or the mean
        if k in rows[-1]:
            values = [r[k] for r in rows]
            result[k] = dict(max=max, min=min).get(k.rsplit("/", 1)[1], lambda v: sum(v) / len(v))(values)
    if device is not None:
        result.update(peak_bytes(device))
    checks = dict(
        all_steps_ran=check(len(rows) == steps, len(rows)),
        loss_and_gradient_finite=check(
            all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), result["grad_norm"]
        ),
        gradient_nonzero=check(all(r["grad_norm"] > 0 for r in rows), result["grad_norm"]),
        checkpoint_written=check((Path(out) / "checkpoint" / "model.safetensors").is_file()),
    )
    if stage > 0:
        diff = result.get("sampling/sampling_logp_difference/max")
        checks["sampler_trainer_mismatch_finite"] = check(diff is not None and math.isfinite(diff), diff)
    return result, checks


def grpo_stage(stage):
    def section(ctx):
        require(ctx, "init")
        drop_model(ctx)
        device = ctx["device"]
        # stage N starts from q-stage{N-1}/checkpoint: grpo's own rule for an --out named *stage{N}
        out = ctx["workdir"] / f"q-stage{stage}"
        reset_peak(device)
        t0 = time.perf_counter()
        grpo.main(grpo_args(ctx, stage, out, ctx["init"]), reward_fn=varied_reward)
        wall = time.perf_counter() - t0
        free_memory()
        result, checks = run_summary(out, ctx["sizes"]["steps"], stage, wall, device)
        if stage > 0:
            before = str(ctx["workdir"] / f"q-stage{stage - 1}" / "checkpoint")
            checks["started_from_the_previous_stage"] = check(result["started_from"] == before, before)
        # the disk: a 1.5B full checkpoint is 18 GB with its optimizer state. The next stage starts from this
        # one's; the last stage's is needed by none
        for done in (stage - 1, stage) if stage == 2 else (stage - 1,):
            if not ctx["keep"]:
                shutil.rmtree(ctx["workdir"] / f"q-stage{done}" / "checkpoint", ignore_errors=True)
        return result, checks

    return section


def drop_model(ctx):
    for k in ("model", "optimizer", "tokenizer"):
        ctx.pop(k, None)
    free_memory()


def section_fsdp_stage1(ctx):
    """grpo.main stage 1 under torchrun, one process per GPU (FSDP2); --tiny: 2 processes on CPU (gloo)."""
    require(ctx, "init")
    drop_model(ctx)
    n = torch.cuda.device_count() if ctx["device"].type == "cuda" else 2
    if n < 2:
        return dict(skipped=f"{n} GPU visible: FSDP2 needs 2 or more"), {}
    out = ctx["workdir"] / "q-fsdp-stage1"
    out.mkdir(parents=True, exist_ok=True)
    args = grpo_args(ctx, 1, out, ctx["init"], ("--init", str(ctx["init"])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cmd += [str(Path(__file__).resolve()), "worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(1, ctx["left"]()))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    result, checks = run_summary(out, ctx["sizes"]["steps"], 1, wall)
    result["processes"] = n
    result["peaks"] = [json.loads(p.read_text()) for p in sorted(out.glob("peak-rank*.json"))]
    checks["every_rank_reported"] = check(len(result["peaks"]) == n, len(result["peaks"]))
    if not ctx["keep"]:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return result, checks


def worker(argv):
    """One torchrun process of section_fsdp_stage1: grpo.main, then this rank's peak memory to <out>/."""
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    )
    grpo.main(argv, reward_fn=varied_reward)
    out = Path(argv[argv.index("--out") + 1])
    peak = peak_bytes(device or torch.device("cpu"))
    (out / f"peak-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(peak))


# ---- sections 9-10: the 7B log-prob kernel, LoRA on an 8B shape ---------------------------------------------------


def measure(fn, device, reps):
    """-> (best seconds, peak bytes above what was allocated before) of fn()."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return best, peak


def section_logprob_7b(ctx):
    drop_model(ctx)
    device, p = ctx["device"], ctx["sizes"]["logprob"]
    N, H, V = p["N"], p["H"], p["V"]
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    grad_out = torch.randn(N, generator=g).to(device)

    def naive():
        logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, labels[:, None])[:, 0]
        return torch.autograd.grad((logp * grad_out).sum(), (hidden, weight))

    def fused():
        logp = kernels.fused_linear_logprobs(hidden, weight, labels)
        return torch.autograd.grad((logp * grad_out).sum(), (hidden, weight))

    out = dict(N=N, H=H, V=V, dtype="bfloat16", backend=kernels.backend_for(hidden).__name__.split(".")[-1])
    for name, fn in (("fused", fused), ("naive", naive)):
        fn()  # compile / warm up
        out[f"{name}_s"], out[f"{name}_peak_bytes"] = measure(fn, device, p["reps"])
    out["time_ratio"] = out["fused_s"] / out["naive_s"]
    if out["fused_peak_bytes"] is not None:
        out["peak_ratio"] = out["fused_peak_bytes"] / out["naive_peak_bytes"]
    floor = FLOOR_BYTES_PER_ENTRY * N * V  # the logits traffic alone; the matmuls' reads of weight are extra
    out["floor_bytes"], out["fused_bandwidth_GBps"] = floor, floor / out["fused_s"] / 1e9
    gf, gn = fused(), naive()
    rel = max(max_rel(a, b) for a, b in zip(gf, gn))
    return out, dict(fused_grads_match_naive=check(rel < 2.0**-5, rel, tol=2.0**-5))


def section_lora_stage1(ctx):
    """A random Qwen3-8B-shaped checkpoint in bf16 (16 GB on disk; fp32 while loaded: grpo loads in fp32 and casts
    the frozen base), then grpo.main stage 1 with LoRA."""
    drop_model(ctx)
    require(ctx, "init")
    s, device = ctx["sizes"], ctx["device"]
    path = ctx["workdir"] / "lora-init"
    numel = sum(math.prod(v) for v in meta_shapes(s["lora_model"]))
    need = 2 * 2 * numel  # the bf16 init and the run's merged bf16 checkpoint
    free = shutil.disk_usage(ctx["workdir"]).free
    if free < need * 1.1:
        raise RuntimeError(f"{free / 1e9:.1f} GB free on disk, the section writes {need / 1e9:.1f} GB")
    n, t_build, t_write = write_checkpoint(
        s["lora_model"], path, load_tokenizer(ctx["init"]), device, ctx["disk_dtype"]
    )
    out = ctx["workdir"] / "lora-stage1"
    extra = ("--lora-rank", str(s["lora_rank"]), "--batch-prompts", str(s["lora_batch"]))
    extra += ("--max-new-tokens", str(s["lora_new_tokens"]), "--lr", "1e-4")
    reset_peak(device)
    t0 = time.perf_counter()
    grpo.main(grpo_args(ctx, 1, out, path, extra), reward_fn=varied_reward)
    wall = time.perf_counter() - t0
    free_memory()
    result, checks = run_summary(out, s["steps"], 1, wall, device)
    result.update(parameters=n, build_s=t_build, write_s=t_write, lora_rank=s["lora_rank"])
    if not ctx["keep"]:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return result, checks


def meta_shapes(hf):
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_hf(hf))
    return [tuple(p.shape) for p in m.parameters()]


SECTIONS = dict(
    env=section_env,
    checks=section_checks,
    checkpoint=section_checkpoint,
    load_bf16=section_load_bf16,
    train_step=section_train_step,
    decode=section_decode,
    grpo_stage0=grpo_stage(0),
    grpo_stage1=grpo_stage(1),
    grpo_stage2=grpo_stage(2),
    fsdp_stage1=section_fsdp_stage1,
    logprob_7b=section_logprob_7b,
    lora_stage1=section_lora_stage1,
)


# ---- the runner ---------------------------------------------------------------------------------------------------


def write_json(path, report):
    """Atomically: a reader (or a run killed mid-write) sees the previous JSON or this one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def on_alarm(signum, frame):
    raise OutOfTime()


def run_section(name, fn, ctx, deadline):
    left = deadline - time.time()
    need = 0 if ctx["tiny"] else NEEDS_S.get(name, 0)
    if left < max(need, 1):
        why = f"{max(left, 0):.0f} s left of the budget ({ctx['budget_s']:.0f} s), the section needs ~{max(need, 1)} s"
        return dict(status="skipped", reason=why)
    t0 = time.perf_counter()
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(math.ceil(left))  # whole seconds: at the deadline or just after it
    try:
        result, checks = fn(ctx)
        failed = [k for k, c in checks.items() if c["passed"] is False]
        status = "failed" if failed else "passed"
        entry = dict(status=status, result=result, checks=checks)
        if failed:
            entry["failed_checks"] = failed
    except OutOfTime:
        entry = dict(status="failed", error=f"stopped at the deadline ({ctx['budget_s']} s budget)")
        entry["traceback"] = traceback.format_exc()
    except Exception as e:  # noqa: BLE001  every section's failure is recorded, the next ones still run
        entry = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    finally:
        if use_alarm:
            signal.alarm(0)
    entry["wall_s"] = time.perf_counter() - t0
    if entry["status"] == "failed":
        free_memory()
    return entry


def headline(entry):
    """A few numbers of a section for the table."""
    r = entry.get("result") or {}
    keys = (
        "device",
        "parameters",
        "load_s",
        "training_tokens_per_s",
        "mfu",
        "tokens_per_s",
        "sampling/sampling_logp_difference/max",
        "peak_device_bytes",
        "time_ratio",
        "skipped",
    )
    parts = []
    for k in keys:
        v = r.get(k)
        if v is not None:
            parts.append(
                f"{k.split('/')[-2] if '/' in k else k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            )
    for k, v in r.items():
        if isinstance(v, dict) and "ms_per_decode_step" in v:
            parts.append(f"{k}: {v['ms_per_decode_step']:.2f} ms/step {v['tokens_per_s']:.0f} tok/s")
    checks = [c for c in (entry.get("checks") or {}).values() if c["passed"] is not None]
    if checks:
        parts.append(f"{sum(c['passed'] for c in checks)}/{len(checks)} checks")
    if "attention_not_math" in (entry.get("checks") or {}):
        parts.append(f"attention={entry['checks']['attention_not_math']['value']}")
    if entry.get("failed_checks"):
        parts.append(f"FAILED: {','.join(entry['failed_checks'])}")
    if entry.get("error"):
        parts.append(entry["error"].splitlines()[0][:100])
    if entry.get("reason"):
        parts.append(entry["reason"])
    return "; ".join(parts)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="every section on tiny shapes (CPU, fp32): CI")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}"
    )
    p.add_argument("--budget-s", type=float, default=480.0, help="the global deadline, seconds")
    p.add_argument("--workdir", default=None, help=f"checkpoints and runs (default {DEFAULT_WORKDIR})")
    p.add_argument("--keep", action="store_true", help="keep the workdir and every checkpoint")
    args = p.parse_args(argv)
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        p.error("no CUDA device: run with --tiny for the CPU version")
    if args.tiny:
        device = torch.device("cpu")
    start = time.time()
    deadline = start + args.budget_s
    workdir = Path(args.workdir or DEFAULT_WORKDIR)
    for name in WORK_DIRS:  # ours, from an earlier run: grpo.main would refuse an --out that holds a run
        shutil.rmtree(workdir / name, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = dict(
        device=device,
        tiny=args.tiny,
        sizes=SMALL if args.tiny else FULL,
        dtype="float32" if device.type == "cpu" else "bfloat16",
        disk_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
        workdir=workdir,
        keep=args.keep,
        budget_s=args.budget_s,
        left=lambda: deadline - time.time(),
    )
    report = dict(
        script="bench/gpu_check.py",
        argv=argv,
        tiny=args.tiny,
        budget_s=args.budget_s,
        sections={n: dict(status="pending") for n in names},
    )
    write_json(args.out, report)
    try:
        for name in names:
            print(f"==== gpu_check: {name} ({deadline - time.time():.0f} s left)", flush=True)
            entry = run_section(name, SECTIONS[name], ctx, deadline)
            report["sections"][name] = entry
            if entry["status"] == "failed":
                print(entry.get("traceback") or entry.get("failed_checks"), file=sys.stderr, flush=True)
            report["wall_s"] = time.time() - start
            report["all_passed"] = all(e["status"] == "passed" for e in report["sections"].values())
            write_json(args.out, report)
    finally:
        drop_model(ctx)
        if not args.keep:
            for name in WORK_DIRS:
                shutil.rmtree(workdir / name, ignore_errors=True)
    print(f"\n{'section':<13} {'status':<8} {'s':>6}  numbers")
    for name, e in report["sections"].items():
        print(f"{name:<13} {e['status']:<8} {e.get('wall_s', 0):>6.1f}  {headline(e)}")
    print(f"all passed: {report['all_passed']} ({report['wall_s']:.0f} s) -> {args.out}")
    return report


if __name__ == "__main__":
    main()
