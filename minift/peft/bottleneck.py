"""Bottleneck adapters (Houlsby et al. 2019): small trainable layers inserted into a frozen transformer.

Lesson
------
Houlsby et al. ("Parameter-Efficient Transfer Learning for NLP", §2.1) keep the pretrained network
frozen and insert, in every block, a small two-layer network of their own with a bottleneck of size m << d
and a skip connection around it:

    adapter(h) = h + W_up act(W_down h + b_down) + b_up          W_down: (m, d)   W_up: (d, m)

It costs 2md + d + m numbers per adapter (m = 64, d = 576: 74k, vs 3.5M in a SmolLM2 block). W_up starts
at zero (the paper starts both near zero), so adapter(h) = h at step 0: the adapted model *is* the base model
until training moves W_up, and the gradient reaches W_down as soon as W_up is no longer zero.

Where (§2.1, Fig. 2): on the output of each sub-layer (attention, feed-forward), after its projection back
to width d and *before* the residual add; in the paper's post-norm transformer the sum then goes into the
layer norm. Both norm placements in minift, with A = adapter:

    post-norm (BERT, Houlsby's setting)         pre-norm (GPT-2, Llama)
    x = norm1(x + A(attn(x)))                   x = x + A(attn(norm1(x)))
    x = norm2(x + A(mlp(x)))                    x = x + A(mlp(norm2(x)))

    placement = "houlsby"    both adapters (attention and MLP): 2 per block
    placement = "pfeiffer"   MLP only, 1 per block: AdapterFusion (Pfeiffer et al. 2021, §3) found it as good
                             for half the parameters (we keep their position only, not their norm changes)

Houlsby also train the layer norms ("new layer normalization parameters per task"): train_norms = True
(the default) does the same for every LayerNorm / RMSNorm of the model; their number is tiny.

How it is inserted: no subclass and no renamed weights. Each adapter is registered next to the sub-layer
it follows (`blocks.3.attn_adapter`, `blocks.3.mlp_adapter`) and a forward hook on the sub-layer passes its
output through the adapter. Base weights keep their names (blocks.3.attn.q_proj.weight), so checkpoints,
LoRA targeting and minift.save work as before; `print(model)` shows the adapters inside each block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.adapter_interface import AdapterLayer
from minift.io.files import json_field, read_json_file, read_safetensors
from minift.peft.freezing import TrainableReport, set_trainable, trainable_report

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}  # which sub-layers of each block get an adapter
ACTIVATIONS = ("gelu", "relu", "silu")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METHOD = "bottleneck_adapters"  # the "method" key of adapter_config.json (PEFT's files have "peft_type" instead)


@dataclass
class AdapterConfig:
    """What add_adapters inserts. Paper notation: d = model width, m = bottleneck."""

    bottleneck: int = 64  # m; Houlsby et al. try 8, 64 and 256
    placement: str = "houlsby"  # "houlsby": after attention and MLP; "pfeiffer": after the MLP only
    activation: str = "gelu"  # nonlinearity inside the bottleneck: gelu | relu | silu
    train_norms: bool = True  # also train every LayerNorm/RMSNorm of the model, as Houlsby et al. do
    init_std: float = 1e-2  # W_down ~ N(0, init_std^2), truncated at 2 std (the paper's); W_up and biases start at 0

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"AdapterConfig.bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement = {self.placement!r}; expected one of {', '.join(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation = {self.activation!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"AdapterConfig.train_norms must be true or false, got {self.train_norms!r}")
        if not self.init_std > 0:
            raise ValueError(f"AdapterConfig.init_std must be positive, got {self.init_std!r}")


class BottleneckAdapter(AdapterLayer):
    """h + W_up act(W_down h): a near-identity residual bottleneck, exactly the identity at init."""

    adapter_kind = "bottleneck"
    foldable = False  # a nonlinearity between two matrices: no plain layer computes it (merged() is None)

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-2) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)  # W_down (m, d)
        self.up = nn.Linear(bottleneck, dim)  # W_up (d, m)
        self.activation = activation
        self.enabled = True  # False: pass h through unchanged (minift.adapter_interface.disabled_adapters)
        nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # adapter(h) = h at step 0
        nn.init.zeros_(self.up.bias)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        return F.silu(x) if self.activation == "silu" else F.gelu(x)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        return h + self.up(self.act(self.down(h)))  # (B, T, d) -> (B, T, m) -> (B, T, d)

    def after_sublayer(self, sublayer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the sub-layer this adapter follows: its output goes through the adapter.

        A bound method (not a closure), so copy.deepcopy(model) gives hooks that call the copied adapters.
        """
        return self(output)

    # ---- the adapter interface (minift/adapter_interface.py) -----------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """W_down, b_down, W_up, b_up. The norms that train beside them (train_norms) are base parameters."""
        return dict(self.named_parameters())

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def adapter_enabled(self) -> bool:
        return self.enabled

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


