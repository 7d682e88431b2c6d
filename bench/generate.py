"""Completion tokens per second: our KV-cached group sampler against transformers' generate, same process.

Same model (the built-in SmolLM2-135M-Instruct, float32), same 4 chat prompts, G = 8 completions each, 128 new
tokens per row, temperature 1.0, top-p 1.0. EOS does not stop either side (ours: no EOS ids; transformers:
min_new_tokens = max_new_tokens), so both produce exactly 4 * 8 * 128 tokens and the rates compare the same work.
Each thread count in turn (1 and 2 by default, in one invocation): a warm-up, then runs alternating (ours, theirs,
ours, theirs, ...) with seeds 0, 1, ... so machine noise hits both alike; the best run of each side is reported.

    python bench/generate.py [--threads 1,2] [--reps 2] [--new-tokens 128] [--baseline REV] [--no-hf]

--baseline REV adds a side: the sampler.py of git revision REV (e.g. baf830a), timed in the same alternation, so a
change to the sampler is measured against the code before it on the same machine at the same moment.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import builtin  # noqa: E402
import model as M  # noqa: E402
import sampler  # noqa: E402

QUESTIONS = [
    "Document [1](Title: Lake Varnis): Lake Varnis has a depth of 412 meters.\nDocument [2](Title: Mount Orel): "
    "Mount Orel is 5,210 meters high.\n\nQuestion: What is the depth of Lake Varnis?",
    "Write a short poem about a river that flows through a quiet city at night.",
    "Explain in two sentences why the sky is blue.",
    "Question: Which is larger, 17 or 71? Answer with a citation to the document that says so. Document [1]: "
    "71 is larger than 17.",
]


def chat_prompts(tok):
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def sampler_at(rev):
    """sampler.py of git revision rev, as a module."""
    root = os.path.join(os.path.dirname(__file__), "..")
    src = subprocess.run(
        ["git", "show", f"{rev}:sampler.py"], cwd=root, capture_output=True, text=True, check=True
    )
    mod = types.ModuleType(f"sampler_{rev}")
    exec(compile(src.stdout, f"{rev}:sampler.py", "exec"), mod.__dict__)
    return mod


def run_ours(model, prompts, args, seed, gen=None):
    gen = gen or sampler.generate
    t = time.perf_counter()
    ids, mask, _ = gen(model, prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                              temperature=args.temperature, top_p=args.top_p, eos_token_ids=[], seed=seed)  # fmt: skip
    return int(mask.sum()), time.perf_counter() - t


def run_hf(hf, prompts, args, seed):
    from sampler import left_pad

    ids, mask = left_pad(prompts, 2, "cpu")
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                          top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          num_return_sequences=args.group, pad_token_id=2)  # fmt: skip
    return int((out.shape[1] - ids.shape[1]) * out.shape[0]), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--reps", type=int, default=2, help="timed runs of each side per thread count, alternating"
    )
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per completion")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in turn")
    ap.add_argument("--baseline", help="also time the sampler.py of this git revision (e.g. baf830a)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers' generate out")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    path = builtin.builtin_model_dir()
    ours = M.Transformer.from_pretrained(path).eval()
    sides = {"ours": (run_ours, ours)}
    if args.baseline:
        base = sampler_at(args.baseline).generate
        sides[f"ours@{args.baseline}"] = (lambda m, p, a, seed: run_ours(m, p, a, seed, gen=base), ours)
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        sides["transformers"] = (run_hf, hf)
    prompts = chat_prompts(M.load_tokenizer(path))
    print(f"torch {torch.__version__}; {len(prompts)} prompts x G={args.group}, {args.new_tokens} new tokens, "
          f"T={args.temperature}, top_p={args.top_p}, prompt lengths {[len(p) for p in prompts]}")  # fmt: skip
    best = {}
    for n in threads:
        torch.set_num_threads(n)
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 8})
        for fn, m in sides.values():
            fn(m, prompts, warm, 0)
        rates = {name: [] for name in sides}
        for rep in range(args.reps):
            for name, (fn, m) in sides.items():
                k, dt = fn(m, prompts, args, seed=rep)
                rates[name].append(k / dt)
                print(
                    f"  {n} thread(s) rep {rep} {name:>14}: {k} tokens in {dt:6.1f} s = {k / dt:7.1f} tok/s"
                )
        best[n] = {name: (max(r), statistics.median(r)) for name, r in rates.items()}
    print("best of each side, completion tokens/s (median in brackets):")
    for n, b in best.items():
        line = ", ".join(f"{name} {v:6.1f} ({med:6.1f})" for name, (v, med) in b.items())
        print(
            f"  {n} thread(s): {line}"
            + (f", ratio {b['ours'][0] / b['transformers'][0]:.2f}x" if "transformers" in b else "")
        )


if __name__ == "__main__":
    main()
