"""minift vs bitsandbytes: NF4 quantize and dequantize speed on the CPU.

Both sides quantize the same random weight (quant_type="nf4", blocksize 64, double quantization on, as
Linear4bit does) and dequantize it back to the weight's dtype. minift is pure torch; bitsandbytes 0.50
quantizes with pure torch too (its default backend) and dequantizes with its C++ CPU kernel. Each timing
is the best of --repeats runs after one warm-up, the two providers alternating in one process; the outputs
are checked to be equal before timing (4-bit and 8-bit scale codes byte for byte, values bit for bit). Both
wall and CPU seconds (process time) are reported: on a shared machine the CPU seconds of a 1-thread run
measure the work done, whatever share of the cores other jobs take.

Dequantizing writes a fresh output, and where that output's pages come from matters as much as the decode
(minift/quant/huge_pages.py): minift advises 2 MiB pages for it, bitsandbytes takes torch.empty's 4 KiB
pages. The first table compares the two as shipped; the second compares like with like, both on 4 KiB pages
(minift's output from plain torch.empty) and both on 2 MiB pages (bitsandbytes' own C++ kernel called into
an output from empty_on_huge_pages, after its own scale decoding). The third splits minift's decode into its
steps, and times writing a fresh output alone, so the gap that is left can be read off.

--threads takes a comma-separated list; each count runs in its own process, with torch's threads and
OMP_NUM_THREADS (which bitsandbytes' OpenMP loop reads when its library loads) set alike, and, above one
thread, OMP_WAIT_POLICY=PASSIVE (see `measure`).

    python benchmarks/bench_nf4_cpu.py [--sizes 1024x1024,4096x4096] [--repeats 5] [--threads 1,2] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, run_isolated, write_result  # noqa: E402

HEADERS = ["op", "weight", "dtype", "minift ms", "bitsandbytes ms", "speed-up (bnb/minift)", "minift CPU ms",
           "bitsandbytes CPU ms", "speed-up in CPU time"]


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


def timing_row(label: str, shape, dtype, best: dict) -> list:
    (ours_s, theirs_s), (ours_cpu, theirs_cpu) = best["wall"], best["cpu"]
    return [label, f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), f"{ours_s * 1e3:.1f}",
            f"{theirs_s * 1e3:.1f}", f"{theirs_s / ours_s:.2f}x", f"{ours_cpu * 1e3:.1f}",
            f"{theirs_cpu * 1e3:.1f}", f"{theirs_cpu / ours_cpu:.2f}x"]


def bnb_kernel_into(packed, state, out):
    """bitsandbytes' dequantize_4bit (CPU backend) with the output given: its scale decoding, then its C++ NF4
    kernel writing into `out` (bitsandbytes registers no CPU `out=` variant, so the call is made here as its
    backend makes it)."""
    import ctypes

    import bitsandbytes.functional as bnbf
    import torch
    from bitsandbytes.cextension import lib

    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    kernel = {torch.float32: lib.cdequantize_blockwise_cpu_nf4_fp32, torch.bfloat16: lib.cdequantize_blockwise_cpu_nf4_bf16,
              torch.float16: lib.cdequantize_blockwise_cpu_nf4_fp16}[out.dtype]
    rows, columns = state.shape[0], state.shape[-1]
    kernel(bnbf.get_ptr(packed), bnbf.get_ptr(absmax), bnbf.get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(columns))
    return out.view(state.shape)


def compare(shape: tuple[int, int], dtype, repeats: int, threads: int) -> tuple[list, list]:
    """(as-shipped rows: quantize and dequantize; like-with-like dequantize rows) for one weight."""
    import bitsandbytes.functional as bnbf
    import torch

    import minift.quant.nf4 as nf4
    from minift.quant import quantize_nf4
    from minift.quant.huge_pages import empty_on_huge_pages

    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    q = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed), "4-bit codes differ from bitsandbytes"
    assert torch.equal(q.absmax, state.absmax), "8-bit scale codes differ from bitsandbytes"
    expected = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(q.dequantize(), expected), "values differ"

    def ours_on_small_pages():  # the same function with its output from plain torch.empty
        nf4.empty_on_huge_pages = lambda numel, dtype: torch.empty(numel, dtype=dtype)
        try:
            return nf4.dequantize_cpu(q, dtype)
        finally:
            nf4.empty_on_huge_pages = empty_on_huge_pages

    def bnb_on_huge_pages():
        return bnb_kernel_into(packed, state, empty_on_huge_pages(weight.numel(), dtype))

    assert torch.equal(ours_on_small_pages(), expected) and torch.equal(bnb_on_huge_pages(), expected)
    shipped = []
    for op, (ours, theirs) in {
        "quantize": (lambda: quantize_nf4(weight),
                     lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")),
        "dequantize": (lambda: q.dequantize(), lambda: bnbf.dequantize_4bit(packed, state)),
    }.items():
        label = op if threads == 1 else f"{op}, {threads} threads"
        shipped.append(timing_row(label, shape, dtype, best_times(ours, theirs, repeats)))
    like = [timing_row(f"both on 4 KiB pages, {threads} thread(s)", shape, dtype,
                       best_times(ours_on_small_pages, lambda: bnbf.dequantize_4bit(packed, state), repeats)),
            timing_row(f"both on 2 MiB pages, {threads} thread(s)", shape, dtype,
                       best_times(lambda: q.dequantize(), bnb_on_huge_pages, repeats))]
    return shipped, like


def step_costs(shape: tuple[int, int], dtype, repeats: int) -> list:
    """CPU ms per whole weight of each step of minift's decode (run chunk by chunk into reused buffers, as
    dequantize_cpu does), and of writing a fresh output alone (fill_) on either page size, against bitsandbytes'
    C++ kernel into memory already mapped."""
    import bitsandbytes.functional as bnbf
    import torch

    import minift.quant.nf4 as nf4
    from minift.quant.huge_pages import empty_on_huge_pages

    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    n = weight.numel()
    chunk = min(nf4.CPU_CHUNK_VALUES, n)
    flat = packed.reshape(-1)[: chunk // 2]
    indices = torch.empty(chunk // 2, dtype=torch.int32).copy_(flat)
    pairs = torch.empty(chunk // 2, dtype=torch.int64)
    values = pairs.view(torch.float32).view(-1, 64)
    scales = torch.rand(chunk // 64, 1)
    narrow = torch.empty(chunk, dtype=dtype)
    mapped = torch.zeros(n, dtype=dtype)
    per_weight = n // chunk

    def per_chunk(step):
        return lambda: [step() for _ in range(per_weight)]

    steps = {
        "bytes -> int32 indices (copy_)": per_chunk(lambda: indices.copy_(flat)),
        "index_select in the 2 KiB pair table": per_chunk(
            lambda: torch.index_select(nf4.BYTE_TO_PAIR_BITS, 0, indices, out=pairs)),
        "mul_ by the block scales": per_chunk(lambda: values.mul_(scales)),
    }
    if dtype != torch.float32:
        steps["float32 -> " + str(dtype).removeprefix("torch.") + " (copy_)"] = per_chunk(
            lambda: narrow.copy_(values.view(-1)))
        steps["not used: mul_ and cast in one torch.mul(out=16-bit)"] = per_chunk(
            lambda: torch.mul(values, scales, out=narrow.view(-1, 64)))
    # the lookups tried and not used, for the same weights (word table: 4 codes per 16-bit word, 1 MiB)
    words = torch.arange(65536)
    word_table = torch.cat([nf4.BYTE_TO_VALUES[words & 255], nf4.BYTE_TO_VALUES[words >> 8]], dim=1)
    word_table = word_table.contiguous().view(torch.complex128).reshape(65536)
    word_indices = flat.view(torch.uint16).int()  # (chunk // 4,) the same bytes read two at a time
    word_out = torch.empty(chunk // 4, dtype=torch.complex128)
    long_indices = indices.long()
    steps.update({
        "not used: index_select in a 1 MiB table of 2-byte words": per_chunk(
            lambda: torch.index_select(word_table, 0, word_indices, out=word_out)),
        "not used: torch.take (int64 indices only)": per_chunk(lambda: torch.take(nf4.BYTE_TO_PAIR_BITS, long_indices)),
        "not used: embedding": per_chunk(
            lambda: torch.nn.functional.embedding(indices, nf4.BYTE_TO_PAIR_BITS.view(256, 1))),
    })
    steps.update({
        "write a fresh output, 4 KiB pages (torch.empty + fill_)": lambda: torch.empty(n, dtype=dtype).fill_(1),
        "write a fresh output, 2 MiB pages (empty_on_huge_pages + fill_)": lambda: empty_on_huge_pages(n, dtype).fill_(1),
        "write mapped memory (fill_)": lambda: mapped.fill_(1),
        "bitsandbytes: scales + C++ kernel into mapped memory": lambda: bnb_kernel_into(packed, state, mapped),
    })
    q = nf4.quantize_nf4(weight)
    for power in range(15, 21):  # the whole dequantize (output on 2 MiB pages) at each chunk size
        steps[f"dequantize_cpu, chunks of 2^{power} values"] = lambda power=power: nf4.dequantize_cpu(q, dtype, 1 << power)
    rows = []
    for name, function in steps.items():
        function()
        best = float("inf")
        for _ in range(repeats):
            cpu = time.process_time()
            function()
            best = min(best, time.process_time() - cpu)
        rows.append([name, f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), f"{best * 1e3:.2f}"])
    return rows


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


def measure(threads: int, sizes: str, repeats: int, with_profile: bool = False) -> dict:
    """Every table for one thread count (call it in a fresh process: OMP_NUM_THREADS is read at load)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before bitsandbytes' OpenMP runtime starts
    if threads > 1:
        # Two OpenMP runtimes share this process (torch's bundled libgomp, and the system one bitsandbytes links);
        # by default each one's idle workers spin after every parallel region, so on a machine with as many cores
        # as threads each side's spinning steals the other's cores (one such run gave 9.6 ms and 14.2 ms for a
        # 1024x1024 dequantize that takes under 2 ms). PASSIVE makes idle workers sleep, for both alike.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    shapes = [tuple(int(n) for n in size.split("x")) for size in sizes.split(",")]
    shipped, like, steps = [], [], []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            rows, same = compare(shape, dtype, repeats, threads)
            shipped += rows
            like += same
            print(*rows, *same, sep="\n", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        steps += step_costs(shapes[-1], dtype, repeats)
    return dict(threads=threads, shipped=shipped, like=like, steps=steps, machine=machine_description(),
                load=(load_before, os.getloadavg()[0]), profile=profile(shapes[-1], threads) if with_profile else "")


WHY = """\
## What bounds the CPU dequantize

minift decodes one packed byte (two weights) per lookup in a 256-entry table of float32 pairs, each pair
stored as one 8-byte integer (2 KiB, so the table stays in the L1 cache), and works through the weight in
chunks of 2^18 values (`dequantize_cpu`; the chunk sizes' rows): per chunk a uint8 -> int32 index copy,
one `index_select` (in torch a serial loop: one 8-byte load and store per byte, with a bounds check), one
in-place float32 multiply by the block scales and, for 16-bit outputs, one rounding copy into
the output. The output is allocated on 2 MiB pages (minift/quant/huge_pages.py). bitsandbytes' C++ loop
does all of it in one pass over the bytes: its AVX-512 build (objdump of libbitsandbytes_cpu.so) widens 16
nibbles to int32, looks them up in the 16 codes held in one register (vpermps), multiplies by the broadcast
block scale and rounds to bfloat16 (vcvtneps2bf16) without leaving registers, and it runs under OpenMP (the
`._omp_fn` clones in the same objdump), so it uses every thread it is given; torch has no in-register
lookup, and its one-dimensional `index_select` runs on one thread whatever the thread count.

Read the steps table for the bound. On one thread, `index_select` alone costs at least as much as
bitsandbytes' whole kernel (scale decoding included), up to about twice it, and the decode steps together
cost more still: with output pages of the same kind on both sides, bitsandbytes
stays ahead (the like-with-like table). What decides the as-shipped ratio at 4096 x 4096 is the output's
pages: a fresh 64 MiB (float32) or 32 MiB (bfloat16) tensor from torch.empty is mapped anew on each call,
and writing it on 4 KiB pages costs several times bitsandbytes' kernel; on 2 MiB pages about a quarter
of that.
bitsandbytes writes into torch.empty's pages, so as shipped minift pays less for its output than
bitsandbytes does. Both would pay the same, and bitsandbytes would be ahead again, if the process set
THP_MEM_ALLOC_ENABLE=1 (torch then advises huge pages for every large allocation) - the "both on 2 MiB
pages" rows. At 1024 x 1024 the outputs (4 MiB and less) come back already mapped from the C library's
heap (its mmap threshold rises to at most 32 MiB after large blocks are freed: mallopt(3)); there the 4 KiB
and 2 MiB rows are equal, no side faults, and the decode alone counts.

Tried and not used (the "not used" rows): a 65,536-entry table decoding two bytes (4 weights) per lookup
(1 MiB, about the size of L2; its gather alone is about as fast per weight as the byte table's, so the
smaller table is kept); `torch.mul(values, scales,
out=bfloat16)` to fuse the multiply with the cast (torch computes into a float32 temporary and copies it:
slower than mul_ then copy_); `torch.take` and `embedding` (several times slower than index_select; none of
these takes uint8 or int16 indices, index_select takes int32 or int64 only). A table of 16-bit codes is not
an option: rounding the code before the float32 multiply rounds twice, which changes values.
`torch.compile` of the plain formula was tried earlier: on this machine, with one thread, it compiled in
16-22 s and ran slower than the chunked loop (its indirect load is not vectorized)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1024x1024,4096x4096", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, each in its own process")
    parser.add_argument("--profile", action="store_true", help="append torch.profiler's table of minift's dequantize")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    if len(counts) == 1:
        results = [measure(counts[0], args.sizes, args.repeats, args.profile)]
    else:
        results = [run_isolated(__file__, "measure", threads=t, sizes=args.sizes, repeats=args.repeats,
                                with_profile=args.profile) for t in counts]
    shipped = sum((r["shipped"] for r in results), [])
    like = sum((r["like"] for r in results), [])
    loads = ", ".join(f"{r['threads']} thread(s): {r['load'][0]:.1f} before, {r['load'][1]:.1f} after" for r in results)
    # How many cores bitsandbytes' parallel loop really got: its CPU time over its wall time, per dequantize row
    cores = "; ".join(
        f"{r['threads']} threads: " + ", ".join(f"{row[1]} {row[2]} {float(row[7]) / float(row[4]):.1f}"
                                                for row in r["shipped"] if row[0].startswith("dequantize"))
        for r in results if r["threads"] > 1)
    steps = "\n\n".join(f"{r['threads']} thread(s):\n\n" + markdown_table(["step", "weight", "dtype", "CPU ms"], r["steps"])
                        for r in results)
    report = (
        "# NF4 on the CPU: minift (pure torch) vs bitsandbytes 0.50\n\n"
        f"Machine: {results[0]['machine'].replace(', torch threads', ', torch threads (first run)')}; "
        f"load average {loads}\n\n"
        f"blocksize 64, double quantization on; best of {args.repeats} runs after a warm-up, providers "
        "alternating in one process, one process per thread count (compare ratios, not times, where the machine "
        "was shared: see the load). Outputs checked equal before timing. bitsandbytes quantizes in pure torch "
        "and dequantizes with its C++ kernel."
        + (f" Cores bitsandbytes' dequantize ran on (its CPU time / wall time; near 1.0 means other jobs held the "
           f"other cores): {cores}." if cores else "") + "\n\n"
        "## As shipped (minift's output on 2 MiB pages, bitsandbytes' from torch.empty)\n\n"
        + markdown_table(HEADERS, shipped) + "\n\n"
        "## Dequantize, like with like (same kind of output pages on both sides)\n\n"
        + markdown_table(["pages"] + HEADERS[1:], like) + "\n\n"
        "## Steps of minift's decode, and writing an output alone (largest weight, CPU ms per whole weight)\n\n"
        + steps + "\n\n" + WHY + "\n"
    )
    report += "".join("\n" + r["profile"] for r in results if r["profile"])
    print(report)
    write_result("nf4_cpu.md", report)


if __name__ == "__main__":
    main()
