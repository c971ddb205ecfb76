"""The Transformer: one readable model for GPT-2, the Llama family (Mistral, Qwen2, Qwen3, Phi-3), Gemma 1-3 and BERT.

Lesson
------
A transformer (Vaswani et al. 2017) is a stack of identical blocks over a residual stream x of width d:

    tokens -> embed (+ learned positions) ------------------------------+
                                                                        |  x: (B, T, d)
    repeat n_layers:   x = x + Attention(norm(x))    # tokens talk       |
                       x = x + MLP(norm(x))          # each token thinks |
                                                                        v
    final norm -> lm_head -> logits (B, T, vocab)        (encoders stop at hidden states)

* Attention. Each token emits a query q, a key k and a value v (linear maps of x, split into heads). The
  output is softmax(q k^T / sqrt(head_dim)) v per head: a weighted average of the values of the tokens
  it may see. A causal model sees only earlier tokens (GPT-2, Llama); an encoder sees all (BERT).
  Grouped-query attention (GQA, Ainslie et al. 2023) lets several query heads share one key/value head,
  which shrinks the KV cache; n_kv_heads = 1 is multi-query attention.
* Positions. GPT-2 and BERT add a learned vector per position. Llama rotates q and k by an angle that
  grows with the position (RoPE, Su et al. 2021 §3.4): then q.k depends only on the distance between
  tokens. Frequencies are theta^(-2i/head_dim); Llama 3 stretches the low frequencies for long contexts.
* MLP. GPT-2/BERT: W2 GELU(W1 x). Llama: W_down (SiLU(W_gate x) * W_up x) — SwiGLU (Shazeer 2020).
* Norm. LayerNorm (subtract mean, divide by std, scale and shift) or RMSNorm (divide by the root mean
  square, scale only; Zhang & Sennrich 2019). GPT-2 and Llama normalise *before* each branch (pre-norm);
  BERT normalises *after* the residual add (post-norm). Qwen3 also RMS-normalises every head's query and
  key vector (width head_dim, before RoPE), which bounds q.k and keeps attention logits from growing.
* Gemma. The same decoder with small changes (Gemma Team 2024a, b; 2025): the embeddings are multiplied
  by sqrt(d), so they start on the scale of the residual stream; RMSNorm multiplies by (1 + w), so a weight
  of 0 is the identity; the MLP is GeGLU (the SwiGLU gate with tanh-GELU in place of SiLU). Gemma 2 and 3
  normalise each branch's output as well as its input ("sandwich" norms), scale q.k by
  1/sqrt(query_pre_attn_scalar), and bound logits with a soft cap, cap * tanh(z / cap): smooth, close to
  z while |z| << cap, never beyond cap (Gemma 2: attention logits at 50 and output logits at 30). Gemma 3
  drops the attention cap and RMS-normalises each head's q and k, as Qwen3 does.
* Sliding window. A "local" layer lets a query see only the last W positions (itself included): cost and
  KV cache can grow with W instead of the whole context, while "global" (full) layers keep long-range
  reach. (minift applies the window as a mask and its KV cache keeps every position: the same numbers,
  not the savings.) Mistral and Phi-3 slide on every layer (when their config sets a window), Qwen2/3 on
  the layers the config names; Gemma 2 alternates local and global; Gemma 3 has five local layers per
  global one, and gives the local ones their own RoPE base (10k) while the global ones use 1M.
* Phi-3. A Llama block whose q, k, v projections are one matrix (qkv_proj, output rows [q; k; v]) and whose
  gate and up projections are one (gate_up_proj, rows [gate; up]): one matmul instead of three or two, the
  same numbers. minift keeps them fused (fused_qkv, fused_gate_up), so LoRA adapts the layers Phi-3 has and
  adapter files carry Phi-3's own names. Phi-3's long-context checkpoints use LongRoPE (Ding et al. 2024):
  each frequency i is divided by its own factor, short_factor[i] while the sequence fits the pretraining
  context (original_max_position_embeddings), long_factor[i] beyond it, and cos/sin are multiplied by
  sqrt(1 + ln(s) / ln(L)) (s = context / L), which keeps attention sharp over the longer context.
  partial_rotary_factor < 1 (Phi-4-mini) rotates only the first dims of each head and leaves the rest alone.
* KV cache. While generating, the keys and values of past tokens never change, so we keep them and feed
  only the new token: each step costs O(T) instead of O(T^2).

Which switch each architecture flips is tabulated in `minift/config.py`. Parameter names (`embed`,
`blocks.{i}.attn.q_proj`, `blocks.{i}.mlp.up_proj`, `norm`, `lm_head`, ...) are minift's own; the
checkpoint readers in `minift/io/` translate Hugging Face and GGUF names into them.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minift.config import ModelConfig

# ----------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like the reference implementations.

    plus_one (Gemma): multiply by (1 + weight) instead, all in float32 before rounding back, as Gemma does;
    the weight starts at 0 and stores the offset from 1."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.dim, config.norm_eps, config.norm_plus_one)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding: the looked-up rows times sqrt(dim), a factor first rounded to the weights' dtype
    (in bfloat16, sqrt(3072) = 55.43 becomes 55.5; sqrt(2048) = 45.25 stays), exactly as transformers does.
    The scale lives in the module, so anything that replaces its output (prompt tuning) sees scaled rows."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embedding_dim ** 0.5, dtype=self.weight.dtype, device=self.weight.device)
        return super().forward(input_ids) * scale


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): about x while |x| << cap, smoothly bounded by +-cap (Gemma 2). None: x unchanged."""
    return x if cap is None else torch.tanh(x / cap) * cap


