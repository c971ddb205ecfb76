"""ModelConfig: every number that decides a transformer's shape, in one dataclass.

Lesson
------
GPT-2, Llama (2, 3, Mistral, Qwen2, Qwen3, SmolLM2) and BERT are the same machine with different switches:

    switch          GPT-2        Llama family          BERT
    ------------    ---------    ------------------    ---------------
    positions       learned      rotary (RoPE)         learned (+ token types)
    norm            LayerNorm    RMSNorm               LayerNorm
    norm placement  pre          pre                   post
    MLP             GELU         SwiGLU (gate * up)    GELU
    biases          all          none (Qwen2: q,k,v)   all
    attention       causal       causal, GQA           bidirectional
    q/k norm        none         none (Qwen3: RMSNorm  none
                                 per head on q and k)
    head            tied         tied or untied        none (hidden states)

`minift.model.Transformer` reads only this dataclass, so adding an architecture means setting switches,
not writing a new model class. Checkpoint readers (`minift.io`) translate a Hugging Face `config.json`
or GGUF metadata into it; `minift.save` translates it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Shape and switches of one transformer. Field names follow the papers (d, heads), spelled out."""

    model_type: str = "llama"  # the Hugging Face model_type written back on save: llama, mistral, qwen2, qwen3,
    # gpt2, bert
    vocab_size: int = 32000
    dim: int = 512  # d_model, the residual-stream width
    n_layers: int = 8
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads; None = n_heads (MHA), 1 = MQA, in between = GQA
    head_dim: int | None = None  # None = dim // n_heads (Qwen3/Gemma set it explicitly)
    hidden_dim: int = 1376  # MLP inner width
    max_seq_len: int = 2048  # size of the learned position table; RoPE models accept longer inputs

    # --- switches (see the table in the module docstring) ---
    causal: bool = True  # False for an encoder (BERT)
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    post_norm: bool = False  # BERT: x = norm(x + f(x)) instead of x = x + f(norm(x))
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    activation: str = "silu"  # "silu" | "gelu" (erf) | "gelu_tanh" (GPT-2's gelu_new)
    qkv_bias: bool = False  # bias on q, k, v projections (GPT-2, BERT, Qwen2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, BERT)
    qk_norm: bool = False  # RMSNorm over head_dim on each head's query and key, before RoPE (Qwen3)
    mlp_bias: bool = False  # biases in the MLP (GPT-2, BERT)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
