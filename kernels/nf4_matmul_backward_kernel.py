"""The backward of an NF4 linear layer in Triton: grad_x = grad_y @ dequantize(W), W decoded on the fly.

Lesson
------
Motivation. QLoRA trains adapters on top of a frozen NF4 layer y = x W^T + b, so the backward pass needs
the gradient with respect to the layer's input (to keep back-propagating into earlier adapters), never
with respect to W:

    dL/dx (M, K) = dL/dy (M, N) @ W (N, K)          (chain rule through y = x W^T)

The naive reference (`nf4_matmul_backward_input_reference`) again dequantizes W to a full bf16 matrix
(writes and re-reads 2 bytes per weight) and calls a matmul. The kernel decodes W tiles in registers.

What changes from the forward. In y = x W^T the reduction runs along K, the direction in which W is
stored and quantized. Here the reduction runs along N, ACROSS the rows of W:

                 K  ->                                       grad_x^T tile (BLOCK_K, BLOCK_M)
    W      n0  [ row n0,   columns k0..k0+BK ]  scales of row n0      +=  W_tile^T (BK, BN)
           n0+1[ row n0+1, columns k0..k0+BK ]  scales of row n0+1        @ grad_y^T tile (BN, BM)
           ...        (loop over n in steps of BLOCK_N)

A program owns a (BLOCK_M, BLOCK_K) tile of grad_x and walks down the rows of W. The W tile of each step
is the same kind of tile the forward decodes (BLOCK_N rows, BLOCK_K columns starting at a multiple of
BLOCK_K, K a multiple of both BLOCK_K and the blocksize), so nf4_decode_tile decodes it unchanged, with
one scale per (row, quantization block), and no transposed copy of W is ever stored. The tails are now
along N (masked rows of W and columns of grad_y); K needs no masks.

As in the forward, the decoded W (transposed, in registers) is the left operand of tl.dot and the loaded
grad_y tile the right one, so on Hopper only grad_y passes through shared memory.

Discussion
----------
* grad_x has the dtype of grad_y (the activations' dtype); accumulation is fp32 and W is rounded to that
  dtype before the dot, as dequantize-then-matmul would round it.
* The bias gradient (a column sum of grad_y) and the choice to skip the weight gradient live in
  NF4MatmulFunction (nf4_matmul_kernel.py).
* Output tiles are BLOCK_K wide along K (64-256 in the autotuning configs): when BLOCK_K exceeds the
  blocksize, a row of the W tile carries BLOCK_K / blocksize scales, broadcast by nf4_decode_tile.
* Compiled for sm_90 (checked without a GPU through triton.compile), the dot lowers to wgmma with the
  decoded W^T as the register operand.
* Tiles that spill registers, or need more shared memory than a block has, on one GPU generation for one
  dtype (mostly float32 with an IEEE dot on sm_80) are left out of autotuning there, as in the forward
  (nf4_matmul_kernel.py, Discussion; kernels/spilling_configs.py).
"""

from __future__ import annotations

import torch

from .nf4_dequantize_kernel import (OUTPUT_DTYPES, check_nf4_tensor, dot_arguments, fused_path_supported,
                                    matmul_aot_cases, nf4_decode_tile, nf4_dequantize, nf4_dequantize_reference,
                                    quant_state_arguments)
from .triton_support import (interpreter_rows_tile, is_interpreted, largest_power_of_2_dividing, next_power_of_2,
                             tile_configs, tile_pruner, tl, triton, use_triton)


