"""Roofline lower bounds for the NF4 kernels: the fastest any implementation could run on an H100 or H200.

A kernel cannot finish before it has moved its bytes through HBM, nor before the tensor cores have done
its multiply-adds, so for each kernel and shape

    bound = max(bytes moved / HBM bandwidth, FLOPs / bf16 dense tensor-core peak)

and the measured time divided into the bound is the fraction of the machine the kernel uses ("% of
bound"). Bytes are the compulsory traffic only: every input read once, every output written once (a
kernel that re-reads a tile from L2 still pays only for DRAM). FLOPs count 2 per multiply-add of the
product; decoding 4-bit codes is not counted (it runs on the CUDA cores beside the tensor cores).

Figures, from NVIDIA's datasheets (the dense bf16 peak is half the "with sparsity" figure they print):

    H100 SXM5   HBM3  3.35 TB/s   BF16 tensor core 1,979 TFLOP/s with sparsity -> 989.5 dense
                (NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/)
    H200 SXM    HBM3e 4.8 TB/s    BF16 tensor core 1,979 TFLOP/s with sparsity -> 989.5 dense
                (NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/)

Bytes per kernel (bf16 activations; W is (N, K) = (out_features, in_features); M rows of x):

    NF4 weight          N*K/2 packed codes + one uint8 scale code per block + one float32 per 256 blocks
                        + the float32 offset  (blocksize 64: 4.127 bits per weight); code tables not counted
    gemv / fused gemm   NF4 weight + x (M*K*2) + y (M*N*2)                         FLOPs 2*M*N*K
    backward (grad_x)   NF4 weight + grad_y (M*N*2) + grad_x (M*K*2)               FLOPs 2*M*N*K
    dequantize          NF4 weight + the bf16 weight written (N*K*2)               FLOPs 0
    dequantize+cublas   dequantize, then cuBLAS reading the bf16 weight back       FLOPs 2*M*N*K
    cublas bf16         bf16 weight (N*K*2) + x + y                                FLOPs 2*M*N*K

`python benchmarks/roofline.py` prints the table for bench_nf4.py's shapes and writes
benchmarks/results/roofline.md; bench_nf4.py prints the bound beside each measured time.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

TB = 1e12
GPUS = {  # name: (HBM bytes/s, dense bf16 tensor-core FLOP/s), from the datasheets above
    "H100 SXM": (3.35 * TB, 989.5 * TB),
    "H200": (4.8 * TB, 989.5 * TB),
}
BF16 = 2  # bytes per activation element


def nf4_weight_bytes(N: int, K: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Bytes of an NF4 (N, K) weight as minift and bitsandbytes store it (NF4Tensor.nbytes)."""
    elements = N * K
    blocks = math.ceil(elements / blocksize)
    codes = math.ceil(elements / 2)
    if not double_quant:
        return codes + 4 * blocks  # float32 absmax per block
    return codes + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4  # uint8 codes, nested float32, offset


@dataclass(frozen=True)
class Work:
    kernel: str
    N: int
    K: int
    M: int
    bytes: int
    flops: int

    def bound_seconds(self, gpu: str) -> float:
        bandwidth, peak = GPUS[gpu]
        return max(self.bytes / bandwidth, self.flops / peak)

    def bound_by(self, gpu: str) -> str:
        bandwidth, peak = GPUS[gpu]
        return "memory" if self.bytes / bandwidth >= self.flops / peak else "compute"


def work(kernel: str, N: int, K: int, M: int, blocksize: int = 64) -> Work:
    """Bytes and FLOPs of one call of `kernel` (names as in the module docstring) on W (N, K), M rows."""
    weight = nf4_weight_bytes(N, K, blocksize)
    product = 2 * M * N * K
    if kernel in ("gemv", "fused gemm"):
        return Work(kernel, N, K, M, weight + BF16 * M * K + BF16 * M * N, product)
    if kernel == "backward":
        return Work(kernel, N, K, M, weight + BF16 * M * N + BF16 * M * K, product)
    if kernel == "dequantize":
        return Work(kernel, N, K, M, weight + BF16 * N * K, 0)
    if kernel == "dequantize+cublas":
        return Work(kernel, N, K, M, weight + 2 * BF16 * N * K + BF16 * M * K + BF16 * M * N, product)
    if kernel == "cublas bf16":
        return Work(kernel, N, K, M, BF16 * N * K + BF16 * M * K + BF16 * M * N, product)
    raise ValueError(f"roofline: unknown kernel {kernel!r}")


