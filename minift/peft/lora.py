"""LoRALinear: a frozen linear layer plus small trainable low-rank updates (LoRA, rsLoRA, DoRA).

Lesson
------
Fine-tuning moves a pretrained weight W (out x in) by some delta W. LoRA (Hu et al. 2021, §4.1) bets that
the update has a low "intrinsic rank" and learns it as the product of two thin matrices, B A:

                 x (..., in)
                 |
       +---------+-----------------+
       |                           |
       |                        dropout            (training only)
       |                           |
    W, b (frozen)               A  (r x in)        init: kaiming-uniform(a=sqrt(5)), or "gaussian" N(0, std=1/r)
       |                           |
       |                        B  (out x r)       init: zeros, so the adapted model starts exactly at W
       |                           |
       |                        x scaling          alpha / r     (rsLoRA: alpha / sqrt(r))
       +------------ + ------------+
                     |
        h = W x + b + scaling * B A dropout(x)          (..., out)

Only A and B train: r * (in + out) numbers instead of in * out. Because B starts at zero, step 0 is the
base model. After training, scaling * B A can be added into W ("merge"): inference then costs nothing extra,
and subtracting it again ("unmerge") gives W back up to float rounding.

rsLoRA (Kalajdzievski 2023): with alpha / r the update's size falls as the rank grows, so high ranks learn
no better than low ones; alpha / sqrt(r) keeps it rank-stable.

DoRA (Liu et al. 2024, §4) splits the adapted weight into a magnitude per output unit and a direction:

    W' = m * (W + s B A) / ||W + s B A||      with ||.|| the L2 norm of each row of the (out, in) matrix
                                              (the paper's "column-wise" norm on its (in, out) layout)

m starts at ||W|| (so step 0 is again the base model) and trains with A and B. Following §4.3 the norm
is treated as a constant in the backward pass (detached), which saves memory and barely changes training.
We compute DoRA the way PEFT 0.21 does, as a correction added to the base output (n = the detached norm):

    h = W x + b  +  (m / n - 1) * (W x)  +  (m / n) * s * B A x

and when LoRA dropout is active, both x's on the right are the dropped-out input (W x is recomputed).

Speed. With r = 8 the LoRA matmuls are skinny and memory-bound, so on a CPU their cost is the number of
passes over (tokens x out) tensors, not FLOPs. Two details cut it (PEFT's layer has neither):
* the update is added with one `addmm_` into the base layer's fresh output (result += s * h B^T), instead of
  `result + B(A(x)) * s`, which writes and reads three extra (tokens x out) tensors; autograd then applies s
  to the small (tokens x r) gradients only;
* B^T is passed as a contiguous (r, out) copy (tiny), so autograd computes grad_B as h^T grad and grad_h as
  grad B, the orientations BLAS runs several times faster than grad^T h for r this small.

Design: drop-in, same names
---------------------------
`LoRALinear(base)` replaces `base` at the same place in the module tree. For a plain nn.Linear it adopts
the layer's own `weight` and `bias` Parameter objects, so the state dict keeps `...q_proj.weight` and tied or
shared weights stay shared. Any other linear-like base (an NF4Linear from minift.quant: `in_features`,
`out_features`, `forward`, and `dequantize()` or a `.weight` with `dequantize()`) is kept whole as the child
`base`, so its tensors appear as `...q_proj.base.<name>`; `base_forward` is then just `self.base(x)`.
Adapters live in dicts keyed by adapter name, so the state dict reads like PEFT's:

    blocks.0.attn.q_proj.weight                          the frozen base weight (unchanged name)
    blocks.0.attn.q_proj.lora_A.default.weight           (r, in)
    blocks.0.attn.q_proj.lora_B.default.weight           (out, r)
    blocks.0.attn.q_proj.lora_magnitude_vector.default   (out,)   DoRA only

Dropping ".<adapter name>" gives the tensor names of PEFT's adapter files (see minift/peft/files.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.adapter_interface import AdapterLayer

INITS = ("kaiming", "gaussian")


def is_plain_linear(module: nn.Module) -> bool:
    """True for nn.Linear and subclasses that keep its forward (their math is F.linear(x, weight, bias))."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A linear-like layer's weight as a dense (out, in) tensor: dequantized if it is quantized (NF4Linear)."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    weight = getattr(layer, "weight", None)
    if weight is not None and hasattr(weight, "dequantize"):
        return weight.dequantize()
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    raise TypeError(f"cannot get a dense weight from {type(layer).__name__}")


