"""Triton if it is installed, stand-ins if it is not, and the one rule for when a kernel runs.

Triton is Linux-only, but every kernel file in minift.kernels also holds the pure-torch reference that
is the CPU fallback, and those references must import everywhere. So the kernel files import Triton
from here: with Triton installed these are the real `triton` and `triton.language`; without it they
are stand-ins whose decorators return the function unchanged, so the module still imports (the kernel
bodies are never called: `use_triton` says no).

When does a kernel run instead of its reference?

    tensor on a GPU                                -> compiled Triton kernel
    TRITON_INTERPRET=1 when the kernel was defined -> Triton interpreter (numpy, any device; the tests)
    otherwise (a CPU tensor, or no Triton)         -> the pure-torch reference

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, i.e. when a kernel module is
imported. That is why `minift.kernels` imports its kernel modules lazily, and why `is_interpreted`
asks the kernel object itself rather than the environment.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

    class _StandInTriton:
        """Just enough of `triton` for kernel modules to import: decorators that change nothing."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(configs, key, **options):
            return lambda fn: fn

        @staticmethod
        def Config(kwargs, **options):  # noqa: N802 - mirrors triton.Config
            return kwargs

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _StandInLanguage:
        constexpr = int  # only used in annotations when Triton is missing

    triton = _StandInTriton()
    tl = _StandInLanguage()


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs in numpy on any device)."""
    return HAS_TRITON and type(kernel).__name__ == "InterpretedFunction"


def use_triton(kernel, tensor: torch.Tensor) -> bool:
    """Run `kernel` on `tensor` (GPU, or interpreter), or fall back to the pure-torch reference."""
    return HAS_TRITON and (tensor.is_cuda or is_interpreted(kernel))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def largest_power_of_2_dividing(n: int, at_most: int) -> int:
    """The largest power of two <= at_most that divides n (tile widths that need no tail masks)."""
    width = 1
    while width * 2 <= at_most and n % (width * 2) == 0:
        width *= 2
    return width


def interpreter_rows_tile(m: int) -> int:
    """BLOCK_M for the interpreter: as small as tl.dot allows for small M (numpy pays for padded rows)."""
    return min(64, max(16, next_power_of_2(m)))


def tile_configs(shapes: list[tuple[int, int, int, int, int]], order: tuple[str, str, str]) -> list:
    """One triton.Config per (three tile sizes named by `order`, warps, stages); all launch with GROUP_M = 8
    (programs walk output tiles in groups of 8 rows, so neighbours share the W tiles they read from L2)."""
    return [triton.Config({**dict(zip(order, shape[:3])), "GROUP_M": 8}, num_warps=shape[3], num_stages=shape[4])
            for shape in shapes]


def prune_tile_configs(configs, named_args, **kwargs) -> list:
    """Autotuning's early prune for the NF4 matmuls: keep tiles whose BLOCK_K divides K (no K tail, so no
    masks on the reduction or output edge) and whose BLOCK_M is not far above M (its bucket, M_BUCKET).
    If no tile fits, the last K-dividing one (the configs end with the smallest tiles)."""
    K, m_bucket = kwargs["K"], kwargs["M_BUCKET"]
    fits = [c for c in configs if K % c.kwargs["BLOCK_K"] == 0]
    return [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m_bucket)] or fits[-1:]


DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
COMPILE_TARGETS = {8: "sm_80", 9: "sm_90"}  # GPU major version -> the target kernels/aot.py compiled for


def config_label(kwargs: dict, num_warps: int, num_stages: int) -> str:
    """'BLOCK_N=128 BLOCK_M=64 BLOCK_K=64 GROUP_M=8 w4 s4': how kernels/aot.py and its tables name a config."""
    return " ".join(f"{k}={v}" for k, v in kwargs.items()) + f" w{num_warps} s{num_stages}"


def dtype_label(dtype: torch.dtype, dot_precision: str | None = None) -> str:
    """'bf16', 'fp16', 'fp32' (IEEE dot) or 'fp32-tf32': the dtype column of kernels/aot.py's cases."""
    name = DTYPE_NAMES[str(dtype)]
    return name + "-tf32" if name == "fp32" and dot_precision == "tf32" else name


def spill_free(configs: list, kernel: str, tensor: torch.Tensor, dot_precision: str | None = None) -> list:
    """`configs` without those kernels/spilling_configs.py lists for this kernel, dtype and GPU generation
    (they spill registers when compiled for it); all of them if that would leave none."""
    from .spilling_configs import SPILLING

    if not tensor.is_cuda:
        return configs
    target = COMPILE_TARGETS.get(torch.cuda.get_device_capability(tensor.device)[0])
    spilling = set(SPILLING.get(kernel, {}).get(target, {}).get(dtype_label(tensor.dtype, dot_precision), ()))
    return [c for c in configs if config_label(c.kwargs, c.num_warps, c.num_stages) not in spilling] or configs


def tile_pruner(kernel: str, activation: str):
    """prune_tile_configs after dropping the configs that spill (spill_free) for `kernel`'s `activation`."""

    def prune(configs, named_args, **kwargs) -> list:
        tensor = kwargs.get(activation, named_args.get(activation))
        return prune_tile_configs(spill_free(configs, kernel, tensor, kwargs.get("DOT_PRECISION")), named_args,
                                  **kwargs)

    return prune