def nf4_matmul_backward_input_reference(grad_y: torch.Tensor, q) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W) in plain torch: grad_y (..., N), W (N, K) -> (..., K)."""
    weight = nf4_dequantize_reference(q, grad_y.dtype)  # (N, K): writes 2 B/weight, then reads them back
    return grad_y @ weight  # (..., K)


@triton.jit
def _nf4_matmul_backward_input_kernel(
    grad_y_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, dynamic_map_ptr, grad_x_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET = next power of 2 of M: only an autotuning key
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order over the (M, K) tiles of grad_x, as in the forward kernel.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = K // BLOCK_K
    programs_per_group = GROUP_M * tiles_k
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_k = (pid % programs_per_group) // group_rows

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of grad_y / grad_x
    m_valid = rows_m < M  # (BM,)
    HALF_K: tl.constexpr = BLOCK_K // 2
    byte_cols = pid_k * HALF_K + tl.arange(0, HALF_K)  # (BK/2,) packed byte of these K columns in a W row

    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # grad_x^T tile, fp32 accumulator
    for n in range(0, N, BLOCK_N):  # the reduction runs down the rows of W
        rows_n = n + tl.arange(0, BLOCK_N)  # (BN,)
        n_valid = rows_n < N  # (BN,) the N tail is masked (N need not be a multiple of anything)
        g_ptrs = grad_y_ptr + rows_m[None, :].to(tl.int64) * N + rows_n[:, None]  # (BN, BM) grad_y^T tile
        g_t = tl.load(g_ptrs, mask=n_valid[:, None] & m_valid[None, :], other=0.0)  # (BN, BM)
        w_ptrs = packed_ptr + rows_n[:, None].to(tl.int64) * (K // 2) + byte_cols[None, :]  # (BN, BK/2)
        packed_bytes = tl.load(w_ptrs, mask=n_valid[:, None], other=0)  # (BN, BK/2) uint8
        w = nf4_decode_tile(packed_bytes, rows_n.to(tl.int64) * (K // BLOCKSIZE), pid_k * BLOCK_K, n_valid,
                            code_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, BLOCK_N, BLOCK_K,
                            BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)  # (BN, BK) float32
        w = w.to(grad_y_ptr.dtype.element_ty)  # round like nf4_dequantize(q, grad_y.dtype)
        acc = tl.dot(tl.trans(w).to(DOT_DTYPE), g_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)  # (BK, BM)

    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    out_ptrs = grad_x_ptr + rows_m[None, :].to(tl.int64) * K + cols_k[:, None]  # (BK, BM): grad_x is (M, K)
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=m_valid[None, :])


# CUDA (H100-oriented) tiles: (BLOCK_K, BLOCK_M, BLOCK_N, warps, stages).
BACKWARD_TILES = [
    (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 128, 8, 3), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3),
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 32, 64, 4, 4), (64, 16, 128, 4, 4),
    (32, 128, 64, 4, 4), (32, 16, 64, 4, 4),  # K a multiple of 32 only (blocksize 32)
]

_nf4_backward_autotuned = triton.autotune(
    configs=tile_configs(BACKWARD_TILES, ("BLOCK_K", "BLOCK_M", "BLOCK_N")),
    key=["N", "K", "M_BUCKET", "BLOCKSIZE", "DOUBLE_QUANT"],
    prune_configs_by={"early_config_prune": tile_pruner("_nf4_matmul_backward_input_kernel", "grad_y_ptr")},  # no spilling tiles
)(_nf4_matmul_backward_input_kernel)


def nf4_matmul_backward_input(grad_y: torch.Tensor, q) -> torch.Tensor:
    """grad_x (..., K) = grad_y (..., N) @ dequantize(q) for the NF4 weight q (N, K)."""
    check_nf4_tensor(q)
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul_backward_input: the NF4 weight must be 2-D, got {tuple(q.shape)}")
    N, K = q.shape
    if grad_y.dim() == 0 or grad_y.shape[-1] != N:
        raise ValueError(f"nf4_matmul_backward_input: grad_y must have shape (..., {N}), got {tuple(grad_y.shape)}")
    if grad_y.dtype not in OUTPUT_DTYPES or grad_y.device != q.packed.device:
        raise ValueError(f"nf4_matmul_backward_input: grad_y must be one of {OUTPUT_DTYPES} on {q.packed.device}, "
                         f"got {grad_y.dtype} on {grad_y.device}")
    if not use_triton(_nf4_matmul_backward_input_kernel, grad_y):
        return nf4_matmul_backward_input_reference(grad_y, q)
    grad_y2d = grad_y.reshape(-1, N).contiguous()  # (M, N)
    M = grad_y2d.shape[0]
    if M == 0 or not fused_path_supported(q):
        return (grad_y2d @ nf4_dequantize(q, grad_y.dtype)).reshape(*grad_y.shape[:-1], K)
    grad_x = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)  # (M, K)
    arguments = dict(
        grad_y_ptr=grad_y2d, packed_ptr=q.packed, grad_x_ptr=grad_x, M=M, N=N, K=K, M_BUCKET=next_power_of_2(M),
        **quant_state_arguments(q, grad_y.device),
        **dot_arguments(grad_y.dtype, _nf4_matmul_backward_input_kernel),
    )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * (K // meta["BLOCK_K"]),)  # noqa: E731
    if is_interpreted(_nf4_matmul_backward_input_kernel):  # one fixed, large tile for the interpreter
        tile = dict(BLOCK_K=largest_power_of_2_dividing(K, 512), BLOCK_M=interpreter_rows_tile(M), BLOCK_N=256,
                    GROUP_M=8)
        _nf4_matmul_backward_input_kernel[grid(tile)](**arguments, **tile, enable_fp_fusion=False)
    else:
        _nf4_backward_autotuned[grid](**arguments, enable_fp_fusion=False)
    return grad_x.reshape(*grad_y.shape[:-1], K)


def aot_cases() -> list:
    """The GPU specializations of the backward kernel (compiled by kernels/aot.py), see matmul_aot_cases."""
    return matmul_aot_cases("nf4_matmul_backward_kernel", "_nf4_matmul_backward_input_kernel", BACKWARD_TILES,
                            ("BLOCK_K", "BLOCK_M", "BLOCK_N"), "grad_y_ptr", "grad_x_ptr", has_bias=None)
