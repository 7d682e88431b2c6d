"""One command for the day a GPU is lent: correctness on CUDA, the log-prob kernel at 7B sizes, a few bf16 GRPO steps.

    python bench/gpu_check.py                 # CUDA, <= 8 minutes on one H100 / H200; writes bench/gpu_check.json
    python bench/gpu_check.py --tiny          # the same logic end to end on tiny sizes (CPU or GPU), for CI

Needs only torch, triton, transformers, safetensors, tqdm, numpy: no gguf, no built-in model, no network. Models are
randomly initialised from configurations written here (Qwen2.5-1.5B's for the GRPO steps).

  1. checks (pass / fail): the log-prob kernels (fused linear and from logits; forward and backward) against float64;
     model logits in bf16 against fp32; greedy decoding with the KV cache equal to decoding without it
  2. logprob_7b: fused vs naive log-probs at N = 8192, H = 3584, V = 152064 in bf16, forward + backward: time, peak
     CUDA memory, achieved bandwidth against the floor of bench/README-kernels.md (6 bytes per vocabulary entry per row)
  3. grpo: a few GRPO steps in bf16 (fp32 masters): sampling and training tokens / s, peak memory, MFU
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import distributed  # noqa: E402
import grpo  # noqa: E402
import kernels  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
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
TINY = dict(
    model_type="qwen2",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    return {
        f"kernel_{k}_{str(dtype)[6:]}": dict(value=v, tol=TOL[dtype], passed=v < TOL[dtype])
        for k, v in out.items()
    }


def random_model(hf, device, dtype=torch.float32, seed=0, embed_std=None):
    """embed_std: the tiny model's checks want sharp logits (0.3); sampling wants them flat (0.02), else every
    completion repeats one token and a group's rewards are all equal."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02 if "embed" not in name else embed_std or (0.3 if hf is TINY else 0.02))
    return model.to(device, dtype)


def check_model(device):
    """bf16 logits against fp32 on the same weights; greedy decoding with the cache against full forwards."""
    model = random_model(TINY, device)
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
    return dict(
        model_logits_bf16_vs_fp32=dict(value=rel, tol=LOGITS_MEAN_REL, passed=rel < LOGITS_MEAN_REL),
        model_argmax_bf16_vs_fp32=dict(value=agree, tol=ARGMAX_AGREE, passed=agree >= ARGMAX_AGREE),
        greedy_cache_equals_no_cache=dict(
            value=float(torch.equal(cached[0], seq[0, ids.shape[1] :])),
            tol=1.0,
            passed=torch.equal(cached[0], seq[0, ids.shape[1] :]),
        ),
    )


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


def logprob_bench(device, N, H, V, reps):
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    grad_out = torch.randn(N, generator=g).to(device)

    def naive():
        logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, labels[:, None])[:, 0]
        torch.autograd.grad((logp * grad_out).sum(), (hidden, weight))

    def fused():
        logp = kernels.fused_linear_logprobs(hidden, weight, labels)
        torch.autograd.grad((logp * grad_out).sum(), (hidden, weight))

    out = dict(N=N, H=H, V=V, dtype="bfloat16", backend=kernels.backend_for(hidden).__name__.split(".")[-1])
    for name, fn in (("fused", fused), ("naive", naive)):
        fn()  # compile / warm up
        out[f"{name}_s"], out[f"{name}_peak_bytes"] = measure(fn, device, reps)
    out["time_ratio"] = out["fused_s"] / out["naive_s"]
    if out["fused_peak_bytes"] is not None:
        out["peak_ratio"] = out["fused_peak_bytes"] / out["naive_peak_bytes"]
    floor = FLOOR_BYTES_PER_ENTRY * N * V  # the logits traffic alone; the matmuls' reads of weight are extra
    out["floor_bytes"], out["fused_bandwidth_GBps"] = floor, floor / out["fused_s"] / 1e9
    return out


