"""NF4 matrix-vector product in Triton: the decoding path of nf4_matmul (batch 1, up to 4 rows).

Lesson
------
Motivation. Generating text one token at a time multiplies every weight matrix by a single vector:
y (N,) = W (N, K) @ x (K,). Each weight is used exactly once, so the time is the time to read W:

    4096 x 4096 layer        bf16: 33.5 MB -> ~10 us at 3.35 TB/s      NF4 (double quant): 8.65 MB -> ~2.6 us

The 3.9x is only available if nothing but the packed bytes crosses the memory bus, which rules out
"dequantize, then matmul" (that writes and re-reads the bf16 matrix). Tensor cores do not help either:
an MMA needs at least 16 rows of x, so 15/16 of its work would be padding. This kernel runs on the
CUDA cores: each program owns BLOCK_N rows of W, streams them once, and reduces along K.

Spec: the same as nf4_matmul_reference (nf4_matmul_kernel.py): y = x @ dequantize(W).T + b.

The tile. W rows are cut along K into groups of GROUP_K elements that each lie inside one quantization
block (GROUP_K = min(blocksize, MAX_GROUP_K = 64) divides the blocksize, and K is a multiple of the blocksize), and a
program handles GROUPS groups per step, as a 3-D tile of packed bytes:

    bytes (BLOCK_N, GROUPS, GROUP_K / 2)      one contiguous run of GROUPS * GROUP_K / 2 bytes per row
      high nibbles  = elements 2i    of the run  -> multiply by x[even positions]
      low nibbles   = elements 2i+1  of the run  -> multiply by x[odd positions]
    scale (BLOCK_N, GROUPS)                   one per group, broadcast over its bytes

So instead of interleaving the two nibbles back into element order (as the GEMM does), we split x into
its even and odd elements (a tiny vector, read from L1/L2 by every program). The products are
accumulated elementwise in a (BLOCK_N, GROUPS, GROUP_K / 2) fp32 register tile and reduced across K once,
after the loop.

Rows of x. With M <= 4 rows, program (m, tile_n) computes row m of y. The grid's first axis is m, so the
programs of one W tile are scheduled next to each other and all but the first read W from L2.

Discussion
----------
* The work per weight: half a byte of load (16 bytes per thread per vector load), one shift or mask,
  one gather from the 16-entry table (an L1 hit), one FMA. Per group: one uint8 scale code, two table
  look-ups. That is far below what the SM can issue, so the kernel should run near the bandwidth of
  reading W; benchmarks/bench_nf4.py reports its GB/s on the NF4 bytes.
* Parallelism without split-K: BLOCK_N is small (4-32 rows), so even a 576-row layer gets 18+ programs
  and a 4096-row layer 128+; the autotuner picks BLOCK_N, GROUPS and the warp count per shape.
* GROUP_K is at most 64 even for blocksizes of 128 and more (two or more groups then share one scale).
  Compiled ahead of time (kernels/aot.py, benchmarks/results/kernels_static.md), GROUP_K = 128 doubled the
  register tile of every config and 4 of the 10 configs spilled (up to 888 bytes on sm_90); at 64 none does.
* No rounding of W to x's dtype: products are formed in fp32 from the fp32 decoded weight, which is at
  least as accurate as dequantize-then-matmul (the tests bound both against a float64 reference).
"""

from __future__ import annotations

import torch

from .nf4_dequantize_kernel import (OUTPUT_DTYPES, nf4_block_scale, nf4_decode_nibbles, quant_state_aot_constants,
                                    quant_state_arguments)
