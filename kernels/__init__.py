"""Label log-probabilities without materializing full logits. The one import for callers:

    from kernels import fused_linear_logprobs, logprobs_from_logits

    fused_linear_logprobs(hidden (N, H), weight (V, H), labels (N,), temperature=1.0, chunk_size=None,
                          return_entropy=False) -> logprobs (N,) float32 [, entropy (N,) float32, detached]
    logprobs_from_logits(logits (..., V), labels (...), temperature=1.0, return_entropy=False) -> (...) float32

Labels equal to -100 mark ignored rows: log-prob 0, entropy 0, no gradient.

Backend, chosen per call from the environment variable KERNEL_BACKEND:
    auto   (default) Triton for CUDA tensors when triton imports, else PyTorch
    triton the Triton kernels (logprob_triton.py); on CPU tensors only under TRITON_INTERPRET=1 (how tests run it)
    torch  the PyTorch twin (logprob_torch.py): same math, same signatures
logprob_triton.py is imported only when first needed, so CPU-only callers never import triton.
"""

import os

from . import logprob_torch

BACKENDS = ("auto", "triton", "torch")
_triton_module = None
_triton_error = None


def _triton():
    """The Triton backend module, or None if triton does not import (the reason is kept in _triton_error)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import logprob_triton

            _triton_module = logprob_triton
        except ImportError as e:
            _triton_error = e
    return _triton_module


def backend_for(tensor):
    """The module (logprob_torch or logprob_triton) that handles `tensor` under the current KERNEL_BACKEND."""
    choice = os.environ.get("KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"KERNEL_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return logprob_torch
    if choice == "auto":
        return (_triton() or logprob_torch) if tensor.is_cuda else logprob_torch
    module = _triton()
    if module is None:
        raise RuntimeError(f"KERNEL_BACKEND=triton but triton does not import: {_triton_error}")
    if not tensor.is_cuda and not module.interpreting():
        raise RuntimeError(
            "KERNEL_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before kernels is "
            "first used (the Triton interpreter), or CUDA tensors"
        )
    return module


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, chunk_size=None, return_entropy=False):
    return backend_for(hidden).fused_linear_logprobs(
        hidden, weight, labels, temperature, chunk_size, return_entropy
    )


def logprobs_from_logits(logits, labels, temperature=1.0, return_entropy=False):
    return backend_for(logits).logprobs_from_logits(logits, labels, temperature, return_entropy)


fused_linear_logprobs.__doc__ = logprob_torch.fused_linear_logprobs.__doc__
logprobs_from_logits.__doc__ = logprob_torch.logprobs_from_logits.__doc__
__all__ = ["fused_linear_logprobs", "logprobs_from_logits", "backend_for"]
