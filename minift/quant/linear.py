"""NF4Linear: a drop-in nn.Linear whose frozen weight is stored in NF4, and quantize_model to swap them in.

Lesson
------
QLoRA (Dettmers et al. 2023, §3) keeps the base model in 4 bits and dequantizes each weight on the fly:

    forward:   y = x W^T + b          with W = dequantize(W_nf4) in x's dtype      (..., in) -> (..., out)
    backward:  grad_x = grad_y W      (W dequantized again, never stored in 16 bits)
               no grad for W: it is frozen; LoRA adapters (minift.peft) carry the training signal.

So memory holds only the 4-bit codes (~0.516 bytes per weight with double quantization instead of 2 for
bf16), and the gradient still flows back through every frozen layer to the adapters below it. On a CUDA
tensor the forward calls the fused Triton kernel `minift.kernels.nf4_matmul` (minift.kernels imports its
module, and Triton, on that first call); on a CPU it is the plain torch reference here: dequantize, then
F.linear.

The state dict uses bitsandbytes' Linear4bit layout, so files move between minift and bitsandbytes /
transformers unchanged (see REFERENCE.md):

    weight                                  uint8 ((n + 1) // 2, 1)    packed 4-bit codes
    bias                                    (out,)                     if the layer has one
    weight.absmax                           float32 (n_blocks,), or uint8 codes with double quantization
    weight.quant_map                        float32 (16,)              the NF4 table
    weight.nested_absmax                    float32 (n_blocks / 256,)  double quantization only
    weight.nested_quant_map                 float32 (256,)             double quantization only
    weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON dict: quant_type, blocksize, dtype, shape
                                            (+ nested_blocksize, nested_dtype, nested_offset)

A dense float `weight` of shape (out, in) also loads: it is quantized on the way in.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.dtypes import DTYPES, dtype_name
from minift.kernels import nf4_matmul
from minift.kernels.nf4_codes import DYNAMIC_MAP, NF4_CODE
from minift.quant.nf4 import (
    SUPPORTED_DTYPES,
    VALID_BLOCKSIZES,
    NF4Tensor,
    quantize_nf4,
)

QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class NF4LinearFunction(torch.autograd.Function):
    """y = F.linear(x, dequantize(W), b); backward gives grad_x = grad_y @ W and (if wanted) grad_b."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # only the 4-bit tensor is kept for backward
        return F.linear(x, weight.dequantize(x.dtype), bias)  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantize(grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """Linear layer with a frozen NF4 weight (`self.weight`, an NF4Tensor) and an optional float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None, train_bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, weight: NF4Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype  # None: compute in the input's dtype
        if weight is None:  # an all-zero placeholder, typically overwritten by load_state_dict
            weight = quantize_nf4(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                  blocksize, double_quant)
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"NF4Linear({in_features}, {out_features}) got a weight of shape {tuple(weight.shape)}; "
                             f"expected ({out_features}, {in_features})")
        self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device),
                                     requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, train_bias: bool = False) -> NF4Linear:
        """Quantize an nn.Linear's weight (bitsandbytes-exact) and keep its bias in its own dtype."""
        weight = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, train_bias=train_bias, weight=weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda and triton_available():
            out = nf4_matmul(x, self.weight, bias)  # minift.kernels imports Triton on this first call
        else:
            out = NF4LinearFunction.apply(x, self.weight, bias)  # (..., out)
        return out.to(input_dtype)

    def _apply(self, fn, recurse=True):
        """Let .to(device) / .cuda() / .cpu() move the NF4 weight; dtype casts leave the 4-bit data alone."""
        super()._apply(fn, recurse)
        target = fn(torch.empty(0, device=self.weight.device)).device
        if target != self.weight.device:
            self.weight = self.weight.to(target)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}")

    # ---------------------------------------------------------------------------------- state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.packed
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias (and any buffers)
        for name, tensor in quant_state_tensors(self.weight).items():
            destination[prefix + "weight." + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key = prefix + "weight"
        ours = {k: v for k, v in state_dict.items() if k == weight_key or k.startswith(weight_key + ".")}
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        weight, nested = None, True
        if weight_key not in ours:
            missing_keys.append(weight_key)
        elif weight_key + "." + QUANT_STATE_SUFFIX not in ours and ours[weight_key].is_floating_point():
            weight, nested = self.quantize_dense_weight(ours[weight_key], weight_key, error_msgs), False
        else:
            try:
                weight = nf4_from_state_dict(ours, weight_key, (self.out_features, self.in_features))
                nested = weight.double_quant
            except ValueError as error:
                error_msgs.append(str(error))
        unexpected_keys.extend(k for k in ours if k not in known_keys(weight_key, nested))
        if weight is not None:
            self.weight = weight.to(self.weight.device)

    def quantize_dense_weight(self, dense: torch.Tensor, key: str, error_msgs: list) -> NF4Tensor | None:
        """A float (out, in) weight in the state dict: quantize it with this layer's settings."""
        expected = (self.out_features, self.in_features)
        if tuple(dense.shape) != expected:
            error_msgs.append(f"{key}: dense weight of shape {tuple(dense.shape)}, expected {expected}")
            return None
        return quantize_nf4(dense.to(self.weight.dtype), self.weight.blocksize, self.weight.double_quant)


# ------------------------------------------------------------------------ bitsandbytes layout


def quant_state_tensors(q: NF4Tensor) -> dict[str, torch.Tensor]:
    """The `weight.*` entries of a bitsandbytes Linear4bit state dict (names without the "weight." prefix)."""
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": dtype_name(q.dtype), "shape": list(q.shape)}
    tensors = {"absmax": q.absmax, "quant_map": NF4_CODE.to(q.device)}
    if q.double_quant:
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset.item())
        tensors.update(nested_absmax=q.nested_absmax, nested_quant_map=DYNAMIC_MAP.to(q.device))
    json_bytes = json.dumps(state).encode("utf-8")
    tensors[QUANT_STATE_SUFFIX] = torch.tensor(list(json_bytes), dtype=torch.uint8)  # (len,) on the CPU, as bnb
    return tensors


