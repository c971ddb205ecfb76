"""Cross-entropy over rows of logits, with its gradient written in place: the Triton half of the fused loss.

Lesson
------
Motivation. The last layer of a language model maps each hidden state h (d numbers) to V logits, V the
vocabulary. For SmolLM2 d = 576 and V = 49,152, so the logits are 85x larger than what produced them:

    N = 4,096 target tokens    hidden (N, d) fp32:  9.4 MB     logits (N, V) fp32:  805 MB

and a plain `F.cross_entropy(lm_head(h), y)` keeps several (N, V) tensors alive at once: the logits, the
log-softmax it saves for backward, and in backward the gradient of the logits. The fused loss
(minift/fused_loss.py) never holds more than one chunk of rows: for each chunk of C tokens it computes the
logits (C, V) with one GEMM, turns them into the loss *and* the gradient of the loss with respect to those
logits, and feeds that gradient straight into the two GEMMs of the backward pass (grad_h = G W,
grad_W += G^T h). Then the chunk's logits are dropped. This file is the middle step, one row at a time.

The math of one row. Logits z (V,), target y, label smoothing eps, optional soft-capping c (Gemma 2):

    s      = c * tanh(z / c)                      (s = z without soft-capping)
    lse    = log sum_k exp(s_k)                   the log of the softmax's denominator
    loss   = (1 - eps) * (lse - s_y) + eps * (lse - mean_k s_k)
    dL/ds  = softmax(s) - (1 - eps) * onehot(y) - eps / V
    dL/dz  = dL/ds * (1 - tanh(z / c)^2)          (the chain rule through the cap; 1 without it)

A row whose target is ignore_index has loss 0 and gradient 0. Each row's gradient is multiplied by
row_scale[row], so the same kernel serves the loss (scale 1; the backward pass scales by grad_output later)
and the backward of per-token log-probabilities (log p_y = -(lse - s_y), so d log p_y / dz is the gradient
above with eps = 0 and scale -grad_output[row]).

The kernel. One program per row, two sweeps over the vocabulary in tiles of BLOCK_V:

    sweep 1   running max m and running sum of exp(s - m) ("online softmax": when m grows, the sum so far is
              rescaled by exp(m_old - m_new)), plus the sum of s for label smoothing   ->  lse, loss
    sweep 2   (only when a gradient is wanted) recompute s from z, p = exp(s - lse), write dL/dz over z

Sweep 2 overwrites the logits with their gradient in the logits' own dtype, so no second (C, V) buffer is
needed: this is why the fused loss's peak is one chunk of logits, not three. s_y is read with one scalar
load before the sweeps. The loss and lse of each row are float32, whatever the logits' dtype.

tanh. Computed as 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf -> 1, underflows to
0 -> -1), and it needs nothing beyond tl.exp, so it runs the same compiled and in the interpreter.

Discussion
----------
* The GEMMs are not in this kernel: cuBLAS does them at tensor-core speed (torch.matmul on chunks). What
  the kernel saves is memory traffic and memory: a separate softmax, subtract, multiply would each read
  and write the (C, V) tile again, and hold extra copies of it.
* Launch config: BLOCK_V = 4,096 for every vocabulary (a smaller one masks the rest of its one tile), 8
  warps: 16 fp32 values per thread per tile; ptxas reports 56-101 registers (the most with softcap) and
  no spills for sm_80 and sm_90 (benchmarks/results/kernels_static.md). Each row reads its logits twice and
  writes them once: the kernel is bandwidth-bound, about 3 x 2 bytes x V per bf16 row.
* Rows are independent, so the grid is simply (rows,). Row offsets are computed in int64.
* Under the interpreter (the CPU tests) a float32 -> bfloat16 store truncates instead of rounding to
  nearest, so bf16 gradients may differ from the torch reference by one unit in the last place.
"""

from __future__ import annotations

import torch

from .triton_support import HAS_TRITON, tl, triton

