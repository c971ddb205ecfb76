"""The adapter interface (minift/adapter_interface.py), asked of every kind the same way.

For LoRA, (IA)^3, bottleneck adapters and a soft prompt on one tiny decoder: the adapter parameters are exactly
what trains, disabled_adapters gives the base outputs, merge_adapters folds what can be folded (outputs equal)
and refuses the rest with an error naming the layers, and save_adapter -> load_adapter round-trips each kind.
"""

import pytest
import torch

import minift
from minift.adapter_interface import (AdapterLayer, adapter_layers, adapter_parameter_names, disabled_adapters,
                                      has_adapters, merge_adapters)
from minift.peft import AdapterLayer as ReExported
from minift.peft import IA3Config, LoRAConfig, add_ia3, add_lora, load_adapter, save_adapter
from minift.peft.bottleneck import AdapterConfig, add_adapters
from minift.peft.prompt_tuning import add_prompt_tuning
from tests.train_helpers import tiny_decoder

V = 50
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))


def nudge(model, seed=1):
    """Move every adapter parameter away from its init, so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapter_parameter_names(model):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def add_kind(model, kind):
    if kind == "lora":
        add_lora(model, LoRAConfig(r=2, alpha=2, targets="all-linear"))  # scaling 1
    elif kind == "ia3":
        add_ia3(model, IA3Config())
    elif kind == "bottleneck":
        add_adapters(model, AdapterConfig(bottleneck=4, train_norms=False))
    else:
        add_prompt_tuning(model, n_tokens=3, init="random", generator=torch.Generator().manual_seed(0))
    nudge(model)
    return model


KINDS = ["lora", "ia3", "bottleneck", "prompt"]
FOLDABLE = {"lora": True, "ia3": True, "bottleneck": False, "prompt": False}


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_on_off_merge(kind):
    model = tiny_decoder(V)
    with torch.no_grad():
        base = model(IDS)
    assert not has_adapters(model) and not adapter_parameter_names(model)
    add_kind(model, kind)
    assert has_adapters(model) and ReExported is AdapterLayer
    assert {layer.adapter_kind for layer in adapter_layers(model).values()} == {kind}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_parameter_names(model) == trainable and trainable
    with torch.no_grad():
        adapted = model(IDS)
        assert (adapted - base).abs().max() > 1e-3
        with disabled_adapters(model):
            assert torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), adapted)  # restored
    with pytest.raises(ValueError, match="not a base-model weight"):
        minift.save(model, None, "/nonexistent/never-written")  # adapter tensors are not base weights
    if FOLDABLE[kind]:
        with torch.no_grad():
            merge_adapters(model)
            torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)
        assert not has_adapters(model)
    else:
        with pytest.raises(ValueError, match="cannot be folded") as error:
            merge_adapters(model)
        assert f"({kind})" in str(error.value)
        assert has_adapters(model)  # refused before changing anything
        with torch.no_grad():
            assert torch.equal(model(IDS), adapted)


@pytest.mark.parametrize("kind", KINDS)
def test_one_save_and_load_for_every_kind(kind, tmp_path):
    model = add_kind(tiny_decoder(V), kind)
    with torch.no_grad():
        adapted = model(IDS)
    save_adapter(model, tmp_path / kind)
    fresh = tiny_decoder(V)  # the same base weights (same seed)
    load_adapter(fresh, tmp_path / kind)
    assert {layer.adapter_kind for layer in adapter_layers(fresh).values()} == {kind}
    assert not any(p.requires_grad for p in fresh.parameters())  # for inference by default
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), adapted, atol=1e-6, rtol=1e-6)
    again = tiny_decoder(V)
    load_adapter(again, tmp_path / kind, trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == adapter_parameter_names(again)


def test_mixed_kinds_and_tied_weights_are_clear_errors(tmp_path):
    model = tiny_decoder(V)
    add_ia3(model)
    add_prompt_tuning(model, n_tokens=2, init="random")
    with pytest.raises(ValueError, match="several kinds"):
        save_adapter(model, tmp_path / "mixed")
    with pytest.raises(ValueError, match="soft_prompt \\(prompt\\)"):
        merge_adapters(model)
    tied = tiny_decoder(V)  # lm_head shares the embedding matrix
    add_lora(tied, LoRAConfig(r=2, targets=["lm_head"]))
    with pytest.raises(ValueError, match="shared with"):
        merge_adapters(tied)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        (tmp_path / "empty").mkdir()
        load_adapter(tiny_decoder(V), tmp_path / "empty")
