"""NF4 model directories: save a quantized model the way transformers + bitsandbytes do, and load it back.

Lesson
------
A model quantized with `quantize_model` is a minift Transformer whose nn.Linear layers became NF4Linear.
On disk it is an ordinary Hugging Face directory with two differences, both taken from what
`transformers` writes after `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`:

    config.json          the usual architecture keys, plus
                         "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                                                 "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
                                                 "bnb_4bit_compute_dtype": "float32", ...,
                                                 "llm_int8_skip_modules": ["lm_head"]}   <- layers kept dense
    model.safetensors    dense tensors under their Hugging Face names (embeddings, norms, lm_head), and for
                         every quantized layer the Linear4bit entries (minift/quant/linear.py), e.g.

        model.layers.0.self_attn.q_proj.weight                                     uint8 (n/2, 1) packed codes
        model.layers.0.self_attn.q_proj.weight.absmax                              uint8 (n/64,)  (double quant)
        model.layers.0.self_attn.q_proj.weight.nested_absmax                       float32
        model.layers.0.self_attn.q_proj.weight.quant_map / .nested_quant_map       the code tables
        model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4       JSON: blocksize, shape, dtype...
    tokenizer.json ...   as minift.save writes them

So `transformers.AutoModelForCausalLM.from_pretrained(directory)` (with bitsandbytes installed) rebuilds
Linear4bit layers holding the same bytes, and `load_quantized(directory)` rebuilds minift's NF4Linear
layers from them: no re-quantization on either side, so the outputs are the quantized model's exactly.
The blocksize of each layer travels in its quant_state JSON; the config holds one double-quant flag.

    model, tokenizer = minift.load("smollm2-135m")
    quantize_model(model)                                  # nn.Linear -> NF4Linear (lm_head stays dense)
    save_quantized(model, tokenizer, "smollm2-nf4")        # 4.127 bits per quantized weight on disk
    model, tokenizer = load_quantized("smollm2-nf4")       # NF4Linear layers again
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minift.dtypes import dtype_name
from minift.io import hf
from minift.io.files import json_field, write_json_atomic, write_safetensors_atomic
from minift.io.weights import base_model_state, build_model
from minift.model import Transformer
from minift.quant.linear import NF4Linear, nf4_from_state_dict, quant_state_tensors

CONFIG_KEY = "quantization_config"


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, NF4Linear)}


def quantization_config(model: nn.Module, layers: dict[str, NF4Linear]) -> dict:
    """The config.json entry transformers' BitsAndBytesConfig reads (and writes) for an NF4 model."""
    model_type = model.config.model_type
    double_quant = {layer.weight.double_quant for layer in layers.values()}
    if len(double_quant) > 1:
        raise ValueError("save_quantized: some NF4 layers use double quantization and some do not; "
                         "config.json has one bnb_4bit_use_double_quant flag, so quantize all layers alike")
    compute = {layer.compute_dtype or layer.weight.dtype for layer in layers.values()}
    dense = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    skip = sorted({hf_name[: -len(".weight")] for hf_name in (hf.rename(f"{name}.weight", model_type, to_hf=True)
                                                              for name in dense) if hf_name is not None})
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant.pop(),
        "bnb_4bit_compute_dtype": dtype_name(compute.pop()) if len(compute) == 1 else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def save_quantized(model: Transformer, tokenizer, directory: str | Path) -> Path:
    """Write a model with NF4Linear layers as a Hugging Face directory in bitsandbytes' 4-bit layout."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError("save_quantized: expected a minift Transformer (it has no config.model_type)")
    if hf.family(model_type) == "gpt2":
        raise ValueError("save_quantized: GPT-2 stores its projections as fused, transposed Conv1D weights in "
                         "Hugging Face files, which have no 4-bit layout; quantize a Llama-family or BERT model")
    layers = nf4_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no NF4Linear layer; run quantize_model(model) first "
                         "(or use minift.save for a dense model)")
    dense = base_model_state(model, where="save_quantized", skip=tuple(f"{layer}.weight" for layer in layers))
    quantized = {}
    for layer_name, layer in layers.items():
        weight_name = hf.rename(f"{layer_name}.weight", model_type, to_hf=True)
        if weight_name is None:
            raise ValueError(f"save_quantized: {layer_name} has no Hugging Face name for model_type {model_type!r}")
        quantized[weight_name] = layer.weight.packed  # uint8 ((n + 1) // 2, 1)
        for suffix, tensor in quant_state_tensors(layer.weight).items():  # the code tables are shared: copy
            quantized[f"{weight_name}.{suffix}"] = tensor.clone()
    tensors = {**hf.state_dict_to_hf(dense, model.config), **quantized}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    config = hf.config_to_hf(model.config)
    config[CONFIG_KEY] = quantization_config(model, layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(config, directory / "config.json")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def check_quantization_config(settings, config_file: Path) -> None:
    """Accept bitsandbytes 4-bit NF4 only; anything else gets an error naming the key and what to do."""
    if not isinstance(settings, dict):
        raise ValueError(f"{config_file}: {CONFIG_KEY} must be a JSON object")
    for key, kind in (("quant_method", "str"), ("load_in_4bit", "bool"), ("load_in_8bit", "bool"),
                      ("bnb_4bit_quant_type", "str"), ("bnb_4bit_use_double_quant", "bool"),
                      ("bnb_4bit_compute_dtype", "str"), ("bnb_4bit_quant_storage", "str"),
                      ("llm_int8_skip_modules", "str list")):
        json_field(settings, key, config_file, kind, default=None, section=CONFIG_KEY)
    method = settings.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{config_file}: {CONFIG_KEY}.quant_method = {method!r}; minift reads bitsandbytes NF4 "
                         "checkpoints only (dequantize it with its own library and save a dense model)")
    if settings.get("load_in_8bit") or not settings.get("load_in_4bit", True):
        raise ValueError(f"{config_file}: an 8-bit bitsandbytes checkpoint; minift reads 4-bit NF4 only")
    quant_type = settings.get("bnb_4bit_quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"{config_file}: bnb_4bit_quant_type = {quant_type!r}; minift reads NF4 only "
                         "(re-quantize the dense model with `minift quantize`)")


def split_quantized(tensors: dict[str, tuple[Path, torch.Tensor]]) -> tuple[dict[str, dict], dict]:
    """Group the Linear4bit entries by their weight name ("...q_proj.weight" -> {its tensors, "path"});
    everything else is dense. A quantized weight is one that has a `.quant_state.bitsandbytes__*` entry."""
    quantized = {name.rpartition(".quant_state.")[0] for name in tensors if ".weight.quant_state." in name}
    groups: dict[str, dict] = {name: {} for name in quantized}
    dense = {}
    for name, (path, tensor) in tensors.items():
        owner = name if name in quantized else name.partition(".weight.")[0] + ".weight"
        if owner in groups:
            groups[owner][name] = tensor
            if owner == name:
                groups[owner]["path"] = path
        else:
            dense[name] = (path, tensor)
    return groups, dense


def load_quantized(directory: str | Path, device=None) -> tuple[Transformer, object]:
    """Load a 4-bit NF4 directory (written by save_quantized or by transformers + bitsandbytes) with its
    quantized layers as NF4Linear, bytes unchanged; returns (model, tokenizer or None)."""
    directory = Path(directory)
    raw, config_file = hf.read_config(directory)
    if CONFIG_KEY not in raw:
        raise ValueError(f"{config_file}: no {CONFIG_KEY}; this is a dense model (load it with minift.load)")
    check_quantization_config(raw[CONFIG_KEY], config_file)
    config = hf.config_from_hf(raw, where=str(config_file))
    if hf.family(config.model_type) == "gpt2":
        raise ValueError(f"{config_file}: 4-bit GPT-2 checkpoints are not supported (fused Conv1D projections)")
    with torch.device("meta"):  # shapes only: which linear layers exist and their (out, in)
        skeleton = Transformer(config)
    linear_shapes = {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules()
                     if isinstance(m, nn.Linear)}

    groups, dense_tensors = split_quantized(hf.read_tensors(directory))
    weights: dict[str, object] = {}  # minift module name -> NF4Tensor
    for hf_weight, entries in sorted(groups.items()):
        path = entries.pop("path", None)
        if path is None:
            raise ValueError(f"{directory}: {hf_weight} has a quant_state entry but no packed weight tensor")
        module = (hf.minift_name(hf_weight, config.model_type) or "")[: -len(".weight")]
        if module not in linear_shapes:
            raise ValueError(f"{path}: quantized tensor {hf_weight!r} has no linear layer in a "
                             f"{config.model_type} model")
        try:
            weights[module] = nf4_from_state_dict(entries, hf_weight, linear_shapes[module])
        except ValueError as error:  # its messages name the tensor, except json's for a broken quant_state
            named = str(error) if hf_weight in str(error) else f"{hf_weight}.quant_state: {error}"
            raise ValueError(f"{path}: {named}") from None
        except (TypeError, AttributeError, KeyError) as error:  # a quant_state JSON of the wrong shape
            raise ValueError(f"{path}: {hf_weight}.quant_state: malformed bitsandbytes quant state "
                             f"({type(error).__name__}: {error})") from None
    dense = hf.state_dict_from_tensors(dense_tensors, config)  # the HF reader's renaming and skip lists

    # Dense layers load as usual; each quantized weight gets a shape-only placeholder, then its layer is swapped.
    placeholders = {f"{module}.weight": torch.empty(linear_shapes[module], dtype=q.dtype, device="meta")
                    for module, q in weights.items()}
    model = build_model(config, {**dense, **placeholders}, where=str(directory))
    for module, weight in weights.items():
        linear = model.get_submodule(module)
        layer = NF4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, weight=weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        model.set_submodule(module, layer)
    if device is not None:
        model = model.to(device)
    return model.eval(), hf.read_tokenizer(directory)
