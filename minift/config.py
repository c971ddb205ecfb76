"""ModelConfig: every number that decides a transformer's shape, in one dataclass.

Lesson
------
GPT-2, Llama (2, 3, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3), Gemma (1, 2, 3) and BERT are the same machine with
different switches:

    switch          GPT-2        Llama family          Gemma 1 / 2 / 3                 BERT
    ------------    ---------    ------------------    ----------------------------    ---------------
    positions       learned      rotary (RoPE; Phi-3:  RoPE (3: own base on local      learned (+ token
                                 LongRoPE, partial)    layers, rope_local_theta)       types)
    norm            LayerNorm    RMSNorm               RMSNorm scaling by (1 + w)      LayerNorm
                                                       (norm_plus_one)
    norm placement  pre          pre                   pre (2, 3: and after each       post
                                                       branch, branch_post_norms)
    MLP             GELU         SwiGLU (gate * up)    GeGLU: the gated MLP with       GELU
                                                       tanh-GELU
    biases          all          none (Qwen2: q,k,v;   none                            all
                                 Llama, Qwen3: if
                                 attention_bias)
    attention       causal       causal, GQA           causal, GQA; 2, 3: sliding      bidirectional
                                 (Mistral, Phi-3,      window on some layers,
                                 Qwen: may use a       query_pre_attn_scalar
                                 sliding window)
    q/k norm        none         none (Qwen3: RMSNorm  none (3: RMSNorm per head)      none
                                 per head on q and k)
    fused layers    none         none (Phi-3: one      none                            none
                                 qkv_proj, one
                                 gate_up_proj)
    soft-capping    none         none                  2: attention and final logits   none
                                                       3: final logits if configured
    embeddings      as stored    as stored             times sqrt(d) (embed_scale)     as stored
    head            tied         tied or untied        tied                            none (hidden states)

A sliding window (Mistral, Qwen2/3 when asked, Gemma 2/3's local layers) lets a query see only the last
`sliding_window` positions, itself included; `layer_types` says which layers are "sliding_attention" and
which "full_attention" (Gemma 2 alternates, Gemma 3 has five local layers per global one).

`minift.model.Transformer` reads only this dataclass, so adding an architecture means setting switches,
not writing a new model class. Checkpoint readers (`minift.io`) translate a Hugging Face `config.json`
or GGUF metadata into it; `minift.save` translates it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names for the two kinds of layer


@dataclass
class ModelConfig:
    """Shape and switches of one transformer. Field names follow the papers (d, heads), spelled out."""

    model_type: str = "llama"  # the Hugging Face model_type written back on save: llama, mistral, qwen2, qwen3,
    # phi3, gemma, gemma2, gemma3_text, gpt2, bert
    vocab_size: int = 32000
    dim: int = 512  # d_model, the residual-stream width
    n_layers: int = 8
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads; None = n_heads (MHA), 1 = MQA, in between = GQA
    head_dim: int | None = None  # None = dim // n_heads (Qwen3/Gemma set it explicitly)
    hidden_dim: int = 1376  # MLP inner width
    max_seq_len: int = 2048  # size of the learned position table; RoPE models accept longer inputs (LongRoPE
    # without a factor derives its scale from max_seq_len / original_max_position_embeddings)

    # --- switches (see the table in the module docstring) ---
    causal: bool = True  # False for an encoder (BERT)
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    post_norm: bool = False  # BERT: x = norm(x + f(x)) instead of x = x + f(norm(x))
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    # or Phi-3's {"rope_type": "longrope", "short_factor", "long_factor", "original_max_position_embeddings", ...}
    partial_rotary_factor: float = 1.0  # RoPE turns only the first int(head_dim * this) dims of each head (Phi-4-mini)
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    activation: str = "silu"  # "silu" | "gelu" (erf) | "gelu_tanh" (GPT-2's gelu_new, Gemma's GeGLU)
    qkv_bias: bool = False  # bias on q, k, v projections (GPT-2, BERT, Qwen2; attention_bias in config.json)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, BERT; attention_bias in config.json)
    qk_norm: bool = False  # RMSNorm over head_dim on each head's query and key, before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), its weight stored as the offset from 1 (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(dim), rounded to the weights' dtype first (Gemma)
    branch_post_norms: bool = False  # also normalise each branch's output before the residual add (Gemma 2, 3)
    query_pre_attn_scalar: float | None = None  # softmax scale 1/sqrt(this), not 1/sqrt(head_dim) (Gemma 2, 3)
    attn_softcap: float | None = None  # attention logits -> cap * tanh(logits / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # output logits -> cap * tanh(logits / cap) (Gemma 2, 3)
    sliding_window: int | None = None  # sliding layers attend to the last `sliding_window` positions, self included
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None: every layer
    # slides when sliding_window is set (Mistral), none otherwise
    rope_local_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3); None: as the rest
    mlp_bias: bool = False  # biases in the MLP (GPT-2, BERT; a Llama whose config.json sets mlp_bias)
    fused_qkv: bool = False  # one qkv_proj whose output rows are [q; k; v] instead of q/k/v_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj whose output rows are [gate; up] (Phi-3)
    tie_embeddings: bool = False  # the LM head reuses the token embedding matrix
    type_vocab_size: int = 0  # BERT token types (segment A/B); 0 = none
    lm_head: bool = True  # False for an encoder that returns hidden states
    dropout: float = 0.0  # on embeddings and each residual branch (BERT fine-tuning uses 0.1)

    # --- special tokens (None where the model has none) ---
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    extra: dict[str, Any] = field(default_factory=dict)  # fields kept only to write the checkpoint back

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        for name, value, allowed in [
            ("norm", self.norm, ("rms", "layer")),
            ("positions", self.positions, ("rope", "learned")),
            ("mlp", self.mlp, ("swiglu", "gelu")),
            ("activation", self.activation, ("silu", "gelu", "gelu_tanh")),
        ]:
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {allowed}")
        factor = self.partial_rotary_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1 or \
                (factor != 1 and (int(self.head_dim * factor) < 2 or int(self.head_dim * factor) % 2)):
            raise ValueError(f"ModelConfig.partial_rotary_factor={factor!r}; expected 0 < factor <= 1 leaving an even "
                             f"number of rotated dims of head_dim={self.head_dim}")
        if self.fused_gate_up and self.mlp != "swiglu":
            raise ValueError("ModelConfig.fused_gate_up needs the gated MLP (mlp='swiglu')")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, name)
            positive = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            if value is not None and not positive:
                raise ValueError(f"ModelConfig.{name}={value!r}; expected a positive number or None")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window!r}; expected a positive integer or None")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"ModelConfig.layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.n_layers}), got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding_attention layers but sliding_window is None")

    def is_sliding(self, layer: int) -> bool:
        """Does this layer attend only within the sliding window?"""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
