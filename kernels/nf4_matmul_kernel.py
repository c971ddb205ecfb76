"""NF4 matmul in Triton: y = x @ dequantize(W).T + bias, with dequantization fused into the GEMM.

Lesson
------
Motivation. In QLoRA every frozen Linear layer stores W (N, K) = (out_features, in_features) as NF4 and
computes y = x W^T + b for activations x (M, K), M = batch * tokens. The obvious way,

    W16 = dequantize(W)          reads 0.52 B/weight, WRITES 2 B/weight of bf16 to memory
    y = x @ W16.T                reads the 2 B/weight back (and x)

moves 4.5 bytes per weight to use a weight that is stored in 0.52. When M is small (decoding, M = 1..64)
the matmul is bound by memory traffic, so those extra 4 bytes make it up to ~8x slower than it could be.
Fusing means: load the packed 4-bit tile of W, decode it in registers, and feed it straight to the tensor
cores, so W crosses the memory bus once, at 4.127 bits per weight.

The naive reference (`nf4_matmul_reference`) is exactly the two lines above (the spec and CPU fallback).

Three paths, picked by the number of rows M of x (after flattening x (..., K) to (M, K)):

    M <= GEMV_MAX_ROWS (4)   nf4_gemv_kernel.py: matrix-vector kernel on CUDA cores, one row of x per program
    M  > GEMV_MAX_ROWS       the fused GEMM below: tiles of (N, M), K loop, tl.dot with fp32 accumulation
    K % blocksize != 0       dequantize kernel + F.linear (a quantization block would straddle two rows)
    M >= LARGE_M_DEQUANTIZE_ROWS (off until measured, see Discussion): dequantize kernel + cuBLAS

The fused GEMM, one program per (BLOCK_N, BLOCK_M) tile of y^T:

          K (in steps of BLOCK_K)                                  y^T tile (BLOCK_N, BLOCK_M)
    W    [bytes (BLOCK_N, BLOCK_K/2)] --unpack, x scale--> w (BLOCK_N, BLOCK_K) bf16 --.
                                                                                       tl.dot, fp32 acc
    x^T  [x tile (BLOCK_K, BLOCK_M)] ------------------------------------------------'

* K is a multiple of the blocksize and of BLOCK_K (the autotuner only offers such tiles; both are powers
  of two), so a row of a W tile either lies inside one quantization block or covers whole blocks: its
  scales are a (BLOCK_N, max(1, BLOCK_K / blocksize)) array, computed once per K step in nf4_decode_tile
  and broadcast over the row. It also means no K tail and no K masks in the main loop.
* We compute y^T = W x^T rather than y = x W^T. The decoded W tile lives in registers, and Hopper's
  wgmma instruction takes its left operand from registers but its right operand from shared memory;
  with W on the left, only x takes the trip through shared memory (which Triton's pipeliner fills
  asynchronously). It is the same arithmetic; only the store is transposed.
* W is rounded to x's dtype before the dot, exactly as nf4_dequantize(q, x.dtype) would round it, so
  the fused result equals dequantize-then-matmul up to the order of the fp32 additions.
* Programs are grouped (GROUP_M, as in the Triton matmul tutorial) so that programs running at the same
  time share tiles of x and W in L2.

Backward (nf4_matmul_backward_kernel.py): grad_x = grad_y @ W, a product whose reduction runs along N.
`NF4MatmulFunction` ties both together for autograd: no weight gradient (W is frozen), a bias gradient
when the bias requires one.

Discussion
----------
* Where fusion pays: every program dequantizes its W tile, so W is decoded ceil(M / BLOCK_M) times. For
  decoding-size M that is once or twice and the kernel runs at the speed of reading 4 bits per weight.
  For training-size M (thousands of rows) decoding is repeated per M tile and competes with the tensor
  cores for issue slots, while dequantize-then-cuBLAS decodes once (bitsandbytes switches to that above
  a few hundred to 1536 rows, per GPU). benchmarks/bench_nf4.py times both ("minift-triton" and
  "minift-dequant+cublas"); LARGE_M_DEQUANTIZE_ROWS below is the switch-over point to set from them.
* Decoding cost: per weight, one 4-bit shift/mask and one gather from the 64-byte NF4 table (an L1 hit).
  Compiled for sm_90, the GEMM uses wgmma with the decoded W as the register operand, and Triton's
  pipeliner prefetches the table gathers with cp.async into shared memory together with the x tiles
  (about 100 KB of shared memory for a 128 x 128 x 64 tile in 3 stages). A register-held table read with
  tl.gather avoids the prefetch copies but adds barriers per K step: one of the things to measure.
* float32 inputs: tl.dot uses IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set, the same
  rule as torch.matmul, so float32 results match F.linear's precision.
* Registers and shared memory of every tile, dtype and GPU generation are checked without a GPU
  (kernels/aot.py compiles them for sm_80 and sm_90; benchmarks/results/kernels_static.md lists them). The
  tiles were picked for Hopper and bf16, yet 2 of the 17 spill registers there, 5 on Ampere, and with
  float32 operands most large tiles spill (an IEEE float32 dot runs on the CUDA cores, with twice the
  register bytes per operand); the largest float32 backward tile also needs more shared memory than an
  A100 block has. Rather than shrink the list for every GPU and dtype, the autotuner leaves a tile out only
  where it spills: triton_support.spill_free reads kernels/spilling_configs.py (per kernel, target, dtype),
  which benchmarks/kernels_static.py writes and tests/test_aot_compile.py checks against the compiler.
  No tile the autotuner can pick spills registers or overflows shared memory.
* Triton's interpreter (TRITON_INTERPRET=1, our CPU tests) multiplies bfloat16 dot operands as raw
  uint16 bit patterns (triton-lang/triton#11584), so under the interpreter the operands are upcast to
  float32 just before tl.dot (DOT_DTYPE). The upcast is exact, so the result is the one a bf16 tensor
  core with fp32 accumulation computes; compiled kernels keep bf16 operands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nf4_dequantize_kernel import (OUTPUT_DTYPES, check_nf4_tensor, dot_arguments, fused_path_supported,
                                    matmul_aot_cases, nf4_decode_tile, nf4_dequantize, nf4_dequantize_reference,
                                    quant_state_arguments)
from .nf4_gemv_kernel import nf4_gemv
from .nf4_matmul_backward_kernel import nf4_matmul_backward_input
from .triton_support import (interpreter_rows_tile, is_interpreted, largest_power_of_2_dividing, next_power_of_2,
                             tile_configs, tile_pruner, tl, triton, use_triton)

GEMV_MAX_ROWS = 4  # M <= this: the matrix-vector kernel (nf4_gemv_kernel.py)
LARGE_M_DEQUANTIZE_ROWS = None  # M >= this: dequantize + cuBLAS instead of fused (None: always fused)

# --------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------


def nf4_matmul_reference(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantize(W), bias) in plain torch: x (..., K), W (N, K) -> (..., N)."""
    weight = nf4_dequantize_reference(q, x.dtype)  # (N, K): writes N*K*2 bytes, then reads them back
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # (..., N)


