# %% [markdown]
# # Lesson 08 — A fused NF4 dequantize-matmul kernel in Triton
#
# Prerequisites: lesson 07 (the NF4 code table, blockwise absmax, double quantization); matrix multiplication
# in tiles, and GPU memory bandwidth vs compute; no GPU (the kernels also run in Triton's interpreter); the
# `.venv` that `make test` builds (Triton comes with torch on Linux).
#
# In the style of the Triton tutorials: motivation with memory-traffic arithmetic, the naive reference,
# then three kernels of growing ambition — dequantize, matrix-vector (decoding, batch 1) and the fused
# matrix-matrix tile loop — each written here in a short teaching version, run, and checked against the
# real kernel in `kernels/` (`minift.kernels`), whose extra machinery we then read. Finally a check on an
# irregular shape against a float64 truth, and what the GPU benchmark measures.
#
# **No GPU is needed to follow along.** Without CUDA the kernels run in Triton's interpreter
# (`TRITON_INTERPRET=1`, numpy on the CPU) on tiny shapes: it executes the same kernel code, so it checks
# correctness, but it says nothing about speed. Every timing quoted below is arithmetic from the hardware
# numbers, or comes from `benchmarks/bench_nf4.py`, which must be run on a GPU.
#
# Run it as a script (`python tutorials/08_triton_nf4_matmul.py`) or cell by cell. `MINIFT_FAST=1` uses the
# smallest shapes (for the test suite); this lesson writes no files.

# %%
import inspect
import os
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # must happen before any @triton.jit runs: Triton reads it when a kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minift.kernels import (NF4MatmulFunction, nf4_dequantize, nf4_dequantize_reference,  # noqa: E402
                            nf4_matmul, nf4_matmul_reference)
from minift.kernels import nf4_matmul_kernel as matmul_module  # noqa: E402
from minift.kernels.nf4_dequantize_kernel import nf4_block_scale  # noqa: E402
from minift.kernels.nf4_gemv_kernel import _nf4_gemv_kernel  # noqa: E402
from minift.kernels.triton_support import is_interpreted  # noqa: E402
from minift.quant import NF4_CODE, nf4_nbytes, quantize_nf4  # noqa: E402

FAST = os.environ.get("MINIFT_FAST") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
torch.manual_seed(0)
print("device:", DEVICE, "| Triton interpreter:", is_interpreted(matmul_module._nf4_matmul_kernel))


def show_source(function, start: str, stop: str) -> None:
    """Print the lines of `function`'s source from the line containing `start` up to the one with `stop`."""
    lines = inspect.getsource(getattr(function, "fn", function)).splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if i > first and stop in line)
    print("\n".join(lines[first: last + 1]))


# %% [markdown]
# ## 1. Motivation: the bytes are the time
# A QLoRA model keeps a 4096 x 4096 projection as NF4: half a byte per weight for the codes, one uint8
# absmax code per 64 weights, one float32 per 256 of those, and a float32 offset (double quantization,
# lesson 07). Generating one token multiplies that matrix by one vector: 2 * 4096^2 = 33.6 MFLOP, which
# an H100 does in about 0.04 us at 800 TFLOP/s — but the weights must first be read from HBM at about
# 3.35 TB/s. So the time is bytes / bandwidth, and the format decides it:

# %%
N = K = 4096
HBM_BYTES_PER_S = 3.35e12  # H100 SXM, datasheet (about 3.0e12 measured for a device copy)
BF16_FLOPS = 800e12  # H100 dense bf16 tensor-core throughput, measured order of magnitude
nf4_bytes = nf4_nbytes(N * K)  # codes + uint8 absmax + nested absmax + offset
bf16_bytes = 2 * N * K
unfused_bytes = nf4_bytes + 2 * bf16_bytes  # dequantize writes bf16 W, the matmul reads it back
for label, nbytes in [("bf16 weight, cuBLAS", bf16_bytes), ("NF4, fused kernel", nf4_bytes),
                      ("NF4, dequantize then matmul", unfused_bytes)]:
    print(f"{label:>28}: {nbytes / 1e6:6.2f} MB moved -> {nbytes / HBM_BYTES_PER_S * 1e6:5.1f} us at 3.35 TB/s")
print(f"fused NF4 vs bf16: {bf16_bytes / nf4_bytes:.2f}x fewer bytes")

