"""Hugging Face checkpoint directories: read them into a minift Transformer, and write them back.

Lesson
------
A Hugging Face model directory is two things:

    config.json                       -> the architecture's numbers      -> ModelConfig (config_from_hf)
    model.safetensors                 -> named tensors                   -> state dict   (rename_from_hf)
      or model.safetensors.index.json    + model-0000k-of-0000n.safetensors shards

Each architecture names its tensors its own way; minift uses one naming for all of them. The translation
is a table of (Hugging Face pattern, minift pattern) pairs per family, read in both directions:

    model.layers.{i}.self_attn.q_proj.weight        <->  blocks.{i}.attn.q_proj.weight       (Llama family)
    transformer.h.{i}.attn.c_attn.weight (d, 3d)    <->  blocks.{i}.attn.{q,k,v}_proj.weight (GPT-2: split
                                                          and transposed, because GPT-2 used Conv1D layers
                                                          that store weights as (in, out))
    encoder.layer.{i}.attention.self.query.weight   <->  blocks.{i}.attn.q_proj.weight       (BERT)

Writing goes the other way and produces a directory `transformers` loads with identical outputs. Every
file is read with safetensors (no pickle), and every mismatch names the file and tensor: a corrupt file, an
integer tensor where a weight belongs, a config value of the wrong type ("hidden_size": "32") or a shard
name that leaves the directory ("../x.safetensors") is one error naming the file and the tensor or key.

Reading is four steps, and the 4-bit reader (nf4dir.py) uses the same four, so both formats accept the
same checkpoints, skip the same tensors and find the same tokenizer:

    read_config(dir)              config.json as a dict (errors name the file)
    read_tensors(dir)             {HF name: (file, tensor)} from model.safetensors or an index + shards
    state_dict_from_tensors(...)  skip buffers and pre-training heads, rename, split GPT-2's fused qkv
    read_tokenizer(dir)           tokenizer.json, or None
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minift.config import ModelConfig
from minift.io.files import check_floating, json_field, path_inside, read_json_file, read_safetensors
from minift.tokenizer import Tokenizer

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm2", "qwen3")

# (Hugging Face name, minift name); "{i}" is a layer number. Tensors not listed here are an error on load.
NAME_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": [
        ("model.embed_tokens.weight", "embed.weight"),
        ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        *[(f"model.layers.{{i}}.self_attn.{p}.{w}", f"blocks.{{i}}.attn.{p}.{w}")
          for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")],
        *[(f"model.layers.{{i}}.self_attn.{p}.weight", f"blocks.{{i}}.attn.{p}.weight") for p in ("q_norm", "k_norm")],
        ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        *[(f"model.layers.{{i}}.mlp.{p}.{w}", f"blocks.{{i}}.mlp.{p}.{w}")
          for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")],
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
    "gpt2": [
        ("transformer.wte.weight", "embed.weight"),
        ("transformer.wpe.weight", "pos_embed.weight"),
        *[(f"transformer.h.{{i}}.ln_1.{w}", f"blocks.{{i}}.attn_norm.{w}") for w in ("weight", "bias")],
        *[(f"transformer.h.{{i}}.attn.c_attn.{w}", f"blocks.{{i}}.attn.qkv.{w}") for w in ("weight", "bias")],
        *[(f"transformer.h.{{i}}.attn.c_proj.{w}", f"blocks.{{i}}.attn.o_proj.{w}") for w in ("weight", "bias")],
        *[(f"transformer.h.{{i}}.ln_2.{w}", f"blocks.{{i}}.mlp_norm.{w}") for w in ("weight", "bias")],
        *[(f"transformer.h.{{i}}.mlp.c_fc.{w}", f"blocks.{{i}}.mlp.up_proj.{w}") for w in ("weight", "bias")],
        *[(f"transformer.h.{{i}}.mlp.c_proj.{w}", f"blocks.{{i}}.mlp.down_proj.{w}") for w in ("weight", "bias")],
        *[(f"transformer.ln_f.{w}", f"norm.{w}") for w in ("weight", "bias")],
        ("lm_head.weight", "lm_head.weight"),
    ],
    "bert": [
        ("embeddings.word_embeddings.weight", "embed.weight"),
        ("embeddings.position_embeddings.weight", "pos_embed.weight"),
        ("embeddings.token_type_embeddings.weight", "type_embed.weight"),
        *[(f"embeddings.LayerNorm.{w}", f"embed_norm.{w}") for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.attention.self.{hf}.{w}", f"blocks.{{i}}.attn.{ours}.{w}")
          for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")) for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.attention.output.dense.{w}", f"blocks.{{i}}.attn.o_proj.{w}") for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.attention.output.LayerNorm.{w}", f"blocks.{{i}}.attn_norm.{w}") for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.intermediate.dense.{w}", f"blocks.{{i}}.mlp.up_proj.{w}") for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.output.dense.{w}", f"blocks.{{i}}.mlp.down_proj.{w}") for w in ("weight", "bias")],
        *[(f"encoder.layer.{{i}}.output.LayerNorm.{w}", f"blocks.{{i}}.mlp_norm.{w}") for w in ("weight", "bias")],
    ],
}
# Tensors a checkpoint may carry that the model does not use (buffers, BERT's pooler, GPT-2's causal-mask buffers).
IGNORED = re.compile(r"(position_ids$|^pooler\.|\.attn\.bias$|\.attn\.masked_bias$|rotary_emb\.inv_freq$)")


def family(model_type: str) -> str:
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in NAME_TABLES:
        return model_type
    raise ValueError(
        f"unknown model_type {model_type!r}; minift supports {sorted(set(LLAMA_FAMILY) | {'gpt2', 'bert'})}"
    )


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def rename(name: str, model_type: str, to_hf: bool) -> str | None:
    """Translate one tensor name between Hugging Face and minift naming; None if the table has no entry."""
    for hf, ours in NAME_TABLES[family(model_type)]:
        source, target = (ours, hf) if to_hf else (hf, ours)
        match = _compile(source).match(name)
        if match:
            return target.replace("{i}", match.group("i")) if "{i}" in source else target
    return None


# ----------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config dict (any of the supported model types) into a ModelConfig.

    Every value is checked for type and range first ("hidden_size": "32" is an error naming the file and key)."""
    model_type = json_field(hf, "model_type", where, "str")
    try:
        fam = family(model_type)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    def need(key, kind="positive int"):
        return json_field(hf, key, where, kind)

    def get(key, default, kind):
        return json_field(hf, key, where, kind, default=default)

    special = {key: get(key, None, "token id") for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if fam == "llama":
        # Newer transformers write rope_parameters = {"rope_type", "rope_theta", ...}; older ones rope_theta +
        # rope_scaling.
        rope = get("rope_parameters", {}, "object")
        scaling = get("rope_scaling", None, "object")
        scaling = scaling or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            check_rope_scaling(scaling, where, "rope_scaling" if hf.get("rope_scaling") else "rope_parameters")
        theta = json_field(rope, "rope_theta", where, "positive number", section="rope_parameters",
                           default=get("rope_theta", 10000.0, "positive number"))
        bias = get("attention_bias", None, "bool")
        if model_type == "qwen3":
            check_no_sliding_window(hf, where, get)
        fields = dict(
            model_type=model_type, vocab_size=need("vocab_size"), dim=need("hidden_size"),
            n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
            n_kv_heads=get("num_key_value_heads", None, "positive int"),
            head_dim=get("head_dim", 128 if model_type == "qwen3" else None, "positive int"),  # Qwen3Config's default
            hidden_dim=need("intermediate_size"), max_seq_len=get("max_position_embeddings", 2048, "positive int"),
            norm="rms", norm_eps=get("rms_norm_eps", 1e-6, "positive number"), positions="rope",
            rope_theta=theta, rope_scaling=scaling, mlp="swiglu", activation="silu",
            qkv_bias=model_type == "qwen2" if bias is None else bias, out_bias=bool(bias),
            mlp_bias=get("mlp_bias", False, "bool"), tie_embeddings=get("tie_word_embeddings", False, "bool"),
            qk_norm=model_type == "qwen3",
        )
    elif fam == "gpt2":
        act = get("activation_function", "gelu_new", "str")
        fields = dict(
            model_type="gpt2", vocab_size=need("vocab_size"), dim=need("n_embd"), n_layers=need("n_layer"),
            n_heads=need("n_head"), hidden_dim=get("n_inner", None, "positive int") or 4 * need("n_embd"),
            max_seq_len=need("n_positions"), norm="layer",
            norm_eps=get("layer_norm_epsilon", 1e-5, "positive number"), positions="learned", mlp="gelu",
            activation="gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "gelu",
            qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=get("tie_word_embeddings", True, "bool"),
        )
    else:  # bert
        fields = dict(
            model_type="bert", vocab_size=need("vocab_size"), dim=need("hidden_size"),
            n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
            hidden_dim=need("intermediate_size"), max_seq_len=get("max_position_embeddings", 512, "positive int"),
            causal=False, norm="layer", norm_eps=get("layer_norm_eps", 1e-12, "positive number"), post_norm=True,
            positions="learned", mlp="gelu", activation="gelu" if get("hidden_act", "gelu", "str") == "gelu" else
            "gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
            type_vocab_size=get("type_vocab_size", 2, "int >= 0"), lm_head=False,
        )
    try:
        return ModelConfig(**fields, **special)
    except ValueError as error:  # e.g. hidden_size not divisible by num_attention_heads
        raise ValueError(f"{where}: {error}") from None


def check_no_sliding_window(hf: dict, where: str, get) -> None:
    """Qwen3 attends within a sliding window only when use_sliding_window is true, and then only on the layers
    layer_types marks "sliding_attention" (by default those from max_window_layers on). minift has no windowed
    mask yet, so such a config is an error rather than a model that silently attends further back."""
    if not get("use_sliding_window", False, "bool"):
        return
    window = get("sliding_window", None, "positive int")
    if window is None:
        return
    layers = json_field(hf, "num_hidden_layers", where, "positive int")
    kinds = get("layer_types", None, "list")
    if kinds is None:
        first = get("max_window_layers", layers, "int >= 0")
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    if sliding:
        raise ValueError(f"{where}: use_sliding_window = true makes layers {sliding} attend only to the last "
                         f"{window} tokens, which minift does not support yet; set use_sliding_window to false "
                         "(Qwen3's released checkpoints do)")


def check_rope_scaling(scaling: dict, where: str, section: str) -> None:
    """The rope scaling kinds minift computes (model.rope_frequencies), with numbers of the right type."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: {section}.rope_type = {kind!r} is not supported (supported: default, linear, "
                         "llama3)")
    if kind in ("linear", "llama3"):
        json_field(scaling, "factor", where, "positive number", section=section)
    if kind == "llama3":
        low = json_field(scaling, "low_freq_factor", where, "positive number", 1.0, section)
        high = json_field(scaling, "high_freq_factor", where, "positive number", 4.0, section)
        json_field(scaling, "original_max_position_embeddings", where, "positive int", 8192, section)
        if high <= low:
            raise ValueError(f"{where}: {section}.high_freq_factor = {high} must be above low_freq_factor = {low}")


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json `transformers` needs to rebuild the same model."""
    c = config
    fam = family(c.model_type)
    special = {k: v for k, v in dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                     pad_token_id=c.pad_token_id).items() if v is not None}
    if fam == "llama":
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}.get(c.model_type, "LlamaForCausalLM")
        model_type = c.model_type if c.model_type in ("llama", "mistral", "qwen2", "qwen3") else "llama"
        out = dict(
            architectures=[arch], model_type=model_type, vocab_size=c.vocab_size, hidden_size=c.dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            head_dim=c.head_dim, intermediate_size=c.hidden_dim, max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act="silu",
            tie_word_embeddings=c.tie_embeddings, mlp_bias=c.mlp_bias,
        )
        if c.rope_scaling:
            out["rope_scaling"] = dict(c.rope_scaling)
        if c.qk_norm != (model_type == "qwen3"):
            raise ValueError(f"model_type {model_type!r} cannot express qk_norm={c.qk_norm} in config.json "
                             "(only Qwen3 has q/k norms, and it always has them)")
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = c.qkv_bias
            if c.qkv_bias != c.out_bias:
                raise ValueError(f"a {model_type} config.json cannot express q/k/v biases without an o_proj bias")
        elif model_type == "qwen2" and (not c.qkv_bias or c.out_bias):
            raise ValueError("Qwen2 always has q/k/v biases and no o_proj bias")
        if model_type == "qwen3":
            out["use_sliding_window"] = False
        return {**out, **special, "torch_dtype": "float32"}
    if fam == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size, n_embd=c.dim,
                    n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.hidden_dim, n_positions=c.max_seq_len,
                    layer_norm_epsilon=c.norm_eps,
                    activation_function="gelu_new" if c.activation == "gelu_tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_embeddings, **special)
    return dict(architectures=["BertModel"], model_type="bert", vocab_size=c.vocab_size, hidden_size=c.dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.hidden_dim,
                max_position_embeddings=c.max_seq_len, layer_norm_eps=c.norm_eps, type_vocab_size=c.type_vocab_size,
                hidden_act="gelu" if c.activation == "gelu" else "gelu_new", **special)


