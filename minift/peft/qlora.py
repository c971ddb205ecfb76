"""QLoRA: trainable LoRA adapters on a frozen NF4 base, and how to get a plain 16-bit model back out.

Lesson
------
QLoRA (Dettmers et al. 2023) stacks two memory savings so that fine-tuning needs little more memory than
storing the model in 4 bits:

    base weights   NF4 + double quantization (minift/quant/nf4.py)   0.516 bytes/weight instead of 2 (bf16)
                                                                     or 4 (fp32); frozen, no optimizer state
    adapters       LoRA A (r, in) and B (out, r) (minift/peft/)      float32; the only tensors that train

             x (..., in)
             |------------------------------------------.
       NF4Linear: W = dequantize(W_nf4), on the fly     dropout -> A -> B -> x scaling
             |                                          |
             W x + b ------------------ + --------------'       y = W x + b + scaling * B A x
                                        |
                                    y (..., out)

The forward dequantizes W in the activations' dtype (on a GPU inside the fused Triton matmul, lesson 08).
The backward still flows *through* the frozen layer, grad_x = grad_y @ W, so adapters in lower layers
learn; W gets no gradient at all (it is an NF4Tensor, not a Parameter). §4 of the paper finds that
adapters on every linear layer are what it takes to match 16-bit fine-tuning, so `targets` defaults to
"all-linear" here. (The paper's third idea, paged optimizers that spill Adam state to CPU memory under
pressure, is a CUDA unified-memory feature that minift does not reproduce.)

Preparing a model is two calls, quantize_model(model) then add_lora(model, config) on the NF4Linear layers
(LoRALinear keeps an NF4Linear whole as its `base`). The trainer's `[method] name = "qlora"` entry does exactly
that, with its options (LoRA's, plus blocksize, double_quant, compute_dtype, export_dtype) declared in
minift/train/methods.py's QLoRAOptions; this file holds what only QLoRA needs: getting a dense model back out.

Getting a model out: merge into 16 (or 32) bits, never back into 4
------------------------------------------------------------------
`merge_qlora(model, dtype)` replaces each LoRALinear over an NF4Linear by one dense nn.Linear with

    W' = dequantize(W_nf4) + scaling * B A          (float32 arithmetic, then cast to dtype)

and every other NF4Linear by its dequantized weight, so the result is a plain model that `minift.save`
writes as a Hugging Face directory, with the adapter model's outputs up to the rounding of `dtype`.

Why not re-quantize W' to NF4 ("merge into 4-bit")? The adapters were trained against the dequantized
grid values, and neighbouring NF4 codes are 0.08 to 0.3 of a block's absmax apart (half of that to the
decision boundary between them). Rounding W' back to the nearest code does three things:

    update smaller than the distance to a boundary   W' rounds back to its old code: the update is erased
    update that crosses a boundary                   the weight jumps by a whole step, usually far more
                                                     than the update itself
    the block's largest |weight| moved               absmax changes, every weight of the block is rescaled
                                                     by a slightly different factor and may re-round

So quantize(W') is not dequantize(W_nf4) + scaling * B A: small updates vanish and large ones are
distorted, with errors of the order of the quantization error itself. `merge_qlora_into_nf4` does it
anyway so that the damage can be measured: tests/test_qlora.py checks that it changes the outputs
measurably and that a small update is erased outright; lesson 09 prints the errors on a tiny model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from minift.adapter_interface import adapter_parameter_names, merge_adapters
from minift.peft.lora import LoRALinear
from minift.quant.linear import NF4Linear, QuantizationReport, quantize_model


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's dense (non-adapter) floating-point parameters, e.g. the embedding's."""
    adapters = adapter_parameter_names(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and name not in adapters:
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------------------------------
# Merging and export
# ----------------------------------------------------------------------------------------------------


def dequantized_linear(layer: NF4Linear) -> nn.Linear:
    """A frozen nn.Linear holding `layer`'s dequantized weight (float32) and a copy of its bias."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.dequantize(torch.float32), requires_grad=False)  # (out, in)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)  # (out,)
    return linear


@torch.no_grad()
def merge_qlora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active LoRA adapters into dequantized NF4 weights; every layer becomes a plain nn.Linear.

    In place. W' = dequantize(W_nf4) + scaling * B A is computed in float32, then the whole model is cast
    to `dtype` (default: its dense dtype). Afterwards `minift.save(model, tokenizer, directory)` writes
    a Hugging Face directory.
    """
    dtype = dtype or dense_dtype(model)
    merge_adapters(model)  # LoRALinear, IA3Linear -> nn.Linear; an NF4 base is dequantized first
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):  # quantized layers that carried no adapter
            model.set_submodule(name, dequantized_linear(module))
    return model.to(dtype)


@torch.no_grad()
def merge_qlora_into_nf4(model: nn.Module) -> QuantizationReport:
    """Merge, then quantize the merged weights back to NF4 — the lossy path this module's lesson warns about.

    In place. Only the layers that were NF4 before are re-quantized, with their own blocksize and double
    quantization setting. Provided to *measure* the damage, not as a way to ship a model.
    """
    nf4_layers = {}  # module name after merging -> (blocksize, double_quant, compute_dtype)
    wrappers = set()  # LoRALinear names: their `<name>.base` disappears with the merge
    for name, module in model.named_modules():  # parents come before their children
        if isinstance(module, LoRALinear) and isinstance(module.base, NF4Linear):
            wrappers.add(name)
            layer = module.base
        elif isinstance(module, NF4Linear) and name.rpartition(".")[0] not in wrappers:
            layer = module
        else:
            continue
        nf4_layers[name] = (layer.weight.blocksize, layer.weight.double_quant, layer.compute_dtype)
    if not nf4_layers:
        raise ValueError("merge_qlora_into_nf4: the model has no NF4Linear layer (is it a QLoRA model?)")
    settings = set(nf4_layers.values())
    if len(settings) > 1:
        raise ValueError(f"merge_qlora_into_nf4: NF4 layers use different settings {sorted(map(str, settings))}")
    blocksize, double_quant, compute_dtype = settings.pop()
    merge_qlora(model, torch.float32)
    others = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name not in nf4_layers]
    return quantize_model(model, skip=others, blocksize=blocksize, double_quant=double_quant,
                          compute_dtype=compute_dtype)


def export_merged(model: nn.Module, tokenizer, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a merged copy of a QLoRA model as a Hugging Face directory; `model` itself is left as it was."""
    from minift.io import save

    merged = merge_qlora(copy.deepcopy(model), dtype)
    return save(merged, tokenizer, directory)
