"""The numbers behind bench/README-generate.md: this machine's peak float32 matrix-product rate and memory bandwidth,
the products of one decode step (32 rows, the built-in model's shapes) in GFLOP/s, and a profile of the sampler.

    python bench/decode_roofline.py [--threads 1,2] [--profile]

Products are timed two ways: "hot" repeats one weight (it stays in cache), "cold" cycles through 30 layers' worth of
distinct weights as a decode step does (each weight comes from memory once per step).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import builtin  # noqa: E402
import model as M  # noqa: E402
import sampler  # noqa: E402
from kernels import decode  # noqa: E402

ROWS = 32  # 4 prompts x G = 8


def best_time(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine(n):
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_time(lambda: a @ a) / 1e9
    big = torch.randn(135_000_000)  # the size of the built-in model's float32 weights
    bw = big.numel() * 4 / best_time(lambda: big.sum()) / 1e9
    print(f"{n} thread(s): 2048^3 float32 product {peak:.0f} GFLOP/s; reading 540 MB {bw:.1f} GB/s")


def products(n, cfg):
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q, o": (H, H), "k, v": (kv, H), "gate, up": (I, H), "down": (H, I)}
    layers = cfg.num_hidden_layers
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K) * 0.02 for _ in range(layers)]
        x = torch.randn(ROWS, K)
        flop = 2 * ROWS * N * K
        row = []
        for label, fn in (("F.linear", F.linear), ("rows_linear", decode.rows_linear)):
            hot = flop * layers / best_time(lambda: [fn(x, ws[0]) for _ in ws]) / 1e9
            cold = flop * layers / best_time(lambda: [fn(x, w) for w in ws]) / 1e9
            row.append(f"{label} hot {hot:5.1f} cold {cold:5.1f}")
        print(f"  {n} thread(s) {name:9s} ({N}x{K}): " + "; ".join(row) + " GFLOP/s")
    emb, h = torch.randn(V, H) * 0.02, torch.randn(ROWS, H)
    flop = 2 * ROWS * V * H
    for label, fn in (("F.linear", F.linear), ("output_logits", decode.output_logits)):
        dt = best_time(lambda: fn(h, emb))
        print(
            f"  {n} thread(s) output layer ({V}x{H}) {label}: {dt * 1e3:.1f} ms, {flop / dt / 1e9:.1f} GFLOP/s"
        )


def profile(n):
    from generate import chat_prompts
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    path = builtin.builtin_model_dir()
    net = M.Transformer.from_pretrained(path).eval()
    prompts = chat_prompts(M.load_tokenizer(path))
    kw = dict(group_size=8, temperature=1.0, top_p=1.0, eos_token_ids=[], seed=0)
    sampler.generate(net, prompts, max_new_tokens=4, **kw)
    with torch_profile(activities=[ProfilerActivity.CPU]) as p:
        sampler.generate(net, prompts, max_new_tokens=32, **kw)
    print(f"{n} thread(s), 32 rows x 32 new tokens:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in turn")
    ap.add_argument("--profile", action="store_true", help="also profile generate (torch.profiler, CPU ops)")
    args = ap.parse_args()
    cfg = M.ModelConfig()  # SmolLM2-135M's shapes
    for n in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n)
        machine(n)
        products(n, cfg)
        if args.profile:
            profile(n)


if __name__ == "__main__":
    main()
