r"""(IA)^3: fine-tune a frozen model by learning one rescaling vector per adapted layer.

Lesson
------
Liu et al. 2022 ("Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
§3.3) ask how little can be learned and still adapt a model: "Infused Adapter by Inhibiting and Amplifying
Inner Activations" multiplies three activations of every block, elementwise, by learned vectors:

    attention   softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)        l_k, l_v: (d_kv,)  scale keys and values
    FFN         (l_ff * act(W_1 x)) W_2                            l_ff: (d_ff,)      scale the intermediate activation

Keys and values are the outputs of k_proj and v_proj, so their vectors scale a layer's *output* rows; the
FFN's intermediate activation is the *input* of down_proj (W_2), so its vector scales that layer's input:

    output scaling (k_proj, v_proj)              input scaling (down_proj: "feedforward" targets)
    x (..., in)                                  x (..., in)
       |                                            |
    W x + b            (..., out)                 l * x                 (..., in)    l: (in,)
       |                                            |
    l * (W x + b)      l: (out,)                  W (l * x) + b         (..., out)

Each vector starts at ones, so step 0 is the base model, and only the vectors train: for SmolLM2-135M
(30 blocks, d_kv = 192, d_ff = 1536) that is 30 * (192 + 192 + 1536) = 57,600 numbers, 0.04% of the model,
five times fewer than LoRA with r = 1 on every linear layer (305,280). (The paper also trains with extra
losses, unlikelihood and length normalisation, on T0; those are training recipes, not part of the layer.)

Merging is exact because a diagonal scaling folds into the matrix next to it:

    l * (W x + b) = (diag(l) W) x + l * b       output scaling: row i of W and b_i times l_i
    W (l * x) + b = (W diag(l)) x + b           input scaling:  column j of W times l_j, bias unchanged

Files are PEFT's (peft_type "IA3"): `base_model.model.<HF path>.ia3_l`, shaped (out, 1) for output scaling and
(1, in) for input scaling, with `target_modules` and `feedforward_modules` in adapter_config.json; the
orientation of each tensor tells which kind of scaling it is, and must agree with feedforward_modules.
PEFT keeps the vectors in float32 over a 16-bit base, multiplies in float32 and casts back; so does IA3Linear.

    from minift.peft import IA3Config, add_ia3, save_adapter
    add_ia3(model, IA3Config())                 # k_proj, v_proj (outputs), down_proj (input): the paper's three
    ... train ...
    save_adapter(model, "my_ia3")               # peft.PeftModel.from_pretrained(hf_model, "my_ia3") reads it
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.adapter_interface import AdapterLayer, adapter_layers
from minift.peft.inject import ParameterCount, count_parameters, find_targets, linear_layers
from minift.peft.lora import dense_weight, is_plain_linear
from minift.peft.peft_format import (CONFIG_FILE, PEFT_FORMAT_VERSION, PREFIX, check_family, check_fields,
                                     group_by_module, hf_paths, read_adapter_directory, reject_unsupported,
                                     target_modules, task_type, write_adapter_directory)


@dataclass
class IA3Config:
    """What add_ia3 adds. PEFT's field names are given where they differ."""

    targets: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])  # target_modules
    feedforward_targets: list[str] | str = field(default_factory=lambda: ["down_proj"])  # feedforward_modules: the
    # targets whose input (not output) is scaled; a subset of targets (suffixes like targets, or a regex)
    init_ones: bool = True  # PEFT init_ia3_weights; False draws N(0, 1) vectors (for tests: not the base model)

    def __post_init__(self) -> None:
        for key in ("targets", "feedforward_targets"):
            value = getattr(self, key)
            if isinstance(value, str):
                if value == "all-linear" and key == "feedforward_targets":
                    raise ValueError("IA3Config.feedforward_targets cannot be 'all-linear'; name the layers whose "
                                     "input is scaled (e.g. ['down_proj'])")
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise ValueError(f"IA3Config.{key}={value!r} is not a valid regex ({e})") from None
            elif not all(isinstance(t, str) and t for t in value) or (key == "targets" and not value):
                raise ValueError(f"IA3Config.{key} must be a list of module-name suffixes or a regex; got {value!r}")
        if isinstance(self.targets, list) and isinstance(self.feedforward_targets, list):
            extra = sorted(set(self.feedforward_targets) - set(self.targets))
            if extra:
                raise ValueError(f"IA3Config.feedforward_targets {extra} are not in targets {self.targets}; every "
                                 "feedforward target must also be a target (as in PEFT)")
        if not isinstance(self.init_ones, bool):
            raise ValueError(f"IA3Config.init_ones must be true or false, got {self.init_ones!r}")


