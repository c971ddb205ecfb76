"""NF4 matmul on a GPU: minift's Triton kernels vs bitsandbytes vs dequantize-in-torch vs bf16 cuBLAS.

For every layer shape (SmolLM2-135M and Llama-7B) and batch of rows M it
  1. checks each provider's output against a float32 reference of the same quantized weight,
  2. times it (CUDA graphs when capturable, so launch overhead does not hide the kernel),
  3. prints a table: time, effective GB/s on the NF4 bytes, TFLOP/s, and the speed-up of minift-triton
     over bitsandbytes and over cuBLAS on the unquantized bf16 weight,
and writes benchmarks/results/nf4_<gpu>.md. A second table times the backward product grad_x = grad_y @ W
that QLoRA training needs. Beside each time stands its roofline lower bound on this GPU (benchmarks/roofline.py:
compulsory bytes / HBM bandwidth vs FLOPs / bf16 tensor-core peak, from NVIDIA's H100 and H200 datasheets)
and the share of it reached.

Providers
    minift-triton          minift.kernels.nf4_matmul (GEMV for M <= 4, fused dequantize-GEMM above)
    minift-dequant+cublas  minift's Triton dequantize kernel, then F.linear (what LARGE_M_DEQUANTIZE_ROWS picks)
    minift-torch           the pure-torch reference: dequantize with torch ops, then F.linear
    bitsandbytes           bnb.matmul_4bit with a Linear4bit-style quant state (nf4, blocksize 64, nested)
    cublas-bf16            F.linear on the unquantized bf16 weight: the speed NF4 has to compete with

    python benchmarks/bench_nf4.py [--shapes smollm2,llama7b] [--rows 1,16,256,4096] [--no-backward]

Needs a CUDA GPU; on a machine without one it prints the roofline bound table alone (nothing is measured).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402
from roofline import bench_works, gpu_for, minift_kernel, work  # noqa: E402

SHAPES = {  # (N, K) = (out_features, in_features)
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],  # q/o, k/v, gate/up, down
    "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)],  # q/k/v/o, gate/up, down
}
PROVIDERS = ["minift-triton", "minift-dequant+cublas", "minift-torch", "bitsandbytes", "cublas-bf16"]
DEFAULT_ROWS = "1,16,256,4096"
RELATIVE_TOLERANCE = 2e-2  # max |y - y_ref| / max |y_ref| for a bf16 output (a sanity check; tests bound errors)


def backward_rows_of(rows: list[int]) -> list[int]:
    """The M the backward table uses: training-sized ones (>= 256), or all of them if none is."""
    return [m for m in rows if m >= 256] or rows


def roofline_kernel(provider: str, M: int, backward: bool) -> str:
    """benchmarks/roofline.py's name for the work `provider` does."""
    if provider == "cublas-bf16":
        return "cublas bf16"
    if provider == "minift-triton":
        return minift_kernel(M, backward)
    return "dequantize+cublas"  # minift-dequant+cublas, minift-torch and bitsandbytes all write the bf16 weight


def bound_us(row: dict, gpu: str | None, backward: bool) -> float:
    if gpu is None:
        return float("nan")
    return work(roofline_kernel(row["provider"], row["M"], backward), row["N"], row["K"], row["M"]).bound_seconds(
        gpu) * 1e6


def time_ms(fn) -> tuple[float, str]:
    """Median milliseconds of fn(): CUDA-graph replay when capturable, else plain launches."""
    import torch
    import triton.testing

    fn()  # warm-up: compiles and autotunes outside any graph capture
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100), "graph"
    except Exception:  # noqa: BLE001 - some providers cannot be captured; fall back to launches
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100), "launch"


