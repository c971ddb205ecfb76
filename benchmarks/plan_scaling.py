"""The README's "Scaling out" table: `minift plan` for 7B, 13B and 70B on 8 GPUs of 80 GiB.

    python benchmarks/plan_scaling.py            # prints the README table, writes benchmarks/results/plan_8x80.md

Nothing is measured: these are minift/plan.py's formulas (weights, gradients, AdamW state, activations) on the
published LLaMA / Llama 2 shapes, for full fine-tuning, LoRA and QLoRA (r = 16 on every linear layer), under DDP
and FSDP, activation checkpointing off and on, at 2048 tokens x 1 sequence per GPU with SDPA attention.
tests/test_plan.py checks that README.md holds exactly the table this prints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minift import plan  # noqa: E402

SIZES, GPUS, GPU_GIB, SEQ_LEN, BATCH, LORA_R = ("7b", "13b", "70b"), 8, 80, 2048, 1, 16
COMMAND = (f"minift plan --model SIZE --gpus {GPUS} --gpu-memory {GPU_GIB} --seq-len {SEQ_LEN} --batch {BATCH} "
           f"--lora-r {LORA_R}")


def readme_table() -> str:
    """Total GiB per GPU and whether it fits, one row per (size, method), one column per (sharding, ckpt)."""
    lines = ["| model | method | DDP | DDP + ckpt | FSDP | FSDP + ckpt |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for size in SIZES:
        config = plan.size_config(size)
        counts = plan.count_parameters(config, LORA_R)
        rows = plan.plan_rows(config, counts, GPUS, plan.METHODS, SEQ_LEN, BATCH)
        for method in plan.METHODS:
            cells = [f"{row.total / plan.GiB:.1f} ({row.fit(GPU_GIB * plan.GiB)})"
                     for row in rows if row.method == method]
            name = f"{plan.SIZES[size][0].split(' / ')[-1]} ({counts.total / 1e9:.2f}B)"
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    table = readme_table()
    print(table)
    parts = [f"# minift plan: 7B, 13B and 70B on {GPUS} x {GPU_GIB} GiB\n",
             f"Produced by `python benchmarks/plan_scaling.py` (no measurement: minift/plan.py's formulas). Each "
             f"section is `{COMMAND} --format markdown`.\n", "## Summary (total GiB per GPU, fits?)\n", table + "\n"]
    for size in SIZES:
        parts += [f"## {size}\n", plan.report(size, gpus=GPUS, seq_len=SEQ_LEN, batch=BATCH, gpu_memory=GPU_GIB,
                                              lora_r=LORA_R, fmt="markdown") + "\n"]
    out = Path(os.environ.get("MINIFT_BENCH_RESULTS", ROOT / "benchmarks" / "results")) / "plan_8x80.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print("wrote", out)


if __name__ == "__main__":
    main()
