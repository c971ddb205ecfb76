"""minift vs bitsandbytes: NF4 quantize and dequantize speed on the CPU.

Both sides quantize the same random weight (quant_type="nf4", blocksize 64, double quantization on, as
Linear4bit does) and dequantize it back to the weight's dtype. minift is pure torch; bitsandbytes 0.50
quantizes with pure torch too (its default backend) and dequantizes with its C++ CPU kernel. Each timing
is the best of --repeats runs after one warm-up, the two providers alternating in one process; the outputs are checked to be equal
before timing (4-bit codes bit-exact; values equal wherever the 8-bit nested codes agree).

    python benchmarks/bench_nf4_cpu.py [--sizes 1024x1024,4096x4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402


def best_times(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best of `repeats` for each, alternating the two so that background load hits both alike."""
    ours(), theirs()  # warm-up
    best_ours = best_theirs = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        middle = time.perf_counter()
        theirs()
        best_ours, best_theirs = min(best_ours, middle - start), min(best_theirs, time.perf_counter() - middle)
    return best_ours, best_theirs


def compare(shape: tuple[int, int], dtype, repeats: int) -> list[list]:
    import bitsandbytes.functional as bnbf
    import torch

    from minift.quant import quantize_nf4

    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    q = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed), "4-bit codes differ from bitsandbytes"
    same = (q.absmax == state.absmax).repeat_interleave(64)[: weight.numel()].view(shape)
    assert torch.equal(q.dequantize()[same], bnbf.dequantize_4bit(packed, state)[same]), "values differ"

    timings = {
        "quantize": (lambda: quantize_nf4(weight),
                     lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")),
        "dequantize": (lambda: q.dequantize(), lambda: bnbf.dequantize_4bit(packed, state)),
    }
    rows = []
    for op, (ours, theirs) in timings.items():
        ours_s, theirs_s = best_times(ours, theirs, repeats)
        gbytes = weight.numel() * weight.element_size() / 1e9  # dense side of the conversion
        rows.append([op, f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), f"{ours_s * 1e3:.1f}",
                     f"{theirs_s * 1e3:.1f}", f"{theirs_s / ours_s:.2f}x", f"{gbytes / ours_s:.2f}"])
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1024x1024,4096x4096", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]

    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            rows += compare(shape, dtype, args.repeats)
            print(rows[-2], rows[-1], flush=True)
    headers = ["op", "weight", "dtype", "minift ms", "bitsandbytes ms", "speed-up (bnb/minift)",
               "minift GB/s (dense side)"]
    table = markdown_table(headers, rows)
    report = (
        "# NF4 on the CPU: minift (pure torch) vs bitsandbytes 0.50\n\n"
        f"Machine: {machine_description()}\n\n"
        f"blocksize 64, double quantization on; best of {args.repeats} runs after a warm-up, providers "
        "alternating in one process (the machine was shared with other jobs: compare ratios, not times). "
        "Outputs checked equal before timing. bitsandbytes quantizes in pure torch and dequantizes with its "
        "C++ kernel.\n\n" + table + "\n"
    )
    print(report)
    write_result("nf4_cpu.md", report)


if __name__ == "__main__":
    main()
