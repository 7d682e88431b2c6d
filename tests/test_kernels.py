"""kernels/: label log-probs (+ entropy, + gradients) against a float64 reference, both backends.

The Triton path runs here through the Triton interpreter (TRITON_INTERPRET=1, CPU tensors), with the vocabulary
block shrunk to 128 so that V=300 takes 3 blocks, the last one partial. The interpreter is slow, so those cases are
small. The real GPU build is checked ahead of time: every kernel is compiled for sm_80 and sm_90 and its cubin must
show no stack and no local memory (no register spills).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The interpreter is chosen when the kernels are defined (at import), so set it before kernels.logprob_triton is
# imported; restore the environment afterwards (the interpreter tests set it again while they run).
# (Run as `python tests/test_kernels.py --aot`, this file is the AOT-compile child below and must not interpret.)
HAVE_TRITON = importlib.util.find_spec("triton") is not None
AOT_CHILD = __name__ == "__main__" and sys.argv[1:] == ["--aot"]
if HAVE_TRITON:
    _saved = os.environ.get("TRITON_INTERPRET")
    if not AOT_CHILD:
        os.environ["TRITON_INTERPRET"] = "1"
    import kernels.logprob_triton as KT  # noqa: E402

    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import kernels  # noqa: E402
import kernels.logprob_torch as KP  # noqa: E402

IGNORE = -100
needs_interpreter = pytest.mark.skipif(
    not HAVE_TRITON or not KT.interpreting(),
    reason="triton missing, or kernels.logprob_triton was imported before TRITON_INTERPRET=1 could be set",
)


# ----------------------------------------------------------------------------------------------------------------
# float64 reference: the textbook formula, independent of the chunked code


def reference(logits64, labels, temperature):
    """logits64 (N, V) float64 -> logp (N,), entropy (N,) with ignored rows 0."""
    lp = torch.log_softmax(logits64 / temperature, dim=-1)
    keep = labels != IGNORE
    logp = lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * keep
    ent = -(lp.exp() * lp).sum(-1) * keep
    return logp, ent


def make_case(N, H, V, dtype, seed, n_ignored=2):
    """Random hidden / weight (never zeros) with logits of order 2, labels with some ignored rows, upstream grad."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE
    grad_out = torch.randn(N, generator=g)
    return hidden, weight, labels, grad_out


