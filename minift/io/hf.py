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
    model.layers.{i}.self_attn.qkv_proj.weight      <->  blocks.{i}.attn.qkv_proj.weight     (Phi-3: kept fused,
                                                          as are mlp.gate_up_proj; fused_qkv, fused_gate_up)
    model.layers.{i}.post_attention_layernorm       <->  blocks.{i}.mlp_norm (Llama: the norm before the MLP)
                                                    <->  blocks.{i}.attn_post_norm (Gemma 2, 3: the norm
                                                         after attention; pre_feedforward_layernorm is the
                                                         one before the MLP), hence a table of their own

The config.json keys that set each family's switches (minift/config.py) are read in config_from_hf and
written back in config_to_hf; what a model_type always is (Gemma's (1 + w) norms, Qwen3's q/k norms) is
the FIXED_SWITCHES table, and its biases follow the keys transformers reads for it (ATTENTION_BIAS_READERS).

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

from minift.config import LAYER_TYPES, ModelConfig
from minift.io.files import check_floating, json_field, path_inside, read_json_file, read_safetensors
from minift.tokenizer import Tokenizer

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm2", "qwen3", "gemma")
GEMMA2_FAMILY = ("gemma2", "gemma3_text")  # Llama's names, plus the norms after each branch
PHI3_FAMILY = ("phi3",)  # Llama's names with q/k/v and gate/up fused
DECODERS = LLAMA_FAMILY + GEMMA2_FAMILY + PHI3_FAMILY  # model types read by the same rules (decoder_fields)

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
NAME_TABLES["gemma2"] = [pair for pair in NAME_TABLES["llama"] if "post_attention_layernorm" not in pair[0]] + [
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.attn_post_norm.weight"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.mlp_post_norm.weight"),
]
NAME_TABLES["phi3"] = [pair for pair in NAME_TABLES["llama"]
                       if not any(f".{p}." in pair[0] for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))] + [
    ("model.layers.{i}.self_attn.qkv_proj.weight", "blocks.{i}.attn.qkv_proj.weight"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "blocks.{i}.mlp.gate_up_proj.weight"),
]
# Switches a model_type always has (config.json has no key for them); any other model_type has them all off.
FIXED_SWITCHES: dict[str, dict[str, bool]] = {
    "qwen3": dict(qk_norm=True),
    "gemma": dict(norm_plus_one=True, embed_scale=True),
    "gemma2": dict(norm_plus_one=True, embed_scale=True, branch_post_norms=True),
    "gemma3_text": dict(norm_plus_one=True, embed_scale=True, branch_post_norms=True, qk_norm=True),
    "phi3": dict(fused_qkv=True, fused_gate_up=True),
}
SWITCH_NAMES = ("qk_norm", "norm_plus_one", "embed_scale", "branch_post_norms", "fused_qkv", "fused_gate_up")


def fixed_switches(model_type: str) -> dict[str, bool]:
    return {name: FIXED_SWITCHES.get(model_type, {}).get(name, False) for name in SWITCH_NAMES}


# Tensors a checkpoint may carry that the model does not use (buffers, BERT's pooler, GPT-2's causal-mask buffers).
IGNORED = re.compile(r"(position_ids$|^pooler\.|\.attn\.bias$|\.attn\.masked_bias$|rotary_emb\.inv_freq$)")