def minift_kernel(M: int, backward: bool, gemv_max_rows: int = 4) -> str:
    """Which minift kernel nf4_matmul runs for M rows (kernels/nf4_matmul_kernel.py's dispatch)."""
    if backward:
        return "backward"
    return "gemv" if M <= gemv_max_rows else "fused gemm"


def bench_works(shapes: list[tuple[int, int]], rows: list[int], backward_rows: list[int]) -> list[Work]:
    """Every (kernel, shape, M) bench_nf4.py times: minift's kernel for each M, the dequantize kernel once
    per shape, and cuBLAS bf16 (the speed to compare with); backward for backward_rows."""
    works = []
    for N, K in shapes:
        works.append(work("dequantize", N, K, 0))
        for M in rows:
            works += [work(minift_kernel(M, False), N, K, M), work("dequantize+cublas", N, K, M),
                      work("cublas bf16", N, K, M)]
        for M in backward_rows:
            works.append(work("backward", N, K, M))
    return works


def gpu_for(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100 SXM'; None for a GPU without datasheet figures here."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIE" not in name:
        return "H100 SXM"
    return None


def table_rows(works: list[Work]) -> list[list]:
    rows = []
    for w in works:
        intensity = f"{w.flops / w.bytes:.1f}" if w.flops else "0"
        rows.append([w.kernel, f"{w.N} x {w.K}", w.M if w.kernel != "dequantize" else "-", f"{w.bytes / 1e6:.3f}",
                     f"{w.flops / 1e9:.3f}", intensity,
                     *(f"{w.bound_seconds(gpu) * 1e6:.3g} ({w.bound_by(gpu)[0]})" for gpu in GPUS)])
    return rows


HEADERS = ["kernel", "N x K", "M", "MB moved", "GFLOP", "FLOP/byte",
           *(f"{gpu} bound, us (m = memory, c = compute)" for gpu in GPUS)]


def markdown(works: list[Work]) -> str:
    from common import markdown_table

    figures = "; ".join(f"{gpu}: {bw / TB:.2f} TB/s HBM, {peak / TB:.1f} TFLOP/s dense bf16"
                        for gpu, (bw, peak) in GPUS.items())
    return "\n".join([
        "# Roofline lower bounds for the NF4 kernels (benchmarks/roofline.py)", "",
        f"Datasheet figures: {figures} (NVIDIA H100 and H200 datasheets; dense = half the sparsity figure).",
        "bound = max(bytes / bandwidth, FLOPs / peak). Bytes are compulsory traffic: NF4 weight (blocksize 64, "
        "double quantization: 4.127 bits per weight), bf16 activations in and out, each once. The shapes and M are "
        "those of benchmarks/bench_nf4.py (SmolLM2-135M and Llama-7B layers); 'gemv' is minift's M <= 4 path, "
        "'fused gemm' the M > 4 path, 'backward' grad_x = grad_y @ W. Targets read off this table: GEMV at 85% of "
        "HBM bandwidth means a time <= bound / 0.85.", "",
        markdown_table(HEADERS, table_rows(works)), ""])


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_nf4 import DEFAULT_ROWS, SHAPES, backward_rows_of
    from common import write_result

    rows = [int(m) for m in DEFAULT_ROWS.split(",")]
    shapes = [shape for name in SHAPES for shape in SHAPES[name]]
    text = markdown(bench_works(shapes, rows, backward_rows_of(rows)))
    print(text)
    write_result("roofline.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
