"""Adapter files: one `save_adapter` / `load_adapter` for every kind of adapter, and LoRA's PEFT files.

Lesson
------
Whatever was added to a model, one pair of calls writes it out and reads it back:

    save_adapter(model, directory)     looks at the adapter layers the model has (minift/adapter_interface.py)
    load_adapter(model, directory)     looks at the files in the directory

    kind         files                                                 format        read by
    ----------   ---------------------------------------------------   -----------   --------------------------
    lora         adapter_config.json (peft_type "LORA") + tensors       PEFT's        peft.PeftModel, minift
    ia3          adapter_config.json (peft_type "IA3")  + tensors       PEFT's        peft.PeftModel, minift
    bottleneck   adapter_config.json ("method": "bottleneck_adapters")  minift's      minift
                 + adapter_model.safetensors
    prompt       soft_prompt.safetensors                                minift's      minift

The PEFT directory layout is in peft_format.py; the per-kind writers and readers live beside their
technique (ia3.py, bottleneck.py, prompt_tuning.py), except LoRA's, which are here:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", ...],
                                  "use_rslora": false, "use_dora": false, "task_type": "CAUSAL_LM", ...}
    adapter_model.safetensors    base_model.model.<Hugging Face module path>.lora_A.weight          (r, in)
                                 base_model.model.<Hugging Face module path>.lora_B.weight          (out, r)
                                 base_model.model.<Hugging Face module path>.lora_magnitude_vector  (out,)  DoRA

`write_lora_files` writes both files atomically. `read_lora_files` reads a directory written by either
library: it checks every tensor name and shape against the model before changing it, adds LoRA to exactly
the modules the file holds, and copies the tensors in. `save_merged` writes a full Hugging Face model with
the adapter folded in (a copy is merged, the model you pass is left as it was).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from minift.adapter_interface import KINDS, adapter_layers
from minift.io.files import REQUIRED, read_json_file
from minift.io import save as save_model
from minift.peft import bottleneck, ia3, prompt_tuning
from minift.peft.inject import LoRAConfig, add_lora, linear_layers, lora_layers, merge_lora, set_adapter
from minift.peft.lora import LoRALinear
from minift.peft.peft_format import (CONFIG_FILE, PEFT_FORMAT_VERSION, PREFIX, check_family, check_fields,
                                     group_by_module, hf_module_path, hf_paths, read_adapter_directory,
                                     reject_unsupported, target_modules, task_type, write_adapter_directory)

__all__ = ["adapter_kind_of", "hf_module_path", "load_adapter", "save_adapter", "save_merged"]


# ----------------------------------------------------------------------------------------------------
# One pair for every kind
# ----------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter (adapter tensors only) into `directory`, in the format of its kind.

    adapter_name picks one of several LoRA adapters (default: the active one); base_model_name_or_path is
    recorded in PEFT's adapter_config.json (LoRA, IA3).
    """
    kinds = sorted({layer.adapter_kind for layer in adapter_layers(model).values()}, key=KINDS.index)
    if not kinds:
        raise ValueError("save_adapter: the model has no adapters (add_lora, add_ia3, add_adapters or "
                         "add_prompt_tuning adds one)")
    if len(kinds) > 1:
        raise ValueError(f"save_adapter: the model has adapters of several kinds ({', '.join(kinds)}); one directory "
                         "holds one kind")
    kind = kinds[0]
    if kind != "lora" and adapter_name not in (None, "default"):
        raise ValueError(f"save_adapter: adapter_name={adapter_name!r}, but {kind} adapters have no names")
    if kind == "lora":
        return write_lora_files(model, directory, adapter_name, base_model_name_or_path)
    if kind == "ia3":
        return ia3.write_ia3_files(model, directory, base_model_name_or_path)
    if kind == "bottleneck":
        return bottleneck.write_bottleneck_files(model, directory)
    return prompt_tuning.write_prompt_files(model, directory)