# --------------------------------------------------------------------------------------------------
# The fused GEMM kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, dynamic_map_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET = next power of 2 of M: only an autotuning key
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M tiles of x rows sweep the N tiles together (L2 reuse).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x / of y
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W / columns of y
    m_valid = rows_m < M  # (BM,)
    n_valid = rows_n < N  # (BN,)
    HALF_K: tl.constexpr = BLOCK_K // 2  # packed bytes per W row per K step

    # Pointers at k = 0: x^T tile (BK, BM) and the packed W tile (BN, BK/2). int64: large layers.
    x_ptrs = x_ptr + rows_m[None, :].to(tl.int64) * K + tl.arange(0, BLOCK_K)[:, None]  # (BK, BM)
    w_ptrs = packed_ptr + rows_n[:, None].to(tl.int64) * (K // 2) + tl.arange(0, HALF_K)[None, :]  # (BN, BK/2)
    first_block = rows_n.to(tl.int64) * (K // BLOCKSIZE)  # (BN,) quantization block of W[n, 0]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile, fp32 accumulator
    for k in range(0, K, BLOCK_K):  # K % BLOCK_K == 0: no K masks
        x_t = tl.load(x_ptrs, mask=m_valid[None, :], other=0.0)  # (BK, BM) in x's dtype
        packed_bytes = tl.load(w_ptrs, mask=n_valid[:, None], other=0)  # (BN, BK/2) uint8, 2 weights each
        w = nf4_decode_tile(packed_bytes, first_block, k, n_valid, code_ptr, absmax_ptr, nested_absmax_ptr,
                            offset_ptr, dynamic_map_ptr, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE,
                            DOUBLE_QUANT)  # (BN, BK) float32, one scale per row and quantization block
        w = w.to(x_ptr.dtype.element_ty)  # round like nf4_dequantize(q, x.dtype)
        acc = tl.dot(w.to(DOT_DTYPE), x_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)  # (BN, BM)
        x_ptrs += BLOCK_K
        w_ptrs += HALF_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_valid, other=0.0).to(tl.float32)[:, None]  # (BN, 1)
    y_ptrs = y_ptr + rows_m[None, :].to(tl.int64) * N + rows_n[:, None]  # (BN, BM): y is (M, N) row-major
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_valid[:, None] & m_valid[None, :])


# CUDA (H100-oriented) tile shapes: (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages).
GEMM_TILES = [
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 32, 64, 4, 5),
    (128, 16, 64, 4, 4), (64, 16, 64, 4, 5), (32, 16, 64, 2, 5), (128, 128, 128, 8, 3),
    (64, 16, 128, 4, 4), (128, 16, 128, 4, 4), (64, 32, 128, 4, 4),  # small M: more bytes per K step
    (64, 64, 32, 4, 5), (64, 16, 32, 4, 5),  # K a multiple of 32 only (blocksize 32)
]