def known_keys(weight_key: str, double_quant: bool) -> set[str]:
    names = ["absmax", "quant_map", QUANT_STATE_SUFFIX]
    names += ["nested_absmax", "nested_quant_map"] if double_quant else []
    return {weight_key} | {f"{weight_key}.{name}" for name in names}


def check_tensor(tensors: dict, key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{key}: missing from the state dict (bitsandbytes Linear4bit layout expected)")
    tensor = tensors[key]
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{key}: expected {dtype_name(dtype)} of shape {tuple(shape)}, "
                         f"found {dtype_name(tensor.dtype)} of shape {tuple(tensor.shape)}")
    return tensor


def nf4_from_state_dict(tensors: dict, weight_key: str, expected_shape: tuple) -> NF4Tensor:
    """Rebuild an NF4Tensor from bitsandbytes-layout entries, checking every key against the quant state."""
    if any(k.startswith(weight_key + ".quant_state.bitsandbytes__fp4") for k in tensors):
        raise ValueError(f"{weight_key}: the checkpoint is FP4 (bitsandbytes__fp4); NF4Linear reads only NF4")
    state_key = f"{weight_key}.{QUANT_STATE_SUFFIX}"
    if state_key not in tensors:
        raise ValueError(f"{weight_key}: a uint8 weight needs {state_key} (bitsandbytes Linear4bit layout)")
    state = json.loads(bytes(tensors[state_key].cpu().tolist()).decode("utf-8"))
    shape = tuple(state.get("shape") or ())
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{state_key}: quant_type={state.get('quant_type')!r}, NF4Linear needs 'nf4'")
    if shape != tuple(expected_shape):
        raise ValueError(f"{weight_key}: checkpoint shape {shape}, expected {tuple(expected_shape)} "
                         "(out_features, in_features)")
    blocksize, dtype = state.get("blocksize"), DTYPES.get(state.get("dtype"))
    if blocksize not in VALID_BLOCKSIZES or dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{state_key}: blocksize={blocksize!r} / dtype={state.get('dtype')!r} not supported; "
                         f"blocksizes {VALID_BLOCKSIZES}, dtypes {[dtype_name(d) for d in SUPPORTED_DTYPES]}")

    n = torch.Size(shape).numel()
    n_blocks = -(-n // blocksize)
    packed = tensors[weight_key]
    if packed.dtype != torch.uint8:  # bnb's quant_storage option: the same bytes seen as another dtype
        packed = packed.contiguous().reshape(-1).view(torch.uint8).reshape(-1, 1)
    packed = check_tensor({weight_key: packed}, weight_key, torch.uint8, ((n + 1) // 2, 1))
    quant_map = check_tensor(tensors, f"{weight_key}.quant_map", torch.float32, (16,))
    if not torch.equal(quant_map.cpu(), NF4_CODE):
        raise ValueError(f"{weight_key}.quant_map is not the NF4 table (NF4_CODE)")
    if "nested_offset" not in state:
        absmax = check_tensor(tensors, f"{weight_key}.absmax", torch.float32, (n_blocks,))
        return NF4Tensor(packed, absmax, torch.Size(shape), dtype, blocksize)

    nested_blocksize = state.get("nested_blocksize")
    if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise ValueError(f"{state_key}: nested_blocksize={nested_blocksize!r} must be a positive integer")
    codes = check_tensor(tensors, f"{weight_key}.absmax", torch.uint8, (n_blocks,))
    n_nested = -(-n_blocks // nested_blocksize)
    nested_absmax = check_tensor(tensors, f"{weight_key}.nested_absmax", torch.float32, (n_nested,))
    nested_map = check_tensor(tensors, f"{weight_key}.nested_quant_map", torch.float32, (256,))
    if not torch.equal(nested_map.cpu(), DYNAMIC_MAP):
        raise ValueError(f"{weight_key}.nested_quant_map is not the signed dynamic map (DYNAMIC_MAP)")
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=packed.device)
    return NF4Tensor(packed, codes, torch.Size(shape), dtype, blocksize, nested_absmax=nested_absmax,
                     offset=offset, nested_blocksize=nested_blocksize)


# ------------------------------------------------------------------------ whole models


@dataclass
class QuantizationReport:
    """What quantize_model did, and the storage before / after (parameters only; buffers not counted)."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    quantized_params: int = 0  # elements of the weights that are now NF4
    quantized_bytes: int = 0  # their NF4 storage
    dense_bytes: int = 0  # what those weights took before
    model_params: int = 0
    model_bytes: int = 0  # whole model after (NF4 weights + remaining parameters)
    model_bytes_before: int = 0

    @property
    def bytes_per_param_quantized(self) -> float:
        return self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def bytes_per_param_model(self) -> float:
        return self.model_bytes / max(self.model_params, 1)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear layers to NF4, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        lines.append(f"  quantized weights: {self.quantized_params:,} params, {self.dense_bytes:,} -> "
                     f"{self.quantized_bytes:,} bytes ({self.bytes_per_param_quantized:.4f} bytes/param, "
                     f"{8 * self.bytes_per_param_quantized:.3f} bits)")
        lines.append(f"  whole model: {self.model_params:,} params, {self.model_bytes_before:,} -> "
                     f"{self.model_bytes:,} bytes ({self.bytes_per_param_model:.4f} bytes/param)")
        return "\n".join(lines)


def model_storage(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes) counting NF4 weights by their packed storage."""
    params = nbytes = 0
    for p in model.parameters():
        params, nbytes = params + p.numel(), nbytes + p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            params, nbytes = params + module.weight.numel(), nbytes + module.weight.nbytes
    return params, nbytes


def name_matches(name: str, patterns) -> bool:
    """A pattern matches the full module name, its last components ("lm_head"), or as a glob ("*.mlp.*")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, train_bias: bool = False,
                   verbose: bool = False) -> QuantizationReport:
    """Swap every nn.Linear in `model` for an NF4Linear, in place; embeddings and `skip` matches stay dense.

    Also left dense: a Linear whose weight is tied to another module (quantizing would break the tie) and
    the projections of nn.MultiheadAttention (it reads their .weight directly).
    """
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model swaps layers inside a model; for one layer use NF4Linear.from_linear")
    if isinstance(skip, str):
        skip = (skip,)
    report = QuantizationReport()
    report.model_params, report.model_bytes_before = model_storage(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rsplit(".", 1)[0])

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        sharing = [owner for owner in owners[id(module.weight)] if owner != name]
        if name_matches(name, skip):
            report.skipped[name] = f"matches skip={tuple(skip)}"
        elif sharing:
            report.skipped[name] = f"weight tied to {sharing[0]}"
        elif isinstance(parent, nn.MultiheadAttention):
            report.skipped[name] = "inside nn.MultiheadAttention, which reads .weight directly"
        elif type(module).forward is not nn.Linear.forward:
            report.skipped[name] = f"{type(module).__name__} overrides nn.Linear.forward"
        else:
            report.dense_bytes += module.weight.numel() * module.weight.element_size()
            layer = NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype, train_bias)
            setattr(parent, child_name, layer)
            report.quantized.append(name)
            report.quantized_params += layer.weight.numel()
            report.quantized_bytes += layer.weight.nbytes
    report.model_params, report.model_bytes = model_storage(model)
    if verbose:
        print(report)
    return report