# ----------------------------------------------------------------------------------------------------
# Inserting, listing, removing
# ----------------------------------------------------------------------------------------------------


def adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Every bottleneck adapter of `model` by name, e.g. {"blocks.0.attn_adapter": ..., ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every LayerNorm / RMSNorm (any module whose class name ends in "Norm")."""
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm")]


def add_adapters(model: nn.Module, config: AdapterConfig | None = None) -> TrainableReport:
    """Insert adapters into every block of a minift Transformer and freeze everything else (norms trained
    when config.train_norms). Returns the report of what trains; the model's outputs are unchanged."""
    config = config or AdapterConfig()
    if not hasattr(model, "blocks"):
        raise ValueError(f"add_adapters: expected a minift Transformer with `blocks`, got {type(model).__name__}")
    if adapter_modules(model):
        raise ValueError("add_adapters: the model already has bottleneck adapters; remove_adapters(model) first")
    reference = next(model.parameters())
    set_trainable([model], False)
    for block in model.blocks:
        for sublayer in PLACEMENTS[config.placement]:
            adapter = BottleneckAdapter(model.config.dim, config.bottleneck, config.activation, config.init_std)
            adapter.to(device=reference.device, dtype=reference.dtype)
            block.add_module(f"{sublayer}_adapter", adapter)  # named blocks.{i}.attn_adapter / mlp_adapter
            getattr(block, sublayer).register_forward_hook(adapter.after_sublayer)
    if config.train_norms:
        set_trainable(norm_modules(model), True)
    model.adapter_config = config  # read by write_bottleneck_files
    return trainable_report(model)


def remove_adapters(model: nn.Module) -> None:
    """Take the adapters (and their hooks) out again; the base model's weights were never changed."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), BottleneckAdapter):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
    for block in getattr(model, "blocks", []):
        for sublayer in PLACEMENTS["houlsby"]:
            if hasattr(block, f"{sublayer}_adapter"):
                delattr(block, f"{sublayer}_adapter")
    if hasattr(model, "adapter_config"):
        del model.adapter_config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapted model adds or changes: adapter weights, and norm weights if they train."""
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("adapter_state_dict: the model has no bottleneck adapters (call add_adapters first)")
    norm_ids = {id(p) for m in norm_modules(model) for p in m.parameters()} if config.train_norms else set()
    prefixes = tuple(name + "." for name in adapter_modules(model))
    return {name: p.detach() for name, p in model.named_parameters() if name.startswith(prefixes) or id(p) in norm_ids}


# ----------------------------------------------------------------------------------------------------
# Files: adapter_config.json + adapter_model.safetensors, next to (not inside) the base model
# ----------------------------------------------------------------------------------------------------


def write_bottleneck_files(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter config and tensors (a few MB) into `directory` (minift.peft.save_adapter calls this)."""
    from minift.io.files import write_json_atomic, write_safetensors_atomic

    tensors = {name: t.cpu().contiguous() for name, t in adapter_state_dict(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"method": METHOD, **asdict(model.adapter_config)}, directory / CONFIG_FILE)
    write_safetensors_atomic(tensors, directory / WEIGHTS_FILE)
    return directory


def read_bottleneck_files(model: nn.Module, directory: str | Path) -> TrainableReport:
    """Insert adapters as saved in `directory` into a base model and load their tensors (names must match).
    minift.peft.load_adapter calls this."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected a directory written by minift.peft.save_adapter")
    saved = read_json_file(config_file)
    if saved.pop("method", None) != METHOD:
        raise ValueError(f"{config_file}: not a bottleneck-adapter config (no \"method\": \"bottleneck_adapters\")")
    kinds = {"bottleneck": "positive int", "placement": "str", "activation": "str", "train_norms": "bool",
             "init_std": "positive number"}
    unknown = sorted(set(saved) - set(kinds))
    if unknown:
        raise ValueError(f"{config_file}: unknown keys {unknown}; a bottleneck-adapter config has {sorted(kinds)}")
    for key, kind in kinds.items():
        json_field(saved, key, config_file, kind)
    try:
        adapter_config = AdapterConfig(**saved)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None
    tensors = read_safetensors(weights_file, floating=True)
    report = add_adapters(model, adapter_config)
    try:
        expected = adapter_state_dict(model)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_file}: tensors do not match this model's adapters (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}); was it saved from another model?")
        for name, tensor in tensors.items():
            if expected[name].shape != tensor.shape:
                raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(expected[name].shape)}")
    except ValueError:
        remove_adapters(model)  # a failed load leaves the model as it was
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return report
