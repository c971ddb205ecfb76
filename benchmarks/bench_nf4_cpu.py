"""minift vs bitsandbytes: NF4 quantize and dequantize speed on the CPU.

Both sides quantize the same random weight (quant_type="nf4", blocksize 64, double quantization on, as
Linear4bit does) and dequantize it back to the weight's dtype. minift is pure torch; bitsandbytes 0.50
quantizes with pure torch too (its default backend) and dequantizes with its C++ CPU kernel. Each timing
is the best of --repeats runs after one warm-up, the two providers alternating in one process; the outputs are checked to be equal
before timing (4-bit and 8-bit scale codes byte for byte, values bit for bit). Both wall and CPU
seconds (process time) are reported: on a shared machine the CPU seconds of a 1-thread run measure the work
done, whatever share of the cores other jobs take. --threads sets torch's threads and OMP_NUM_THREADS (which
bitsandbytes' OpenMP loop reads) alike.

    python benchmarks/bench_nf4_cpu.py [--sizes 1024x1024,4096x4096] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402


def best_times(ours, theirs, repeats: int) -> dict[str, tuple[float, float]]:
    """{"wall"|"cpu": (ours, theirs)}: best of `repeats` each, alternating the two so that background load
    hits both alike."""
    ours(), theirs()  # warm-up
    best = {"wall": [float("inf")] * 2, "cpu": [float("inf")] * 2}
    for _ in range(repeats):
        for side, function in enumerate((ours, theirs)):
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            best["wall"][side] = min(best["wall"][side], time.perf_counter() - wall)
            best["cpu"][side] = min(best["cpu"][side], time.process_time() - cpu)
    return {kind: tuple(pair) for kind, pair in best.items()}


def compare(shape: tuple[int, int], dtype, repeats: int) -> list[list]:
    import bitsandbytes.functional as bnbf
    import torch

    from minift.quant import quantize_nf4

    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    q = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed), "4-bit codes differ from bitsandbytes"
    assert torch.equal(q.absmax, state.absmax), "8-bit scale codes differ from bitsandbytes"
    assert torch.equal(q.dequantize(), bnbf.dequantize_4bit(packed, state)), "values differ"

    timings = {
        "quantize": (lambda: quantize_nf4(weight),
                     lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")),
        "dequantize": (lambda: q.dequantize(), lambda: bnbf.dequantize_4bit(packed, state)),
    }
    rows = []
    for op, (ours, theirs) in timings.items():
        best = best_times(ours, theirs, repeats)
        (ours_s, theirs_s), (ours_cpu, theirs_cpu) = best["wall"], best["cpu"]
        gbytes = weight.numel() * weight.element_size() / 1e9  # dense side of the conversion
        rows.append([op, f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), f"{ours_s * 1e3:.1f}",
                     f"{theirs_s * 1e3:.1f}", f"{theirs_s / ours_s:.2f}x", f"{ours_cpu * 1e3:.1f}",
                     f"{theirs_cpu * 1e3:.1f}", f"{theirs_cpu / ours_cpu:.2f}x", f"{gbytes / ours_s:.2f}"])
    return rows


WHY = """\
## What bounds the CPU dequantize

minift decodes two packed bytes (four weights) per lookup in a 65,536-entry table and works through the
weight in chunks of 32,768 values whose buffers stay in the cache (minift/quant/nf4.py, `dequantize_cpu`):
per chunk a uint8 -> int32 index copy, one `index_select`, one in-place float32 multiply by the block
scales and, for 16-bit outputs, one rounding copy into the output. bitsandbytes' C++ loop does all of it in
one pass over the bytes: its AVX-512 build (objdump of libbitsandbytes_cpu.so) widens 16 nibbles to int32,
looks them up in the 16 codes held in one register (vpermps), multiplies by the broadcast block scale and
rounds to bfloat16 (vcvtneps2bf16) without leaving registers; torch has no such in-register lookup. Where its
output lands on freshly mapped pages, both sides pay the same page faults (writing a new 64 MiB tensor costs
about as much as bitsandbytes' whole float32 dequantize); what is left is minift's several passes, each a
torch op over the chunk, against bitsandbytes' one. The table below (`--profile`) splits minift's time by op.
`torch.compile` of the plain formula (gather the two nibbles' codes, multiply, cast) was tried: on this
machine, with one thread, it compiled in 16-22 s and ran slower than the chunked loop (its indirect load is
not vectorized), so it is not used."""


def profile(shape: tuple[int, int], threads: int) -> str:
    """torch.profiler's table of minift's dequantize (3 calls per dtype), ops sorted by their own CPU time."""
    import torch

    from minift.quant import quantize_nf4

    parts = [f"## Profile of minift's dequantize, {shape[0]}x{shape[1]}, {threads} thread(s), 3 calls\n"]
    for dtype in (torch.float32, torch.bfloat16):
        q = quantize_nf4((torch.randn(shape) * 0.02).to(dtype))
        q.dequantize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                q.dequantize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6, max_name_column_width=24)
        parts.append(f"{dtype}:\n\n```\n{table.strip()}\n```\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1024x1024,4096x4096", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and OpenMP threads")
    parser.add_argument("--profile", action="store_true", help="append torch.profiler's table of minift's dequantize")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before bitsandbytes' OpenMP runtime starts
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    shapes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]

    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            rows += compare(shape, dtype, args.repeats)
            print(rows[-2], rows[-1], flush=True)
    load_after = os.getloadavg()
    headers = ["op", "weight", "dtype", "minift ms", "bitsandbytes ms", "speed-up (bnb/minift)",
               "minift CPU ms", "bitsandbytes CPU ms", "speed-up in CPU time", "minift GB/s (dense side)"]
    table = markdown_table(headers, rows)
    report = (
        "# NF4 on the CPU: minift (pure torch) vs bitsandbytes 0.50\n\n"
        f"Machine: {machine_description()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n\n"
        f"blocksize 64, double quantization on; best of {args.repeats} runs after a warm-up, providers "
        "alternating in one process (the machine was shared with other jobs: compare ratios, not times). "
        "Outputs checked equal before timing. bitsandbytes quantizes in pure torch and dequantizes with its "
        "C++ kernel.\n\n" + table + "\n\n" + WHY + "\n"
    )
    if args.profile:
        report += "\n" + profile(shapes[-1], args.threads)
    print(report)
    write_result("nf4_cpu.md", report)


if __name__ == "__main__":
    main()