def fused_and_grads(fn, hidden, weight, labels, grad_out, temperature, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = fn(h, w, labels, temperature, return_entropy=True, **kw)
    gh, gw = torch.autograd.grad((logp * grad_out.to(logp.dtype)).sum(), (h, w))
    return logp.detach(), ent, gh, gw


def reference_fused(hidden, weight, labels, grad_out, temperature):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logp, ent = reference(h @ w.T, labels, temperature)
    gh, gw = torch.autograd.grad((logp * grad_out.double()).sum(), (h, w))
    return logp.detach(), ent.detach(), gh, gw


def max_rel(a, b):
    """Largest error relative to the largest reference entry (entries near 0 do not blow it up)."""
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


# Tolerances.
# fp32 math: summing V=300 exponentials in fp32 has relative error below log2(V) * 2^-24 ~ 5e-7, and logp, lse are
# O(10); 1e-5 absolute on logp / entropy and 1e-5 relative (to the largest entry) on gradients leave a 10x margin.
FP32_ATOL, FP32_REL = 1e-5, 1e-5
# bf16 inputs, fused path: the hidden and weight values are exact in the reference (it uses the same bf16 numbers in
# float64), but the bf16 matmul rounds each logit once (bf16 keeps 8 significant bits: unit roundoff 2^-8; |z| <= ~8
# here, so |dz| <= 0.03), and the gradient chunk G and the matmul outputs are rounded to bf16 again (2^-8 relative
# each). logp = z_y - lse moves by at most 2 max|dz| ~ 0.06 in the worst case, ~0.03 seen; gradients: p = exp(z - lse)
# moves by a relative ~2 |dz| plus two roundings. Bounds: 0.08 absolute on logp / entropy, 0.05 relative to the
# largest gradient entry (the errors are not all worst case at once).
BF16_FUSED_ATOL, BF16_FUSED_REL = 0.08, 0.05
# bf16 logits given directly: the reference uses the same bf16 values, so logp / entropy see only fp32 math (as
# above), and the returned gradient is rounded to bf16 once (round to nearest: relative 2^-8 of each entry); 2^-7
# relative to the largest entry leaves a 2x margin for the fp32 part.
BF16_LOGITS_REL = 2.0**-7

TOL = {torch.float32: (FP32_ATOL, FP32_REL), torch.bfloat16: (BF16_FUSED_ATOL, BF16_FUSED_REL)}


def check_fused(module, dtype, temperature, chunk_size, seed):
    hidden, weight, labels, grad_out = make_case(N=11, H=24, V=300, dtype=dtype, seed=seed)
    got = fused_and_grads(
        module.fused_linear_logprobs, hidden, weight, labels, grad_out, temperature, chunk_size=chunk_size
    )
    ref = reference_fused(hidden, weight, labels, grad_out, temperature)
    atol, rel = TOL[dtype]
    ignored = labels == IGNORE
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()  # ignored rows get no gradient
    assert (got[0].double() - ref[0]).abs().max() < atol, "logp"
    assert (got[1].double() - ref[1]).abs().max() < atol, "entropy"
    assert max_rel(got[2], ref[2]) < rel, "grad hidden"
    assert max_rel(got[3], ref[3]) < rel, "grad weight"
    assert got[2].dtype == dtype and got[3].dtype == dtype


def check_logits(module, dtype, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 3, 300, generator=g) * 3).to(dtype)  # (B, T, V), 3D on purpose
    labels = torch.randint(0, 300, (2, 3), generator=g)
    labels[0, 1] = labels[1, 2] = IGNORE
    grad_out = torch.randn(2, 3, generator=g)
    x = logits.clone().requires_grad_()
    logp, ent = module.logprobs_from_logits(x, labels, temperature, return_entropy=True)
    (gx,) = torch.autograd.grad((logp * grad_out).sum(), x)
    x64 = logits.double().reshape(6, 300).requires_grad_()
    rlogp, rent = reference(x64, labels.reshape(6), temperature)
    (rgx,) = torch.autograd.grad((rlogp * grad_out.reshape(6).double()).sum(), x64)
    assert logp.shape == (2, 3) and logp.dtype == torch.float32 and gx.dtype == dtype
    assert (logp.reshape(6).double() - rlogp).abs().max() < FP32_ATOL  # same input values: fp32 math only
    assert (ent.reshape(6).double() - rent).abs().max() < FP32_ATOL
    rel = FP32_REL if dtype == torch.float32 else BF16_LOGITS_REL
    assert max_rel(gx.reshape(6, 300), rgx) < rel
    assert (gx[0, 1] == 0).all() and (gx[1, 2] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# PyTorch twin


@pytest.fixture
def partial_keep(monkeypatch):
    """Tiny cases fit CHUNK_BYTES, so forward would keep every block; without that floor it keeps KEEP_FRACTION of
    them and backward recomputes the rest, so both paths run."""
    monkeypatch.setattr(KP, "CHUNK_BYTES", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,chunk_size", [(1.0, None), (0.7, 4), (1.3, 3)])
def test_torch_fused_matches_float64(dtype, temperature, chunk_size):
    check_fused(KP, dtype, temperature, chunk_size, seed=1)


@pytest.mark.parametrize("temperature,chunk_size", [(0.7, 4), (1.3, 3)])
def test_torch_fused_partly_kept_matches_float64(partial_keep, temperature, chunk_size):
    check_fused(KP, torch.float32, temperature, chunk_size, seed=1)


def test_torch_fused_kept_blocks_far_below_the_max(partial_keep):
    """Kept blocks hold exp(z - m_b) and backward rescales by c = exp(m_b - lse), one scalar per row and block. Here
    the kept (leading) vocabulary blocks sit ~50 below each row's max, so c ~ e^-50 (small but a normal fp32
    number), and the labels of half the rows lie in those blocks, so their gradient is onehot - p with p ~ 0.
    fp32 with logits up to ~|70|: rounding of z itself is ~70 * 2^-24 ~ 4e-6, so logp gets 1e-4 absolute and the
    gradients the usual 1e-5 relative to their largest entry."""
    N, H, V, chunk = 12, 16, 256, 4
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    n = N - 2  # make_case-style: 2 rows ignored
    cols = KP.vocab_block_cols(n, V, 4, chunk_size=chunk)
    n_keep = KP.kept_blocks(n, V, 4, cols)
    assert 0 < n_keep < len(KP.vocab_blocks(V, cols))
    hidden[:, -1] = 1.0  # a constant feature ...
    weight[:, -1] = 0.0
    weight[n_keep * cols :, -1] = 50.0  # ... lifts the recomputed blocks by 50
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::2] = torch.randint(0, n_keep * cols, (N // 2,), generator=g)  # half the labels in kept blocks
    labels[[3, 8]] = IGNORE
    grad_out = torch.randn(N, generator=g)
    z = hidden @ weight.T
    gap = z[:, n_keep * cols :].amax(1) - z[:, : n_keep * cols].amax(1)
    assert (gap > 30).all(), gap  # the case is what it claims
    got = fused_and_grads(KP.fused_linear_logprobs, hidden, weight, labels, grad_out, 1.0, chunk_size=chunk)
    ref = reference_fused(hidden, weight, labels, grad_out, 1.0)
    assert (got[0].double() - ref[0]).abs().max() < 1e-4, "logp"
    assert (got[1].double() - ref[1]).abs().max() < 1e-4, "entropy"
    assert max_rel(got[2], ref[2]) < FP32_REL, "grad hidden"
    assert max_rel(got[3], ref[3]) < FP32_REL, "grad weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_torch_logits_matches_float64(dtype, temperature):
    check_logits(KP, dtype, temperature, seed=2)


def test_torch_gradcheck_float64(partial_keep):
    hidden, weight, labels, _ = make_case(N=7, H=5, V=13, dtype=torch.float64, seed=3)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: KP.fused_linear_logprobs(a, b, labels, 0.8, chunk_size=3), (h, w)
    )
    logits = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: KP.logprobs_from_logits(x, labels, 0.8), (logits,))


def test_torch_fused_second_backward_and_no_grad(partial_keep):
    """retain_graph: the first backward uses the blocks kept from forward, a second one recomputes every block from
    the same matmul, subtract and exp, so both see the same exp(z - m_b) and must agree exactly; log-probs under
    no_grad (nothing kept) too."""
    hidden, weight, labels, grad_out = make_case(N=10, H=8, V=50, dtype=torch.float32, seed=4)
    n = int((labels != IGNORE).sum())
    cols = KP.vocab_block_cols(n, 50, 4, chunk_size=4)
    assert 0 < KP.kept_blocks(n, 50, 4, cols) < len(KP.vocab_blocks(50, cols))  # some kept, some recomputed
    h = hidden.requires_grad_()
    logp = KP.fused_linear_logprobs(h, weight, labels, chunk_size=4)
    (g1,) = torch.autograd.grad((logp * grad_out).sum(), h, retain_graph=True)
    (g2,) = torch.autograd.grad((logp * grad_out).sum(), h)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    with torch.no_grad():
        again = KP.fused_linear_logprobs(h, weight, labels, chunk_size=4)
    torch.testing.assert_close(again, logp.detach(), rtol=0, atol=0)


def test_all_rows_ignored():
    hidden, weight, _, _ = make_case(N=4, H=8, V=20, dtype=torch.float32, seed=5)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    logp = kernels.fused_linear_logprobs(h, w, torch.full((4,), IGNORE))
    logp.sum().backward()
    assert (logp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


def test_bad_labels_and_backend_name(monkeypatch):
    hidden, weight, labels, _ = make_case(N=4, H=8, V=20, dtype=torch.float32, seed=6)
    labels[2] = 20
    with pytest.raises(ValueError, match=r"labels\[2\] \(flattened\) = 20"):
        kernels.fused_linear_logprobs(hidden, weight, labels)
    logp = kernels.fused_linear_logprobs(hidden, weight, torch.tensor([1, 2, 3, IGNORE], dtype=torch.int32))
    assert logp[3] == 0 and (logp[:3] < 0).all()  # int32 labels work too
    monkeypatch.setenv("KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNEL_BACKEND"):
        kernels.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]))
    monkeypatch.setenv("KERNEL_BACKEND", "auto")
    assert kernels.backend_for(torch.randn(2)) is KP  # CPU tensor: PyTorch twin


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(KT, "FWD_BLOCK_V", 128)
    monkeypatch.setattr(KT, "BWD_BLOCK_V", 128)
    monkeypatch.setenv("KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton also reads it at launch


@needs_interpreter
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_triton_fused_matches_float64(small_blocks, dtype, temperature):
    assert kernels.backend_for(torch.zeros(1)) is KT  # the dispatcher reaches Triton
    check_fused(kernels, dtype, temperature, chunk_size=4, seed=7)


@needs_interpreter
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.bfloat16, 0.6)])
def test_triton_logits_matches_float64(small_blocks, dtype, temperature):
    check_logits(kernels, dtype, temperature, seed=8)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time GPU build: no spills


