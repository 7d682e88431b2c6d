"""Forward + backward of fused_linear_logprobs against the naive path, on CPU, at two model sizes.

    naive: logits = hidden @ weight.T / T -> log_softmax -> gather       (N x V fp32 logits, plus copies)
    fused: kernels.fused_linear_logprobs (chunks of rows, lse saved, softmax recomputed in backward)

Both get the same inputs and the same random upstream gradient, and produce grads for hidden and weight.

Time: both variants run in this process, alternating, `--reps` times each; the best (minimum) wall time is reported
because this machine is shared and slower runs only measure other people's jobs.

Peak memory: torch's CPU allocator keeps no statistics and tracemalloc does not see torch's allocations, so each
variant runs once in its own child process (this same file with --child) which measures resident memory (RSS):
set up inputs, warm up the variant at a tiny size (library buffers), return freed heap to the OS (malloc_trim),
reset the RSS high-water mark (write 5 to /proc/self/clear_refs), run one forward + backward, and report
VmHWM - VmRSS(before). That is the extra peak the step needs on top of its inputs, including the grads it returns
(grad_weight is V x H fp32 in both variants). Both variants are measured the same way.

Run: .venv/bin/python bench/logprob.py --reps 3   (7-20 minutes on 2 shared cores)
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fused_linear_logprobs  # noqa: E402

SIZES = [(4096, 576, 49152, "SmolLM2-135M"), (2048, 896, 151936, "Qwen2.5-0.5B")]


def make_inputs(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H**-0.5).requires_grad_()  # logits of order 1, like a model
    labels = torch.randint(0, V, (N,), generator=g)
    grad_out = torch.randn(N, generator=g)  # random upstream gradient
    return hidden, weight, labels, grad_out


def naive_step(hidden, weight, labels, grad_out, temperature):
    logits = hidden @ weight.T  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    logp.backward(grad_out)


def fused_step(hidden, weight, labels, grad_out, temperature):
    logp = fused_linear_logprobs(hidden, weight, labels, temperature)
    logp.backward(grad_out)


STEPS = {"naive": naive_step, "fused": fused_step}


def run_timed(step, inputs, temperature):
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    t0 = time.perf_counter()
    step(*inputs, temperature)
    dt = time.perf_counter() - t0
    hidden.grad = weight.grad = None
    return dt


# ----------------------------------------------------------------------------------------------------------------
# Peak memory, one child process per variant


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_measure(variant, N, H, V, temperature):
    step = STEPS[variant]
    step(*make_inputs(64, H, 1024, seed=1), temperature)  # warm-up at a tiny size
    inputs = make_inputs(N, H, V)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    step(*inputs, temperature)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_peak_bytes": (peak - base) * 1024, "hwm_reset": reset}))


def measure_memory(variant, N, H, V, temperature):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        variant,
        str(N),
        str(H),
        str(V),
        "--temperature",
        str(temperature),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if not res["hwm_reset"]:
        print("  note: /proc/self/clear_refs not writable; peak includes the set-up phase")
    return res["extra_peak_bytes"]


# ----------------------------------------------------------------------------------------------------------------
# The floor: bytes per row the GPU log-prob kernel must move (one pass over the row's logits each way)


def bytes_per_row(V, logit_bytes):
    label, scalar = 8, 4  # int64 label in; fp32 logp / lse / upstream grad
    fwd = V * logit_bytes + label + 2 * scalar  # read logits row; write logp and lse
    bwd = 2 * V * logit_bytes + label + 2 * scalar  # read logits row, write grad row (in place); read lse, g
    return fwd, bwd


def naive_bytes_per_row(V, logit_bytes):
    # eager PyTorch on bf16 logits: .float() (read 2V write 4V), log_softmax (read 4V twice, write 4V), gather;
    # backward: zeros + scatter (write 4V), log_softmax backward (read 4V + 4V, write 4V), cast back (read 4V, write 2V)
    up = 0 if logit_bytes == 4 else V * (logit_bytes + 4)
    down = 0 if logit_bytes == 4 else V * (4 + logit_bytes)
    return up + 12 * V, 16 * V + down


def mib(b):
    return b / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per variant and size (best is reported)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "N", "H", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, N, H, V = args.child
        child_measure(variant, int(N), int(H), int(V), args.temperature)
        return

    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, temperature {args.temperature}, "
        f"best of {args.reps}"
    )
    rows = []
    for N, H, V, name in SIZES:
        print(f"\n{name}: N={N} H={H} V={V}", flush=True)
        mem = {v: measure_memory(v, N, H, V, args.temperature) for v in STEPS}
        print(
            f"  extra peak RSS: naive {mib(mem['naive']):.0f} MiB, fused {mib(mem['fused']):.0f} MiB",
            flush=True,
        )
        inputs = make_inputs(N, H, V)
        times = {v: [] for v in STEPS}
        for _ in range(args.reps):
            for v, step in STEPS.items():
                times[v].append(run_timed(step, inputs, args.temperature))
                print(f"  {v} fwd+bwd {times[v][-1]:.2f} s", flush=True)
        t = {v: min(ts) for v, ts in times.items()}
        rows.append((name, N, H, V, mem, t))
        del inputs

    print(
        "\n| model sizes | N | H | V | naive peak MiB | fused peak MiB | peak ratio | naive s | fused s | time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, N, H, V, mem, t in rows:
        print(
            f"| {name} | {N} | {H} | {V} | {mib(mem['naive']):.0f} | {mib(mem['fused']):.0f} | "
            f"{mem['fused'] / mem['naive']:.3f} | {t['naive']:.2f} | {t['fused']:.2f} | "
            f"{t['fused'] / t['naive']:.3f} |"
        )
    print(
        "(peak = extra resident memory of one forward + backward above its inputs, grads included; "
        "targets: peak ratio <= 0.25, time ratio <= 1.0)"
    )

    print("\nGPU log-prob kernel, bytes per row it must move (computed, not measured):")
    print("| V | logits | kernel fwd | kernel bwd | kernel total | eager PyTorch fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for V in sorted({V for _, _, V, _ in SIZES}):
        for dt, nb in (("bf16", 2), ("fp32", 4)):
            f, b = bytes_per_row(V, nb)
            nf, nbw = naive_bytes_per_row(V, nb)
            print(
                f"| {V} | {dt} | {f:,} | {b:,} | {f + b:,} ({(f + b) / V:.1f} B/vocab entry) | "
                f"{nf + nbw:,} ({(nf + nbw) / V:.0f} B/vocab entry) |"
            )


if __name__ == "__main__":
    main()
