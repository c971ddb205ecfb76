"""Named tensors <-> a Transformer, checked both ways: what every checkpoint format reads into and writes from.

Lesson
------
Every format in minift/io ends in a state dict under minift's names, and every writer starts from one:

    HF dir / 4-bit dir / .gguf --(format's reader)--> {name: tensor} --build_model--> Transformer
    Transformer --base_model_state--> {name: tensor} --(format's writer)--> HF dir / 4-bit dir

`build_model` checks every tensor against the shape the config implies, so a bad checkpoint fails with the
tensor's name instead of producing garbage. It builds on the "meta" device (shapes only, no memory) and then
adopts the loaded tensors as parameters, so peak memory is one copy of the weights, not a random init plus
the checkpoint.

`base_model_state` is the way back, and it refuses what a base-model checkpoint cannot hold: adapter
parameters (the adapter interface says which: minift/adapter_interface.py) and anything that is not a
weight or a bias. Merge the adapters first, or save them on their own with minift.peft.save_adapter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minift.adapter_interface import adapter_parameter_names
from minift.config import ModelConfig
from minift.model import Transformer


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], where: str = "checkpoint") -> Transformer:
    """A Transformer with exactly these weights; a missing, extra or mis-shaped tensor is a clear error."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"{where}: tensor {name!r} is missing (expected shape {tuple(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra[:5]} for a {config.model_type} model")
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced the embedding: tie the head again
    model.reset_rope(model.embed.weight.device)  # computed buffers, not in checkpoints: rebuild them off meta
    return model.eval()


def base_model_state(model: nn.Module, where: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The model's base weights and biases by minift name, refusing adapter tensors.

    Names starting with a prefix in `skip` are left out (the 4-bit writer stores its NF4 layers itself).
    """
    adapters = adapter_parameter_names(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if skip and name.startswith(skip):
            continue
        if name in adapters or not name.endswith(("weight", "bias")):
            raise ValueError(f"{where}: tensor {name!r} is not a base-model weight; merge the adapters into the "
                             "weights or remove them first (or save them with minift.peft.save_adapter)")
        state[name] = tensor
    return state
