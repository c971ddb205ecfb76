"""PEFT's adapter directory, the part every PEFT-format adapter shares (LoRA in files.py, (IA)^3 in ia3.py).

Lesson
------
A Hugging Face PEFT adapter is a directory with two files and no base weights at all:

    adapter_config.json          {"peft_type": "LORA" | "IA3", "target_modules": ["q_proj", ...],
                                  "task_type": "CAUSAL_LM", ... the technique's own keys ...}
    adapter_model.safetensors    base_model.model.<Hugging Face module path>.<the technique's tensor names>

The tensor names are a minift state-dict name with the adapter name dropped and the module path translated
to Hugging Face naming (minift/io/hf.py does the translation for whole models already):

    blocks.3.attn.q_proj.lora_A.default.weight  <->  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    blocks.3.attn.k_proj.ia3_l                  <->  base_model.model.model.layers.3.self_attn.k_proj.ia3_l
    blocks.3.attn.q_proj                        <->  base_model.model.encoder.layer.3.attention.self.query    (BERT)

"base_model.model." is where PEFT's wrappers put the transformers model. GPT-2 cannot take part: Hugging
Face fuses its q, k, v into one Conv1D (c_attn), so an adapter on minift's separate q_proj has no name there.

`target_modules` is written the way PEFT matches it: a bare leaf name ("q_proj") selects every module whose
name ends in it, so a leaf is written only when it selects exactly the adapted layers; otherwise full paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minift.io import hf
from minift.io.files import json_field, read_json_file, read_safetensors, write_json_atomic, write_safetensors_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files these match (written as "peft_version")
# Leaf names of Hugging Face linear layers that minift does not model (BERT's pooler.dense): a bare "dense" in
# target_modules would also adapt them, so such layers are listed by full path instead.
HF_ONLY_LEAVES = {"bert": {"dense"}}


def check_family(model: nn.Module, action: str) -> str:
    """The model's Hugging Face family ("llama", "bert"); an error for GPT-2 and for non-minift models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{action}: the model has no config.model_type (expected a minift Transformer)")
    family = hf.family(model_type)
    if family == "gpt2":
        raise ValueError(f"{action}: GPT-2 adapters cannot be written in PEFT's format: Hugging Face GPT-2 fuses "
                         "q, k and v into one Conv1D (c_attn), so minift's q_proj/k_proj/v_proj have no name there. "
                         "Use a Llama-family or BERT model, or keep the adapter as a minift state dict")
    return family


def task_type(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


def hf_module_path(name: str, model_type: str) -> str | None:
    """minift module name -> Hugging Face module name ("blocks.0.attn.q_proj" -> "model.layers.0.self_attn.q_proj")."""
    full = hf.rename(f"{name}.weight", model_type, to_hf=True)
    return None if full is None else full[: -len(".weight")]


def minift_module_path(hf_path: str, model_type: str) -> str | None:
    full = hf.rename(f"{hf_path}.weight", model_type, to_hf=False)
    return None if full is None else full[: -len(".weight")]


def hf_paths(names: list[str], model_type: str, action: str) -> list[str]:
    """Hugging Face paths of these minift modules; an error naming the first that has none."""
    paths = []
    for name in names:
        path = hf_module_path(name, model_type)
        if path is None:
            raise ValueError(f"{action}: module {name!r} has no Hugging Face name for model_type {model_type!r}")
        paths.append(path)
    return paths


def target_modules(all_layers: list[str], paths: list[str], family: str, model_type: str) -> list[str]:
    """PEFT target_modules for the layers at `paths`: a bare leaf ("q_proj") where it selects exactly these
    among `all_layers` (every linear layer of the model, minift names), else the full paths."""
    every_layer = [p for p in (hf_module_path(n, model_type) for n in all_layers) if p is not None]
    chosen = set(paths)
    targets: list[str] = []
    for leaf in sorted({p.rsplit(".", 1)[-1] for p in paths}):
        with_leaf = [p for p in every_layer if p.rsplit(".", 1)[-1] == leaf]
        if leaf not in HF_ONLY_LEAVES.get(family, ()) and all(p in chosen for p in with_leaf):
            targets.append(leaf)
        else:
            targets += sorted(p for p in paths if p.rsplit(".", 1)[-1] == leaf)
    return targets


def write_adapter_directory(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Both files, atomically (temporary file, then rename); tensors detached, on the CPU, contiguous."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json_atomic(dict(sorted(config.items())), directory / CONFIG_FILE)
    return directory


def read_adapter_directory(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, tensors, weights file) of a PEFT adapter directory, with clear errors for missing files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    config = read_json_file(directory / CONFIG_FILE, f"a PEFT adapter directory needs {CONFIG_FILE}")
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.exists():
        hint = " (adapter_model.bin is pickle, which minift does not read: re-save with safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_file}: missing{hint}")
    return config, read_safetensors(weights_file, floating=True), weights_file


def check_fields(config: dict, config_file: Path, fields: dict[str, tuple[str, object]]) -> None:
    """`fields`: key -> (JSON_KINDS kind, default or REQUIRED); a wrong type names the file and the key."""
    for key, (kind, default) in fields.items():
        json_field(config, key, config_file, kind, default=default)


def reject_unsupported(config: dict, config_file: Path, unsupported: list[tuple[str, object, str]]) -> None:
    """`unsupported`: (key, the value that is fine, why) for config fields minift cannot honour."""
    for key, fine, why in unsupported:
        if config.get(key) not in (fine, None, {}, []):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported ({why}); expected {fine!r}")


def group_by_module(tensors: dict[str, torch.Tensor], suffixes: dict[str, str], where: Path, model_type: str,
                    family: str, kind: str) -> dict[str, dict]:
    """{minift module name: {"hf_path": ..., "tensors": {part: tensor}}} for tensors named
    base_model.model.<HF path><suffix>, with `suffixes` mapping each suffix to its part name."""
    grouped: dict[str, dict] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"{where}: tensor {key!r} is not a {kind} tensor minift can load (expected "
                             f"{PREFIX}<module>{' / '.join(suffixes)})")
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
        raise ValueError(f"{where}: holds no {kind} tensors")
    return grouped