# ----------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------


def read_config(directory: Path) -> tuple[dict, Path]:
    """(the raw config.json dict, its path) of a Hugging Face directory; errors name the file."""
    config_file = Path(directory) / "config.json"
    return read_json_file(config_file, "a Hugging Face model directory needs config.json"), config_file


def read_tokenizer(directory: Path) -> Tokenizer | None:
    """The directory's tokenizer.json as a minift Tokenizer, or None when it has none."""
    path = Path(directory) / "tokenizer.json"
    return Tokenizer.from_file(path) if path.exists() else None


def read_tensors(directory: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    """Every tensor of the directory (model.safetensors, or the shards an index names) by its Hugging Face
    name, with its file. Shard names must stay inside the directory; each file is read once."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object; expected a safetensors shard index")
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(path_inside(directory, shard, f"{index}: weight_map[{name!r}]"), []).append(name)
        tensors = {}
        for path, names in shards.items():
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {index.name} for tensor {names[0]!r} is missing")
            held = read_safetensors(path)
            for name in names:
                if name not in held:
                    raise ValueError(f"{path}: has no tensor {name!r}, though {index.name} places it in this shard")
                tensors[name] = (path, held[name])
        return tensors
    if single.exists():
        return {name: (single, tensor) for name, tensor in read_safetensors(single).items()}
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def checkpoint_name(hf_name: str, model_type: str) -> str:
    """The name as the task model would write it: headless checkpoints leave out or add a prefix.

    GPT2Model drops "transformer."; BertForMaskedLM puts "bert." (some exports "model.") before the encoder.
    """
    if model_type == "gpt2" and not hf_name.startswith(("transformer.", "lm_head")):
        return "transformer." + hf_name
    if model_type == "bert":
        return hf_name.removeprefix("bert.").removeprefix("model.")
    return hf_name


def is_skipped(hf_name: str, model_type: str) -> bool:
    """Tensors a checkpoint may carry that a minift model does not use (IGNORED, BERT's pre-training heads)."""
    if IGNORED.search(hf_name):
        return True
    return model_type == "bert" and checkpoint_name(hf_name, model_type).startswith("cls.")


def minift_name(hf_name: str, model_type: str) -> str | None:
    """A checkpoint's tensor name in minift naming, None if it has no place in the model."""
    return rename(checkpoint_name(hf_name, model_type), model_type, to_hf=False)


def state_dict_from_tensors(tensors: dict[str, tuple[Path, torch.Tensor]],
                            config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (Hugging Face name -> (file, tensor)) to a minift state dict; GPT-2's fused qkv is split here."""
    state: dict[str, torch.Tensor] = {}
    for hf_name, (path, tensor) in tensors.items():
        if is_skipped(hf_name, config.model_type):
            continue
        ours = minift_name(hf_name, config.model_type)
        if ours is None:
            raise ValueError(f"{path}: tensor {hf_name!r} has no place in a {config.model_type} model")
        check_floating({hf_name: tensor}, path)
        state[ours] = tensor
    return _split_gpt2(state) if config.model_type == "gpt2" else state


def state_dict_from_hf(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read all tensors of a directory and rename them to minift names."""
    return state_dict_from_tensors(read_tensors(directory), config)


def _split_gpt2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D stores weights as (in, out): transpose them; split the fused qkv into q, k, v."""
    out = {}
    for name, t in state.items():
        if ".attn.qkv." in name:
            parts = t.chunk(3, dim=-1)  # weight (d, 3d) -> 3 x (d, d); bias (3d,) -> 3 x (d,)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out[name.replace("qkv", proj)] = part.t().contiguous() if t.dim() == 2 else part.contiguous()
        elif name.endswith("weight") and t.dim() == 2 and (".mlp." in name or ".o_proj." in name):
            out[name] = t.t().contiguous()
        else:
            out[name] = t
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of state_dict_from_hf: minift names and layouts -> Hugging Face ones."""
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: transformers rebuilds it from the embedding
    if config.model_type == "gpt2":
        for i in range(config.n_layers):
            for w in ("weight", "bias"):
                q, k, v = (state.pop(f"blocks.{i}.attn.{p}.{w}") for p in ("q_proj", "k_proj", "v_proj"))
                state[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([q, k, v], dim=0)
        state = {n: (t.t() if n.endswith("weight") and t.dim() == 2 and (".mlp." in n or ".attn." in n) else t)
                 for n, t in state.items()}
    out = {}
    for name, t in state.items():
        hf = rename(name, config.model_type, to_hf=True)
        if hf is None:
            raise ValueError(f"tensor {name!r} has no Hugging Face name for model_type {config.model_type!r}")
        out[hf] = t.detach().contiguous()
    return out