def rotary_dims(config: ModelConfig) -> int:
    """How many dims of each head RoPE turns: head_dim, or its first int(head_dim * partial_rotary_factor)."""
    return int(config.head_dim * config.partial_rotary_factor)


def rope_frequencies(config: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for i < d/2 (d = rotary_dims), with Llama-3, linear or LongRoPE scaling
    when configured. (d/2,)

    local=True: the sliding layers' frequencies when they have a base of their own (Gemma 3's
    rope_local_theta, never scaled). long=True: LongRoPE's long_factor set (sequences beyond
    original_max_position_embeddings); otherwise its short_factor set."""
    d = rotary_dims(config)
    theta = config.rope_local_theta if local else config.rope_theta
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = 1.0 / (theta ** exponents)
    scaling = {} if local else (config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "longrope":  # Phi-3: one divisor per frequency, a set for short and one for long sequences
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        if factors.shape != (d // 2,):
            raise ValueError(f"rope_scaling.{'long' if long else 'short'}_factor has {factors.numel()} entries; "
                             f"LongRoPE needs one per frequency, {d // 2} (rotated dims / 2)")
        inv_freq = 1.0 / (factors * theta ** exponents)
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low frequencies by `factor`, blend smoothly in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, blended, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)")
    return inv_freq


def longrope_context(config: ModelConfig) -> int | None:
    """LongRoPE's original_max_position_embeddings (the length where it switches to long_factor); None without it."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    return int(scaling["original_max_position_embeddings"])