def adapter_kind_of(directory: str | Path) -> str:
    """Which kind of adapter a directory holds, from its files: "lora" | "ia3" | "bottleneck" | "prompt"."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected an adapter directory written by "
                                "save_adapter or by PEFT's save_pretrained)")
    if (directory / prompt_tuning.PROMPT_FILE).is_file():
        return "prompt"
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; an adapter directory holds {CONFIG_FILE} (LoRA, IA3, "
                                f"bottleneck adapters) or {prompt_tuning.PROMPT_FILE} (a soft prompt)")
    config = read_json_file(config_file)
    if config.get("method") == bottleneck.METHOD:
        return "bottleneck"
    peft_type = config.get("peft_type")
    kind = {"LORA": "lora", "IA3": "ia3"}.get(peft_type) if isinstance(peft_type, str) else None
    if kind is None:
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}; minift reads LORA and IA3 "
                         "adapters in PEFT's format")
    return kind


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add the adapter stored in `directory` (any kind save_adapter writes, or a PEFT LoRA / IA3 directory).

    Everything is checked before the model changes: a failed load leaves it as it was. trainable=False
    (the default, for inference) freezes every parameter; trainable=True lets the adapter's tensors train
    (for bottleneck adapters, also the norms they were saved with). LoRA adapters get `adapter_name`.
    """
    kind = adapter_kind_of(directory)
    if kind == "lora":
        return read_lora_files(model, directory, adapter_name, trainable)
    if adapter_name != "default":
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r}, but {kind} adapters have no names")
    if kind == "ia3":
        ia3.read_ia3_files(model, directory)
    elif kind == "bottleneck":
        bottleneck.read_bottleneck_files(model, directory)
    else:
        prompt_tuning.read_prompt_files(model, directory)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# LoRA: saving
# ----------------------------------------------------------------------------------------------------

# Every key PEFT 0.21 writes for LoRA, with PEFT's defaults; write_lora_files fills in the ones that describe
# the adapter.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Config fields minift cannot honour: (key, the value that is fine, why).
UNSUPPORTED = [
    ("fan_in_fan_out", False, "transposed (Conv1D) weights are GPT-2 only"),
    ("bias", "none", "minift adapters do not train biases"),
    ("lora_bias", False, "minift adapters do not train biases"),
    ("modules_to_save", None, "fully trained extra modules (e.g. a classifier) are not adapter tensors"),
    ("rank_pattern", {}, "per-layer ranks are not supported"),
    ("alpha_pattern", {}, "per-layer alphas are not supported"),
    ("layers_to_transform", None, "per-layer selection is expressed by the tensors themselves"),
    ("target_parameters", None, "LoRA on raw parameters is not supported"),
    ("trainable_token_indices", None, "trainable tokens are not supported"),
    ("use_qalora", False, "QA-LoRA is not supported"),
]
# The fields read_lora_files uses: (kind, default); a wrong type ("r": "8") is an error naming the key.
LORA_FIELDS = {
    "r": ("positive int", REQUIRED), "lora_alpha": ("positive number", REQUIRED),
    "target_modules": ("str or str list", REQUIRED), "lora_dropout": ("probability", 0.0),
    "use_rslora": ("bool", False), "use_dora": ("bool", False), "base_model_name_or_path": ("str", None),
}
LORA_PARTS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude_vector"}


