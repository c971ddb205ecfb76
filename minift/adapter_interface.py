"""The adapter interface: what the engine may ask of any adapter, whatever technique it implements.

Lesson
------
LoRA, (IA)^3, bottleneck adapters and soft prompts change a frozen model in four different ways, but the
rest of minift (the trainer's checkpoints, export, `minift.save`, the 4-bit writer, DPO's reference model)
only ever needs to ask four questions of them. Every adapter module derives from `AdapterLayer` and answers:

    question                         method                       LoRA          (IA)^3        bottleneck   prompt
    -------------------------------  ---------------------------  ------------  ------------  -----------  -------
    which tensors are mine?          adapter_parameters()         A, B, (m)     l             W_down, W_up P
    turn me off / on                 set_adapter_enabled(bool)    base only     base only     identity     no P
    fold me into the weights         merged() -> module | None    W + s B A     W * l         None         None
    what kind am I (save / load)?    adapter_kind                 "lora"        "ia3"         "bottleneck" "prompt"

and the model-level helpers below answer the same questions for a whole model by walking its module tree:

    model --named_modules()--> [ ... AdapterLayer ... ]  (found by class, never by parameter names)
      |
      +-- adapter_layers(model)           {"blocks.0.attn.k_proj": IA3Linear, "soft_prompt": SoftPrompt, ...}
      +-- adapter_parameter_names(model)  {"blocks.0.attn.k_proj.ia3_l", "soft_prompt.weight", ...}
      |                                   = what a checkpoint of an adapter run holds; what minift.save refuses
      +-- has_adapters(model)             anything above at all?
      +-- with disabled_adapters(model):  the base model's outputs (DPO's reference, "forgetting" checks)
      +-- merge_adapters(model)           every foldable layer replaced by its merged() module, in place;
                                          an error naming the layers that cannot be folded (nothing changes)

Saving and loading go through one public pair, `minift.peft.save_adapter(model, directory)` and
`minift.peft.load_adapter(model, directory)`, which dispatch on `adapter_kind` when saving and on the files
when loading (PEFT's adapter_config.json for LoRA and (IA)^3, minift's own files for the other two).

This module sits below minift.io in the layer order and imports nothing but torch, so the checkpoint
readers and writers can ask it without importing any technique.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

KINDS = ("lora", "ia3", "bottleneck", "prompt")


class AdapterLayer(nn.Module):
    """Base class of every adapter module. Subclasses set `adapter_kind` and `foldable` and override the methods."""

    adapter_kind: str = ""  # one of KINDS
    foldable: bool = False  # True: merged() returns a module (merge_adapters checks this before changing anything)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Local names (relative to this module, as in named_parameters()) -> the adapter's own parameters."""
        raise NotImplementedError(f"{type(self).__name__}.adapter_parameters")

    def set_adapter_enabled(self, enabled: bool) -> None:
        """False: this module computes what the base model computes; True: the adapter applies again."""
        raise NotImplementedError(f"{type(self).__name__}.set_adapter_enabled")

    def adapter_enabled(self) -> bool:
        """The state set_adapter_enabled last set (disabled_adapters restores it)."""
        raise NotImplementedError(f"{type(self).__name__}.adapter_enabled")

    def merged(self) -> nn.Module | None:
        """The module that replaces this one with the adapter folded into its weights; None: cannot be folded."""
        return None


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter module of `model` by module name ("" when the model itself is one)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Full names, as in model.named_parameters() / model.state_dict(), of every adapter parameter."""
    names = set()
    for layer_name, layer in adapter_layers(model).items():
        for local in layer.adapter_parameters():
            names.add(f"{layer_name}.{local}" if layer_name else local)
    return names


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, AdapterLayer) for module in model.modules())


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """`with disabled_adapters(model):` every adapter is off (the base model); each one's state is restored after."""
    layers = list(adapter_layers(model).values())
    states = [layer.adapter_enabled() for layer in layers]
    for layer in layers:
        layer.set_adapter_enabled(False)
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.set_adapter_enabled(state)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its merged() module, in place, and return the model.

    Checked first, so a refusal changes nothing: layers that cannot be folded (bottleneck adapters, soft
    prompts: computation a plain architecture does not have) and layers whose base weight is shared with
    another module (a tied lm_head: folding would change both) are named in the error.
    """
    layers = adapter_layers(model)
    unfoldable = [f"{name or '<model>'} ({layer.adapter_kind})" for name, layer in layers.items() if not layer.foldable]
    if unfoldable:
        raise ValueError(f"merge_adapters: {', '.join(unfoldable)} cannot be folded into the weights (extra "
                         "computation no plain model has); save it with minift.peft.save_adapter instead")
    _refuse_shared_weights(model, layers)
    for name, layer in layers.items():
        replacement = layer.merged()
        if replacement is None:
            raise ValueError(f"merge_adapters: {name} ({layer.adapter_kind}) returned no merged module")
        if name:
            model.set_submodule(name, replacement)
        else:
            model = replacement
    return model


def _refuse_shared_weights(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """A foldable layer's base parameters must belong to it alone (tied embeddings would change both uses)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for layer_name, layer in layers.items():
        own = {id(p) for p in layer.adapter_parameters().values()}
        for local, p in layer.named_parameters():
            others = [n for n in owners.get(id(p), []) if not n.startswith(f"{layer_name}.")]
            if id(p) not in own and others:
                raise ValueError(f"merge_adapters: cannot fold {layer_name}: its {local} is shared with {others} "
                                 "(tied embeddings); folding would change both. Untie the weights first or do not "
                                 "put an adapter on this layer")
