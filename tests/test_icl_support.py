"""Shared helpers for the ICL tests (no tests here): a tiny byte-level tokenizer and tiny random models.

The byte tokenizer is lossless and needs no training, so prompts round-trip exactly; ChatML markers are
single special tokens, as in SmolLM2's real tokenizer.
"""

import re

import torch

from minift.config import ModelConfig
from minift.model import Transformer

SPECIALS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "[MASK]", "<s>"]
OFFSET = len(SPECIALS)
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class ByteTokenizer:
    """encode/decode over UTF-8 bytes; ids 0..5 are special tokens, 6..261 the 256 bytes."""

    pad_token_id, eos_token_id = 0, 1
    bos_token_id = None
    vocab_size = OFFSET + 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for piece in SPECIAL_PATTERN.split(text):
            if piece in SPECIALS:
                ids.append(SPECIALS.index(piece))
            else:
                ids.extend(b + OFFSET for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out, buffer = [], bytearray()
        for i in ids:
            if i >= OFFSET:
                buffer.append(i - OFFSET)
                continue
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer = bytearray()
            out.append(SPECIALS[i])
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)


class BosByteTokenizer(ByteTokenizer):
    """Like ByteTokenizer but adds a BOS (<s>, id 5) with add_special_tokens=True, as Llama tokenizers do."""

    bos_token_id = 5

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + super().encode(text)


def tiny_decoder(seed: int = 0, layers: int = 2, dim: int = 32, max_seq_len: int = 4096) -> Transformer:
    """A random Llama-style decoder (GQA, RoPE) over the byte vocabulary."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=ByteTokenizer.vocab_size, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2,
                         hidden_dim=64, max_seq_len=max_seq_len)
    return Transformer(config).eval()


def tiny_gpt2(seed: int = 0) -> Transformer:
    """A random GPT-2-style decoder (learned positions, LayerNorm, biases)."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="gpt2", vocab_size=ByteTokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                         hidden_dim=64, max_seq_len=1024, norm="layer", positions="learned", mlp="gelu",
                         activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
    return Transformer(config).eval()


def tiny_encoder(seed: int = 0) -> Transformer:
    """A random BERT-style encoder (returns hidden states)."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="bert", vocab_size=ByteTokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                         hidden_dim=64, max_seq_len=512, causal=False, norm="layer", post_norm=True,
                         positions="learned", mlp="gelu", activation="gelu", qkv_bias=True, out_bias=True,
                         mlp_bias=True, type_vocab_size=2, lm_head=False, norm_eps=1e-12)
    return Transformer(config).eval()
