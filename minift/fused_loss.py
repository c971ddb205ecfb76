"""Fused linear + cross-entropy: the language-model loss without the (tokens x vocabulary) logits in memory.

Lesson
------
The last step of a language model's loss is

    logits = hidden @ W.T + b           hidden (N, d), W (V, d): logits (N, V)
    loss   = sum_i cross_entropy(logits[i], y[i])

and for a small model with a big vocabulary the logits are by far the largest tensor of training. SmolLM2-135M
has d = 576 and V = 49,152: each target token costs 576 floats of hidden state and 49,152 floats of logits.
Autograd keeps the logits (or their log-softmax) for the backward pass and then makes their gradient, another
(N, V) tensor, so 4,096 target tokens hold 1.6 GB in float32 just to compute one number.

The way out (Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, derived here from the math): the
gradient of the loss with respect to the logits of one row is known in closed form,

    dL/dlogits[i] = softmax(logits[i]) - onehot(y[i])        (label smoothing and soft-capping: see the kernel file)

so the forward pass can compute it at once, while the logits are still there, and push it through the linear
layer immediately:

    for each chunk c of C tokens:
        z   = hidden[c] @ W.T + b                 (C, V)   the only logits ever in memory
        loss += sum of the rows' cross-entropy
        G   = dL/dz                               (C, V)   written over z (same buffer)
        grad_hidden[c]  = G @ W                   (C, d)
        grad_W         += G.T @ hidden[c]         (V, d)   float32 accumulator (chunk 0 writes it: no fill)
        grad_b         += G.sum(0)                (V,)
        (drop z / G)

The backward pass has nothing left to do but multiply the stored gradients by grad_output (the loop divides
the summed loss by the number of targets, so grad_output is 1 / N_total). The peak is one chunk of logits
instead of the full (N, V) tensor and its copies; the FLOPs are the same three GEMMs autograd would run.
The default chunk holds at most 2^23 logits (32 MiB in float32): C = 170 rows for SmolLM2.

Gradients are only computed for what needs them: with LoRA the lm_head is frozen, so grad_W (a V x d
GEMM per chunk and a V x d accumulator) is skipped; under torch.no_grad (evaluation) only the loss is computed.
What it costs: grad_hidden (N x d) and, when lm_head trains, grad_W (V x d, float32) live from forward to
backward: the size of the hidden states and of the weight's gradient, which the unfused backward makes too.

Per-token log-probabilities (DPO and the other preference losses need log p(y_i) of every completion token,
to be summed per sequence and weighted by the loss) cannot use the same trick: their upstream gradient differs
per token and is only known in backward. `linear_token_logprobs` therefore computes log p(y_i) = z_y - lse
chunk by chunk in forward (keeping nothing of size V), and *recomputes* each chunk's logits in backward, where
the gradient of row i is grad_output[i] * (onehot(y_i) - softmax(z_i)). One extra GEMM per chunk buys the same
one-chunk peak.

Details that make it equal to the unfused loss:

* Precision. The logits are computed in the inputs' dtype (like `lm_head(hidden)`), the softmax, loss and
  gradient in float32 (like `F.cross_entropy(logits.float(), ...)`), the gradient is cast back to the logits'
  dtype for the two GEMMs (as autograd does), and grad_W and grad_b are summed over chunks in float32.
  Under torch.autocast the inputs are cast to the autocast dtype first, as autocast's F.linear would.
* ignore_index rows add 0 to the loss and get a zero gradient; N = 0 gives a loss of 0.0 with zero grads.
* Tied weights (lm_head.weight is the token embedding): the weight's gradient is returned to autograd like any
  other, which adds it to the embedding's own gradient on the same Parameter.
* softcap (Gemma 2's final_logit_softcapping): logits -> c * tanh(logits / c) before the softmax.
* Where the work happens per chunk: `minift.kernels.cross_entropy_rows` (Triton, on a GPU) or its pure-torch
  reference (on the CPU); the chunking, the GEMMs and autograd are here, shared by both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.kernels import cross_entropy_rows, cross_entropy_rows_reference

IGNORE_INDEX = -100
CHUNK_LOGITS = 2**23  # logits per chunk by default: 32 MiB in float32
BACKENDS = ("auto", "torch", "triton")
REDUCTIONS = ("sum", "mean")


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk so that one chunk of logits holds at most CHUNK_LOGITS numbers (at least 1 row)."""
    return max(1, CHUNK_LOGITS // max(vocab, 1))


def _rows_function(backend: str, device: torch.device):
    """The per-chunk cross-entropy: Triton on a GPU (or when asked), the pure-torch reference otherwise."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        return cross_entropy_rows
    return cross_entropy_rows_reference


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
           chunk_size: int | None, backend: str, softcap: float | None, label_smoothing: float = 0.0) -> int:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"linear_cross_entropy: hidden must be (N, d) and weight (V, d); got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be integer (N,) = ({hidden.size(0)},); got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias must be (V,) = ({weight.size(0)},); got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 (or None), got {softcap}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    return chunk_size or default_chunk_size(weight.size(0))


def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, cast to its dtype (the casts are recorded, so gradients reach the originals)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _accumulate_grads(G, h, weight, grad_h, grad_w, grad_b, start, end):
    """One chunk's gradient of the logits G (C, V) into grad_hidden rows, grad_W and grad_b."""
    if grad_h is not None:
        torch.mm(G, weight, out=grad_h[start:end])  # (C, d)
    if grad_w is not None:  # (V, d) in float32; the first chunk writes the buffer, the others add into it
        if start == 0:
            torch.mm(G.t().to(grad_w.dtype), h.to(grad_w.dtype), out=grad_w)
        else:
            grad_w.addmm_(G.t().to(grad_w.dtype), h.to(grad_w.dtype))
    if grad_b is not None:
        grad_b += G.sum(0, dtype=torch.float32)  # (V,)


def _new_grads(hidden, weight, bias, need):
    """Gradient buffers for the inputs that need one (need: hidden, weight, bias flags). grad_W is left unfilled
    (the first chunk writes it, saving a V x d fill per step) unless there are no rows, when it stays zero."""
    grad_h = torch.empty_like(hidden) if need[0] else None
    new_w = torch.empty if hidden.size(0) > 0 else torch.zeros
    grad_w = new_w(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
    grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if need[2] else None
    return grad_h, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of hidden @ W.T + b; the gradients are made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_size, rows_fn,
                need):
        grad_h, grad_w, grad_b = _new_grads(hidden, weight, bias, need)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(hidden.size(0), chunk_size):
            h = hidden[start:end]  # (C, d)
            z = F.linear(h, weight, bias)  # (C, V) in the inputs' dtype
            loss_rows, _ = rows_fn(z, targets[start:end], None, ignore_index, label_smoothing, softcap, True)
            loss += loss_rows.sum()
            _accumulate_grads(z, h, weight, grad_h, grad_w, grad_b, start, end)  # z now holds dL/dz
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(weight_dtype) if grad_w is not None else None
        grad_b = (grad_b * grad_loss).to(bias_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _loss_only(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_size, rows_fn):
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start, end in _chunks(hidden.size(0), chunk_size):
        z = F.linear(hidden[start:end], weight, bias)
        loss += rows_fn(z, targets[start:end], None, ignore_index, label_smoothing, softcap, False)[0].sum()
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         chunk_size: int | None = None, reduction: str = "sum", label_smoothing: float = 0.0,
                         softcap: float | None = None, backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(softcap(F.linear(hidden, weight, bias)).float(), targets, reduction=...) without the logits.

    hidden (N, d), weight (V, d), targets (N,) with ignore_index rows, bias (V,) or None. Returns a float32
    scalar: the sum over target rows ("sum"), or that sum / the number of target rows ("mean", NaN for none,
    as PyTorch). chunk_size: rows per chunk (default: 2^23 / V). backend: "auto" (Triton for CUDA tensors,
    pure torch otherwise), "torch", or "triton" (also on the CPU under TRITON_INTERPRET=1: the tests).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    chunk_size = _check(hidden, weight, targets, bias, chunk_size, backend, softcap, label_smoothing)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    rows_fn = _rows_function(backend, hidden.device)
    args = (targets, ignore_index, float(label_smoothing), softcap, chunk_size, rows_fn)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and any(need):
            loss = LinearCrossEntropyFunction.apply(hidden, weight, bias, *args, need)
        else:
            loss = _loss_only(hidden, weight, bias, *args)
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum()
    return loss


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """log p(targets[i]) under softmax(hidden @ W.T + b) per row; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, chunk_size, rows_fn):
        logps = torch.zeros(hidden.size(0), dtype=torch.float32, device=hidden.device)
        for start, end in _chunks(hidden.size(0), chunk_size):
            z = F.linear(hidden[start:end], weight, bias)  # (C, V)
            loss_rows, _ = rows_fn(z, targets[start:end], None, ignore_index, 0.0, softcap, False)
            logps[start:end] = -loss_rows  # log p = s_y - lse = -cross-entropy; 0 on ignored rows
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.settings = (ignore_index, softcap, chunk_size, rows_fn)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets = ctx.saved_tensors
        ignore_index, softcap, chunk_size, rows_fn = ctx.settings
        need = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = _new_grads(hidden, weight, bias, need)
        with torch.autocast(hidden.device.type, enabled=False):
            for start, end in _chunks(hidden.size(0), chunk_size):
                h = hidden[start:end]
                z = F.linear(h, weight, bias)  # (C, V) recomputed
                # d log p / dz = -(d cross-entropy / dz): the kernel's gradient scaled by -grad_output per row
                rows_fn(z, targets[start:end], -grad_logps[start:end], ignore_index, 0.0, softcap, True)
                _accumulate_grads(z, h, weight, grad_h, grad_w, grad_b, start, end)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                          chunk_size: int | None = None, softcap: float | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """log_softmax(softcap(F.linear(hidden, weight, bias)).float())[i, targets[i]] for each row: (N,) float32,
    0 on ignore_index rows; differentiable in hidden, weight and bias, with one chunk of logits at a time."""
    chunk_size = _check(hidden, weight, targets, bias, chunk_size, backend, softcap)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    rows_fn = _rows_function(backend, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearTokenLogprobsFunction.apply(hidden, weight, bias, targets, ignore_index, softcap, chunk_size,
                                                 rows_fn)


def fusable_head(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a vocabulary projection the fused loss can take over: a plain nn.Linear (tied or not).

    None for anything else (an lm_head with a LoRA adapter or in NF4): callers then run the module and the
    unfused loss, which gives the same numbers with the full logits in memory."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    return None


def final_softcap(config) -> float | None:
    """The soft-cap of a model's final logits (ModelConfig.final_softcap, Gemma 2's final_logit_softcapping in
    config.json), None when it has none or there is no config."""
    value = getattr(config, "final_softcap", None)
    return float(value) if value else None