def family(model_type: str) -> str:
    """The name table a model_type uses: "llama", "gemma2", "phi3", "gpt2" or "bert"."""
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in GEMMA2_FAMILY:
        return "gemma2"
    if model_type in PHI3_FAMILY:
        return "phi3"
    if model_type in ("gpt2", "bert"):
        return model_type
    hint = ""
    if model_type == "gemma3":
        hint = (" ('gemma3' is Gemma3ForConditionalGeneration, text and vision; minift reads the text-only "
                "Gemma3ForCausalLM checkpoints, model_type 'gemma3_text')")
    raise ValueError(
        f"unknown model_type {model_type!r}; minift supports {sorted(set(DECODERS) | {'gpt2', 'bert'})}{hint}"
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
    if fam in ("llama", "gemma2", "phi3"):
        fields = decoder_fields(hf, model_type, where)
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


# What a config.json key means when it is missing: transformers' default for that model_type.
DEFAULTS = {
    "head_dim": {"qwen3": 128, "gemma": 256, "gemma2": 256, "gemma3_text": 256},
    "num_key_value_heads": {"mistral": 8, "qwen2": 32, "qwen3": 32, "gemma": 16, "gemma2": 4,
                            "gemma3_text": 4},  # others: num_attention_heads
    "max_position_embeddings": {"mistral": 131072, "qwen2": 32768, "qwen3": 32768, "gemma": 8192, "gemma2": 8192,
                                "gemma3_text": 131072, "phi3": 4096},  # others: 2048
    "rms_norm_eps": {"phi3": 1e-5},  # others: 1e-6
    "tie_word_embeddings": {"gemma": True, "gemma2": True, "gemma3_text": True},
}
ATTENTION_BIAS_READERS = ("llama", "smollm2", "qwen3", "gemma", "gemma2", "gemma3_text")  # honour attention_bias
GELU_NAMES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def decoder_fields(hf: dict, model_type: str, where: str) -> dict:
    """ModelConfig fields of a Llama-family, Phi-3 or Gemma config.json (every value type-checked, errors name the key).

        config.json key                         ModelConfig field      families
        hidden_size, num_hidden_layers, ...     dim, n_layers, ...     all
        rope_theta / rope_parameters            rope_theta             all (Gemma 3: the full layers')
        rope_scaling                            rope_scaling           all (Gemma 3: full layers only)
        rope_local_base_freq                    rope_local_theta       Gemma 3 (rope_parameters.sliding_attention)
        attention_bias                          qkv_bias, out_bias     Llama, Qwen3, Gemma (Qwen2: always q, k, v
                                                                       only; Mistral, Phi-3: never)
        mlp_bias                                mlp_bias               Llama (the others: never)
        hidden_act / hidden_activation          activation             Gemma 1 / Gemma 2, 3 (GeGLU's GELU)
        query_pre_attn_scalar                   query_pre_attn_scalar  Gemma 2, 3
        attn_logit_softcapping                  attn_softcap           Gemma 2
        final_logit_softcapping                 final_softcap          Gemma 2, 3
        sliding_window                          sliding_window         Mistral, Phi-3 (every layer), Qwen2/3
                                                                       (with use_sliding_window), Gemma 2, 3
        use_sliding_window, max_window_layers,  layer_types            Qwen2/3, Gemma 2, 3
        layer_types, sliding_window_pattern
        (model_type phi3)                       fused_qkv,             Phi-3 (FIXED_SWITCHES); no biases
                                                fused_gate_up
        hidden_act                              activation             Phi-3 (silu; the GELUs); Llama, Mistral,
                                                                       Qwen: silu only (anything else refused)
        partial_rotary_factor (top level or     partial_rotary_factor  Phi-3 (Phi-4-mini: 0.75)
          in rope_parameters)
        rope_scaling {"type": "longrope",       rope_scaling           Phi-3 long-context checkpoints ("su" and
          short_factor, long_factor, ...},      (rope_type longrope)   "yarn" read as "longrope", as transformers
          original_max_position_embeddings                             does)
    """
    def get(key, default, kind):
        return json_field(hf, key, where, kind, default=default)

    def nullable(key, default, kind):  # missing: transformers' default; an explicit null: none
        return None if key in hf and hf[key] is None else get(key, default, kind)

    def default(key, fallback=None):
        return DEFAULTS[key].get(model_type, fallback)

    gemma = model_type in ("gemma",) + GEMMA2_FAMILY
    if gemma and get("use_bidirectional_attention", False, "bool"):
        raise ValueError(f"{where}: use_bidirectional_attention = true (an encoder-style Gemma) is not supported; "
                         "minift's Gemma is a causal language model")
    if model_type == "phi3":
        theta, scaling, partial = phi3_rope_fields(hf, where, get)
        local_theta = None
    else:
        theta, scaling, local_theta = rope_fields(hf, model_type, where, get)
    n_layers = json_field(hf, "num_hidden_layers", where, "positive int")
    window, layer_types = sliding_fields(hf, model_type, where, get, nullable, n_layers)
    # Biases as transformers builds them: attention_bias (q, k, v and o) is read by Llama, Qwen3 and Gemma only,
    # mlp_bias by Llama only; Qwen2 always has q/k/v biases (no o_proj, no MLP bias), Mistral and Phi-3 none.
    bias = get("attention_bias", False, "bool") if model_type in ATTENTION_BIAS_READERS else False
    fields = dict(
        model_type=model_type, vocab_size=json_field(hf, "vocab_size", where, "positive int"),
        dim=json_field(hf, "hidden_size", where, "positive int"), n_layers=n_layers,
        n_heads=json_field(hf, "num_attention_heads", where, "positive int"),
        n_kv_heads=get("num_key_value_heads", default("num_key_value_heads"), "positive int"),
        head_dim=get("head_dim", default("head_dim"), "positive int"),
        hidden_dim=json_field(hf, "intermediate_size", where, "positive int"),
        max_seq_len=get("max_position_embeddings", default("max_position_embeddings", 2048), "positive int"),
        norm="rms", norm_eps=get("rms_norm_eps", default("rms_norm_eps", 1e-6), "positive number"), positions="rope",
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta, mlp="swiglu", activation="silu",
        qkv_bias=bias or model_type == "qwen2", out_bias=bias,
        mlp_bias=get("mlp_bias", False, "bool") if model_type in ("llama", "smollm2") else False,
        tie_embeddings=get("tie_word_embeddings", default("tie_word_embeddings", False), "bool"),
        sliding_window=window, layer_types=layer_types, **fixed_switches(model_type),
    )
    if fields["n_kv_heads"] and fields["n_heads"] % fields["n_kv_heads"]:  # in the file's names, not ModelConfig's
        raise ValueError(f"{where}: num_attention_heads = {fields['n_heads']} must be a multiple of "
                         f"num_key_value_heads = {fields['n_kv_heads']}")
    if gemma:
        key = "hidden_act" if model_type == "gemma" else "hidden_activation"
        act = get(key, "gelu_pytorch_tanh", "str")
        if model_type == "gemma" and act == "gelu":  # early Gemma configs: transformers reads it as the tanh GELU
            act = "gelu_pytorch_tanh"
        if act not in GELU_NAMES:
            raise ValueError(f"{where}: {key} = {act!r} is not supported for {model_type} (supported: "
                             f"{', '.join(GELU_NAMES)})")
        fields["activation"] = GELU_NAMES[act]
    if not gemma and model_type != "phi3" and get("hidden_act", "silu", "str") != "silu":
        raise ValueError(f"{where}: hidden_act = {hf['hidden_act']!r} is not supported for {model_type} (its MLP is "
                         "SwiGLU: 'silu')")
    if model_type == "phi3":  # transformers' Phi-3 has no biases whatever the config says
        act = get("hidden_act", "silu", "str")
        names = {"silu": "silu", **GELU_NAMES}
        if act not in names:
            raise ValueError(f"{where}: hidden_act = {act!r} is not supported for phi3 (supported: {', '.join(names)})")
        fields.update(activation=names[act], qkv_bias=False, out_bias=False, mlp_bias=False,
                      partial_rotary_factor=partial)
    if model_type in GEMMA2_FAMILY:
        fields["query_pre_attn_scalar"] = get("query_pre_attn_scalar", 256, "positive number")
        fields["final_softcap"] = nullable("final_logit_softcapping", 30.0 if model_type == "gemma2" else None,
                                           "positive number")
        attn_cap = nullable("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None, "positive number")
        if model_type == "gemma3_text" and attn_cap is not None:
            raise ValueError(f"{where}: attn_logit_softcapping = {attn_cap} is not supported for gemma3_text: "
                             "transformers' Gemma 3 never applies it (only Gemma 2 caps attention logits); set it "
                             "to null")
        fields["attn_softcap"] = attn_cap
    return fields


def rope_fields(hf: dict, model_type: str, where: str, get) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta). Newer transformers write rope_parameters = {"rope_type",
    "rope_theta", ...}; older ones rope_theta + rope_scaling. Gemma 3 has one set per layer kind:
    rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}, or the older rope_theta (global,
    default 1M), rope_local_base_freq (local, default 10k) and rope_scaling (global layers only)."""
    rope = get("rope_parameters", {}, "object")
    legacy = get("rope_scaling", None, "object")
    if model_type != "gemma3_text":
        scaling = legacy or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            check_rope_scaling(scaling, where, "rope_scaling" if legacy else "rope_parameters")
        theta = json_field(rope, "rope_theta", where, "positive number", section="rope_parameters",
                           default=get("rope_theta", 10000.0, "positive number"))
        return theta, scaling, None
    if rope and not set(rope) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"{where}: rope_parameters of a gemma3_text config must be {{\"full_attention\": {{...}}, "
                         f"\"sliding_attention\": {{...}}}}, got keys {sorted(rope)}")
    full = dict(json_field(rope, "full_attention", where, "object", {}, "rope_parameters"))
    local = json_field(rope, "sliding_attention", where, "object", {}, "rope_parameters")
    full.update(legacy or {})
    section = "rope_scaling" if legacy else "rope_parameters.full_attention"
    scaling = full if full.get("rope_type", full.get("type", "default")) != "default" else None
    if scaling:
        check_rope_scaling(scaling, where, section)
    theta = json_field(full, "rope_theta", where, "positive number", section="rope_parameters.full_attention",
                       default=get("rope_theta", 1_000_000.0, "positive number"))
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where}: rope_parameters.sliding_attention.rope_type = {kind!r} is not supported (Gemma 3's "
                         "local layers use plain RoPE: 'default')")
    local_theta = json_field(local, "rope_theta", where, "positive number", section="rope_parameters.sliding_attention",
                             default=get("rope_local_base_freq", 10_000.0, "positive number"))
    return theta, scaling, local_theta


def sliding_fields(hf: dict, model_type: str, where: str, get, nullable, n_layers: int):
    """(sliding_window, layer_types) as transformers reads them for each model_type:

        mistral        sliding_window on every layer (missing: 4096; null: none); layer_types ignored
        phi3           sliding_window on every layer (missing or null: none)
        qwen2, qwen3   only if use_sliding_window; then layer_types, or the layers from max_window_layers on
        gemma2         layer_types, or alternating: layers 0, 2, 4, ... local (sliding_window 4096 if missing)
        gemma3_text    layer_types, or sliding_window_pattern (6): every 6th layer global, the rest local
        llama, gemma   no sliding window
    """
    if model_type == "mistral":
        return nullable("sliding_window", 4096, "positive int"), None
    if model_type == "phi3":  # Phi3Config's default is no window
        return nullable("sliding_window", None, "positive int"), None
    if model_type in ("qwen2", "qwen3"):
        if not get("use_sliding_window", False, "bool"):
            return None, None
        window = nullable("sliding_window", 4096, "positive int")
        first = get("max_window_layers", 28, "int >= 0")
        computed = ["sliding_attention" if window is not None and i >= first else "full_attention"
                    for i in range(n_layers)]
    elif model_type == "gemma2":
        window = nullable("sliding_window", 4096, "positive int")
        computed = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    elif model_type == "gemma3_text":
        window = nullable("sliding_window", 4096, "positive int")
        pattern = get("sliding_window_pattern", 6, "positive int")
        computed = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    else:
        return None, None
    kinds = get("layer_types", computed, "str list")
    if len(kinds) != n_layers or not set(kinds) <= set(LAYER_TYPES):
        raise ValueError(f"{where}: layer_types must list {n_layers} entries (num_hidden_layers), each one of "
                         f"{', '.join(LAYER_TYPES)}; got {kinds!r}"[:300])
    if "sliding_attention" not in kinds:
        return None, None
    if window is None:
        raise ValueError(f"{where}: layer_types has sliding_attention layers but sliding_window is null")
    return window, kinds


def phi3_rope_fields(hf: dict, where: str, get) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) of a Phi-3 config.json, read as Phi3Config reads it:
    rope_scaling (older files) or rope_parameters; rope type "su" or "yarn" means "longrope"; LongRoPE's
    original_max_position_embeddings is the top-level key (default 4096), which wins over one inside the dict;
    short_factor and long_factor need one number per rotated frequency."""
    legacy = get("rope_scaling", None, "object")
    rope = dict(legacy or get("rope_parameters", {}, "object"))
    section = "rope_scaling" if legacy else "rope_parameters"
    theta = json_field(rope, "rope_theta", where, "positive number", section=section,
                       default=get("rope_theta", 10000.0, "positive number"))
    partial = json_field(rope, "partial_rotary_factor", where, "positive number", section=section,
                         default=get("partial_rotary_factor", 1.0, "positive number"))
    n_heads = json_field(hf, "num_attention_heads", where, "positive int")
    head_dim = get("head_dim", json_field(hf, "hidden_size", where, "positive int") // n_heads, "positive int")
    rotated = int(head_dim * partial)
    if partial > 1 or rotated < 2 or rotated % 2:
        raise ValueError(f"{where}: partial_rotary_factor = {partial} must be in (0, 1] and leave an even number "
                         f"of rotated dims of head_dim {head_dim}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind
    if kind == "default":
        return theta, None, partial
    if kind != "longrope":
        raise ValueError(f"{where}: {section}.type = {kind!r} is not supported for phi3 (supported: default, "
                         "longrope)")
    scaling = {"rope_type": "longrope"}
    for key in ("short_factor", "long_factor"):
        factors = json_field(rope, key, where, "list", section=section)
        if len(factors) != rotated // 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                   and f > 0 for f in factors):
            raise ValueError(f"{where}: {section}.{key} must list {rotated // 2} positive numbers (one per rotated "
                             f"frequency), got {len(factors)} entries")
        scaling[key] = [float(f) for f in factors]
    scaling["original_max_position_embeddings"] = get("original_max_position_embeddings", 4096, "positive int")
    for key in ("factor", "attention_factor"):
        value = json_field(rope, key, where, "positive number", section=section, default=None)
        if value is not None:
            scaling[key] = value
    return theta, scaling, partial


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
    if fam in ("llama", "gemma2", "phi3"):
        return {**decoder_config(c), **special, "torch_dtype": "float32"}
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


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def decoder_config(c: ModelConfig) -> dict:
    """config.json of a Llama-family, Phi-3 or Gemma model (decoder_fields backwards). A switch the model_type cannot
    express (a Llama with a soft cap, a Gemma 2 without its post norms) is an error, not a silent change."""
    model_type = c.model_type if c.model_type in ARCHITECTURES else "llama"  # smollm2 and friends save as Llama
    gemma = model_type.startswith("gemma")

    def refuse(what: str) -> None:
        raise ValueError(f"model_type {model_type!r} cannot express {what} in config.json")

    for name, fixed in fixed_switches(model_type).items():
        if getattr(c, name) != fixed:
            refuse(f"{name}={getattr(c, name)} ({model_type} always has {name}={fixed})")
    out = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=c.vocab_size,
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.hidden_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act="silu",
        tie_word_embeddings=c.tie_embeddings, mlp_bias=c.mlp_bias,
    )
    if c.rope_scaling:
        out["rope_scaling"] = dict(c.rope_scaling)
        if c.rope_scaling.get("rope_type") == "longrope" and model_type != "phi3":
            refuse("LongRoPE rope_scaling (only phi3 reads it)")
    if model_type == "phi3":
        phi3_config(c, out, refuse)
    elif c.partial_rotary_factor != 1.0:
        refuse(f"partial_rotary_factor={c.partial_rotary_factor}")
    if model_type in ATTENTION_BIAS_READERS:  # decoder_fields backwards: who reads attention_bias, mlp_bias
        out["attention_bias"] = c.qkv_bias
        if c.qkv_bias != c.out_bias:
            raise ValueError(f"a {model_type} config.json cannot express q/k/v biases without an o_proj bias")
    elif model_type == "qwen2" and (not c.qkv_bias or c.out_bias):
        raise ValueError("Qwen2 always has q/k/v biases and no o_proj bias")
    elif model_type == "mistral" and (c.qkv_bias or c.out_bias):
        refuse(f"attention biases (qkv_bias={c.qkv_bias}, out_bias={c.out_bias}); Mistral has none")
    if not gemma and model_type != "phi3" and (c.mlp != "swiglu" or c.activation != "silu"):
        refuse(f"mlp={c.mlp!r}, activation={c.activation!r} (its MLP is SwiGLU: gated, SiLU)")
    if model_type != "llama":
        if c.mlp_bias:
            refuse(f"mlp_bias={c.mlp_bias} (only llama reads mlp_bias)")
        del out["mlp_bias"]
    if gemma:
        if c.mlp != "swiglu" or c.activation == "silu":
            refuse(f"mlp={c.mlp!r}, activation={c.activation!r} (Gemma's MLP is GeGLU: gated, GELU, no biases)")
        if model_type == "gemma" and c.activation != "gelu_tanh":
            refuse(f"activation={c.activation!r} (Gemma 1's hidden_act is the tanh GELU)")
        del out["hidden_act"]  # Gemma 1 names the GELU hidden_act, Gemma 2 and 3 hidden_activation
        out["hidden_act" if model_type == "gemma" else "hidden_activation"] = \
            "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else "gelu"
    kinds = [("sliding_attention" if c.is_sliding(i) else "full_attention") for i in range(c.n_layers)]
    sliding = "sliding_attention" in kinds
    if model_type in ("llama", "gemma") and sliding:
        refuse(f"sliding_window={c.sliding_window}")
    if model_type in ("mistral", "phi3"):
        if sliding and "full_attention" in kinds:
            refuse(f"layer_types={kinds} ({'Mistral' if model_type == 'mistral' else 'Phi-3'} slides on every layer "
                   "or none)")
        out["sliding_window"] = c.sliding_window if sliding else None
    if model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=sliding, sliding_window=c.sliding_window if sliding else None)
        if sliding:
            out["layer_types"] = kinds
            first = kinds.index("sliding_attention")
            if all(kind == "sliding_attention" for kind in kinds[first:]):  # older transformers read this instead
                out["max_window_layers"] = first
    if model_type in GEMMA2_FAMILY:  # transformers builds a sliding mask even if no layer uses it: give a window
        out.update(sliding_window=c.sliding_window or c.max_seq_len, layer_types=kinds,
                   query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
                   final_logit_softcapping=c.final_softcap)
    elif c.query_pre_attn_scalar is not None and c.query_pre_attn_scalar != c.head_dim:
        refuse(f"query_pre_attn_scalar={c.query_pre_attn_scalar}")
    elif c.final_softcap is not None:
        refuse(f"final_softcap={c.final_softcap}")
    if model_type == "gemma2":
        out["attn_logit_softcapping"] = c.attn_softcap
    elif c.attn_softcap is not None:
        refuse(f"attn_softcap={c.attn_softcap}")
    if model_type == "gemma3_text":
        out["attn_logit_softcapping"] = None
        if c.rope_local_theta is None and c.rope_scaling:
            refuse("sliding layers that share the global layers' scaled RoPE (rope_local_theta=None)")
        out["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
    elif c.rope_local_theta is not None:
        refuse(f"rope_local_theta={c.rope_local_theta}")
    return out


def phi3_config(c: ModelConfig, out: dict, refuse) -> None:
    """Phi-3's own keys of config.json, in place: no bias keys (Phi-3 has none), hidden_act, the rotated fraction,
    LongRoPE's original context at the top level where Phi3Config reads it."""
    if c.qkv_bias or c.out_bias or c.mlp_bias:
        refuse(f"biases (qkv_bias={c.qkv_bias}, out_bias={c.out_bias}, mlp_bias={c.mlp_bias}); Phi-3 has none")
    if c.mlp != "swiglu":
        refuse(f"mlp={c.mlp!r} (Phi-3's MLP is gated)")
    out["hidden_act"] = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.activation]
    out["partial_rotary_factor"] = c.partial_rotary_factor
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "longrope"):
        refuse(f"rope_scaling of type {scaling.get('rope_type', scaling.get('type'))!r} (Phi-3 reads longrope only)")
    if scaling.get("rope_type") == "longrope":
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]


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