def make_providers(x, q, weight_bf16, bnb_weight, bnb_state, backward: bool) -> dict:
    """name -> zero-argument callable computing y = x W^T (or grad_x = x W when backward)."""
    import torch
    import torch.nn.functional as F

    from minift.kernels import (nf4_dequantize, nf4_dequantize_reference, nf4_matmul, nf4_matmul_backward_input)

    providers = {}
    if backward:
        providers["minift-triton"] = lambda: nf4_matmul_backward_input(x, q)
        providers["minift-dequant+cublas"] = lambda: x @ nf4_dequantize(q, x.dtype)
        providers["minift-torch"] = lambda: x @ nf4_dequantize_reference(q, x.dtype)
        providers["cublas-bf16"] = lambda: x @ weight_bf16
    else:
        providers["minift-triton"] = lambda: nf4_matmul(x, q)
        providers["minift-dequant+cublas"] = lambda: F.linear(x, nf4_dequantize(q, x.dtype))
        providers["minift-torch"] = lambda: F.linear(x, nf4_dequantize_reference(q, x.dtype))
        providers["cublas-bf16"] = lambda: F.linear(x, weight_bf16)
    if bnb_state is not None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional

        if backward:  # bitsandbytes' MatMul4Bit.backward: grad_y @ dequantize_4bit(W)
            providers["bitsandbytes"] = lambda: x @ bnb_functional.dequantize_4bit(bnb_weight, bnb_state).to(x.dtype)
        else:
            providers["bitsandbytes"] = lambda: bnb.matmul_4bit(x, bnb_weight, quant_state=bnb_state)
    with torch.no_grad():
        return {name: providers[name] for name in PROVIDERS if name in providers}


def reference_output(x, q, weight_bf16, bnb_weight, bnb_state, provider: str, backward: bool):
    """float32 product with the weight that provider actually multiplies by."""
    import torch

    if provider == "cublas-bf16":
        weight = weight_bf16.float()
    elif provider == "bitsandbytes":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(bnb_weight, bnb_state).float()
    else:
        weight = q.dequantize(torch.float32)
    return x.float() @ weight if backward else x.float() @ weight.T