_nf4_matmul_autotuned = triton.autotune(
    configs=tile_configs(GEMM_TILES, ("BLOCK_N", "BLOCK_M", "BLOCK_K")),
    key=["N", "K", "M_BUCKET", "BLOCKSIZE", "DOUBLE_QUANT", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": tile_pruner("_nf4_matmul_kernel", "x_ptr")},  # no spilling tiles
)(_nf4_matmul_kernel)


def _launch_gemm(x2d: torch.Tensor, q, bias: torch.Tensor | None) -> torch.Tensor:
    M, K = x2d.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)  # (M, N)
    arguments = dict(
        x_ptr=x2d, packed_ptr=q.packed, bias_ptr=bias if bias is not None else x2d, y_ptr=y,
        M=M, N=N, K=K, M_BUCKET=next_power_of_2(M), HAS_BIAS=bias is not None,
        **quant_state_arguments(q, x2d.device), **dot_arguments(x2d.dtype, _nf4_matmul_kernel),
    )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if is_interpreted(_nf4_matmul_kernel):  # one fixed, large tile: the interpreter pays per program
        tile = dict(BLOCK_N=256, BLOCK_M=interpreter_rows_tile(M), BLOCK_K=largest_power_of_2_dividing(K, 512),
                    GROUP_M=8)
        _nf4_matmul_kernel[grid(tile)](**arguments, **tile, enable_fp_fusion=False)
    else:
        _nf4_matmul_autotuned[grid](**arguments, enable_fp_fusion=False)
    return y


# --------------------------------------------------------------------------------------------------
# Launchers and dispatch
# --------------------------------------------------------------------------------------------------


def check_matmul_inputs(x: torch.Tensor, q, bias: torch.Tensor | None) -> None:
    check_nf4_tensor(q)
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul: the NF4 weight must be 2-D (out_features, in_features), got {tuple(q.shape)}")
    N, K = q.shape
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != K:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"nf4_matmul: x must have shape (..., {K}) to match the weight ({N}, {K}), got {shape}")
    if x.dtype not in OUTPUT_DTYPES:
        raise ValueError(f"nf4_matmul: x must be one of {OUTPUT_DTYPES}, got {x.dtype}")
    if x.device != q.packed.device:
        raise ValueError(f"nf4_matmul: x is on {x.device} but the NF4 weight is on {q.packed.device}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.device != x.device):
        raise ValueError(f"nf4_matmul: bias must have shape ({N},) on {x.device}, "
                         f"got {tuple(bias.shape)} on {bias.device}")


def nf4_matmul_forward(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequantize(q).T + bias -> (..., N), without autograd (see nf4_matmul)."""
    check_matmul_inputs(x, q, bias)
    if not use_triton(_nf4_matmul_kernel, x):
        return nf4_matmul_reference(x, q, bias)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    N, K = q.shape
    x2d = x.reshape(-1, K).contiguous()  # (M, K)
    M = x2d.shape[0]
    large = LARGE_M_DEQUANTIZE_ROWS is not None and M >= LARGE_M_DEQUANTIZE_ROWS
    if M == 0 or large or not fused_path_supported(q):
        y = F.linear(x2d, nf4_dequantize(q, x.dtype), bias)  # (M, N)
    elif M <= GEMV_MAX_ROWS:
        y = nf4_gemv(x2d, q, bias)  # (M, N)
    else:
        y = _launch_gemm(x2d, q, bias)  # (M, N)
    return y.reshape(*x.shape[:-1], N)


class NF4MatmulFunction(torch.autograd.Function):
    """y = x @ dequantize(W).T + b for a frozen NF4 weight W: gradients for x and b, none for W.

        dL/dx = dL/dy @ W              (..., N) @ (N, K) -> (..., K)   nf4_matmul_backward_input
        dL/db = sum over rows of dL/dy (N,)
    The input x is not saved (grad_x needs only W) and neither is a dense W: the backward keeps a
    reference to the NF4 weight and decodes it again on the fly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.q = q
        ctx.bias_dtype = None if bias is None else bias.dtype
        return nf4_matmul_forward(x, q, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul_backward_input(grad_y, ctx.q)  # (..., K)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            rows = grad_y.reshape(-1, grad_y.shape[-1]).float()  # (M, N), summed in fp32
            grad_bias = rows.sum(dim=0).to(ctx.bias_dtype)  # (N,)
        return grad_x, None, grad_bias


def nf4_matmul(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = F.linear(x, dequantize(q, x.dtype), bias) with NF4 weight q (N, K); x (..., K) -> (..., N).

    Differentiable in x and bias (not in the frozen weight). Runs Triton on a GPU (or under
    TRITON_INTERPRET=1) and the pure-torch reference on a CPU.
    """
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        check_matmul_inputs(x, q, bias)
        return NF4MatmulFunction.apply(x, q, bias)
    return nf4_matmul_forward(x, q, bias)


def aot_cases() -> list:
    """The GPU specializations of the fused GEMM (compiled by kernels/aot.py), see matmul_aot_cases."""
    return matmul_aot_cases("nf4_matmul_kernel", "_nf4_matmul_kernel", GEMM_TILES, ("BLOCK_N", "BLOCK_M", "BLOCK_K"),
                            "x_ptr", "y_ptr", has_bias=True)
