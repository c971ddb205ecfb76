"""minift.kernels: Triton GPU kernels, each beside its pure-torch reference.

Every kernel here is a set of four (DESIGN.md, principle 2): a pure-torch `<op>_reference` that is the
spec and the CPU fallback, the Triton kernel with its launcher and autograd.Function, a test on irregular
shapes (run on the CPU under TRITON_INTERPRET=1), and a benchmark against torch and the reference library.
Nothing is decided at import time: Triton is imported lazily, only when a kernel is launched.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it. Importing a submodule imports Triton and decorates its kernels (which
# is when Triton reads TRITON_INTERPRET), so each public function below imports its module on first call.
# The modules are named <op>_kernel.py: a submodule named like a function of this package would replace
# that function (`minift.kernels.nf4_matmul`) by the module the moment it is imported.
_EXPORTS = {
    "nf4_dequantize": "nf4_dequantize_kernel",
    "nf4_dequantize_reference": "nf4_dequantize_kernel",
    "nf4_matmul": "nf4_matmul_kernel",
    "nf4_matmul_reference": "nf4_matmul_kernel",
    "nf4_matmul_backward_input": "nf4_matmul_backward_kernel",
    "nf4_matmul_backward_input_reference": "nf4_matmul_backward_kernel",
    "NF4MatmulFunction": "nf4_matmul_kernel",
    "cross_entropy_rows": "fused_linear_cross_entropy_kernel",
    "cross_entropy_rows_reference": "fused_linear_cross_entropy_kernel",
}


def _load(name: str):
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def nf4_dequantize(q, dtype=None):
    """NF4Tensor -> dense tensor (Triton on a GPU, pure torch on a CPU). See kernels/nf4_dequantize_kernel.py."""
    return _load("nf4_dequantize")(q, dtype)


def nf4_dequantize_reference(q, dtype=None):
    """Pure-torch NF4 dequantization: the spec of nf4_dequantize."""
    return _load("nf4_dequantize_reference")(q, dtype)


def nf4_matmul(x, q, bias=None):
    """F.linear(x, dequantize(q), bias) with the dequantization fused; differentiable in x and bias.

    See kernels/nf4_matmul_kernel.py.
    """
    return _load("nf4_matmul")(x, q, bias)


def nf4_matmul_reference(x, q, bias=None):
    """Pure-torch spec of nf4_matmul: dequantize, then F.linear."""
    return _load("nf4_matmul_reference")(x, q, bias)


def nf4_matmul_backward_input(grad_y, q):
    """grad_x = grad_y @ dequantize(q), W decoded on the fly. See kernels/nf4_matmul_backward_kernel.py."""
    return _load("nf4_matmul_backward_input")(grad_y, q)


def nf4_matmul_backward_input_reference(grad_y, q):
    """Pure-torch spec of nf4_matmul_backward_input."""
    return _load("nf4_matmul_backward_input_reference")(grad_y, q)


def cross_entropy_rows(logits, targets, row_scale=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
                       compute_grad=True):
    """Per-row cross-entropy (R,) and log-sum-exp (R,) of logits (R, V), the gradient written over the logits
    (Triton). The per-chunk step of the fused linear cross-entropy; see kernels/fused_linear_cross_entropy_kernel.py.
    """
    return _load("cross_entropy_rows")(logits, targets, row_scale, ignore_index, label_smoothing, softcap,
                                       compute_grad)


def cross_entropy_rows_reference(logits, targets, row_scale=None, ignore_index=-100, label_smoothing=0.0,
                                 softcap=None, compute_grad=True):
    """Pure-torch spec of cross_entropy_rows (the CPU path of minift/fused_loss.py)."""
    return _load("cross_entropy_rows_reference")(logits, targets, row_scale, ignore_index, label_smoothing, softcap,
                                                 compute_grad)


def __getattr__(name: str):
    """Classes (NF4MatmulFunction) load lazily on attribute access (PEP 562)."""
    if name in _EXPORTS:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
