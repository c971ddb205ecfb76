"""Adapter files in PEFT's format, so adapters move freely between minift and Hugging Face PEFT.

Lesson
------
A PEFT LoRA adapter is a directory with two files and no base weights at all:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", ...],
                                  "use_rslora": false, "use_dora": false, "task_type": "CAUSAL_LM", ...}
    adapter_model.safetensors    base_model.model.<Hugging Face module path>.lora_A.weight          (r, in)
                                 base_model.model.<Hugging Face module path>.lora_B.weight          (out, r)
                                 base_model.model.<Hugging Face module path>.lora_magnitude_vector  (out,)  DoRA

The names are a minift state-dict name with the adapter name dropped and the module path translated to
Hugging Face naming (minift/io/hf.py does the translation for whole models already):

    blocks.3.attn.q_proj.lora_A.default.weight  <->  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    blocks.3.attn.q_proj                        <->  base_model.model.encoder.layer.3.attention.self.query     (BERT)

"base_model.model." is where PEFT's wrappers put the transformers model. GPT-2 cannot take part: Hugging
Face fuses its q, k, v into one Conv1D (c_attn), so an adapter on minift's separate q_proj has no name there.

`save_adapter` writes both files atomically (temporary file, then rename). `load_adapter` reads a directory
written by either library: it checks every tensor name and shape against the model before changing it, adds
LoRA to exactly the modules the file holds, and copies the tensors in. `save_merged` writes a full Hugging
Face model with the adapter folded in (a copy is merged, the model you pass is left as it was).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from minift.io import hf
from minift.io import save as save_model
from minift.peft.inject import LoRAConfig, add_lora, linear_layers, lora_layers, merge_lora, set_adapter
from minift.peft.lora import LoRALinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files these match (written as "peft_version")
# Leaf names of Hugging Face linear layers that minift does not model (BERT's pooler.dense): a bare "dense" in
# target_modules would also put LoRA on them, so such layers are listed by full path instead.
HF_ONLY_LEAVES = {"bert": {"dense"}}
# Every key PEFT 0.21 writes, with PEFT's defaults; save_adapter fills in the ones that describe the adapter.
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


def _family(model: nn.Module, action: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{action}: the model has no config.model_type (expected a minift Transformer)")
    family = hf.family(model_type)
    if family == "gpt2":
        raise ValueError(f"{action}: GPT-2 adapters cannot be written in PEFT's format: Hugging Face GPT-2 fuses "
                         "q, k and v into one Conv1D (c_attn), so minift's q_proj/k_proj/v_proj have no name there. "
                         "Use a Llama-family or BERT model, or keep the adapter as a minift state dict")
    return family


def hf_module_path(name: str, model_type: str) -> str | None:
    """minift module name -> Hugging Face module name ("blocks.0.attn.q_proj" -> "model.layers.0.self_attn.q_proj")."""
    full = hf.rename(f"{name}.weight", model_type, to_hf=True)
    return None if full is None else full[: -len(".weight")]


def minift_module_path(hf_path: str, model_type: str) -> str | None:
    full = hf.rename(f"{hf_path}.weight", model_type, to_hf=False)
    return None if full is None else full[: -len(".weight")]


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the active one) as a PEFT adapter directory. Adapter tensors only."""
    family = _family(model, "save_adapter")
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

    tensors: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    for name, layer in holders.items():
        path = hf_module_path(name, model_type)
        if path is None:
            raise ValueError(f"save_adapter: module {name!r} has no Hugging Face name for model_type {model_type!r}")
        paths.append(path)
        key = PREFIX + path
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight  # (r, in)
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight  # (out, r)
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]  # (out,)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    config = dict(PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path,
        task_type="FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM",
        r=setting["r"], lora_alpha=setting["alpha"], lora_dropout=setting["dropout"],
        use_rslora=setting["use_rslora"], use_dora=setting["use_dora"],
        init_lora_weights=True if setting["init"] == "kaiming" else "gaussian",
        target_modules=_target_modules(model, paths, family),
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.write_safetensors_atomic(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    hf.write_json_atomic(dict(sorted(config.items())), directory / CONFIG_FILE)
    return directory


def _target_modules(model: nn.Module, paths: list[str], family: str) -> list[str]:
    """PEFT target_modules: a bare leaf name ("q_proj") where it selects exactly these layers, else full paths."""
    model_type = model.config.model_type
    every_layer = [p for p in (hf_module_path(n, model_type) for n in linear_layers(model)) if p is not None]
    chosen = set(paths)
    targets: list[str] = []
    for leaf in sorted({p.rsplit(".", 1)[-1] for p in paths}):
        with_leaf = [p for p in every_layer if p.rsplit(".", 1)[-1] == leaf]
        if leaf not in HF_ONLY_LEAVES.get(family, ()) and all(p in chosen for p in with_leaf):
            targets.append(leaf)
        else:
            targets += sorted(p for p in paths if p.rsplit(".", 1)[-1] == leaf)
    return targets


def save_merged(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write a Hugging Face model directory with the active adapter merged in; `model` itself is not changed."""
    merged = merge_lora(copy.deepcopy(model))
    return save_model(merged, tokenizer, directory)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def read_adapter_config(directory: Path) -> dict:
    config_file = directory / CONFIG_FILE
    config = hf.read_json_file(config_file, f"a PEFT adapter directory needs {CONFIG_FILE}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}; minift reads LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{config_file}: missing key {key!r}")
    for key, fine, why in UNSUPPORTED:
        if config.get(key) not in (fine, None, {}, []):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported ({why}); expected {fine!r}")
    return config


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add the PEFT adapter stored in `directory` to `model` as `adapter_name`, and activate it.

    Everything is checked before the model changes: a failed load leaves it as it was. With trainable=True
    the adapter's tensors require grad (to continue training); by default it is loaded for inference.
    """
    family = _family(model, "load_adapter")
    model_type = model.config.model_type
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    config = read_adapter_config(directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.exists():
        hint = " (adapter_model.bin is pickle, which minift does not read: re-save with safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_file}: missing{hint}")

    with safe_open(weights_file, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    grouped = _group_by_module(tensors, weights_file, model_type, family)
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


def _group_by_module(tensors: dict[str, torch.Tensor], where: Path, model_type: str, family: str) -> dict:
    """{minift module name: {"hf_path": ..., "tensors": {"lora_A": A, "lora_B": B[, "lora_magnitude_vector": m]}}}"""
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude_vector"}
    grouped: dict[str, dict] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA tensor minift can load (expected "
                             f"{PREFIX}<module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector)")
        hf_path = key[len(PREFIX): -len(suffix)]
        if family == "bert" and hf_path.startswith("bert."):
            hf_path = hf_path[len("bert."):]  # adapters trained on BertFor... heads
        if family == "bert" and hf_path.startswith("pooler."):
            continue  # PEFT's "all-linear" also adapts BERT's pooler, which minift's encoder does not have
        name = minift_module_path(hf_path, model_type)
        if name is None:
            raise ValueError(f"{where}: tensor {key!r} names module {hf_path!r}, which a {model_type} model does not "
                             "have; was this adapter trained on a different architecture?")
        entry = grouped.setdefault(name, {"hf_path": hf_path, "tensors": {}})
        entry["tensors"][suffixes[suffix]] = tensor
    if not grouped:
        raise ValueError(f"{where}: holds no LoRA tensors")
    return grouped