def write_lora_files(model: nn.Module, directory: str | Path, adapter_name: str | None = None,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write LoRA adapter `adapter_name` (default: the active one) as a PEFT adapter directory."""
    family = check_family(model, "save_adapter")
    model_type = model.config.model_type
    layers = dict(lora_layers(model))
    if adapter_name is None:
        active = sorted({n for layer in layers.values() for n in layer.active})
        if len(active) != 1:
            raise ValueError(f"save_adapter: pass adapter_name (active adapters: {active or 'none'})")
        adapter_name = active[0]
    holders = {name: layer for name, layer in layers.items() if adapter_name in layer.lora_A}
    if not holders:
        raise ValueError(f"save_adapter: no layer has an adapter named {adapter_name!r}")
    settings = {tuple(sorted(layer.settings[adapter_name].items())) for layer in holders.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} has different r/alpha/dropout/DoRA settings on "
                         "different layers; PEFT's format needs one setting for all")
    setting = holders[next(iter(holders))].settings[adapter_name]

    paths = hf_paths(list(holders), model_type, "save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in zip(paths, holders.values()):
        key = PREFIX + path
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight  # (r, in)
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight  # (out, r)
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]  # (out,)

    config = dict(PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path, task_type=task_type(family),
        r=setting["r"], lora_alpha=setting["alpha"], lora_dropout=setting["dropout"],
        use_rslora=setting["use_rslora"], use_dora=setting["use_dora"],
        init_lora_weights=True if setting["init"] == "kaiming" else "gaussian",
        target_modules=target_modules(list(linear_layers(model)), paths, family, model_type),
    )
    return write_adapter_directory(directory, tensors, config)


def save_merged(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write a Hugging Face model directory with the active adapter merged in; `model` itself is not changed."""
    merged = merge_lora(copy.deepcopy(model))
    return save_model(merged, tokenizer, directory)


# ----------------------------------------------------------------------------------------------------
# LoRA: loading
# ----------------------------------------------------------------------------------------------------


def check_lora_config(config: dict, config_file: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    check_fields(config, config_file, LORA_FIELDS)
    reject_unsupported(config, config_file, UNSUPPORTED)


def read_lora_files(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                    trainable: bool = False) -> nn.Module:
    """Add the PEFT LoRA adapter stored in `directory` to `model` as `adapter_name`, and activate it."""
    family = check_family(model, "load_adapter")
    model_type = model.config.model_type
    config, tensors, weights_file = read_adapter_directory(directory)
    check_lora_config(config, Path(directory) / CONFIG_FILE)
    grouped = group_by_module(tensors, LORA_PARTS, weights_file, model_type, family, "LoRA")
    modules = linear_layers(model)
    r, use_dora = config["r"], bool(config.get("use_dora", False))
    for name, parts in grouped.items():
        where = f"{weights_file}: {parts['hf_path']}"
        if name not in modules:
            raise ValueError(f"{where}: the model has no linear layer {name!r}; was this adapter trained on a "
                             f"different architecture? (base_model_name_or_path={config.get('base_model_name_or_path')!r})")
        module = modules[name]
        expected = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        if use_dora:
            expected["lora_magnitude_vector"] = (module.out_features,)
        if set(parts["tensors"]) != set(expected):
            raise ValueError(f"{where}: has {sorted(parts['tensors'])}, expected {sorted(expected)} "
                             f"(use_dora={use_dora} in {CONFIG_FILE})")
        for part, shape in expected.items():
            got = tuple(parts["tensors"][part].shape)
            if got != shape:
                rank_note = f" (adapter_config.json says r={r})" if part in ("lora_A", "lora_B") else ""
                raise ValueError(f"{where}.{part}: shape {got}, but this model's {name} ({module.in_features} -> "
                                 f"{module.out_features}) needs {shape}{rank_note}")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"load_adapter: {name} already has an adapter named {adapter_name!r}; pass another "
                             "adapter_name")

    lora_config = LoRAConfig(r=r, alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                             targets=sorted(grouped), use_rslora=bool(config.get("use_rslora", False)),
                             use_dora=use_dora, adapter_name=adapter_name)
    add_lora(model, lora_config)
    with torch.no_grad():
        for name, parts in grouped.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(parts["tensors"]["lora_A"])
            layer.lora_B[adapter_name].weight.copy_(parts["tensors"]["lora_B"])
            if use_dora:
                layer.lora_magnitude_vector[adapter_name].copy_(parts["tensors"]["lora_magnitude_vector"])
    set_adapter(model, adapter_name, trainable=trainable)
    return model
