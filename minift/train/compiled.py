"""train.compile = true: torch.compile each transformer block, and count the seconds spent compiling.

Lesson
------
torch.compile (PyTorch 2) traces a module's forward into a graph (TorchDynamo), derives the backward graph
from it ahead of time (AOTAutograd), and hands both to a compiler (Inductor), which fuses chains of
elementwise ops into single loops: C++ with OpenMP on a CPU, Triton kernels on a GPU. Matrix products
still go to BLAS; what compiling saves is the memory traffic between small ops (RMSNorm, RoPE, SiLU x up,
residual adds) and the Python overhead of launching them one by one.

Why each block and not the whole model:

    model.blocks[i].compile()        for every i          (nn.Module.compile: in place)

* All blocks run the same code on same-shaped weights, so Dynamo compiles one graph and every block
  reuses it (weights are graph inputs, not constants). Compiling the whole model would trace all N blocks
  into one long graph: N times the compile time for the same kernels.
* nn.Module.compile() keeps the module's own parameter names. torch.compile(module) would wrap it in an
  OptimizedModule whose state_dict keys start with "_orig_mod.", and checkpoints would no longer load.
* The loop around the blocks (masks, the KV cache, gradient checkpointing) stays plain Python, so
  train.gradient_checkpointing still wraps each (now compiled) block.

The first step pays for compiling: the forward graph when the first block runs, the backward graph at the
first backward. A new sequence length compiles once more, then Dynamo marks the length dynamic and one
graph serves them all. `CompileClock` reads PyTorch's own counters of those seconds, so the loop can log
them apart (`compile_s` in metrics.jsonl) and leave them out of tokens_per_s. The results are the same
computation in a different order of floating-point operations: losses and gradients agree with the eager
model to rounding (tests/test_train_compile.py), not bit for bit.
"""

from __future__ import annotations

import torch.nn as nn

# The timed phases of torch._dynamo.utils.compilation_time_metrics that cover a whole compilation:
# the forward (Dynamo tracing + AOTAutograd + Inductor) and the lazily compiled backward.
COMPILE_PHASES = ("_compile.compile_inner", "backward._backward_impl")


def compile_blocks(model: nn.Module) -> int:
    """Compile each transformer block of `model` (a minift Transformer) in place; returns how many."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"train.compile = true needs a model with transformer blocks; {type(model).__name__} "
                         "has none")
    from minift.quant.nf4 import keep_out_of_compile

    keep_out_of_compile()  # NF4 code lookups and the chunked dequantize stay eager (minift/quant/nf4.py)
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile so far (forward and backward graphs)."""
    from torch._dynamo.utils import compilation_time_metrics  # a private table: read defensively

    return float(sum(sum(compilation_time_metrics.get(phase, ())) for phase in COMPILE_PHASES))


class CompileClock:
    """Compile seconds since this clock started: `elapsed()` grows while the first steps compile."""

    def __init__(self) -> None:
        self.start = compile_seconds()

    def elapsed(self) -> float:
        return compile_seconds() - self.start