def rope_attention_factor(config: ModelConfig) -> float:
    """LongRoPE's multiplier of cos and sin: attention_factor if given, else sqrt(1 + ln s / ln L) with
    s = factor (or max_position_embeddings / L) and L = original_max_position_embeddings; 1 when s <= 1 or
    without LongRoPE."""
    original = longrope_context(config)
    if original is None:
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor") or config.max_seq_len / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of each (x1_i, x2_i) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, H, T, hd) by the angles of their positions; cos/sin are (B, 1, T, d), d = the rotated
    dims: all of hd, or (partial_rotary_factor < 1) the first d, the rest passing through unturned."""
    d = cos.size(-1)
    if d == x.size(-1):
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :d], x[..., d:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions. `length` counts positions filled."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, Hkv, T, hd) after the cached ones; return all of them so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KVCache is full: {end} positions needed, {self.k.size(3)} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def expand(self, batch_size: int) -> "KVCache":
        """A copy whose batch repeats this cache's single row: share one prompt prefix across many queries."""
        if self.k.size(1) != 1:
            raise ValueError("KVCache.expand needs a cache of batch size 1")
        new = KVCache.__new__(KVCache)
        new.k = self.k.expand(-1, batch_size, -1, -1, -1).clone()
        new.v = self.v.expand(-1, batch_size, -1, -1, -1).clone()
        new.length = self.length
        return new


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hd, H, Hkv = config.head_dim, config.n_heads, config.n_kv_heads
        if config.fused_qkv:  # Phi-3: one matrix, output rows [q (H*hd); k (Hkv*hd); v (Hkv*hd)]
            self.qkv_proj = nn.Linear(config.dim, (H + 2 * Hkv) * hd, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(config.dim, H * hd, bias=config.qkv_bias)
            self.k_proj = nn.Linear(config.dim, Hkv * hd, bias=config.qkv_bias)
            self.v_proj = nn.Linear(config.dim, Hkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * hd, config.dim, bias=config.out_bias)
        if config.qk_norm:  # Qwen3, Gemma 3: one RMSNorm of width head_dim, shared by all heads, for q and one for k
            self.q_norm = RMSNorm(hd, config.norm_eps, config.norm_plus_one)
            self.k_norm = RMSNorm(hd, config.norm_eps, config.norm_plus_one)
        # softmax scale: 1/sqrt(query_pre_attn_scalar) where the config says (Gemma 2, 3); None = 1/sqrt(head_dim)
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5

    def forward(self, x, rope, mask, is_causal, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        hd, H, Hkv = self.config.head_dim, self.config.n_heads, self.config.n_kv_heads
        if self.config.fused_qkv:
            q, k, v = self.qkv_proj(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.config.qk_norm:  # normalise each head's vector over hd, then rotate: the norm sees raw q, k
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd), S = cached + T
        dropout = self.config.dropout if self.training else 0.0
        if self.config.attn_softcap is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale, enable_gqa=Hkv != H
            )  # (B, H, T, hd)
        else:  # the cap goes between q.k and softmax, where SDPA lets nothing in: write attention out
            scale = self.scale if self.scale is not None else hd ** -0.5
            y = capped_attention(q, k, v, mask, is_causal, scale, self.config.attn_softcap, dropout, self.training)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, d)