from .triton_support import is_interpreted, tl, triton


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, dynamic_map_ptr, bias_ptr, y_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):
    m = tl.program_id(0)  # the row of x (fastest grid axis: programs sharing a W tile run together)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W
    n_valid = rows_n < N  # (BN,)
    HALF_G: tl.constexpr = GROUP_K // 2  # packed bytes per group
    STEP_K: tl.constexpr = GROUPS * GROUP_K  # elements of K per loop step
    group = tl.arange(0, GROUPS)  # (G,)
    pair = tl.arange(0, HALF_G)  # (H,) byte within a group = pair of elements (2i, 2i+1)

    x_row = x_ptr + m.to(tl.int64) * K
    w_rows = packed_ptr + rows_n[:, None, None].to(tl.int64) * (K // 2)  # (BN, 1, 1) start of each W row
    first_block = rows_n[:, None].to(tl.int64) * (K // BLOCKSIZE)  # (BN, 1) quantization block of W[n, 0]

    acc = tl.zeros((BLOCK_N, GROUPS, HALF_G), dtype=tl.float32)
    for k in range(0, K, STEP_K):
        k_group = k + group * GROUP_K  # (G,) first element of each group
        g_valid = k_group < K  # (G,) K is a multiple of GROUP_K: groups are all in or all out
        k_even = k_group[:, None] + 2 * pair[None, :]  # (G, H) positions 2i of this step
        x_even = tl.load(x_row + k_even, mask=g_valid[:, None], other=0.0).to(tl.float32)  # (G, H)
        x_odd = tl.load(x_row + k_even + 1, mask=g_valid[:, None], other=0.0).to(tl.float32)  # (G, H)

        valid = n_valid[:, None, None] & g_valid[None, :, None]  # (BN, G, 1)
        packed_bytes = tl.load(w_rows + (k_even // 2)[None, :, :], mask=valid, other=0)  # (BN, G, H) uint8
        high, low = nf4_decode_nibbles(packed_bytes, code_ptr)  # (BN, G, H) float32: W[n, 2i], W[n, 2i+1]
        block = first_block + (k_group // BLOCKSIZE)[None, :]  # (BN, G)
        scale = nf4_block_scale(absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block,
                                n_valid[:, None] & g_valid[None, :], DOUBLE_QUANT, NESTED_BLOCKSIZE)  # (BN, G)
        products = high * x_even[None, :, :] + low * x_odd[None, :, :]  # (BN, G, H) un-scaled
        acc += products * scale[:, :, None]  # (BN, G, H)

    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,) reduce along K once, after the loop
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=n_valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * N + rows_n, y.to(y_ptr.dtype.element_ty), mask=n_valid)


MAX_GROUP_K = 64  # elements per group; larger groups spill registers (see the Discussion)


def _gemv_configs() -> list:
    """CUDA configs: (BLOCK_N, GROUPS, warps). With GROUP_K = 64 a step reads GROUPS * 32 bytes per row."""
    shapes = [(4, 8, 2), (8, 4, 2), (8, 8, 4), (16, 4, 4), (16, 8, 4), (32, 4, 4), (32, 8, 8), (8, 16, 4),
              (16, 16, 8), (64, 4, 8)]
    return [triton.Config(dict(BLOCK_N=bn, GROUPS=g), num_warps=w, num_stages=2) for bn, g, w in shapes]


_nf4_gemv_autotuned = triton.autotune(
    configs=_gemv_configs(), key=["N", "K", "BLOCKSIZE", "DOUBLE_QUANT", "HAS_BIAS"],
)(_nf4_gemv_kernel)


def nf4_gemv(x2d: torch.Tensor, q, bias: torch.Tensor | None) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ dequantize(q).T + bias for small M. Inputs checked by nf4_matmul.

    Needs K % q.blocksize == 0 and contiguous x2d; bias (N,) already in x's dtype.
    """
    M, K = x2d.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)  # (M, N)
    arguments = dict(
        x_ptr=x2d, packed_ptr=q.packed, bias_ptr=bias if bias is not None else x2d, y_ptr=y,
        M=M, N=N, K=K, HAS_BIAS=bias is not None, GROUP_K=min(q.blocksize, MAX_GROUP_K),
        **quant_state_arguments(q, x2d.device),
    )
    grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    if is_interpreted(_nf4_gemv_kernel):  # one fixed, large tile: the interpreter pays per program
        tile = dict(BLOCK_N=256, GROUPS=max(1, 1024 // min(q.blocksize, MAX_GROUP_K)))
        _nf4_gemv_kernel[grid(tile)](**arguments, **tile, enable_fp_fusion=True)
    else:
        _nf4_gemv_autotuned[grid](**arguments, enable_fp_fusion=True)  # FMA accumulation
    return y


def aot_cases() -> list:
    """The GPU specializations nf4_gemv can launch (compiled by kernels/aot.py): every autotuning config x
    every dtype at blocksize 64 (GROUP_K 64), double quantization, with bias; every config again with
    GROUP_K 32 (blocksize 32), and blocksize 128 (GROUP_K 64, two groups per block) in bf16; blocksize 4096,
    no double quantization and no bias on one config each."""
    from .aot import DTYPE_NAMES, CompileCase, config_label, pointer_type

    def case(config, dtype, blocksize=64, double_quant=True, has_bias=True, variant="default"):
        pointers, constants = quant_state_aot_constants(blocksize, double_quant)
        pointers.update(x_ptr=pointer_type(dtype), packed_ptr="*u8", bias_ptr=pointer_type(dtype),
                        y_ptr=pointer_type(dtype))
        return CompileCase(
            module="nf4_gemv_kernel", kernel="_nf4_gemv_kernel", dtype=DTYPE_NAMES[str(dtype)],
            config=config_label(config.kwargs, config.num_warps, config.num_stages), pointers=pointers,
            constexprs=dict(constants, HAS_BIAS=has_bias, GROUP_K=min(blocksize, MAX_GROUP_K), **config.kwargs),
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True, variant=variant)

    configs = _gemv_configs()
    cases = [case(config, dtype) for config in configs for dtype in OUTPUT_DTYPES]
    cases += [case(config, torch.bfloat16, blocksize=bs, variant=f"blocksize {bs}") for config in configs
              for bs in (32, 128)]
    cases += [case(configs[0], torch.bfloat16, blocksize=4096, variant="blocksize 4096"),
              case(configs[0], torch.bfloat16, double_quant=False, variant="no double quant"),
              case(configs[0], torch.bfloat16, has_bias=False, variant="no bias")]
    return cases
