"""Run every benchmark and write one report: benchmarks/results/REPORT.md.

Each benchmark script already compares minift with its reference library side by side and writes its own
markdown table under benchmarks/results/. This script runs them one after another, each in its own process
(so one that fails is reported with the tail of its error output while the others still run), then
assembles one report: a summary table at the top (the headline ratio of each benchmark next to the target
its issue sets) followed by every result file verbatim, with the machine, the date, the command and the
wall time of each run.

    python benchmarks/run_all.py                 # everything, full sizes (about an hour on a 2-core CPU)
    python benchmarks/run_all.py --only lora,icl # a subset, by name
    python benchmarks/run_all.py --quick         # tiny sizes, a smoke test; written under runs/bench-quick/

Quick mode writes its result files and report into another directory (MINIFT_BENCH_RESULTS), so it never
overwrites the recorded full-size results. The GPU benchmark (nf4_gpu) runs only where CUDA is available and
is listed as skipped, with the reason, everywhere else. Two entries time nothing and need no GPU: roofline (the
datasheet lower bounds nf4_gpu is read against) and kernels_static (every Triton kernel compiled for sm_80 and
sm_90, its registers, spills and shared memory; it reuses build/aot-cache/, so it is quick after a test run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine_description, markdown_table  # noqa: E402


@dataclass
class Benchmark:
    name: str
    script: str
    result: str  # the file the script writes (for nf4_gpu, a glob: its name carries the device)
    target: str  # the goal its issue sets, in words
    # (label, regex) pairs read from the result file: the figure is the regex's last group; with two groups the
    # first names the case (e.g. the weight shape). When a table has several matching rows, the last one counts
    # (the largest size, as the scripts list sizes in increasing order). Where a file gives a ratio both in wall
    # time and in the process's own CPU time, the headline is the CPU-time one: on a shared machine it is the
    # steadier of the two, and it is the one README and results/cpu_training.md quote.
    headline: list[tuple[str, str]]
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    gpu: bool = False


BENCHMARKS = [
    Benchmark("model", "bench_model.py", "model_cpu.md", "forward+backward >= 1.0x transformers (aim 1.3x), "
              "no more peak memory",
              [("forward+backward", r"\| forward\+backward \|[^|]*\|[^|]*\| ([0-9.]+x) \|"),
               ("forward", r"\| forward \|[^|]*\|[^|]*\| ([0-9.]+x) \|")],
              quick=["--layers", "2", "--seq", "32", "--steps", "1", "--rounds", "1"]),
    Benchmark("train", "bench_train.py", "train_cpu.md", "full fine-tuning step >= 1.3x transformers + a "
              "hand-written loop, peak memory <= 0.7x",
              [("step per CPU second", r"\| minift \|(?:[^|]*\|){3} ([0-9.]+x) \|"),
               ("peak memory", r"\| minift \|(?:[^|]*\|){5} ([0-9.]+x) \|")],
              quick=["--layers", "1", "--seq", "32", "--steps", "1", "--rounds", "1"]),
    Benchmark("lora", "bench_lora.py", "lora_cpu.md", "LoRA step >= 1.5x transformers + PEFT (all tokens), peak memory <= 0.7x",
              [("sft per CPU second", r"\*\*sft: minift / PEFT: [0-9.]+x tokens/s \(wall\), ([0-9.]+x) tokens per CPU"),
               ("all tokens per CPU second",
                r"\*\*all: minift / PEFT: [0-9.]+x tokens/s \(wall\), ([0-9.]+x) tokens per CPU"),
               ("sft peak memory", r"\*\*sft: [^*]*peak memory ([0-9.]+x)")],
              full=["--threads", "1", "--warmup", "1", "--steps", "4"],
              quick=["--layers", "1", "--seq", "32", "--batch", "2", "--warmup", "1", "--steps", "1"]),
    Benchmark("qlora", "bench_qlora.py", "qlora_cpu.md", "QLoRA step faster than transformers + PEFT + "
              "bitsandbytes with less peak memory (the issue sets it on a GPU; this is the CPU run)",
              [("step per CPU second", r"\*\*minift / transformers\+PEFT\+bitsandbytes: [0-9.]+x tokens/s \(wall\), "
                                       r"([0-9.]+x) tokens per CPU"),
               ("peak memory", r"\*\*minift / transformers\+PEFT\+bitsandbytes: [^*]*peak memory in training "
                               r"([0-9.]+x)")],
              quick=["--layers", "2", "--seq", "32", "--batch", "2", "--steps", "2"]),
    Benchmark("icl", "bench_icl.py", "icl_cpu.md", "8-shot 3-label scoring, prefix-cached >= 2x naive",
              [("per-query demos", r"\| per-query demos \(BM25\) \|(?:[^|]*\|){4} ([0-9.]+x) \|"),
               ("shared demos", r"\| shared demos \(random\) \|(?:[^|]*\|){4} ([0-9.]+x) \|")],
              quick=["--queries", "2", "--shots", "2", "--pool", "50"]),
    Benchmark("nf4_cpu", "bench_nf4_cpu.py", "nf4_cpu.md", "dequantize >= 1.0x bitsandbytes' C++ loop (CPU)",
              [("quantize fp32", r"\| quantize \| ([0-9]+x[0-9]+) \| float32 \|(?:[^|]*\|){5} ([0-9.]+x) \|"),
               ("dequantize fp32", r"\| dequantize \| ([0-9]+x[0-9]+) \| float32 \|(?:[^|]*\|){5} ([0-9.]+x) \|"),
               ("dequantize bf16", r"\| dequantize \| ([0-9]+x[0-9]+) \| bfloat16 \|(?:[^|]*\|){5} ([0-9.]+x) \|")],
              quick=["--sizes", "128x256", "--repeats", "1"]),
    Benchmark("fused_loss", "bench_fused_loss.py", "fused_loss.md", "memory of the logits part (hidden -> loss -> "
              "grad) <= 0.5x transformers + PEFT on SmolLM2-135M",
              [("all tokens", r"\*\*all: minift fused / transformers\+PEFT = ([0-9.]+x)"),
               ("sft", r"\*\*sft: minift fused / transformers\+PEFT = ([0-9.]+x)")],
              quick=["--batch", "1", "--seq", "32", "--rounds", "1"]),
    Benchmark("dpo", "bench_dpo.py", "dpo_cpu.md", "DPO + LoRA step faster than TRL DPOTrainer + PEFT on the same "
              "weights (issue 13)", [("TRL+PEFT CPU s / minift CPU s", r"minift CPU time: \*\*([0-9.]+x)\*\*")],
              quick=["--layers", "1", "--pairs", "2", "--length", "16", "--steps", "1"]),
    Benchmark("grpo", "bench_grpo.py", "grpo_cpu.md", "a GRPO iteration (sample, score, step) with LoRA vs TRL "
              "GRPOTrainer + PEFT on the same weights (issue 13; reported, no target set)",
              [("TRL+PEFT CPU s / minift CPU s", r"minift CPU time: \*\*([0-9.]+x)\*\*")],
              quick=["--layers", "1", "--prompts", "2", "--group", "2", "--new-tokens", "4", "--iterations", "1"]),
    Benchmark("distributed", "bench_distributed.py", "distributed_scaling.md", "2 gloo processes (DDP) vs 1 "
              "process at equal total threads, same global batch: tokens/s and the share of a step in "
              "communication (issue 14)",
              [("2 processes / 1 process tokens/s", r"\| 2 processes x 1 thread \(DDP, gloo\) \|(?:[^|]*\|){2} ([0-9.]+) \|"),
               ("CPU ms/token 2 proc", r"\| 2 processes x 1 thread \(DDP, gloo\) \|(?:[^|]*\|){3} ([0-9.]+) \|"),
               ("time in comm", r"\| 2 processes x 1 thread \(DDP, gloo\) \|(?:[^|]*\|){4} (-?[0-9]+%) \|")],
              full=["--layers", "1", "--batch", "2", "--seq", "64", "--steps", "2", "--rounds", "2"],
              quick=["--layers", "1", "--batch", "1", "--seq", "16", "--steps", "1", "--rounds", "1"]),
    Benchmark("roofline", "roofline.py", "roofline.md", "not a measurement: the H100/H200 datasheet lower bound of "
              "each NF4 kernel and shape, which nf4_gpu's times are read against", []),
    Benchmark("kernels_static", "kernels_static.py", "kernels_static.md", "not a measurement: every Triton kernel "
              "config compiled for sm_80 and sm_90 without a GPU; no spill or shared-memory overflow outside the "
              "configs the NF4 matmuls' autotuners leave out (kernels/spilling_configs.py)",
              [("defective cases", r"\*\*Defective cases: ([0-9]+)\*\*")]),
    Benchmark("nf4_gpu", "bench_nf4.py", "nf4_*.md", "GEMV >= 85% of bandwidth and >= 1.5x bitsandbytes; "
              "M=4096 GEMM >= 0.9x cuBLAS bf16", [], quick=["--shapes", "smollm2", "--rows", "1,16"], gpu=True),
]


def result_path(bench: Benchmark, results: Path) -> Path | None:
    if bench.gpu:
        found = sorted(p for p in results.glob(bench.result) if p.name != "nf4_cpu.md")
        return found[-1] if found else None
    path = results / bench.result
    return path if path.exists() else None


def headline(bench: Benchmark, text: str) -> str:
    figures = []
    for label, pattern in bench.headline:
        matches = list(re.finditer(pattern, text))
        if not matches:
            figures.append(f"{label} ?")
            continue
        groups = matches[-1].groups()
        figures.append(f"{label} {groups[0]} {groups[-1]}" if len(groups) > 1 else f"{label} {groups[0]}")
    return "; ".join(figures) if figures else "see its section"


def run_one(bench: Benchmark, quick: bool, env: dict) -> dict:
    """Run one benchmark script; returns its status, wall time and (when it failed) the tail of its output."""
    if bench.gpu:
        import torch

        if not torch.cuda.is_available():
            return dict(status="skipped", seconds=0.0, detail="no CUDA GPU on this machine")
    command = [sys.executable, str(HERE / bench.script), *(bench.quick if quick else bench.full)]
    print(f"== {bench.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"   failed (exit {proc.returncode}) after {seconds:.0f} s", flush=True)
        return dict(status=f"failed (exit {proc.returncode})", seconds=seconds, detail=tail)
    print(f"   done in {seconds:.0f} s", flush=True)
    return dict(status="ok", seconds=seconds, detail="")


def demote_headings(markdown: str) -> str:
    """Nest a result file under the report's own headings: '# x' becomes '### x'."""
    return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", markdown, flags=re.MULTILINE)


