"""The aten ops one decode step dispatches (each a kernel launch on CUDA, views aside), counted on CPU with
torch.profiler, for a random model of Qwen2.5-1.5B's shapes (hidden 1536, 12 heads, 2 key/value heads of 128,
intermediate 8960, vocabulary 151936, q/k/v biases): baf830a's generate (before) and today's, eager, fixed-shape
eager (static=True, the CUDA path) and compiled (compile=True; on CPU inductor's C++ kernels and the aten products it
calls, each counted as one launch).

One step = the ops of generate(max_new_tokens=n + 1) minus those of generate(max_new_tokens=n): the model's forward,
the sampling and the loop's bookkeeping, prefill excluded. Counts grow linearly with the layers: the script counts at
--layers (default 1 and 2) and extrapolates to 28.

    python bench/decode_launches.py [--layers 1,2] [--rows 32] [--no-compile]
"""

import argparse
import os
import subprocess
import sys
import types

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import sampler  # noqa: E402

VIEWS = {  # ops that make a view or read metadata: no kernel
    "aten::view", "aten::t", "aten::transpose", "aten::slice", "aten::select", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::as_strided", "aten::chunk", "aten::split", "aten::alias", "aten::detach",
    "aten::_unsafe_view", "aten::narrow", "aten::permute", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::unbind", "aten::_reshape_alias", "aten::empty", "aten::empty_strided",
}  # fmt: skip


def baf830a_sampler():
    """baf830a's sampler.py, from git, as a module: the loop before this change."""
    src = subprocess.run(
        ["git", "show", "baf830a:sampler.py"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    mod = types.ModuleType("sampler_baf830a")
    exec(compile(src.stdout, "baf830a:sampler.py", "exec"), mod.__dict__)
    return mod


def qwen25_15b(layers):
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                        num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        m = M.Transformer(cfg)
    m = m.to_empty(device="cpu")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.eval()


def counts(gen, model, prompts, group, n, **kw):
    """(kernels, views) dispatched by one generate call: top-level aten ops (not inside another aten op) and, in
    compiled graphs, each generated kernel and each aten op the graph calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gen(
            model,
            prompts,
            group_size=group,
            max_new_tokens=n,
            temperature=1.0,
            eos_token_ids=[],
            seed=0,
            **kw,
        )
    kernels = views = 0
    for e in prof.events():
        parent = e.cpu_parent
        top = parent is None or not (parent.name.startswith("aten::") or parent.name.startswith("graph_"))
        if not top or e.name.startswith("## Call CompiledFxGraph"):
            continue
        if e.name.startswith("graph_") or e.name.startswith("aten::"):
            if e.name in VIEWS:
                views += 1
            else:
                kernels += 1
    return kernels, views


def per_step(gen, model, prompts, group, **kw):
    gen(
        model, prompts, group_size=group, max_new_tokens=4, temperature=1.0, eos_token_ids=[], seed=0, **kw
    )  # warm
    a = counts(gen, model, prompts, group, 3, **kw)
    b = counts(gen, model, prompts, group, 4, **kw)
    return b[0] - a[0], b[1] - a[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2", help="two layer counts to count at (comma-separated)")
    ap.add_argument("--rows", type=int, default=32, help="batch rows: 4 prompts x G = rows / 4")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    args = ap.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel shows in the profile
    old = baf830a_sampler()
    prompts = [[11, 12, 13, 14, 15, 16, 17, 18][: 3 + i] for i in range(4)]
    group = args.rows // 4
    paths = {
        "baf830a eager": (old.generate, {}),
        "eager (CPU default)": (sampler.generate, {}),
        "fixed shapes, eager (CUDA default)": (sampler.generate, {"static": True}),
    }
    if not args.no_compile:
        paths["fixed shapes, compiled"] = (sampler.generate, {"compile": True})
    layers = [int(x) for x in args.layers.split(",")]
    table = {name: [] for name in paths}
    for n_layers in layers:
        model = qwen25_15b(n_layers)
        for name, (gen, kw) in paths.items():
            table[name].append(per_step(gen, model, prompts, group, **kw))
            print(
                f"{n_layers} layer(s) {name}: {table[name][-1][0]} kernels, {table[name][-1][1]} views",
                flush=True,
            )
        del model
    l0, l1 = layers[0], layers[-1]
    print(f"\none decode step, {args.rows} rows, Qwen2.5-1.5B shapes (28 layers: per layer x 28 + the rest)")
    print("| path | kernels per layer | other kernels | kernels at 28 layers | views at 28 layers |")
    print("|---|---|---|---|---|")
    for name, c in table.items():
        per = [(c[-1][i] - c[0][i]) / (l1 - l0) for i in (0, 1)]
        rest = [c[0][i] - per[i] * l0 for i in (0, 1)]
        print(
            f"| {name} | {per[0]:g} | {rest[0]:g} | {per[0] * 28 + rest[0]:g} | {per[1] * 28 + rest[1]:g} |"
        )


if __name__ == "__main__":
    main()