def _cuobjdump():
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/cuda/bin"]:
        if (Path(d) / "cuobjdump").exists():
            return str(Path(d) / "cuobjdump")
    return None


# (kernel name, signature, constexprs): the production launch (bf16 logits, 4096-wide blocks), with the 16-byte
# alignment hints the JIT would attach to these pointers and to a stride / V of 151936 (a multiple of 16).
PTR_FWD = ["logits_ptr", "labels_ptr", "logp_ptr", "lse_ptr", "ent_ptr", "stride_row", "V"]
PTR_BWD = ["logits_ptr", "labels_ptr", "lse_ptr", "grad_ptr", "out_ptr", "stride_in", "stride_out", "V"]
AOT_CASES = [
    (
        "_logprob_fwd_kernel",
        {
            "logits_ptr": "*bf16",
            "labels_ptr": "*i64",
            "logp_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "ent_ptr": "*fp32",
            "stride_row": "i32",
            "V": "i32",
            "inv_t": "fp32",
            "IGNORE": "constexpr",
            "BLOCK_V": "constexpr",
            "WANT_ENTROPY": "constexpr",
        },
        {"IGNORE": IGNORE, "BLOCK_V": 4096, "WANT_ENTROPY": False},
        PTR_FWD,
    ),
    (
        "_logprob_fwd_kernel",
        {
            "logits_ptr": "*bf16",
            "labels_ptr": "*i64",
            "logp_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "ent_ptr": "*fp32",
            "stride_row": "i32",
            "V": "i32",
            "inv_t": "fp32",
            "IGNORE": "constexpr",
            "BLOCK_V": "constexpr",
            "WANT_ENTROPY": "constexpr",
        },
        {"IGNORE": IGNORE, "BLOCK_V": 4096, "WANT_ENTROPY": True},
        PTR_FWD,
    ),
    (
        "_logprob_bwd_kernel",
        {
            "logits_ptr": "*bf16",
            "labels_ptr": "*i64",
            "lse_ptr": "*fp32",
            "grad_ptr": "*fp32",
            "out_ptr": "*bf16",
            "stride_in": "i32",
            "stride_out": "i32",
            "V": "i32",
            "inv_t": "fp32",
            "IGNORE": "constexpr",
            "BLOCK_V": "constexpr",
        },
        {"IGNORE": IGNORE, "BLOCK_V": 4096},
        PTR_BWD,
    ),
]