def grpo_bench(device, hf, prompts, prompt_len, G, new_tokens, steps):
    """A few GRPO steps of a random model in bf16 with fp32 masters: sampling, then policy_update."""
    cfg = grpo.Config(
        dtype="bfloat16", group_size=G, max_new_tokens=new_tokens, micro_batch=G, lr=1e-5, warmup_steps=0
    )
    model = random_model(hf, device, embed_std=0.02)
    distributed.keep_master_weights(model, torch.bfloat16)
    optimizer = distributed.with_master_weights(
        model, grpo.make_optimizer(distributed.trained_parameters(model), cfg)
    )
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    sample_s = train_s = sample_tok = train_tok = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        batch_prompts = [
            torch.randint(0, hf["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(prompts)
        ]
        sync(device)
        t = time.perf_counter()
        model.eval()
        ids, mask, slogp = generate(
            model,
            batch_prompts,
            group_size=G,
            max_new_tokens=new_tokens,
            temperature=1.0,
            eos_token_ids=(),
            seed=step,
        )
        model.train()
        sync(device)
        dt_sample = time.perf_counter() - t
        ids, mask, slogp = ids.clone(), mask.clone(), slogp.clone()
        rewards = (
            ((ids % 2 == 0).float() * mask).sum(1).cpu()
        )  # any rule will do: the count of even token ids
        adv = grpo.group_advantages(rewards, G).to(device)
        R = len(rewards)
        batch = grpo.Rollout(
            records=[None] * prompts,
            prompts=batch_prompts,
            prefills=[""] * prompts,
            comp_ids=ids,
            comp_mask=mask,
            sampler_logp=slogp,
            texts=[""] * R,
            rewards=rewards.double(),
            components=[{}] * R,
            truncated=torch.zeros(R, dtype=torch.bool),
        )
        t = time.perf_counter()
        hist = grpo.policy_update(
            model,
            None,
            optimizer,
            batch,
            adv,
            list(range(len(rewards))),
            cfg,
            step,
            steps,
            log=lambda *a: None,
        )
        sync(device)
        dt_train = time.perf_counter() - t
        if step > 0 or steps == 1:  # step 0 warms up kernels and the allocator
            sample_s, train_s = sample_s + dt_sample, train_s + dt_train
            sample_tok, train_tok = (
                sample_tok + mask.sum().item(),
                train_tok + mask.sum().item() + prompts * prompt_len,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    train_flops = 6 * P * train_tok / train_s  # forward + backward of every trained token, attention left out
    return dict(
        parameters=P,
        prompts=prompts,
        group_size=G,
        prompt_tokens=prompt_len,
        new_tokens=new_tokens,
        steps=steps,
        sampling_tokens_per_s=sample_tok / sample_s,
        training_tokens_per_s=train_tok / train_s,
        peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        mfu=train_flops / peak_flops if peak_flops else None,
        grad_norm=hist[0]["grad_norm"],
        finite=math.isfinite(hist[0]["grad_norm"]),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, end to end (CPU CI)")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        p.error("no CUDA device: run with --tiny for the CPU version")
    t0 = time.time()
    checks = {}
    for dtype in (torch.float32, torch.bfloat16):
        checks.update(check_kernels(device, dtype))
    checks.update(check_model(device))
    if args.tiny:
        lp = logprob_bench(device, N=64, H=32, V=1000, reps=1)
        run = grpo_bench(device, TINY, prompts=2, prompt_len=16, G=4, new_tokens=8, steps=2)
    else:
        lp = logprob_bench(device, N=8192, H=3584, V=152064, reps=3)
        run = grpo_bench(device, QWEN25_1_5B, prompts=4, prompt_len=256, G=8, new_tokens=256, steps=3)
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        tiny=args.tiny,
        checks=checks,
        all_passed=all(c["passed"] for c in checks.values()),
        logprob_7b=lp,
        grpo=run,
        wall_s=time.time() - t0,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'check':<36} {'value':>12} {'tol':>10}  result")
    for k, c in checks.items():
        print(f"{k:<36} {c['value']:>12.3e} {c['tol']:>10.1e}  {'pass' if c['passed'] else 'FAIL'}")
    for k, v in list(lp.items()) + list(run.items()):
        print(f"{k:<36} {v:>12.4g}" if isinstance(v, float) else f"{k:<36} {v!s:>12}")
    print(
        f"{'all checks passed':<36} {result['all_passed']!s:>12}   ({result['wall_s']:.0f} s) -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
