"""Static resources of every Triton kernel config, compiled for sm_80 and sm_90 on a machine without a GPU.

For each compile case of kernels/aot.py (every kernel x autotuning/launch config x dtype, plus the other
constexpr variants) and each target, the table gives what ptxas reports (registers per thread, spill
stores/loads, stack frame) and the shared memory Triton allocates, against the per-block limits (sm_80:
166,912 B, sm_90: 232,448 B), and whether the tensor-core path is the expected one (wgmma on sm_90, mma.sync
on sm_80). A spill or too much shared memory is a defect (tests/test_aot_compile.py fails on it).

    python benchmarks/kernels_static.py          # writes benchmarks/results/kernels_static.md and
                                                 # kernels/spilling_configs.py

It shares build/aot-cache/ with the test, so after a test run it only reads the cache.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table, write_result  # noqa: E402


def tensor_core_path(report: dict) -> str:
    if report.get("wgmma"):
        return "wgmma"
    if report.get("mma"):
        return "mma.sync"
    return "-"


def status(report: dict, left_out: dict) -> str:
    from minift.kernels import aot

    found = aot.defects(report)
    if not found:
        return "ok"
    listed = report["config"] in left_out.get(report["kernel"], {}).get(report["target"], {}).get(report["dtype"], ())
    return "; ".join(found) + ("; not autotuned here" if listed and report["ok"] else "")


def markdown(reports: list[dict], seconds: float, compiled: int) -> str:
    import triton

    from minift.kernels import aot

    defective = [r for r in reports if aot.defects(r)]
    left_out = aot.spilling_table(reports)
    summary_rows = []
    for (kernel, target), count in sorted(Counter((r["kernel"], r["target"]) for r in reports).items()):
        mine = [r for r in reports if (r["kernel"], r["target"]) == (kernel, target) and r["ok"]]
        summary_rows.append([kernel, target, count, sum(1 for r in mine if not aot.defects(r)),
                             f"{min(r['registers'] for r in mine)}-{max(r['registers'] for r in mine)}" if mine else "-",
                             max((r["shared"] for r in mine), default=0),
                             sum(1 for r in mine if (r["spill_stores"] or 0) > 0)])
    rows = []
    for r in reports:
        rows.append([r["kernel"], r["config"], r["dtype"], r["variant"], r["target"],
                     r.get("registers", "-"), f"{r.get('spill_stores', '-')}/{r.get('spill_loads', '-')}",
                     r.get("stack", "-"), r.get("shared", "-"), tensor_core_path(r),
                     status(r, left_out)])
    return "\n".join([
        "# Triton kernels compiled ahead of time for sm_80 and sm_90 (benchmarks/kernels_static.py)", "",
        f"Machine (no GPU needed): {machine_description()}; triton {triton.__version__} and its bundled ptxas. "
        f"{len(reports)} compiles ({compiled} compiled in this run, the rest from build/aot-cache/), "
        f"{seconds:.0f} s.", "",
        "Registers per thread, spill stores/loads (bytes) and stack frame from ptxas -v; shared memory (bytes) from "
        "Triton's compiled metadata. Limits per block: 255 registers; shared memory sm_80 166,912 B (163 KB), "
        "sm_90 232,448 B (227 KB) (CUDA C Programming Guide, technical specifications per compute capability). "
        "Cases: every autotuning (or launch) config x every dtype at blocksize 64 with double quantization; "
        "'fp32' uses an IEEE fp32 dot, 'fp32-tf32' the TF32 dot torch.backends.cuda.matmul.allow_tf32 selects; "
        "other variants (blocksizes, no double quantization, no bias) as named.", "",
        f"**Defective cases: {len(defective)}**, all in the NF4 matmuls, whose autotuners leave those configs out "
        "for that target and dtype (kernels/spilling_configs.py, written by this script; triton_support.spill_free). "
        "tests/test_aot_compile.py checks that no other kernel has one and that the list is current.", "",
        "## Summary", "",
        markdown_table(["kernel", "target", "cases", "clean", "registers", "max shared (B)", "cases that spill"],
                       summary_rows), "",
        "## Every case", "",
        markdown_table(["kernel", "config", "dtype", "variant", "target", "registers", "spill st/ld (B)",
                        "stack (B)", "shared (B)", "tensor cores", "status"], rows), ""])


SPILLING_FILE = Path(__file__).resolve().parent.parent / "kernels" / "spilling_configs.py"


def spilling_module(table: dict) -> str:
    import json

    return ('"""Autotuning configs that spill registers (or need too much shared memory) when compiled, per kernel,\n'
            'target and dtype: written by benchmarks/kernels_static.py from kernels/aot.py\'s compiles, read by\n'
            "triton_support.spill_free so the NF4 matmuls' autotuners never pick them. tests/test_aot_compile.py\n"
            'checks that this table is what the compiler reports now (rerun the script when it is not)."""\n\n'
            f"SPILLING = {json.dumps(table, indent=4, sort_keys=True)}\n")  # dicts, lists, strings: Python too


def main() -> int:
    from minift.kernels import aot

    started = time.perf_counter()
    reports = aot.compile_all(aot.all_cases())
    seconds = time.perf_counter() - started
    text = markdown(reports, seconds, sum(1 for r in reports if not r.get("cached")))
    written = write_result("kernels_static.md", text)
    # a run redirected away from benchmarks/results/ (run_all --quick or --out) leaves the source tree alone: the
    # table goes beside its result file instead of over kernels/spilling_configs.py
    redirected = written.parent.resolve() != RESULTS.resolve()
    spilling = written.parent / SPILLING_FILE.name if redirected else SPILLING_FILE
    spilling.write_text(spilling_module(aot.spilling_table(reports)))
    print(f"wrote {spilling}")
    defective = [r for r in reports if aot.defects(r)]
    for r in defective:
        print(f"defect: {aot.describe(r)}: {'; '.join(aot.defects(r))}")
    print(f"{len(reports)} compiles, {len(defective)} defective (left out of autotuning where listed in "
          f"kernels/spilling_configs.py), {seconds:.0f} s")
    return 1 if any(not r["ok"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