def build_report(selected: list[Benchmark], outcomes: dict[str, dict], results: Path, command: str) -> str:
    rows, sections = [], []
    for bench in selected:
        outcome = outcomes[bench.name]
        path = result_path(bench, results) if outcome["status"] == "ok" else None
        text = path.read_text() if path else ""
        figures = headline(bench, text) if text else "—"
        rows.append([bench.name, outcome["status"], f"{outcome['seconds']:.0f}", figures, bench.target])
        sections.append(f"## {bench.name} (`benchmarks/{bench.script}`)")
        if text:
            sections.append(demote_headings(text.strip()))
        else:
            detail = outcome["detail"].strip() or "no result file was written"
            sections.append(f"{outcome['status']}:\n\n```\n{detail}\n```")
    summary = markdown_table(["benchmark", "status", "wall s", "headline (minift / reference)", "target"], rows)
    return "\n\n".join([
        "# minift benchmark report",
        f"Machine: {machine_description()}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Command: `{command}`.",
        "Every speed or memory figure is a ratio measured side by side in the same run (> 1: minift is faster or, "
        "for memory, uses more; roofline and kernels_static are static tables, not measurements); each section "
        "below is the benchmark's own result file, with its method and caveats.",
        summary,
        *sections,
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (results elsewhere)")
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(b.name for b in BENCHMARKS))
    parser.add_argument("--out", type=Path, help="where result files and REPORT.md go (default: "
                        "benchmarks/results, or runs/bench-quick with --quick)")
    args = parser.parse_args(argv)
    selected = BENCHMARKS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(b.name for b in BENCHMARKS)}")
        selected = [b for b in BENCHMARKS if b.name in names]
    results = args.out or (Path("runs/bench-quick") if args.quick else RESULTS)
    results = results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MINIFT_BENCH_RESULTS": str(results)}

    outcomes = {bench.name: run_one(bench, args.quick, env) for bench in selected}
    command = "python benchmarks/run_all.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = build_report(selected, outcomes, results, command)
    (results / "REPORT.md").write_text(report)
    print(f"wrote {results / 'REPORT.md'}")
    return 0 if all(o["status"] in ("ok", "skipped") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