# %% [markdown]
# Two lessons hide in those three lines. First, 4-bit weights can make decoding almost 4x faster, not just
# smaller — but only if nothing but the packed bytes crosses the memory bus. Second, the obvious
# implementation (dequantize to bf16, then call cuBLAS) moves 8.7x more bytes than the fused one and is
# *slower than plain bf16*. Fusion is the whole point.
#
# When does the product stop being memory-bound? With M rows of activations (batch x tokens), the kernel
# does 2 * M * N * K FLOPs on N * K * (bytes per weight). The H100's balance point is about
# 800e12 / 3.35e12 = 240 FLOP per byte:

# %%
balance = BF16_FLOPS / HBM_BYTES_PER_S
for label, bytes_per_weight in [("bf16", 2.0), ("NF4 + double quant", nf4_bytes / (N * K))]:
    print(f"{label:>20}: {bytes_per_weight:.4f} B/weight -> compute-bound above M ~ "
          f"{balance * bytes_per_weight / 2:.0f} rows")

# %% [markdown]
# So NF4 only helps for small M (decoding, small batches). For training-size M (thousands of rows) the
# product is compute-bound either way, and the question becomes whether decoding W inside the tile loop
# costs more than decoding it once (dequantize + cuBLAS). That is what the benchmark has to settle.
#
# ## 2. The naive reference: the spec and the CPU fallback
# Every kernel in `kernels/` sits beside a pure-torch reference. For the matmul it is two lines:

# %%
show_source(matmul_module.nf4_matmul_reference, "def nf4_matmul_reference", "return F.linear")

# %% [markdown]
# `nf4_dequantize_reference` itself builds the dense matrix with whole-tensor torch ops; each one writes a
# full-size intermediate (int64 indices, float32 values, float32 per-element scales...), about 40 bytes of
# traffic per weight. On a CPU that is fine — it is what `NF4Linear` runs there. On a GPU it is the thing
# to beat. A tiny example to work with (weights quantized without double quantization first, so the
# teaching kernels can read the absmax values directly):

# %%
n_rows, n_cols = (96, 128) if FAST else (192, 256)  # W (N, K): K a multiple of the blocksize 64
w_dense = torch.randn(n_rows, n_cols) * 0.02  # (N, K)
q_plain = quantize_nf4(w_dense, blocksize=64, double_quant=False).to(DEVICE)
q_double = quantize_nf4(w_dense, blocksize=64, double_quant=True).to(DEVICE)
print(q_plain, "\n", q_double, sep="")
code = NF4_CODE.to(DEVICE)

# %% [markdown]
# ## 3. Kernel 1: dequantize one quantization block per program
# Element j of the flattened weight lives in the high nibble of byte j // 2 if j is even, the low nibble if
# odd; its scale is absmax[j // 64]. A program owns one block of 64 weights: it loads the block's 32 bytes
# as one vector, splits each byte into two 4-bit indices, looks both up in the 16-entry code table (an L1
# hit after the first touch), multiplies by the block's scale and stores 64 values.

# %%