class LoRALinear(AdapterLayer):
    """A frozen linear layer `base` plus named low-rank adapters; see the module docstring for the math."""

    adapter_kind = "lora"
    foldable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("LoRALinear(base): base is already a LoRALinear; call add_adapter on it instead")
        if isinstance(base, AdapterLayer):
            raise ValueError(f"LoRALinear(base): base is already a {base.adapter_kind} adapter layer; stacking "
                             "adapters on one layer is not supported (merge_adapters(model) first)")
        for attribute in ("in_features", "out_features"):
            if not isinstance(getattr(base, attribute, None), int):
                raise ValueError(f"LoRALinear(base): {type(base).__name__} has no integer `{attribute}`")
        self.in_features, self.out_features = base.in_features, base.out_features
        if is_plain_linear(base):
            self.base = None
            self.weight = base.weight  # the same Parameter object: no copy, names and ties unchanged
            self.register_parameter("bias", base.bias)
        else:
            self.base = base  # e.g. NF4Linear: its tensors appear under `base.`
        self.lora_A = nn.ModuleDict()  # adapter name -> nn.Linear(in, r, bias=False)
        self.lora_B = nn.ModuleDict()  # adapter name -> nn.Linear(r, out, bias=False)
        self.lora_dropout = nn.ModuleDict()  # adapter name -> nn.Dropout or nn.Identity
        self.lora_magnitude_vector = nn.ParameterDict()  # adapter name -> m (out,), DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.settings: dict[str, dict] = {}  # adapter name -> the arguments it was created with (for files)
        self.active: list[str] = []  # adapters applied in forward, in order
        self.disabled = False  # True: forward is the base layer alone (reference outputs)
        self.merged_adapters: list[str] = []  # adapters currently added into self.weight
        self._dora_norms: dict[str, torch.Tensor] = {}  # row norms used at merge time, needed to unmerge

    # ------------------------------------------------------------------------------------------------
    # The base layer
    # ------------------------------------------------------------------------------------------------

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base is None:
            return F.linear(x, self.weight, self.bias)  # (..., out)
        return self.base(x)  # (..., out)

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor (dequantized for a quantized base)."""
        return self.weight if self.base is None else dense_weight(self.base)

    def base_bias(self) -> torch.Tensor | None:
        return self.bias if self.base is None else getattr(self.base, "bias", None)

    def _adapter_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """float32 adapters over a half-precision or quantized base (PEFT does the same), else the weight's dtype."""
        if self.base is None:
            dtype = self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32
            return dtype, self.weight.device
        weight = getattr(self.base, "weight", None)  # NF4Linear: an NF4Tensor with a .device
        tensors = [weight, *self.base.parameters(), *self.base.buffers()]
        device = next((t.device for t in tensors if hasattr(t, "device")), torch.device("cpu"))
        return torch.float32, device

    # ------------------------------------------------------------------------------------------------
    # Adapters
    # ------------------------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
    ) -> None:
        """Create adapter `name` (not activated; see set_adapter)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter name")
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if init not in INITS:
            raise ValueError(f"init={init!r}; expected one of {INITS}")
        dtype, device = self._adapter_dtype_and_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        if init == "kaiming":  # what nn.Linear itself does: uniform with bound 1/sqrt(in)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.settings[name] = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
                                   init=init)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._dora_norm(name))

    def set_adapter(self, names: str | list[str]) -> None:
        """Apply these adapters (in this order) in forward."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"no adapter {name!r} on this layer; it has {list(self.lora_A)}")
        if self.merged_adapters and names != self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the weight; unmerge() before switching")
        self.active = names

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A, the (out, in) update of adapter `name`, in float32."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = torch.promote_types(A.dtype, torch.float32)
        return self.scaling[name] * (B.to(dtype) @ A.to(dtype))  # (out, in)

    def _dora_norm(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| per output row, as a constant (no gradient), in the adapter's dtype. (out,)"""
        with torch.no_grad():
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            W = (self.base_weight() if base_weight is None else base_weight).to(A.dtype)
            return torch.linalg.norm(W + self.scaling[name] * (B @ A), dim=1)  # (out,)

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        if self.disabled or self.merged_adapters or not self.active:
            return self.base_forward(x)
        leading = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (N, in): all tokens as rows, so the matmuls below are plain 2-D
        result = self.base_forward(x)  # (N, out)
        base_result = result
        # The F.linear output is ours alone (its backward needs W, not the output), so LoRA can be accumulated
        # into it in place; not when a DoRA adapter still needs the pure base output, or for a wrapped base
        # whose own backward might have saved its output.
        in_place = self.base is None and not any(n in self.lora_magnitude_vector for n in self.active)
        for name in self.active:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
            x_lora = x.to(A.dtype)
            if name in self.lora_magnitude_vector:
                result = result + self._dora_update(name, x_lora, base_result).to(result.dtype)
                continue
            h = F.linear(self.lora_dropout[name](x_lora), A)  # (N, r)
            if h.dtype != result.dtype:  # float32 adapters on a 16-bit base
                result = result + (F.linear(h, B) * self.scaling[name]).to(result.dtype)
                continue
            B_t = B.t().contiguous()  # (r, out), a tiny copy; see "Speed" above
            if in_place:  # result += scaling * h B^T: one GEMM, no (N, out) temporaries
                result = result.addmm_(h, B_t, alpha=self.scaling[name])
            else:
                result = torch.addmm(result, h, B_t, alpha=self.scaling[name])
        return result.view(*leading, self.out_features)  # (..., out)

    def _dora_update(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """(m/n - 1) * W x + (m/n) * s * B A x, with n = ||W + s B A|| detached (DoRA §4.3, PEFT's order of ops)."""
        A, B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        weight = self.base_weight().to(x.dtype)  # (out, in)
        norm = self._dora_norm(name, weight)  # (out,), no gradient
        magnitude_over_norm = (self.lora_magnitude_vector[name] / norm).view(1, -1)  # (1, out)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_bias()
            Wx = base_result.to(x.dtype) if bias is None else (base_result - bias).to(x.dtype)  # (..., out)
        else:
            x = dropout(x)
            Wx = F.linear(x, weight)  # (..., out): the base path must see the same dropped-out input
        lora_result = B(A(x))  # (..., out)
        return (magnitude_over_norm - 1) * Wx + magnitude_over_norm * lora_result * self.scaling[name]

    # ------------------------------------------------------------------------------------------------
    # Merging
    # ------------------------------------------------------------------------------------------------

    def _check_mergeable(self) -> None:
        dora = [n for n in self.active if n in self.lora_magnitude_vector]
        if dora and len(self.active) > 1:
            raise ValueError(f"merging DoRA adapter {dora[0]!r} together with others is not supported; "
                             f"activate it alone (active: {self.active})")

    def _merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with every active adapter folded in (float32 math, returned in the weight's dtype)."""
        merged = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for name in self.active:
            delta = self.delta_weight(name)  # (out, in)
            if name in self.lora_magnitude_vector:
                norm = torch.linalg.norm(merged + delta, dim=1)  # (out,)
                self._dora_norms[name] = norm
                factor = self.lora_magnitude_vector[name].detach().float() / norm  # (out,)
                merged = factor[:, None] * (merged + delta)
            else:
                merged = merged + delta
        return merged.to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapters into `weight` in place; forward then costs one matmul. Undo with unmerge()."""
        if self.base is not None:
            raise ValueError(f"merge() needs a plain float weight, but this layer wraps {type(self.base).__name__}; "
                             "use minift.peft.merge_lora(model), which builds a new 16/32-bit nn.Linear instead")
        if self.merged_adapters:
            return
        self._check_mergeable()
        self.weight.data = self._merge_into(self.weight)
        self.merged_adapters = list(self.active)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again (exact up to float rounding)."""
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        for name in reversed(self.merged_adapters):
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                factor = self.lora_magnitude_vector[name].detach().float() / self._dora_norms.pop(name)
                weight = weight / factor[:, None] - delta
            else:
                weight = weight - delta
        self.weight.data = weight.to(self.weight.dtype)
        self.merged_adapters = []

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear computing base + active adapters (dequantized first if the base is quantized)."""
        if self.base is None and self.merged_adapters:
            weight = self.weight.data
        else:
            self._check_mergeable()
            base_weight = self.base_weight()
            if self.base is not None and base_weight.dtype not in (torch.float32, torch.float64):
                base_weight = base_weight.float()  # merge into 16/32 bits, never back into 4 bits
            weight = self._merge_into(base_weight)
        bias = self.base_bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        if self.base is None:
            linear.weight = self.weight  # reuse the Parameter: optimizer and tie references stay valid
            linear.weight.data = weight
        else:
            linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone(), False)
        return linear

    # ------------------------------------------------------------------------------------------------
    # The adapter interface (minift/adapter_interface.py)
    # ------------------------------------------------------------------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter's A, B (and DoRA m), active or not: {"lora_A.default.weight": ..., ...}."""
        found = {}
        for name in self.lora_A:
            found[f"lora_A.{name}.weight"] = self.lora_A[name].weight
            found[f"lora_B.{name}.weight"] = self.lora_B[name].weight
            if name in self.lora_magnitude_vector:
                found[f"lora_magnitude_vector.{name}"] = self.lora_magnitude_vector[name]
        return found

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.disabled = not enabled  # a merged layer unmerges itself on its next disabled forward

    def adapter_enabled(self) -> bool:
        return not self.disabled

    def merged(self) -> nn.Linear:
        return self.merged_linear()

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={s['r']}, scaling={self.scaling[n]:g}{', dora' if s['use_dora'] else ''})"
            for n, s in self.settings.items()
        )
        state = "disabled" if self.disabled else f"active={self.active}" + (f", merged={self.merged_adapters}" if self.merged_adapters else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], {state}"