def compile_and_dump(arch, case):
    """AOT-compile one kernel for sm_<arch> and return cuobjdump's resource line as a dict (REG, SHARED, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs, aligned = case
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=getattr(KT, name), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": KT.NUM_WARPS})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return dict(re.findall(r"(\w+):(\d+)", line))


@pytest.fixture(scope="module")
def aot_usage():
    """All AOT builds, in a child process: the interpreter patches triton.language in this one, which breaks real
    compilation, so the child imports the kernels without TRITON_INTERPRET."""
    if _cuobjdump() is None:
        pytest.skip(
            "cuobjdump not found: not in triton/backends/nvidia/bin/ nor on PATH nor /usr/local/cuda/bin"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a deprecation warning
    res = subprocess.run(
        [sys.executable, __file__, "--aot"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(
    "index",
    range(len(AOT_CASES)),
    ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}" for c in AOT_CASES],
)
def test_triton_kernels_compile_without_spills(aot_usage, arch, index):
    name, _, constexprs, _ = AOT_CASES[index]
    usage = aot_usage[f"{arch}/{index}"]
    print(
        f"sm_{arch} {name} {constexprs}: registers {usage['REG']}, shared {usage['SHARED']} bytes, "
        f"stack {usage['STACK']}, local {usage['LOCAL']}"
    )
    assert usage["STACK"] == "0" and usage["LOCAL"] == "0", f"register spills: {usage}"


if AOT_CHILD:
    print(
        json.dumps(
            {
                f"{arch}/{i}": compile_and_dump(arch, case)
                for arch in (80, 90)
                for i, case in enumerate(AOT_CASES)
            }
        )
    )
