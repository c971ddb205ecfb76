r"""Putting LoRA into a model: choose target layers, swap them for LoRALinear, freeze the rest, merge back.

Lesson
------
LoRA never subclasses the model. `add_lora(model, LoRAConfig(...))` walks the module tree, picks the
linear layers named by `targets`, replaces each one *in place* with a LoRALinear wrapping it, and freezes
every base parameter, so only the adapters train:

    blocks.0.attn.q_proj   nn.Linear(576, 576)   --add_lora-->   LoRALinear(weight, bias, lora_A.default, lora_B.default)
    blocks.0.mlp.up_proj   nn.Linear(576, 1536)  (not a target: untouched, frozen)

Targets, as in PEFT:
    ["q_proj", "v_proj"]     module-name suffixes: a name matches if it equals the suffix or ends with "." + suffix
    r"blocks\.[0-3]\..*"     a regex string, matched against the whole module name (re.fullmatch)
    "all-linear"             every linear layer except the output head `lm_head`

Hu et al. (2021, §7.1) adapt only W_q and W_v; QLoRA (Dettmers et al. 2023, §4) finds that adapting every
linear layer is what matches full fine-tuning. The trainable fraction is small either way: for SmolLM2-135M
with r = 8 on all linear layers it is 2.44M of 136.9M parameters, 1.8%.

Several adapters can live side by side (different `adapter_name`s): `set_adapter(model, name)` picks the one
applied in forward (and trained), `with disabled_adapters(model):` gives the base model's outputs, and
`merge_lora(model)` folds the active adapter into the weights and puts plain nn.Linear layers back, after
which `minift.save` writes an ordinary Hugging Face directory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from minift.adapter_interface import AdapterLayer
from minift.peft.lora import INITS, LoRALinear

OUTPUT_HEAD = "lm_head"  # never part of "all-linear" (PEFT also leaves the output layer out)


@dataclass
class LoRAConfig:
    """What add_lora adds. Field names follow the papers; PEFT's names are given where they differ."""

    r: int = 8  # rank of the update B A
    alpha: float = 16  # PEFT lora_alpha; scaling = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # PEFT lora_dropout; applied to the LoRA path's input while training
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # PEFT target_modules
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    use_dora: bool = False  # weight-decomposed LoRA: trainable magnitude per output unit (Liu et al. 2024)
    init: str = "kaiming"  # A's init: "kaiming" (uniform, a = sqrt(5)) or "gaussian" (std 1/r); B is zero
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init={self.init!r}; expected one of {INITS}")
        if not self.adapter_name or "." in self.adapter_name:
            raise ValueError(f"LoRAConfig.adapter_name={self.adapter_name!r} must be non-empty without '.'")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                try:
                    re.compile(self.targets)
                except re.error as e:
                    raise ValueError(f"LoRAConfig.targets={self.targets!r} is not a valid regex ({e})") from None
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be 'all-linear', a regex, or a non-empty list of "
                             f"module-name suffixes; got {self.targets!r}")


@dataclass
class ParameterCount:
    """Trainable vs all parameters; prints like PEFT's print_trainable_parameters()."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Each distinct Parameter once (tied embeddings count once), split by requires_grad.

    A quantized weight that is not an nn.Parameter (NF4Linear's NF4Tensor) counts with its logical shape, so
    "all params" of a QLoRA model is the same as for the 16-bit model.
    """
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    params = seen.values()
    frozen_quantized = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and not isinstance(weight, torch.Tensor) and hasattr(weight, "shape"):
            frozen_quantized += math.prod(weight.shape)
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params) + frozen_quantized)