IGNORE_INDEX = -100


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor | None = None,
                                 ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                                 softcap: float | None = None, compute_grad: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch spec of `cross_entropy_rows`: logits (R, V), targets (R,) -> (loss (R,), lse (R,)) float32.

    With compute_grad, the logits are overwritten by d loss_row / d logits * row_scale[row] (0 on ignored rows).
    """
    rows, vocab = logits.shape
    valid = targets != ignore_index  # (R,)
    safe = torch.where(valid, targets, 0)[:, None]  # (R, 1)
    s = logits.float()  # (R, V): a copy for bf16/fp16 logits, the logits themselves for fp32 (overwritten anyway)
    if softcap is not None:
        tanh = torch.tanh(s / softcap)  # (R, V)
        s = tanh * softcap
    lse = torch.logsumexp(s, dim=-1)  # (R,)
    loss = lse - s.gather(1, safe).squeeze(1)  # (R,)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - s.mean(dim=-1))
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:  # in place, in s: no second (R, V) buffer
        grad = s.sub_(lse[:, None]).exp_()  # softmax
        grad.scatter_add_(1, safe, torch.full_like(lse[:, None], label_smoothing - 1.0))
        if label_smoothing:
            grad -= label_smoothing / vocab
        if softcap is not None:
            grad *= 1.0 - tanh * tanh
        if row_scale is not None:
            grad *= row_scale.float()[:, None]
        if not bool(valid.all()):
            grad[~valid] = 0.0
        if grad.data_ptr() != logits.data_ptr():
            logits.copy_(grad)
    return loss, lse


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, targets_ptr, row_scale_ptr, loss_ptr, lse_ptr,
    stride_row, V, ignore_index, label_smoothing, softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row).to(tl.int32)
    if target == ignore_index:  # nothing to learn here: loss 0 and, if asked for, a zero gradient
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < V)
    else:
        s_target = tl.load(row_ptr + target).to(tl.float32)
        if HAS_SOFTCAP:
            s_target = softcap * _tanh(s_target / softcap)

        # sweep 1: online max and sum of exponentials (per lane, combined after the loop)
        m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)  # (BV,) running max of each lane
        total = tl.zeros((BLOCK_V,), dtype=tl.float32)  # (BV,) sum of exp(s - m) of each lane
        s_sum = 0.0  # sum of s, for label smoothing (a scalar: a third per-lane array would spill on sm_90)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < V
            s = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                s = tl.where(in_vocab, softcap * _tanh(s / softcap), float("-inf"))
            m_new = tl.maximum(m, s)
            # a lane that has seen only -inf so far (past the vocabulary's end) must keep sum 0: shift by 0
            # there, as exp(-inf - -inf) would be nan
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - shift) + tl.exp(s - shift)
            m = m_new
            if HAS_SMOOTHING:
                s_sum += tl.sum(tl.where(in_vocab, s, 0.0), axis=0)
        row_max = tl.max(m, axis=0)
        lse = row_max + tl.log(tl.sum(total * tl.exp(m - row_max), axis=0))  # empty lanes: 0 * 0
        loss = lse - s_target
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - s_sum / V)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

        # sweep 2: the gradient, over the logits
        if COMPUTE_GRAD:
            scale = 1.0
            if HAS_ROW_SCALE:
                scale = tl.load(row_scale_ptr + row).to(tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_vocab = cols < V
                z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    s = softcap * t
                else:
                    s = z
                grad = tl.exp(s - lse)
                grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
                if HAS_SMOOTHING:
                    grad = grad - label_smoothing / V
                if HAS_SOFTCAP:
                    grad = grad * (1.0 - t * t)
                grad = grad * scale
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_vocab)


# The one launch configuration (see the lesson); the AOT compile check and the launcher both read it.
BLOCK_V_MAX = 4096
NUM_WARPS = 8


def launch_config(vocab: int) -> dict:
    """The same tile whatever the vocabulary (a small one masks the rest of the tile): one compiled program."""
    return {"BLOCK_V": BLOCK_V_MAX, "num_warps": NUM_WARPS}


def aot_cases() -> list:
    """What the launcher can compile (kernels/aot.py): the one launch config in each logits dtype, with the
    gradient and no options (the LM loss), plus every other combination of the four flags in bf16."""
    from itertools import product

    from .aot import CompileCase, config_label

    flags = ("HAS_SOFTCAP", "HAS_SMOOTHING", "HAS_ROW_SCALE", "COMPUTE_GRAD")
    default = (False, False, False, True)
    variants = [(dtype, default) for dtype in ("fp32", "fp16", "bf16")]
    variants += [("bf16", values) for values in product((False, True), repeat=4) if values != default]
    config = launch_config(0)
    cases = []
    for dtype, values in variants:
        on = [name for name, value in zip(flags, values) if value]
        cases.append(CompileCase(
            module="fused_linear_cross_entropy_kernel", kernel="_cross_entropy_rows_kernel",
            config=config_label({"BLOCK_V": config["BLOCK_V"]}, config["num_warps"], 3), dtype=dtype,
            pointers=dict(logits_ptr=f"*{dtype}", targets_ptr="*i64", row_scale_ptr="*fp32", loss_ptr="*fp32",
                          lse_ptr="*fp32"),
            constexprs=dict(zip(flags, values), BLOCK_V=config["BLOCK_V"]), num_warps=config["num_warps"],
            num_stages=3, unaligned=("stride_row", "V", "ignore_index"),
            scalars={"label_smoothing": "fp32", "softcap": "fp32"},
            variant="default" if values == default else " ".join(on) or "no flags"))
    return cases


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                       softcap: float | None = None, compute_grad: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `cross_entropy_rows_reference` (same arguments, same results, same in-place gradient).

    logits: (R, V) float32/bfloat16/float16 with unit stride along V; targets (R,) int64; row_scale (R,) or None.
    Runs wherever the kernel can (a CUDA tensor, or any tensor under TRITON_INTERPRET=1).
    """
    if not HAS_TRITON:
        raise RuntimeError("cross_entropy_rows: Triton is not installed; use cross_entropy_rows_reference")
    if logits.dim() != 2 or logits.stride(1) != 1 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows: logits must be (R, V) with unit stride along V and targets (R,); "
                         f"got {tuple(logits.shape)} (strides {logits.stride()}) and {tuple(targets.shape)}")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, lse
    config = launch_config(vocab)
    _cross_entropy_rows_kernel[(rows,)](
        logits, targets.contiguous(), row_scale.float().contiguous() if row_scale is not None else loss, loss, lse,
        logits.stride(0), vocab, ignore_index, float(label_smoothing), float(softcap or 1.0),
        BLOCK_V=config["BLOCK_V"], HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=bool(label_smoothing),
        HAS_ROW_SCALE=row_scale is not None, COMPUTE_GRAD=compute_grad, num_warps=config["num_warps"],
    )
    return loss, lse