@triton.jit
def dequantize_teaching_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_elements, BLOCKSIZE: tl.constexpr):
    block = tl.program_id(0)  # one program per quantization block
    pair = tl.arange(0, BLOCKSIZE // 2)  # (B/2,) byte i of the block holds elements 2i and 2i + 1
    element = block * BLOCKSIZE + 2 * pair  # (B/2,) the even element of each byte
    byte = tl.load(packed_ptr + element // 2, mask=element < n_elements, other=0).to(tl.int32)  # (B/2,)
    high = tl.load(code_ptr + (byte >> 4))  # (B/2,) NF4_CODE[index] of element 2i
    low = tl.load(code_ptr + (byte & 0x0F))  # (B/2,) NF4_CODE[index] of element 2i + 1
    scale = tl.load(absmax_ptr + block)  # () float32 absmax of this block
    tl.store(out_ptr + element, high * scale, mask=element < n_elements)
    tl.store(out_ptr + element + 1, low * scale, mask=element + 1 < n_elements)


def dequantize_teaching(q):
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # (N, K)
    dequantize_teaching_kernel[(q.n_blocks,)](q.packed, q.absmax, code, out, q.numel(), BLOCKSIZE=q.blocksize)
    return out


ours = dequantize_teaching(q_plain)
print("teaching kernel == nf4_dequantize (real kernel):", torch.equal(ours, nf4_dequantize(q_plain, torch.float32)))
print("teaching kernel == pure-torch reference        :",
      torch.equal(ours, nf4_dequantize_reference(q_plain, torch.float32)))

# %% [markdown]
# The real kernel (`kernels/nf4_dequantize_kernel.py`) does the same arithmetic with three refinements:
# a program handles many blocks at once as a 2-D tile (fewer, fatter programs); the two nibbles are
# interleaved back into element order with `tl.join` + `reshape`, so the output is one contiguous store
# instead of two strided ones; and the scale comes from the double-quantized statistics. That scale logic
# is a `@triton.jit` helper shared by every NF4 kernel:

# %%
show_source(nf4_block_scale, "def nf4_block_scale", "return scale")
print("real kernel, double quant == reference:",
      torch.equal(nf4_dequantize(q_double, torch.float32), nf4_dequantize_reference(q_double, torch.float32)))

# %% [markdown]
# ## 4. Kernel 2: matrix-vector product for decoding (M = 1)
# y (N,) = W (N, K) @ x (K,). Each weight is used exactly once, so tensor cores would idle (an MMA needs 16
# rows of x). Instead each program owns BLOCK_N rows of W, walks along K one quantization block at a time,
# and keeps a float32 running sum per row. Rather than interleaving the nibbles back into element order,
# split x instead: high nibbles (elements 2i) meet x[even], low nibbles (2i + 1) meet x[odd]. The scale is
# factored out of the block's partial sum: one multiply per block instead of one per weight.
#
#     W row n, block b (64 weights = 32 bytes)      x[k .. k+63]
#     bytes  [h0 l0][h1 l1] ... [h31 l31]           even: x0 x2 ... x62     odd: x1 x3 ... x63
#     partial_n += absmax[n, b] * sum_i (code[h_i] * x_even_i + code[l_i] * x_odd_i)

# %%


@triton.jit
def gemv_teaching_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, N, K,
                         BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W = entries of y
    row_ok = rows < N  # (BN,)
    pair = tl.arange(0, BLOCKSIZE // 2)  # (B/2,) byte within a quantization block
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCKSIZE):  # K % BLOCKSIZE == 0: each step is one whole block of every row
        x_even = tl.load(x_ptr + k + 2 * pair)  # (B/2,) x[k + 2i]
        x_odd = tl.load(x_ptr + k + 2 * pair + 1)  # (B/2,) x[k + 2i + 1]
        byte_ptrs = packed_ptr + rows[:, None] * (K // 2) + (k // 2 + pair)[None, :]  # (BN, B/2)
        byte = tl.load(byte_ptrs, mask=row_ok[:, None], other=0).to(tl.int32)  # (BN, B/2)
        high = tl.load(code_ptr + (byte >> 4))  # (BN, B/2) W[n, k + 2i] / scale
        low = tl.load(code_ptr + (byte & 0x0F))  # (BN, B/2) W[n, k + 2i + 1] / scale
        scale = tl.load(absmax_ptr + rows * (K // BLOCKSIZE) + k // BLOCKSIZE, mask=row_ok, other=0.0)  # (BN,)
        acc += tl.sum(high * x_even[None, :] + low * x_odd[None, :], axis=1) * scale  # (BN,)
    tl.store(y_ptr + rows, acc, mask=row_ok)


def gemv_teaching(x, q, block_n=32):
    y = torch.empty(q.shape[0], dtype=torch.float32, device=x.device)  # (N,)
    grid = (triton.cdiv(q.shape[0], block_n),)
    gemv_teaching_kernel[grid](x, q.packed, q.absmax, code, y, q.shape[0], q.shape[1], BLOCKSIZE=q.blocksize,
                               BLOCK_N=block_n)
    return y


x_vec = torch.randn(n_cols, device=DEVICE)  # (K,)
ours = gemv_teaching(x_vec, q_plain)
real = nf4_matmul(x_vec[None, :], q_plain)[0]  # M = 1 <= GEMV_MAX_ROWS: dispatches to the real GEMV kernel
print(f"teaching GEMV vs real GEMV kernel: max |difference| = {(ours - real).abs().max().item():.2e}")
torch.testing.assert_close(ours, real, rtol=1e-5, atol=1e-6)  # fp32 sums in a different order

# %% [markdown]
# The real GEMV (`kernels/nf4_gemv_kernel.py`) keeps this shape and adds: several quantization blocks per
# loop step (a 3-D byte tile (BLOCK_N, GROUPS, 32) — more bytes in flight per load), accumulation of the
# products elementwise with a single reduction after the loop, up to 4 rows of x (the grid's first axis,
# so programs sharing a W tile run side by side and hit L2), double-quantized scales, and an autotuner that
# picks BLOCK_N, GROUPS and the warp count per shape. Its inner loop:

# %%
show_source(_nf4_gemv_kernel, "for k in range(0, K, STEP_K)", "acc += products")

# %% [markdown]
# ## 5. Kernel 3: the fused GEMM tile loop (M > 4)
# With more rows of x, tensor cores pay off, and each decoded weight is reused by BLOCK_M rows. A program
# owns a (BLOCK_M, BLOCK_N) tile of y and loops over K in steps of BLOCK_K = 64 (one quantization block
# per W row per step, so one scale per row):
#
#            K in steps of 64
#     x    [ (BLOCK_M, 64) tile ] ------------------------------------------------.
#                                                                                  tl.dot, fp32 accumulator
#     W    [ bytes (BLOCK_N, 32) ] --unpack, look up, x scale--> w (BLOCK_N, 64) -'  (BLOCK_M, BLOCK_N)
#
# W is read once per program at 4 bits per weight and decoded in registers; the dense tile never exists
# in global memory.

# %%


@triton.jit
def matmul_teaching_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K,
                           BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x and of y
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W = columns of y
    cols = tl.arange(0, BLOCKSIZE)  # (BK,) with BLOCK_K = BLOCKSIZE
    pair = tl.arange(0, BLOCKSIZE // 2)  # (BK/2,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCKSIZE):
        x = tl.load(x_ptr + rows_m[:, None] * K + (k + cols)[None, :], mask=rows_m[:, None] < M, other=0.0)  # (BM, BK)
        byte_ptrs = packed_ptr + rows_n[:, None] * (K // 2) + (k // 2 + pair)[None, :]  # (BN, BK/2)
        byte = tl.load(byte_ptrs, mask=rows_n[:, None] < N, other=0).to(tl.int32)  # (BN, BK/2)
        high = tl.load(code_ptr + (byte >> 4))  # (BN, BK/2) elements 2i
        low = tl.load(code_ptr + (byte & 0x0F))  # (BN, BK/2) elements 2i + 1
        w = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCKSIZE))  # (BN, BK): interleaved back to element order
        scale = tl.load(absmax_ptr + rows_n * (K // BLOCKSIZE) + k // BLOCKSIZE, mask=rows_n < N, other=0.0)  # (BN,)
        acc = tl.dot(x, tl.trans(w * scale[:, None]), acc, input_precision="ieee")  # (BM, BN) += x w^T
    y_ptrs = y_ptr + rows_m[:, None] * N + rows_n[None, :]  # (BM, BN)
    tl.store(y_ptrs, acc, mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))


def matmul_teaching(x2d, q, block_m=16, block_n=32):
    M, K = x2d.shape
    y = torch.empty(M, q.shape[0], dtype=torch.float32, device=x2d.device)  # (M, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(q.shape[0], block_n))
    matmul_teaching_kernel[grid](x2d, q.packed, q.absmax, code, y, M, q.shape[0], K, BLOCKSIZE=q.blocksize,
                                 BLOCK_M=block_m, BLOCK_N=block_n)
    return y


x_rows = torch.randn(21, n_cols, device=DEVICE)  # (M, K): M = 21 is not a multiple of BLOCK_M
ours = matmul_teaching(x_rows, q_plain)
real = nf4_matmul(x_rows, q_plain)  # M > 4: the real fused GEMM kernel
print(f"teaching GEMM vs real GEMM kernel: max |difference| = {(ours - real).abs().max().item():.2e}")
torch.testing.assert_close(ours, real, rtol=1e-5, atol=1e-6)

# %% [markdown]
# What the real GEMM (`kernels/nf4_matmul_kernel.py`) adds, and why:
#
# * **It computes y^T = W x^T.** The decoded W tile is in registers; Hopper's `wgmma` takes its left operand
#   from registers and its right one from shared memory, so with W on the left only x takes the trip
#   through shared memory (filled asynchronously by Triton's software pipeliner).
# * **Grouped program order** (GROUP_M, as in the Triton matmul tutorial): programs running at the same
#   time share tiles of x and W in L2.
# * **Autotuned tiles**, BLOCK_K of 32-128 (a row of a W tile then carries BLOCK_K / 64 scales, broadcast
#   by the shared helper `nf4_decode_tile`), pruned so BLOCK_K always divides K: no K tails, no K masks.
# * **W rounded to x's dtype** before the dot, exactly as `nf4_dequantize(q, x.dtype)` would round it, so
#   the fused product equals dequantize-then-matmul up to the order of the fp32 additions.
# * int64 pointer arithmetic (layers above 2^31 elements) and double-quantized scales.
#
# Its main loop, to compare with ours:

# %%
show_source(matmul_module._nf4_matmul_kernel, "acc = tl.zeros", "w_ptrs += HALF_K")

# %% [markdown]
# `nf4_matmul` picks a path by the number of rows M of x (flattened to (M, K)): M <= 4 the GEMV, larger M the
# fused GEMM, and dequantize + F.linear when K is not a multiple of the blocksize (a quantization block
# would straddle two rows of W) — or above `LARGE_M_DEQUANTIZE_ROWS` once a benchmark has shown where
# cuBLAS on a dequantized W wins. On a CPU tensor without the interpreter it runs the reference.
#
# ## 6. Checking on an irregular shape against float64
# Tests should not compare one fast implementation with another: compare both with the exact answer.
# Take an awkward shape (M = 37 rows, N = 50 outputs not a multiple of any tile, K = 192 = 3 blocks, not a
# power of two), a bias, double quantization, and both float32 and bfloat16 activations. The exact result
# is the float64 product of the *same* inputs (x, bias, W dequantized in float64). The standard forward
# error bound of a dot product of length K accumulated in float32 (unit roundoff u32 = 2^-24), with W and
# y rounded to the activation dtype (unit roundoff u), gives a bound per output element:
#
#     |y - y_exact| <= (u_W + (K + 8) * u32) * (|x| @ |W|^T) + u * |y_exact|
#
# A wrong nibble, scale or block index moves whole terms of |x| @ |W|^T and breaks it by orders of
# magnitude. (Triton's interpreter converts float32 to bfloat16 by truncation, so there u = 2^-7.)

# %%
M, N_out, K_in = (13, 50, 128) if FAST else (37, 50, 192)
weight = torch.randn(N_out, K_in) * 0.02  # (N, K)
q = quantize_nf4(weight).to(DEVICE)  # blocksize 64, double quantization
w64 = nf4_dequantize_reference(q, torch.float64)  # (N, K) exact values of the stored weight
x32 = torch.randn(M, K_in, device=DEVICE)  # (M, K)
bias32 = torch.randn(N_out, device=DEVICE)  # (N,)
interpreted = is_interpreted(matmul_module._nf4_matmul_kernel)
for dtype in (torch.float32, torch.bfloat16):
    x, bias = x32.to(dtype), bias32.to(dtype)
    exact = x.double() @ w64.T + bias.double()  # (M, N)
    y = nf4_matmul(x, q, bias)  # (M, N) in x's dtype
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-7 if interpreted else 2.0**-8}[dtype]
    u_w = u if dtype != torch.float32 else 0.0
    bound = (u_w + (K_in + 8) * 2.0**-24) * (x.double().abs() @ w64.abs().T) + u * exact.abs()  # (M, N)
    ratio = ((y.double() - exact).abs() / bound).max().item()
    print(f"{str(dtype):>15}: y {tuple(y.shape)}, max error / bound = {ratio:.3f}  (must be <= 1)")
    assert ratio <= 1.0

# %% [markdown]
# ## 7. Backward: gradients for x, none for W
# QLoRA freezes W, so the backward of y = x W^T + b needs grad_x = grad_y @ W (to keep back-propagating to
# the adapters below) and the bias gradient — never a weight gradient. `NF4MatmulFunction` wires the
# forward kernel to `nf4_matmul_backward_input`, a kernel whose reduction runs along N (across W's rows)
# and which decodes the same W tiles on the fly: no dense W is saved for backward, only the 4-bit tensor.

# %%
x = x32.clone().requires_grad_(True)
bias = bias32.clone().requires_grad_(True)
y = nf4_matmul(x, q, bias)  # records NF4MatmulFunction
grad_y = torch.randn_like(y)
y.backward(grad_y)
x_ref = x32.clone().requires_grad_(True)
bias_ref = bias32.clone().requires_grad_(True)
nf4_matmul_reference(x_ref, q, bias_ref).backward(grad_y)  # autograd through dequantize + F.linear
print(f"grad_x: max |kernel - reference| = {(x.grad - x_ref.grad).abs().max().item():.2e}")
print(f"grad_b: max |kernel - reference| = {(bias.grad - bias_ref.grad).abs().max().item():.2e}")
torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)
print("autograd node:", type(y.grad_fn).__name__, "| NF4MatmulFunction:", NF4MatmulFunction.__name__)

# %% [markdown]
# ## 8. What the benchmark measures, and what to expect on an H100
# The interpreter ran every kernel above, so we know they are correct; it cannot say whether they are
# fast. `benchmarks/bench_nf4.py` does that on a CUDA GPU (it exits with a message elsewhere):
#
#     python benchmarks/bench_nf4.py --shapes smollm2,llama7b --rows 1,16,256,4096
#
# For each layer shape (SmolLM2-135M and Llama-7B projections) and number of rows M it first checks every
# provider's output against a float32 reference, then times it with CUDA graphs (so kernel-launch overhead
# does not hide a 3-microsecond kernel) and reports time, effective GB/s on the NF4 bytes, TFLOP/s, and the
# speed-up of `minift-triton` over bitsandbytes and over cuBLAS on the unquantized bf16 weight. Providers:
# `minift-triton` (this lesson's kernels), `minift-dequant+cublas` (dequantize kernel, then F.linear),
# `minift-torch` (the reference), `bitsandbytes` (`bnb.matmul_4bit`) and `cublas-bf16`. A second table
# times the backward product. It writes `benchmarks/results/nf4_<gpu>.md` with the machine name.
#
# What to expect, from the arithmetic of section 1 (these are bounds, not measurements):

# %%
print(f"{'layer (N x K)':>16} {'M':>5} {'bf16 us':>8} {'NF4 fused us':>13} {'dequant+mm us':>14}  (bandwidth bound)")
for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    for m in (1, 16):
        activations = 2 * m * (n + k)  # bf16 x read + y written
        times = [(bytes_w + activations) / HBM_BYTES_PER_S * 1e6 for bytes_w in
                 (2 * n * k, nf4_nbytes(n * k), nf4_nbytes(n * k) + 4 * n * k)]
        print(f"{n:>7} x {k:<6} {m:>5} {times[0]:>8.1f} {times[1]:>13.1f} {times[2]:>14.1f}")

# %% [markdown]
# * **M = 1..16 (decoding):** a fused kernel can approach bytes / bandwidth, up to ~3.9x faster than bf16.
#   Well-tuned memory-bound kernels typically reach 70-90% of peak bandwidth on large layers; small
#   layers (SmolLM2's 576 x 576 is 0.17 MB as NF4) are dominated by launch and tail effects, where CUDA
#   graphs matter. For reference, bitsandbytes reports its fused batch-1 4-bit kernel about 4x faster than
#   16-bit on Hopper.
# * **M in the hundreds to thousands (training, prefill):** compute-bound; every program decodes its W tile
#   again for each M tile, so expect the fused kernel to fall behind dequantize + cuBLAS at some M.
#   bitsandbytes 0.50 decides per GPU and per layer shape (`_gemm_4bit_use_custom_cuda` in its CUDA
#   backend): on H100 its fused kernel is used up to somewhere between a handful and a few hundred rows,
#   and dequantize + cuBLAS above. `LARGE_M_DEQUANTIZE_ROWS` in `nf4_matmul_kernel.py` is minift's
#   switch-over point, to be set from the benchmark's table.
#
# Measured GPU tables, when someone has run the benchmark, live next to the CPU ones:

# %%
results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
gpu_tables = sorted(p for p in results.glob("nf4_*.md") if p.name != "nf4_cpu.md") if results.is_dir() else []
if gpu_tables:
    for path in gpu_tables:
        print(f"--- {path.name} ---")
        print(path.read_text()[:3000])
else:
    print("No GPU results recorded yet (benchmarks/results/nf4_<gpu>.md): run benchmarks/bench_nf4.py on a GPU.")

# %% [markdown]
# ## 9. Discussion
# * Fusion pays where memory traffic dominates: decoding. The same 4 bits that make the model fit make
#   each token cheaper, but only when the dequantized matrix never touches global memory.
# * For large M, decoding W once per M tile competes with the tensor cores; a hybrid (fused below a row
#   count, dequantize + cuBLAS above) is what production libraries ship.
# * Bit-exactness is a choice: the dequantize kernel launches with `enable_fp_fusion=False` so that
#   `a * b + c` is not contracted into one FMA, and its output matches the reference bit for bit.
# * Correctness is checked on the CPU in the interpreter (tests/test_kernels_nf4.py), on irregular
#   shapes, several dtypes and both quantization modes, against a float64 truth with a rigorous bound.