# ----------------------------------------------------------------------------------------------------
# Finding targets
# ----------------------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, a LoRALinear, or any drop-in linear module (e.g. NF4Linear) with integer in/out features."""
    if isinstance(module, (nn.Linear, LoRALinear)):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def named_modules_outside_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """All named submodules, without those inside an adapter layer (LoRA's A, B and wrapped base, ...)."""
    found: dict[str, nn.Module] = {}
    adapter_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in adapter_prefixes):
            continue
        found[name] = module
        if isinstance(module, AdapterLayer):
            adapter_prefixes.append(name + ".")
    return found


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the model by name (LoRALinear counts as one; its insides are not listed)."""
    return {n: m for n, m in named_modules_outside_adapters(model).items() if is_linear(m)}


def find_targets(model: nn.Module, targets: list[str] | str, kind: str = "LoRA") -> list[str]:
    """Names of the linear layers that `targets` selects; an error (naming the `kind`) if a target selects none."""
    layers = linear_layers(model)
    if targets == "all-linear":
        chosen = [n for n in layers if n != OUTPUT_HEAD and not n.endswith("." + OUTPUT_HEAD)]
    elif isinstance(targets, str):
        chosen = [n for n in layers if re.fullmatch(targets, n)]
    else:
        modules = named_modules_outside_adapters(model)
        chosen = []
        for suffix in targets:
            matches = [n for n in modules if (n == suffix or n.endswith("." + suffix))]
            if not matches:
                fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                         "up_proj": "gate_up_proj"}.get(suffix)
                hint = f"; this model fuses it into {fused} (Phi-3): target {fused!r}" \
                    if fused and any(n.endswith("." + fused) for n in layers) else ""
                raise ValueError(f"{kind} target {suffix!r} matches no module{hint}; linear layers here end in "
                                 f"{_suffixes(layers)} (or use 'all-linear' or a regex)")
            not_linear = [n for n in matches if n not in layers]
            if not_linear:
                raise ValueError(f"{kind} target {suffix!r} matches {not_linear[0]!r}, a "
                                 f"{type(modules[not_linear[0]]).__name__}, not a linear layer; "
                                 f"linear layers end in {_suffixes(layers)}")
            chosen += [n for n in matches if n not in chosen]
    if not chosen:
        raise ValueError(f"{kind} targets {targets!r} match no linear layer; linear layers end in {_suffixes(layers)}")
    return chosen


def _suffixes(layers: dict[str, nn.Module]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in layers})


# ----------------------------------------------------------------------------------------------------
# Adding, switching, merging
# ----------------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(model: nn.Module, config: LoRAConfig, verbose: bool = False) -> ParameterCount:
    """Wrap the target layers in LoRALinear, add adapter `config.adapter_name`, activate it, freeze the rest.

    The model is changed in place. Returns the trainable-parameter count (printed with verbose=True).
    """
    names = find_targets(model, config.targets)
    for name in names:  # check before changing anything: a failed call leaves the model as it was
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and config.adapter_name in module.lora_A:
            raise ValueError(f"{name} already has an adapter named {config.adapter_name!r}; "
                             "set LoRAConfig.adapter_name to a new name")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            model.set_submodule(name, module)
        module.add_adapter(config.adapter_name, r=config.r, alpha=config.alpha, dropout=config.dropout,
                           use_rslora=config.use_rslora, use_dora=config.use_dora, init=config.init)
    set_adapter(model, config.adapter_name)
    count = count_parameters(model)
    if verbose:
        print(count)
    return count


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.lora_A if n not in names]
    return names


def set_adapter(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Apply adapter `name` in every layer that has it (others: base only); only it trains (if trainable).

    All base parameters are frozen; adapters other than `name` are frozen too, as in PEFT's set_adapter.
    """
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.set_adapter([name] if name in layer.lora_A else [])
        if name in layer.lora_A:
            adapter_params = [layer.lora_A[name].weight, layer.lora_B[name].weight]
            if name in layer.lora_magnitude_vector:
                adapter_params.append(layer.lora_magnitude_vector[name])
            for p in adapter_params:
                p.requires_grad_(trainable)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the weights and put plain nn.Linear layers back, in place.

    Afterwards the model has exactly the parameter names it had before add_lora, so `minift.save` writes a
    Hugging Face directory. A quantized base is dequantized and merged in 16/32 bits (never re-quantized).
    """
    _refuse_shared_weights(model)
    for name, layer in list(lora_layers(model)):
        model.set_submodule(name, layer.merged_linear())
    return model


def _refuse_shared_weights(model: nn.Module) -> None:
    """A LoRA layer whose weight is also used elsewhere (a tied lm_head) cannot be merged without changing both."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in lora_layers(model):
        if layer.base is None and layer.active and len(owners.get(id(layer.weight), [])) > 1:
            others = [n for n in owners[id(layer.weight)] if n != f"{name}.weight"]
            raise ValueError(f"cannot merge LoRA into {name}: its weight is shared with {others} (tied embeddings); "
                             "merging would change both. Untie the weights first or do not target this layer")
