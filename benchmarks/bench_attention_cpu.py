"""Which attention backend a CPU training step should use: SDPA's kernels, forward + backward, one layer.

minift's attention calls torch's scaled_dot_product_attention (SDPA) with `is_causal=True` when the batch has
no padding mask, and with a boolean mask otherwise; torch then picks its CPU flash-attention kernel, or the
"math" backend (scores, softmax, weighted sum as separate ops, the (T x T) scores kept for backward). This
times the three ways at the SmolLM2-135M attention shape (9 query heads, 3 key-value heads, head size 64),
taking the best of --repeats CPU times of each, interleaved, and writes benchmarks/results/attention_cpu.md.

    python benchmarks/bench_attention_cpu.py [--batch 2] [--seq 256] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, D = args.batch, args.seq, 64
    q = torch.randn(B, 9, T, D, requires_grad=True)
    k, v = (torch.randn(B, 3, T, D, requires_grad=True) for _ in range(2))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)  # what a padding mask gives

    def flash_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def flash_mask():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def math_causal():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ways = {"SDPA, is_causal=True (no mask)": flash_causal, "SDPA, boolean causal mask": flash_mask,
            "SDPA math backend, is_causal=True": math_causal}
    reference = flash_causal()
    for function in ways.values():
        torch.testing.assert_close(function(), reference)
    best = {name: float("inf") for name in ways}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, function in ways.items():
            start = time.process_time()
            function().sum().backward()
            best[name] = min(best[name], time.process_time() - start)
    load_after = os.getloadavg()
    names = {}
    for name, function in ways.items():  # which kernel torch really ran
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            function()
        names[name] = ", ".join(sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_")
                                        and "attention" in e.key or e.key in ("aten::bmm", "aten::_softmax")}))
    fastest = min(best.values())
    rows = [[name, names[name], f"{seconds * 1e3:.1f}", f"{seconds / fastest:.2f}x"] for name, seconds in best.items()]
    report = (f"# Attention on the CPU: SDPA backends, forward + backward of one layer\n\n"
              f"Machine: {machine_description()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
              f"(shared machine; CPU seconds of this process, best of {args.repeats}, interleaved)\n\n"
              f"Shape: batch {B} x {T} tokens, 9 query heads / 3 key-value heads of 64, float32; "
              f"`python benchmarks/bench_attention_cpu.py --batch {B} --seq {T} --threads {args.threads}`.\n\n"
              + markdown_table(["call", "kernels torch ran", "CPU ms", "vs fastest"], rows) + "\n\n"
              "minift's model passes is_causal=True when there is no padding mask and a boolean mask otherwise; "
              "either way torch runs its CPU flash-attention kernel, so nothing is left to choose here. The math "
              "backend is what an explicit (scores, softmax, matmul) implementation costs.\n")
    print(report)
    write_result("attention_cpu.md", report)


if __name__ == "__main__":
    main()