def capped_attention(q, k, v, mask, is_causal, scale, cap, dropout, training) -> torch.Tensor:
    """softmax(mask(cap * tanh(q k^T * scale / cap))) v, written out (Gemma 2's attention logit soft-capping).

    q (B, H, T, hd); k, v (B, Hkv, S, hd), each key/value head shared by H / Hkv query heads; mask: boolean
    "may attend" (B or 1, 1, T, S) or None. The softmax runs in float32, as in transformers. -> (B, H, T, hd)"""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    scores = soft_cap(q @ k.transpose(-2, -1) * scale, cap)  # (B, H, T, S)
    if mask is None and is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout, training=training)
    return probs @ v  # (B, H, T, hd)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.fused = config.fused_gate_up
        if self.fused:  # Phi-3: one matrix, output rows [gate; up]
            self.gate_up_proj = nn.Linear(config.dim, 2 * config.hidden_dim, bias=config.mlp_bias)
        else:
            if self.swiglu:
                self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
            self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.activation = config.activation

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return F.silu(x)
        return F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)  # (B, T, d)
        if self.swiglu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)
        return self.down_proj(self.act(self.up_proj(x)))  # (B, T, d)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.branch_post_norms = config.branch_post_norms
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        if config.branch_post_norms:  # Gemma 2, 3: each branch's output is normalised before the residual add
            self.attn_post_norm = make_norm(config)
            self.mlp_post_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, is_causal, cache=None, layer=0) -> torch.Tensor:
        if self.post_norm:  # BERT: add, then normalise
            x = self.attn_norm(x + self.dropout(self.attn(x, rope, mask, is_causal, cache, layer)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        h = self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer)
        if self.branch_post_norms:
            h = self.attn_post_norm(h)
        x = x + self.dropout(h)
        h = self.mlp(self.mlp_norm(x))
        if self.branch_post_norms:
            h = self.mlp_post_norm(h)
        return x + self.dropout(h)


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def build_attention_mask(attention_mask, T: int, past: int, causal: bool, device) -> torch.Tensor | None:
    """Turn a (B, S) padding mask (1 = real token, S = past + T) into a boolean (B, 1, T, S) "may attend" mask.

    A 4-D boolean mask (packed sequences) passes through unchanged. A query row that may attend nothing
    (a left-padding position) is allowed to attend everything instead: its output is never used, and an
    all-masked softmax would be NaN and poison the backward pass.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, S) or (B, 1, T, S); got shape {tuple(attention_mask.shape)}")
    S = attention_mask.size(1)
    if S != past + T:
        raise ValueError(f"attention_mask covers {S} positions but past + new = {past} + {T}")
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        keys = keys & (k_pos <= q_pos)  # (B, 1, T, S)
    else:
        keys = keys.expand(-1, -1, T, -1)
    return keys | ~keys.any(dim=-1, keepdim=True)


def sliding_window_mask(mask, is_causal: bool, B: int, T: int, past: int, window: int, device):
    """The (mask, is_causal) pair of a sliding layer, from the full layers' pair: query column q may also see
    only key columns k with q - window < k <= q (the last `window` positions, itself included; columns, not
    position ids, as transformers counts them, so left padding and packed rows slide the same way).

    When no query is `window` columns past the first key, the window cuts nothing and the pair is unchanged."""
    S = past + T
    if S <= window:
        return mask, is_causal
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    band = (k_pos <= q_pos) & (k_pos > q_pos - window)  # (T, S)
    if mask is None:
        return band[None, None].expand(B, 1, T, S), False
    keys = mask & band  # (B, 1, T, S)
    return keys | ~keys.any(dim=-1, keepdim=True), False


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder (GPT-2, Llama family, Phi-3, Gemma) or encoder (BERT), chosen by `ModelConfig` switches."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = (ScaledEmbedding if config.embed_scale else nn.Embedding)(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        if config.type_vocab_size:
            self.type_embed = nn.Embedding(config.type_vocab_size, config.dim)
        if config.post_norm:  # BERT normalises the embeddings; pre-norm models normalise at the end instead
            self.embed_norm = make_norm(config)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        if not config.post_norm:
            self.norm = make_norm(config)
        if config.lm_head:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed.weight
        if config.positions == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
            if config.rope_local_theta is not None:  # Gemma 3: the sliding layers turn at their own base
                self.register_buffer("inv_freq_local", rope_frequencies(config, local=True), persistent=False)
            if longrope_context(config) is not None:  # Phi-3 LongRoPE: the set for sequences past the original context
                self.register_buffer("inv_freq_long", rope_frequencies(config, long=True), persistent=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 / BERT style init (normal, std 0.02). Loaded checkpoints overwrite it."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .half() / .bfloat16() move the RoPE frequencies but keep them float32, as transformers
        does: in bfloat16, theta^(-2i/d) loses digits and the angles of late positions drift visibly."""
        super()._apply(fn, recurse)
        if getattr(self, "inv_freq", None) is not None and self.inv_freq.dtype != torch.float32:
            self.reset_rope(self.inv_freq.device)
        return self

    def reset_rope(self, device) -> None:
        """Recompute the RoPE frequency buffers (float32) on `device`: they are computed, never loaded, so a model
        built on the "meta" device gets them here."""
        if self.config.positions == "rope":
            self.inv_freq = rope_frequencies(self.config).to(device)
            if self.config.rope_local_theta is not None:
                self.inv_freq_local = rope_frequencies(self.config, local=True).to(device)
            if longrope_context(self.config) is not None:
                self.inv_freq_long = rope_frequencies(self.config, long=True).to(device)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():  # parameters() already skips the tied duplicate
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
        return total

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False):
        """cos and sin of position * frequency, (B, 1, T, d), each frequency used for both halves (d = rotated dims).

        LongRoPE (Phi-3) picks its long_factor set for the whole call when the largest position is at or past
        original_max_position_embeddings (as transformers does), and scales cos and sin by its attention factor."""
        inv_freq = self.inv_freq_local if local else self.inv_freq
        original = None if local else longrope_context(self.config)
        if original is not None and int(position_ids.max()) + 1 > original:
            inv_freq = self.inv_freq_long
        freqs = position_ids[:, :, None].float() * inv_freq.float()  # (B, T, d/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, d)
        cos, sin = angles.cos(), angles.sin()
        if original is not None and (scale := rope_attention_factor(self.config)) != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for a causal LM, hidden states (B, T, d) for an encoder or with return_hidden.

        attention_mask: (B, S) with 1 for real tokens (S = cached + T), or a boolean (B, 1, T, S) mask.
        position_ids: (B, T); default past..past+T-1 (pass them for left-padded batches or packed rows).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)  # (B, T, d)
        if self.config.positions == "learned":
            if past + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            x = x + self.pos_embed(position_ids)
        if self.config.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        if self.config.post_norm:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)

        rope = self.rope(position_ids, x.dtype) if self.config.positions == "rope" else None
        mask = build_attention_mask(attention_mask, T, past, self.config.causal, x.device)
        # With no mask, let SDPA apply causality itself (its fastest path); a single new token needs none.
        is_causal = mask is None and self.config.causal and T > 1 and past == 0
        if mask is None and self.config.causal and T > 1 and past > 0:
            mask = build_attention_mask(torch.ones(B, past + T, device=x.device), T, past, True, x.device)
        # Sliding layers (Mistral, Qwen2/3 when asked, Gemma 2/3's local layers): the same, cut to the window,
        # and on Gemma 3 with RoPE at their own base.
        local_rope, local_mask, local_causal = rope, mask, is_causal
        if self.config.sliding_window is not None:
            if not self.config.causal:
                raise ValueError("a sliding window needs a causal model")
            local_mask, local_causal = sliding_window_mask(mask, is_causal, B, T, past, self.config.sliding_window,
                                                           x.device)
            if self.config.rope_local_theta is not None:
                local_rope = self.rope(position_ids, x.dtype, local=True)

        for i, block in enumerate(self.blocks):
            args = (local_rope, local_mask, local_causal) if self.config.is_sliding(i) else (rope, mask, is_causal)
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args, cache, i)
        if cache is not None:
            cache.advance(T)
        if not self.config.post_norm:
            x = self.norm(x)
        if return_hidden or not self.config.lm_head:
            return x  # (B, T, d)
        return self.logits(x)  # (B, T, vocab)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., d) -> next-token logits (..., vocab): lm_head, then the final soft cap where the
        config has one (Gemma 2, 3). Code that keeps hidden states to project only some rows calls this, never
        lm_head alone."""
        return soft_cap(self.lm_head(hidden), self.config.final_softcap)

    # ------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        on_token=None,
    ) -> torch.Tensor:
        """Append up to `max_new_tokens` tokens to each row of `input_ids` (B, T); returns (B, T + n).

        Batches are left-padded (`attention_mask` marks real tokens) so that every row's next token sits in
        the same last column. Rows that produced EOS keep emitting EOS; the loop stops when all rows are done.
        `on_token(token_ids (B,))` is called after each step (streaming).

        The options and their ranges (anything else is a ValueError naming the option and its range,
        checked before any work; see `check_generation_options`):

            max_new_tokens  int >= 0      0 returns input_ids unchanged (transformers rejects 0)
            temperature     finite >= 0   0 = greedy (argmax), as transformers' do_sample=False; > 0 samples
                                          from softmax(logits / temperature)
            top_k           int >= 0      None or 0 = off (as transformers' top_k=0); k >= vocab keeps all
            top_p           0 < p <= 1    None or 1 = off; p = 0 would keep nothing, so it is an error
            input_ids       (B, T >= 1)   every row needs at least one real token: there is nothing to
                                          condition on otherwise (start from the BOS id to generate freely)

        top_k and top_p filter the sampling distribution; at temperature 0 they change nothing, since every
        filter keeps the most likely token. Length: a model with learned positions (GPT-2) has exactly
        `config.max_seq_len` of them, so T + max_new_tokens beyond that is an error naming both numbers.
        A RoPE model (Llama family) has no position table: it may generate past max_seq_len, as transformers
        lets it, but max_seq_len is the context it was trained on, and quality usually degrades beyond it.
        """
        if not self.config.lm_head or not self.config.causal:
            raise ValueError("generate() needs a causal LM with an lm_head")
        check_generation_options(max_new_tokens, temperature, top_k, top_p)
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"generate: input_ids must be a (batch, tokens) tensor of token ids, got {shape}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"generate: the prompt is empty (input_ids has shape {(B, T)}); give at least one "
                             "token (the BOS id, to generate from nothing)")
        if attention_mask is not None and (tuple(attention_mask.shape) != (B, T) or not attention_mask.any(-1).all()):
            raise ValueError(f"generate: attention_mask must have the shape of input_ids {(B, T)} and at least one "
                             f"real token (1) per row (an all-padding row is an empty prompt); got shape "
                             f"{tuple(attention_mask.shape)}")
        limit = self.config.max_seq_len
        if self.config.positions == "learned" and T + max_new_tokens > limit:
            raise ValueError(f"generate: a prompt of {T} tokens + max_new_tokens={max_new_tokens} needs "
                             f"{T + max_new_tokens} positions, but this model has {limit} learned positions "
                             f"(config.max_seq_len); shorten the prompt or set max_new_tokens <= {max(limit - T, 0)}")
        device = input_ids.device
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
        mask = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=device)
        mask = mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's first real token is position 0
        dtype = next(self.parameters()).dtype
        cache = KVCache(self.config, B, T + max_new_tokens, dtype, device) if use_cache else None
        padded = bool((mask == 0).any())
        done = torch.zeros(B, dtype=torch.bool, device=device)
        ids = input_ids
        step_ids, step_pos = input_ids, positions
        switch = longrope_context(self.config)  # LongRoPE: keys cached with short factors go stale past this length
        for _ in range(max_new_tokens):
            if cache is not None and switch is not None and ids.size(1) > switch >= cache.length > 0:
                # as transformers: the first step past the original context recomputes every key with long factors
                cache = KVCache(self.config, B, T + max_new_tokens, dtype, device)
                step_ids, step_pos = ids, positions
            step_mask = mask if (padded or not use_cache) else None
            logits = self(step_ids, attention_mask=step_mask, position_ids=step_pos, cache=cache)[:, -1]  # (B, V)
            next_token = sample_next_token(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            if eos.numel():
                next_token = torch.where(done, eos[0], next_token)
                done = done | torch.isin(next_token, eos)
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            next_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, next_pos], dim=1)
            if on_token is not None:
                on_token(next_token)
            if eos.numel() and bool(done.all()):
                break
            step_ids, step_pos = (next_token[:, None], next_pos) if use_cache else (ids, positions)
        return ids


def check_generation_options(max_new_tokens=0, temperature=0.0, top_k=None, top_p=None, cli: bool = False) -> None:
    """Raise a ValueError naming the first option outside its range (the table in `Transformer.generate`).

    cli=True spells the names as the command's flags (--max-new-tokens) instead of the keywords.
    """
    def name(option: str) -> str:
        return "--" + option.replace("_", "-") if cli else option

    def is_int(value) -> bool:  # Python or NumPy integers; True and False are not counts
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens')} must be an integer >= 0 (0 returns the prompt), "
                         f"got {max_new_tokens!r}")
    if not is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ValueError(f"{name('top_k')} must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} must be in (0, 1] (1 = off), got {top_p!r}")


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax at temperature 0, else sample from the filtered softmax.

    top_k keeps the k most likely tokens (None or 0: all); top_p (nucleus sampling, Holtzman et al. 2020) keeps
    the smallest set of most likely tokens whose probabilities sum to at least p (None or 1: all).
    """
    check_generation_options(0, temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # max at 0: a tiny temperature cannot overflow
    if top_k and top_k < logits.size(-1):  # None or 0: off
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