def bench_shape(N: int, K: int, rows: list[int], blocksize: int, backward: bool, bnb_available: bool,
                gpu: str | None = None) -> list[dict]:
    import torch

    from minift.quant import quantize_nf4

    torch.manual_seed(0)
    weight = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)  # (N, K), a typical init scale
    q = quantize_nf4(weight, blocksize=blocksize, double_quant=True)
    bnb_weight = bnb_state = None
    if bnb_available:
        import bitsandbytes.functional as bnb_functional

        bnb_weight, bnb_state = bnb_functional.quantize_4bit(
            weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    results = []
    for M in rows:
        x = torch.randn(M, N if backward else K, device="cuda", dtype=torch.bfloat16)  # (M, K) or grad_y (M, N)
        out_elements = M * (K if backward else N)
        moved = q.nbytes + x.numel() * 2 + out_elements * 2  # NF4 weight + activations in + out, bytes
        flops = 2 * M * N * K
        with torch.no_grad():
            for name, fn in make_providers(x, q, weight, bnb_weight, bnb_state, backward).items():
                expected = reference_output(x, q, weight, bnb_weight, bnb_state, name, backward)
                error = (fn().float() - expected).abs().max().item() / expected.abs().max().item()
                ok = error <= RELATIVE_TOLERANCE
                ms, method = time_ms(fn) if ok else (float("nan"), "-")
                row = dict(N=N, K=K, M=M, provider=name, ms=ms, method=method, error=error, ok=ok,
                           gbps=moved / ms / 1e6, tflops=flops / ms / 1e9)
                row["bound_us"] = bound_us(row, gpu, backward)
                results.append(row)
                print(f"  {N}x{K} M={M:<5} {name:<22} {ms * 1e3:9.1f} us  bound {row['bound_us']:7.1f} us  "
                      f"rel.err {error:.1e}{'' if ok else '  WRONG'} ({method})", flush=True)
        del x
        torch.cuda.empty_cache()
    return results


def ratio(results: list[dict], row: dict, provider: str) -> str:
    """How many times faster minift-triton is than `provider` on the same shape and M."""
    other = [r for r in results if (r["N"], r["K"], r["M"], r["provider"]) == (row["N"], row["K"], row["M"], provider)]
    triton = [r for r in results if (r["N"], r["K"], r["M"], r["provider"]) == (row["N"], row["K"], row["M"],
                                                                                    "minift-triton")]
    if not other or not triton or not (other[0]["ok"] and triton[0]["ok"]):
        return "-"
    return f"{other[0]['ms'] / triton[0]['ms']:.2f}x"


def table(results: list[dict]) -> str:
    headers = ["N x K", "M", "provider", "time (us)", "roofline bound (us)", "% of bound", "GB/s (NF4 bytes)",
               "TFLOP/s", "rel. error", "minift-triton speed-up vs this", "timed with"]
    rows = []
    for r in results:
        rows.append([f"{r['N']} x {r['K']}", r["M"], r["provider"], f"{r['ms'] * 1e3:.1f}", f"{r['bound_us']:.1f}",
                     f"{100 * r['bound_us'] / (r['ms'] * 1e3):.0f}%", f"{r['gbps']:.0f}",
                     f"{r['tflops']:.1f}", f"{r['error']:.1e}" + ("" if r["ok"] else " WRONG"),
                     ratio(results, r, r["provider"]) if r["provider"] != "minift-triton" else "", r["method"]])
    return markdown_table(headers, rows)


def summary(results: list[dict]) -> str:
    headers = ["N x K", "M", "minift-triton (us)", "bitsandbytes (us)", "cublas-bf16 (us)",
               "speed-up vs bitsandbytes", "speed-up vs cuBLAS bf16"]
    rows = []
    for r in (r for r in results if r["provider"] == "minift-triton"):
        times = {p["provider"]: p["ms"] for p in results if (p["N"], p["K"], p["M"]) == (r["N"], r["K"], r["M"])}
        rows.append([f"{r['N']} x {r['K']}", r["M"], f"{r['ms'] * 1e3:.1f}",
                     f"{times.get('bitsandbytes', float('nan')) * 1e3:.1f}", f"{times['cublas-bf16'] * 1e3:.1f}",
                     ratio(results, r, "bitsandbytes"), ratio(results, r, "cublas-bf16")])
    return markdown_table(headers, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama7b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of M (rows of x)")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-backward", action="store_true", help="skip the grad_x = grad_y @ W table")
    args = parser.parse_args()

    import torch

    shapes = [shape for name in args.shapes.split(",") for shape in SHAPES[name.strip()]]
    rows = [int(m) for m in args.rows.split(",")]
    if not torch.cuda.is_available():
        import roofline

        print("bench_nf4: no CUDA GPU on this machine; this benchmark times GPU kernels, so nothing was measured. "
              "Run it on a GPU (the kernels' correctness runs on the CPU in tests/test_kernels_nf4.py). "
              "The lower bounds a GPU run is measured against:\n")
        print(roofline.markdown(bench_works(shapes, rows, [] if args.no_backward else backward_rows_of(rows))))
        return 0
    try:
        import bitsandbytes  # noqa: F401

        bnb_available = True
    except ImportError:
        print("bench_nf4: bitsandbytes is not installed (pip install bitsandbytes); its column stays empty.")
        bnb_available = False

    device = torch.cuda.get_device_name(0)
    gpu = gpu_for(device)  # None: no datasheet figures for this GPU, the bound columns stay empty
    print(f"bench_nf4 on {device}: {len(shapes)} shapes x M in {rows}, bf16 activations, NF4 blocksize "
          f"{args.blocksize} with double quantization")
    forward = [r for N, K in shapes for r in bench_shape(N, K, rows, args.blocksize, False, bnb_available, gpu)]
    backward = []
    if not args.no_backward:
        print("backward: grad_x = grad_y @ W")
        backward = [r for N, K in shapes for r in bench_shape(N, K, backward_rows_of(rows), args.blocksize, True,
                                                              bnb_available, gpu)]

    text = [f"# NF4 matmul: minift Triton vs bitsandbytes vs cuBLAS bf16 on {device}", "",
            f"Machine: {machine_description()}", "",
            "bf16 activations; NF4 weight with blocksize "
            f"{args.blocksize} and double quantization (4.127 bits/weight). Median time of CUDA-graph replays "
            "('graph') or of launches ('launch'). GB/s counts the NF4 weight bytes plus activations in and out "
            "for every provider (an effective rate; cuBLAS actually reads 2 bytes per weight). Speed-up = "
            "provider time / minift-triton time (> 1: minift-triton is faster). Roofline bound: "
            f"benchmarks/roofline.py for {gpu or 'this GPU (no datasheet figures: empty)'}; % of bound = bound / "
            "time.", "",
            "## Forward y = x W^T: summary", "", summary(forward), "",
            "## Forward: all providers", "", table(forward), ""]
    if backward:
        text += ["## Backward grad_x = grad_y @ W (QLoRA training)", "", table(backward), ""]
    report = "\n".join(text)
    print(report)
    name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    write_result(f"nf4_{name}.md", report)
    return 0 if all(r["ok"] for r in forward + backward) else 1


if __name__ == "__main__":
    sys.exit(main())