class IA3Linear(AdapterLayer):
    """A frozen linear layer whose output (or, with feedforward=True, input) is rescaled by a learned vector."""

    adapter_kind = "ia3"
    foldable = True

    def __init__(self, base: nn.Module, feedforward: bool, init_ones: bool = True) -> None:
        super().__init__()
        if isinstance(base, AdapterLayer):
            raise ValueError(f"IA3Linear(base): base is already a {base.adapter_kind} adapter layer; stacking "
                             "adapters on one layer is not supported")
        for attribute in ("in_features", "out_features"):
            if not isinstance(getattr(base, attribute, None), int):
                raise ValueError(f"IA3Linear(base): {type(base).__name__} has no integer `{attribute}`")
        self.in_features, self.out_features = base.in_features, base.out_features
        if is_plain_linear(base):  # adopt the Parameters: state-dict names and weight ties stay as they were
            self.base = None
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
            device = base.weight.device
        else:  # e.g. NF4Linear: kept whole, its tensors appear under `base.`
            self.base = base
            device = next((t.device for t in [*base.parameters(), *base.buffers()]), torch.device("cpu"))
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        vector = torch.ones(size, device=device) if init_ones else torch.randn(size, device=device)
        self.ia3_l = nn.Parameter(vector)  # (in,) or (out,), float32 like PEFT's
        self.enabled = True

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_forward(x)
        if self.feedforward:  # scale the input's columns: W (l * x) + b
            return self.base_forward((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))  # (..., in) -> (..., out)
        y = self.base_forward(x)  # (..., out)
        return (y * self.ia3_l).to(y.dtype)  # l * (W x + b)

    # ---- the adapter interface -------------------------------------------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def adapter_enabled(self) -> bool:
        return self.enabled

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing this layer: rows (output scaling) or columns (input) of W times l.

        Over a plain nn.Linear the merged layer reuses the weight and bias Parameters (their data replaced,
        in the weight's dtype); a quantized base is dequantized and merged into float32, never re-quantized.
        """
        weight = self.weight if self.base is None else dense_weight(self.base)  # (out, in)
        bias = self.bias if self.base is None else getattr(self.base, "bias", None)  # (out,) or None
        dtype = weight.dtype if self.base is None else torch.promote_types(weight.dtype, torch.float32)
        l = self.ia3_l.detach().float()
        if self.feedforward:
            new_weight, new_bias = weight.float() * l[None, :], bias  # columns; the bias is added after W
        else:
            new_weight = weight.float() * l[:, None]  # rows
            new_bias = None if bias is None else (bias.float() * l).to(bias.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        if self.base is None:
            linear.weight, linear.bias = self.weight, self.bias  # the same Parameter objects (optimizer, names)
            linear.weight.data = new_weight.to(dtype)
            if new_bias is not None:
                linear.bias.data = new_bias
        else:
            linear.weight = nn.Parameter(new_weight.to(dtype), requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(new_bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        scaled = "input" if self.feedforward else "output"
        state = "" if self.enabled else ", disabled"
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={scaled}{state}"


# ----------------------------------------------------------------------------------------------------
# Adding
# ----------------------------------------------------------------------------------------------------


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: layer for name, layer in adapter_layers(model).items() if isinstance(layer, IA3Linear)}


def feedforward_names(names: list[str], feedforward_targets: list[str] | str) -> set[str]:
    """The module names among `names` that feedforward_targets selects (suffixes, or a regex fullmatch)."""
    if isinstance(feedforward_targets, str):
        return {n for n in names if re.fullmatch(feedforward_targets, n)}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in feedforward_targets)}


def add_ia3(model: nn.Module, config: IA3Config | None = None, verbose: bool = False) -> ParameterCount:
    """Wrap the target layers in IA3Linear, freeze everything else; only the vectors train. In place.

    Returns the trainable-parameter count (printed with verbose=True).
    """
    config = config or IA3Config()
    names = find_targets(model, config.targets, kind="IA3")
    feedforward = feedforward_names(names, config.feedforward_targets)
    if isinstance(config.feedforward_targets, list):
        unmatched = [t for t in config.feedforward_targets if not feedforward_names(names, [t])]
        if unmatched:
            raise ValueError(f"IA3 feedforward_targets {unmatched} select none of the target layers")
    existing = adapter_layers(model)
    for name in names:  # check before changing anything
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            raise ValueError(f"add_ia3: {name} already is {_a(module.adapter_kind)} adapter layer; (IA)^3 cannot be "
                             "stacked on it")
    if any(layer.adapter_kind == "ia3" for layer in existing.values()):
        raise ValueError("add_ia3: the model already has (IA)^3 vectors")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        model.set_submodule(name, IA3Linear(model.get_submodule(name), name in feedforward, config.init_ones))
    count = count_parameters(model)
    if verbose:
        print(count)
    return count


def unwrapped(layer: IA3Linear) -> nn.Module:
    """The layer IA3Linear was made from: its base, or an nn.Linear holding the same weight and bias Parameters."""
    if layer.base is not None:
        return layer.base
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear


def remove_ia3(model: nn.Module) -> nn.Module:
    """Take the (IA)^3 vectors out again, in place: the base model, whose weights were never changed."""
    for name, layer in ia3_layers(model).items():
        model.set_submodule(name, unwrapped(layer))
    return model


# ----------------------------------------------------------------------------------------------------
# PEFT files
# ----------------------------------------------------------------------------------------------------

# Every key PEFT 0.21 writes for IA3 (checked against peft.IA3Config(...).save_pretrained in tests/test_ia3.py).
PEFT_DEFAULTS = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "peft_version": PEFT_FORMAT_VERSION, "revision": None, "target_modules": None,
    "task_type": "CAUSAL_LM",
}
UNSUPPORTED = [  # (key, the value that is fine, why)
    ("fan_in_fan_out", False, "transposed (Conv1D) weights are GPT-2 only"),
    ("modules_to_save", None, "fully trained extra modules (e.g. a classifier) are not adapter tensors"),
]


def write_ia3_files(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """adapter_config.json (peft_type "IA3") + adapter_model.safetensors (one ia3_l per layer) in `directory`."""
    family = check_family(model, "save_adapter")
    model_type = model.config.model_type
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no (IA)^3 layers (call add_ia3 first)")
    paths = dict(zip(layers, hf_paths(list(layers), model_type, "save_adapter")))
    tensors = {}
    for name, layer in layers.items():
        shape = (1, -1) if layer.feedforward else (-1, 1)  # PEFT: (1, in) scales the input, (out, 1) the output
        tensors[f"{PREFIX}{paths[name]}.ia3_l"] = layer.ia3_l.view(shape)
    every = list(linear_layers(model))
    output_paths = [paths[n] for n, layer in layers.items() if not layer.feedforward]
    input_paths = [paths[n] for n, layer in layers.items() if layer.feedforward]
    # A leaf name is written only where it selects exactly these layers among all of the model's, so the
    # feedforward entries select only input-scaled layers and are a subset of target_modules (PEFT checks that).
    feedforward = target_modules(every, input_paths, family, model_type) if input_paths else []
    targets = (target_modules(every, output_paths, family, model_type) if output_paths else []) + feedforward
    config = dict(PEFT_DEFAULTS)
    config.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type(family),
                  target_modules=sorted(targets), feedforward_modules=sorted(feedforward))
    return write_adapter_directory(directory, tensors, config)


def read_ia3_files(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the (IA)^3 vectors of a PEFT IA3 directory to `model` (they train; load_adapter freezes them by default)."""
    family = check_family(model, "load_adapter")
    model_type = model.config.model_type
    config, tensors, weights_file = read_adapter_directory(directory)
    config_file = Path(directory) / CONFIG_FILE
    if config.get("peft_type") != "IA3":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, expected 'IA3'")
    check_fields(config, config_file, {"target_modules": ("str or str list", None),
                                       "feedforward_modules": ("str or str list", None)})
    reject_unsupported(config, config_file, UNSUPPORTED)
    if ia3_layers(model):
        raise ValueError("load_adapter: the model already has (IA)^3 vectors")
    declared = config.get("feedforward_modules")
    grouped = group_by_module(tensors, {".ia3_l": "ia3_l"}, weights_file, model_type, family, "IA3")
    modules = linear_layers(model)
    plan: dict[str, tuple[bool, torch.Tensor]] = {}
    for name, parts in grouped.items():
        where = f"{weights_file}: {parts['hf_path']}.ia3_l"
        module = modules.get(name)
        if module is None or isinstance(module, AdapterLayer):
            raise ValueError(f"{where}: the model has no plain linear layer {name!r} to scale")
        vector = parts["tensors"]["ia3_l"]
        if tuple(vector.shape) == (module.out_features, 1):
            feedforward = False
        elif tuple(vector.shape) == (1, module.in_features):
            feedforward = True
        else:
            raise ValueError(f"{where}: shape {tuple(vector.shape)}, but this model's {name} ({module.in_features} -> "
                             f"{module.out_features}) needs ({module.out_features}, 1) to scale its output or "
                             f"(1, {module.in_features}) to scale its input")
        if isinstance(declared, list):  # PEFT's rule: a module is feedforward if its path ends with an entry
            says = any(parts["hf_path"].endswith(entry) for entry in declared)
            if says != feedforward:
                raise ValueError(f"{where}: shape {tuple(vector.shape)} scales the {'input' if feedforward else 'output'}"
                                 f", but feedforward_modules={declared} in {CONFIG_FILE} says otherwise")
        plan[name] = (feedforward, vector)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (feedforward, vector) in plan.items():
        layer = IA3Linear(model.get_submodule(name), feedforward)
        with torch.no_grad():
            layer.ia3_l.copy_(vector.reshape(-1))
        model.set_submodule(name, layer)
    return model
