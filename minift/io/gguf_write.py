"""GGUF out: write a minift model as one file llama.cpp runs (F16, Q8_0, Q4_0 or Q4_K), quantizers included.

Lesson
------
minift/io/gguf.py explains the file layout and how to read every block format; this module goes the other
way. Writing is the reader's steps backwards:

    1. metadata   general.architecture = "llama" (or "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"), then the shape as <arch>.* keys (block_count,
                  embedding_length, feed_forward_length, attention.head_count(_kv), rms epsilon,
                  rope.freq_base, rope.dimension_count, context_length), the file type, and the
                  tokenizer as tokenizer.ggml.* keys (below). Integers are uint32 and reals float32,
                  the types llama.cpp's loader asks for; token types are an int32 array.
    2. tensors    renamed to llama.cpp's names (blk.{i}.attn_q.weight, ...: the reader's NAME_MAP read
                  backwards), W_q / W_k rows permuted (below), quantized block by block.
    3. layout     header, key/values, tensor table, padding to 32 bytes, then each tensor's bytes at an
                  offset that is a multiple of 32. The file is written to model.gguf.tmp and renamed,
                  so a crash never leaves half a file under the final name.

Qwen2 and Qwen3 differ from Llama only where the reader says (minift/io/gguf.py): q/k/v biases (Qwen2),
per-head q/k RMSNorm weights blk.{i}.attn_q_norm / attn_k_norm (Qwen3), and no row permutation.
Gemma 1/2/3 and Phi-3 are the reader's table backwards too: Gemma's RMSNorm weights are written as 1 + w
(llama.cpp multiplies by the stored weight), no output.weight (the head is the embedding; an untied Gemma is
refused), gemma2.attn_logit_softcapping / final_logit_softcapping, attention.sliding_window, and for Gemma 3
rope.freq_base (global layers) and rope.freq_base_swa (local ones). llama.cpp derives what is not written: the
query scale 1/sqrt(head_dim) (1/sqrt(dim / heads) at 46 / 62 layers) and the local:global pattern (every 2nd /
6th layer global), so a model whose query_pre_attn_scalar or layer_types differ is refused. Phi-3 keeps its
fused tensors whole (attn_qkv = [q; k; v], ffn_up = [gate; up]), writes rope.dimension_count = the rotated
dims (partial rotary) and sliding_window (0: none). LongRoPE (rope_factors_long / _short) is refused: the
reader cannot read it back. None of these get the Q/K permutation (llama.cpp rotates them NeoX-style).

SentencePiece vocabularies (Gemma, Phi-3, Llama 2: BPE with byte fallback, spaces spelled "▁") are written as
tokenizer.ggml.model = "llama": tokens, types and one score per token, no merges. SentencePiece merges the
adjacent pair whose joined piece scores highest, so the token made by merge r gets score -(r + 1) and every
other normal token a lower one; `sentencepiece_metadata` explains the rest and checks the round trip.

The Q/K permutation. llama.cpp's RoPE for "llama" rotates adjacent pairs (x0, x1), (x2, x3), ...; minift
(like Hugging Face) rotates (x_j, x_{j + hd/2}). Reordering the rows of W_q and W_k turns one into the other:
within each head, row s * hd/2 + j moves to row 2j + s (s in {0, 1}, j < hd/2). `permute_rope` does this;
minift/io/gguf.py's `unpermute_rope` is its exact inverse, and a test checks both directions.

The tokenizer. A byte-level BPE tokenizer ("gpt2" in llama.cpp's terms) is stored as its vocabulary in id
order (tokenizer.ggml.tokens), one type per token (1 normal, 3 control = special tokens such as <|im_end|>,
4 user-defined = added tokens that are not special), the merges as "left right" strings in rank order,
the special ids, and tokenizer.chat_template (the model's jinja template, which llama.cpp applies).
tokenizer.ggml.pre names the regex llama.cpp splits text with before BPE; there is no field for the
regex itself, so `pre_tokenizer_name` tries each name minift knows and keeps the one that tokenizes a
test text exactly as the model's own tokenizer does (llama.cpp's converter does the same with hashes).

The quantizers (F16 is a plain cast; every quantizer works on whole tensors at once):

    Q8_0  per block of 32: d = max|x| / 127, q = round(x / d) (half away from zero, C's roundf)
    Q4_0  per block of 32: m = the value of largest magnitude (its sign kept), d = m / -8,
          q = min(15, trunc(x / d + 8.5)); the extreme value lands on q = 0, i.e. -8 * d = m exactly
    Q5_0  the same with 5 bits: d = m / -16, q = min(31, trunc(x / d + 16.5)). Used where Q4_K cannot go:
          a row length that is not a multiple of 256 (SmolLM2's 576-wide projections); llama-quantize
          falls back to Q5_0 there too
    Q4_K  per sub-block of 32, a weighted least-squares fit of scale and min (llama.cpp's
          make_qkx2_quants): weights w = rms(x) + |x|; try 21 candidate scales (nmax - 1 + 0.1 s)/(max - min),
          for each round to levels 0..15 and solve the 2x2 normal equations for the best (scale, min)
          given those levels; keep the candidate with the smallest weighted squared error (ggml keeps
          one `min` variable, so after a candidate wins the later ones are cut from its min, not the
          data's: we do the same). Then the 8
          scales and 8 mins of a super-block are themselves quantized to 6 bits against d = max scale / 63
          and dmin = max min / 63 (two float16s), and the levels recomputed against those rounded values.

Q8_0, Q4_0 and Q5_0 follow ggml's reference quantizers operation for operation in float32 and are
byte-identical to gguf.quants.quantize (tests/test_gguf_write.py). The gguf package has no Q4_K quantizer;
ours follows ggml's quantize_row_q4_K_ref step by step, accumulating sums in the same sequential order, and
is byte-identical to a scalar, loop-by-loop transcription of that C function in float32 (the test). Compiled
ggml may still differ in rare last bits where the compiler fuses a multiply-add (x86 FMA) that C leaves as
two roundings; benchmarks/llamacpp_check.py counts identical blocks against ggml's own library.

Which tensor gets which type: 1-D tensors (norms) stay F32, as llama.cpp's converter keeps them. With a
4-bit choice the token embedding is written Q8_0: with tied embeddings it is also the output layer, and
llama-quantize likewise keeps the output layer at higher precision. Every other matrix gets the chosen type
(Q4_K falling back to Q5_0 on rows that are not a multiple of 256).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from minift.io.files import replace_atomically
from minift.io.gguf import (BYTE, CONTROL, DEFAULT_ALIGNMENT, FUSED_UP, GEMMA_27B_LAYERS, GGML_TYPES, GGUF_MAGIC,
                            NAME_MAP, PRE_TOKENIZER_SPLITS, SPACE, UNKNOWN, tokenizer_from_gguf)

# ----------------------------------------------------------------------------------------------------
# Quantizers: float32 values -> the bytes of one ggml type
# ----------------------------------------------------------------------------------------------------

TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
BLOCK_SIZE = {name: block for name, block, _ in GGML_TYPES.values()}
QUANTS = ("f16", "q8_0", "q4_0", "q4_k")  # --quant choices
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k": 14}  # general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_*
NORMAL, USER_DEFINED = 1, 4  # tokenizer.ggml.token_type (CONTROL = 3 comes from the reader)


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the float16 (round to nearest even, as ggml's FP32_TO_FP16)."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round sends them to the even neighbour)."""
    magnitude = values.abs()
    whole = magnitude.floor()
    return torch.copysign(whole + (magnitude - whole >= 0.5).float(), values)


def _largest_magnitude(blocks: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n, 1): the value with the largest |value| in each row, sign kept (the first one on ties,
    as ggml's `if (amax < fabsf(v))` loop keeps it)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 2k) integers 0..15 -> (n, k) bytes: element j in the low nibble of byte j, element k + j in its high one."""
    half = q.shape[1] // 2
    return (q[:, :half] | (q[:, half:] << 4)).to(torch.uint8)


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: [d: f16][32 x int8] with d = max|x| / 127, q = roundf(x / d)."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(blocks * _reciprocal_or_zero(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1).reshape(-1)


def _quantize_symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0's shared step: d = m / -(levels/2) for the largest-magnitude m; q in 0..levels-1."""
    blocks = x.reshape(-1, 32)
    d = _largest_magnitude(blocks) / -(levels // 2)
    shifted = blocks * _reciprocal_or_zero(d) + (levels // 2 + 0.5)
    q = shifted.trunc().to(torch.int16).clamp(max=levels - 1)  # C's (int8_t) cast truncates toward zero
    return d, q


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: [d: f16][16 bytes of nibbles], value = d * (q - 8)."""
    d, q = _quantize_symmetric(x, 16)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1).reshape(-1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: [d: f16][qh: 32 fifth bits][16 bytes of low nibbles], value = d * (q - 16)."""
    d, q = _quantize_symmetric(x, 32)
    fifth = (q >> 4).to(torch.int64)  # (n, 32) of 0/1; bit i of a little-endian uint32
    qh = (fifth << torch.arange(32)).sum(dim=1, keepdim=True)  # (n, 1) < 2**32
    qh_bytes = torch.stack([(qh >> (8 * b)) & 255 for b in range(4)], dim=2).reshape(-1, 4).to(torch.uint8)
    return torch.cat([_f16_bytes(d), qh_bytes, _pack_nibbles(q & 15)], dim=1).reshape(-1)


def _ordered_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension in order, terms[0] + terms[1] + ..., in float32 as a C `for` loop adds
    (torch.sum adds in another order, which can differ in the last bit and flip which candidate scale wins).
    With the values of one sub-block down the first dimension, each addition is one contiguous vector add."""
    total = terms[0].clone()
    for row in terms[1:]:
        total += row
    return total


def _fit_scale_min(x: torch.Tensor, weights: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                   rdelta: float = 0.1, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on every column of x (32, n) at once: (scale (n,), -min (n,), levels (32, n)).

    Model: x ~ scale * level + min with levels in 0..nmax and min <= 0. Start from the plain range fit, then
    for each candidate inverse scale round to levels and solve weighted least squares for (scale, min)."""
    low = x.amin(dim=0).clamp(max=0.0)  # min > 0 is replaced by 0
    high = x.amax(dim=0)
    flat = high == low  # all values equal (and >= 0 after the clamp): levels 0, scale 0
    sum_w, sum_x = _ordered_sum(weights), _ordered_sum(weights * x)

    def levels_for(factor, minimum: torch.Tensor) -> torch.Tensor:  # nearest_int rounds half to even, as torch.round
        span = high - minimum
        inverse = factor / torch.where(span == 0, torch.ones_like(span), span)
        return inverse, torch.round(inverse * (x - minimum)).clamp_(0, nmax)

    def weighted_error(scale, minimum, levels):
        diff = scale * levels + minimum - x
        return _ordered_sum(weights * (diff * diff))

    inverse, levels = levels_for(torch.tensor(float(nmax)), low)
    scale = 1 / inverse
    best_error = weighted_error(scale, low, levels)
    minimum = low.clone()
    for step in range(nstep + 1):
        # ggml reuses its `min` variable: once a candidate wins, later candidates start from its min
        factor = torch.tensor(rmin, dtype=torch.float32) + torch.tensor(rdelta, dtype=torch.float32) * step + nmax
        _, trial = levels_for(factor, minimum)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _ordered_sum(wl), _ordered_sum(wl * trial), _ordered_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a positive min is not allowed: fit the scale alone with min = 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = weighted_error(this_scale, this_min, trial)
        better = ok & (error < best_error)
        levels = torch.where(better, trial, levels)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    zero = torch.zeros_like(scale)
    return (torch.where(flat, zero, scale), -torch.where(flat, low, minimum),
            torch.where(flat, torch.zeros_like(levels), levels))


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks of 256: [d][dmin][12 bytes of 6-bit scales and mins][128 bytes of nibbles]."""
    sub = x.reshape(-1, 32)  # 8 consecutive rows are one super-block
    n = sub.shape[0] // 8
    columns = sub.t().contiguous()  # (32, 8n): a sub-block per column, so sums run down contiguous rows
    rms = torch.sqrt(_ordered_sum(columns * columns) / 32)
    scales, mins, levels = _fit_scale_min(columns, rms + columns.abs())
    levels = levels.t()  # (8n, 32)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    # (n, 1); ggml starts its max at +0 and keeps it when every value is <= 0 (+ 0.0 turns a -0.0 into +0.0)
    max_scale = scales.amax(dim=1, keepdim=True).clamp(min=0.0) + 0.0
    max_min = mins.amax(dim=1, keepdim=True).clamp(min=0.0) + 0.0

    def six_bits(values, top):  # nearest_int(63 / top * v), cast to uint8 (wraps), then min(63, .)
        inverse = torch.where(top > 0, 63.0 / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
        return torch.remainder(torch.round(inverse * values), 256).clamp(max=63).to(torch.int64)

    sc, mn = six_bits(scales, max_scale), six_bits(mins, max_min)  # (n, 8) each
    packed = torch.empty(n, 12, dtype=torch.int64)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)  # scales 0-3, top bits of scales 4-7
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)  # mins 0-3, top bits of mins 4-7
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)  # low nibbles of scales / mins 4-7
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    d = d16.float() * sc.float()  # (n, 8): the scales the reader will use
    dm = dmin16.float() * mn.float()
    values = sub.reshape(n, 8, 32)
    requantized = torch.round((values + dm[..., None]) / torch.where(d == 0, torch.ones_like(d), d)[..., None])
    levels = torch.where((d == 0)[..., None], levels.reshape(n, 8, 32), requantized.clamp(0, 15))
    levels = levels.to(torch.int64).reshape(n, 4, 64)  # pairs of sub-blocks share 32 bytes
    qs = (levels[:, :, :32] | (levels[:, :, 32:] << 4)).reshape(n, 128)
    return torch.cat([d16.view(torch.uint8).reshape(n, 2), dmin16.view(torch.uint8).reshape(n, 2),
                      packed.to(torch.uint8), qs.to(torch.uint8)], dim=1).reshape(-1)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": lambda x: x.contiguous().view(torch.uint8).reshape(-1),
    "F16": lambda x: x.to(torch.float16).view(torch.uint8).reshape(-1),
    "Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0, "Q4_K": quantize_q4_k,
}


def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """The bytes (uint8, 1-D) of `values` stored as `type_name`; the last dimension must be whole blocks."""
    if type_name not in QUANTIZERS:
        raise ValueError(f"cannot write ggml type {type_name}; minift writes {', '.join(QUANTIZERS)}")
    x = values.detach().to(torch.float32).contiguous().reshape(-1)
    if values.dim() and values.shape[-1] % BLOCK_SIZE[type_name]:
        raise ValueError(f"{type_name} needs rows that are multiples of {BLOCK_SIZE[type_name]} values, "
                         f"got shape {tuple(values.shape)}")
    return QUANTIZERS[type_name](x)


# ----------------------------------------------------------------------------------------------------
# The file itself
# ----------------------------------------------------------------------------------------------------

# metadata value types (minift/io/gguf.py reads the same ids)
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


@dataclass
class Value:
    """One metadata value with its GGUF type; `item_type` is the element type of an ARRAY."""

    type: int
    value: Any
    item_type: int | None = None


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _scalar(value_type: int, value) -> bytes:
    if value_type == STRING:
        return _string(value)
    return struct.pack({UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?"}[value_type], value)


def _value(value: Value) -> bytes:
    if value.type != ARRAY:
        return struct.pack("<I", value.type) + _scalar(value.type, value.value)
    items = b"".join(_scalar(value.item_type, item) for item in value.value)
    return struct.pack("<IIQ", ARRAY, value.item_type, len(value.value)) + items


@dataclass
class TensorOut:
    """A tensor to write: llama.cpp's name, PyTorch shape, ggml type name, and its bytes (computed on demand,
    so only one quantized tensor is in memory at a time)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: Callable[[], torch.Tensor]

    @property
    def n_bytes(self) -> int:
        _, block, block_bytes = GGML_TYPES[TYPE_IDS[self.type_name]]
        numel = 1
        for size in self.shape:
            numel *= size
        return numel // block * block_bytes


def write_gguf(path: str | Path, metadata: dict[str, Value], tensors: list[TensorOut]) -> Path:
    """Write a GGUF v3 file atomically: header, metadata, tensor table, then the aligned tensor data."""
    alignment = DEFAULT_ALIGNMENT
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        header += _string(key) + _value(value)
    offset = 0
    for tensor in tensors:  # dims in ggml order (fastest first): the PyTorch shape reversed
        header += _string(tensor.name) + struct.pack("<I", len(tensor.shape))
        header += struct.pack(f"<{len(tensor.shape)}Q", *reversed(tensor.shape))
        header += struct.pack("<IQ", TYPE_IDS[tensor.type_name], offset)
        offset += -(-tensor.n_bytes // alignment) * alignment
    header += bytes(-len(header) % alignment)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(header)
            for tensor in tensors:
                data = tensor.data()
                if data.numel() != tensor.n_bytes:
                    raise ValueError(f"tensor {tensor.name}: {data.numel()} bytes, expected {tensor.n_bytes}")
                out.write(data.numpy().tobytes())
                out.write(bytes(-tensor.n_bytes % alignment))

    return replace_atomically(path, write)


# ----------------------------------------------------------------------------------------------------
# A minift Llama-family model -> metadata + tensors
# ----------------------------------------------------------------------------------------------------

# ModelConfig fields that must keep these values for llama.cpp's architecture to compute the same thing
LLAMA_SHAPE = {"causal": True, "norm": "rms", "post_norm": False, "positions": "rope", "mlp": "swiglu",
               "activation": "silu", "qk_norm": False, "norm_plus_one": False, "embed_scale": False,
               "branch_post_norms": False, "query_pre_attn_scalar": None, "attn_softcap": None,
               "final_softcap": None, "sliding_window": None, "rope_local_theta": None, "qkv_bias": False,
               "out_bias": False, "fused_qkv": False, "fused_gate_up": False, "partial_rotary_factor": 1.0}
ANY = object()  # in ARCHITECTURES: the architecture writes this field to the file, any value goes
GEMMA = {"norm_plus_one": True, "embed_scale": True, "activation": "gelu_tanh", "tie_embeddings": True}
# minift model_type -> (general.architecture, the fields where that architecture differs from LLAMA_SHAPE).
# Only "llama" gets the Q/K row permutation; llama.cpp runs the others with the NeoX (rotate_half) RoPE.
ARCHITECTURES = {"llama": ("llama", {}), "mistral": ("llama", {}), "qwen2": ("qwen2", {"qkv_bias": True}),
                 "qwen3": ("qwen3", {"qk_norm": True}),
                 "gemma": ("gemma", GEMMA),
                 "gemma2": ("gemma2", {**GEMMA, "branch_post_norms": True, "query_pre_attn_scalar": ANY,
                                       "attn_softcap": ANY, "final_softcap": ANY, "sliding_window": ANY}),
                 "gemma3_text": ("gemma3", {**GEMMA, "branch_post_norms": True, "qk_norm": True,
                                            "query_pre_attn_scalar": ANY, "final_softcap": ANY,
                                            "sliding_window": ANY, "rope_local_theta": ANY}),
                 "phi3": ("phi3", {"fused_qkv": True, "fused_gate_up": True, "sliding_window": ANY,
                                   "partial_rotary_factor": ANY})}
SLIDING_EVERY = {"gemma2": 2, "gemma3": 6}  # llama.cpp makes every n-th layer global (the reader's SLIDING_PATTERN)


def check_exportable(config) -> None:
    """Refuse, in one line, a model llama.cpp's architecture for it would compute differently."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"--format gguf: model_type {config.model_type!r} is not supported; minift writes GGUF for "
                         f"{sorted(ARCHITECTURES)} (the Llama family, SmolLM2 included, Qwen2 / Qwen3, Gemma 1/2/3 "
                         "and Phi-3)")
    arch, differences = ARCHITECTURES[config.model_type]
    for field, wanted in {**LLAMA_SHAPE, **differences}.items():
        if wanted is not ANY and getattr(config, field, wanted) != wanted:
            raise ValueError(f"--format gguf: this {config.model_type} model has {field}={getattr(config, field)!r}, "
                             f"which llama.cpp's {arch} architecture does not have (expected {wanted!r})")
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear",):
        raise ValueError(f"--format gguf: rope_scaling {scaling!r} is not supported (GGUF export writes none or "
                         "linear; Phi-3's LongRoPE and Llama 3's scaling are not written)")
    head_dim = config.head_dim or config.dim // config.n_heads
    if arch in SLIDING_EVERY:  # what llama.cpp derives instead of reading it from the file
        scalar = float(config.dim // config.n_heads if config.n_layers == GEMMA_27B_LAYERS[arch] else head_dim)
        if config.query_pre_attn_scalar is not None and float(config.query_pre_attn_scalar) != scalar:
            raise ValueError(f"--format gguf: query_pre_attn_scalar={config.query_pre_attn_scalar} but llama.cpp's "
                             f"{arch} scales queries by 1/sqrt({scalar:g}) for this shape")
        if config.sliding_window is not None:
            every = SLIDING_EVERY[arch]
            pattern = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                       for i in range(config.n_layers)]
            layer_types = list(config.layer_types or ["sliding_attention"] * config.n_layers)  # None: all slide
            if layer_types != pattern:
                raise ValueError(f"--format gguf: layer_types {layer_types} differ from llama.cpp's {arch} "
                                 f"pattern (every {every}th layer global)")
    elif config.sliding_window is not None and config.layer_types is not None and \
            any(t != "sliding_attention" for t in config.layer_types):
        raise ValueError(f"--format gguf: layer_types {config.layer_types} mix sliding and global layers, which "
                         f"llama.cpp's {arch} does not")


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """minift's W_q / W_k rows (halves, rotate_half) -> llama.cpp's (adjacent pairs): in each head, row
    s * hd/2 + j goes to row 2j + s. The inverse of minift.io.gguf.unpermute_rope."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    per_head = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])  # (H, halves, hd/2, in)
    return per_head.transpose(1, 2).reshape(weight.shape)  # (H, hd/2, 2, in) -> pairs adjacent


def gguf_names() -> list[tuple[str, str]]:
    """(minift name pattern, GGUF name template): the reader's NAME_MAP the other way round."""
    pairs = []
    for pattern, target in NAME_MAP + [FUSED_UP]:
        gguf_template = (pattern.replace(r"\.", ".").replace(r"(?P<i>\d+)", "{i}")
                         .replace("(?P<p>weight|bias)", "{p}"))
        minift_pattern = target.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)").replace("{p}", "(?P<p>weight|bias)")
        pairs.append((minift_pattern, gguf_template))
    return pairs


def gguf_name(minift_name: str) -> str:
    for pattern, template in gguf_names():
        match = re.fullmatch(pattern, minift_name)
        if match:
            return template.format(**match.groupdict())
    raise ValueError(f"--format gguf: parameter {minift_name!r} has no llama.cpp name")


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The ggml type a tensor is written in for --quant `quant` (see the lesson's last paragraph)."""
    if len(shape) == 1:
        return "F32"
    if quant == "f16":
        return "F16"
    if quant == "q8_0" or name == "token_embd.weight":
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    if quant == "q4_0":
        return "Q4_0" if shape[-1] % 32 == 0 else "F16"
    if shape[-1] % 256 == 0:
        return "Q4_K"
    return "Q5_0" if shape[-1] % 32 == 0 else "F16"


def model_tensors(model, quant: str) -> list[TensorOut]:
    """The model's weights as TensorOut, renamed, Q/K permuted, each with its type; in layer order."""
    from minift.io.weights import base_model_state

    config = model.config
    state = base_model_state(model, where="--format gguf")
    out = []
    for name, weight in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        target = gguf_name(name)
        if ARCHITECTURES[config.model_type][0] != "llama":
            if config.norm_plus_one and target.endswith("norm.weight"):
                weight = weight + 1.0  # Gemma: llama.cpp's plain RMSNorm multiplies by the stored 1 + w
            # the rest, and qwen2 / qwen3 / gemma / phi3 attention rows, stay in rotate_half order
        elif ".attn_q." in target:
            weight = permute_rope(weight, config.n_heads)
        elif ".attn_k." in target:
            weight = permute_rope(weight, config.n_kv_heads or config.n_heads)
        shape = tuple(weight.shape)
        type_name = tensor_type(target, shape, quant)
        out.append(TensorOut(target, shape, type_name, lambda w=weight, t=type_name: quantize(w, t)))
    order = {"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}
    return sorted(out, key=lambda t: (order.get(t.name, 1), _layer_index(t.name)))


def _layer_index(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.inner.to_str())


def tokenizer_metadata(tokenizer, where: str = "--format gguf") -> dict[str, Value]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer: vocabulary, token types, merges, special ids, template."""
    spec = tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: the tokenizer is {model.get('type')!r}; GGUF export writes BPE tokenizers: "
                         "byte-level (llama.cpp's 'gpt2') or with byte fallback and '▁' spaces (SentencePiece, 'llama')")
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)  # token -> id
    size = max(vocab.values()) + 1
    tokens = [None] * size
    for token, index in vocab.items():
        tokens[index] = token
    missing = [i for i, token in enumerate(tokens) if token is None]
    if missing:
        raise ValueError(f"{where}: token ids {missing[:5]} have no token; GGUF needs a gap-free vocabulary")
    types = [NORMAL] * size
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # BPE over "▁"-spelled text with <0xNN> byte tokens: SentencePiece's kind
        return sentencepiece_metadata(tokenizer, spec, tokens, types, merges, where)
    metadata = {
        "tokenizer.ggml.model": Value(STRING, "gpt2"),
        "tokenizer.ggml.pre": Value(STRING, "default"),  # replaced below by the name that tokenizes alike
        "tokenizer.ggml.tokens": Value(ARRAY, tokens, STRING),
        "tokenizer.ggml.token_type": Value(ARRAY, types, INT32),
        "tokenizer.ggml.merges": Value(ARRAY, merges, STRING),
    }
    for key, index in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if index is not None:
            metadata[f"tokenizer.ggml.{key}"] = Value(UINT32, int(index))
    metadata["tokenizer.ggml.add_bos_token"] = Value(BOOL, False)  # minift's encode adds no BOS either
    metadata["tokenizer.ggml.add_space_prefix"] = Value(BOOL, False)
    if tokenizer.chat_template:
        metadata["tokenizer.chat_template"] = Value(STRING, tokenizer.chat_template)
    metadata["tokenizer.ggml.pre"] = Value(STRING, pre_tokenizer_name(tokenizer, metadata, where))
    return metadata


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts one "▁" before the text: a Prepend("▁") normalizer, or a Metaspace
    pre-tokenizer whose prepend_scheme is not "never" (the two ways Hugging Face spells SentencePiece's dummy
    prefix)."""
    def walk(node, kinds):
        if not isinstance(node, dict):
            return []
        found = [node] if node.get("type") in kinds else []
        for child in node.get("normalizers", []) + node.get("pretokenizers", []):
            found += walk(child, kinds)
        return found
    prepends = [n for n in walk(spec.get("normalizer"), ("Prepend",)) if n.get("prepend") == SPACE]
    metaspace = [n for n in walk(spec.get("pre_tokenizer"), ("Metaspace",)) if n.get("prepend_scheme") != "never"]
    return bool(prepends or metaspace)


def _adds_bos(spec: dict, bos: str | None) -> bool:
    """Whether encode(..., add_special_tokens=True) starts with bos (a TemplateProcessing that begins with it)."""
    processor = spec.get("post_processor") or {}
    single = (processor.get("single") or []) if processor.get("type") == "TemplateProcessing" else []
    return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos


SENTENCEPIECE_PROBES = (
    "the quick brown fox jumps over the lazy dog", "Hello  world,   with   runs of spaces ", "trailing  ",
    "unicode the vocabulary lacks: café, naïve, 東京, emoji 🙂!", "digits 0123456789 and symbols #$%^&*()[]{}",
    "tabs\tand\nnewlines\n\nhere", "x", "then there, the theory: they'll see 'quoted' x+y=z")


def sentencepiece_metadata(tokenizer, spec: dict, tokens: list[str], types: list[int], merges: list[str],
                           where: str) -> dict[str, Value]:
    """tokenizer.ggml.* for a BPE tokenizer with byte fallback and "▁" for spaces (Gemma, Phi-3, Llama 2), written
    as llama.cpp's "llama" (SentencePiece) kind: tokens, scores and types, no merge list.

    SentencePiece merges, again and again, the adjacent pair whose joined piece scores highest. Giving the token
    that merge r creates the score -(r + 1) makes that rule pick the merges in BPE's rank order; every other
    token gets a score below all of them. Types: <0xNN> byte tokens 6, the unknown token 2, special added tokens
    3 (control), other added tokens 4 (user-defined), the rest 1 (normal). The vocabulary is then rebuilt the way
    minift's reader builds it and must tokenize SENTENCEPIECE_PROBES exactly as the original does. (None starts
    with a space: there a Hugging Face Metaspace pre-tokenizer adds no "▁" of its own, while SentencePiece, llama.cpp
    and minift's reader of the file always put one in front when add_space_prefix is set.)"""
    import re as regex

    types = list(types)
    unk = spec["model"].get("unk_token")
    for index, token in enumerate(tokens):
        if types[index] == NORMAL and regex.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index] = BYTE
        if token == unk:
            types[index] = UNKNOWN
    low = -float(len(merges) + 1)
    scores = [low if kind == NORMAL else 0.0 for kind in types]
    ids = {token: index for index, token in enumerate(tokens)}
    created = set()
    for rank, merge in enumerate(merges):
        joined = merge.replace(" ", "", 1)
        index = ids.get(joined)
        if index is not None and index not in created:
            created.add(index)
            scores[index] = -float(rank + 1)
    metadata = {
        "tokenizer.ggml.model": Value(STRING, "llama"),
        "tokenizer.ggml.tokens": Value(ARRAY, tokens, STRING),
        "tokenizer.ggml.scores": Value(ARRAY, scores, FLOAT32),
        "tokenizer.ggml.token_type": Value(ARRAY, types, INT32),
    }
    for key, index in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if index is not None:
            metadata[f"tokenizer.ggml.{key}"] = Value(UINT32, int(index))
    bos = tokens[tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else None
    metadata["tokenizer.ggml.add_bos_token"] = Value(BOOL, _adds_bos(spec, bos))
    metadata["tokenizer.ggml.add_space_prefix"] = Value(BOOL, _space_prefix(spec))
    if tokenizer.chat_template:
        metadata["tokenizer.chat_template"] = Value(STRING, tokenizer.chat_template)
    rebuilt = tokenizer_from_gguf({key: value.value for key, value in metadata.items()}, where)
    for text in SENTENCEPIECE_PROBES:
        if any(rebuilt.encode(text, special) != tokenizer.encode(text, special) for special in (False, True)):
            raise ValueError(f"{where}: the tokenizer written as a SentencePiece ('llama') vocabulary tokenizes "
                             f"{text!r} differently from the model's own; GGUF export cannot store it")
    return metadata


PRE_TOKENIZER_PROBE = ("Hello world! It's 2024: 3.14159 and 1234567 apples... \n\n  indented\tline\r\n"
                       "ünïcödé 日本語 I'M HERE, we'll see 'quoted' x+y=z  ")


def pre_tokenizer_name(tokenizer, metadata: dict[str, Value], where: str) -> str:
    """The tokenizer.ggml.pre name whose regexes cut PRE_TOKENIZER_PROBE into the same pieces as `tokenizer`'s
    pre-tokenizer (compared piece by piece, so a small vocabulary cannot hide a difference); then the whole
    tokenizer rebuilt from the metadata must give the same ids as the original."""
    own = tokenizer.inner.pre_tokenizer
    if own is None:
        raise ValueError(f"{where}: the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    expected = [piece for piece, _ in own.pre_tokenize_str(PRE_TOKENIZER_PROBE)]
    for name in ("gpt2", "smollm", "llama-bpe", "qwen2"):
        probe = tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name,
                                     "tokenizer.ggml.tokens": ["a"]}, where)  # only its pre-tokenizer is used
        if [piece for piece, _ in probe.inner.pre_tokenizer.pre_tokenize_str(PRE_TOKENIZER_PROBE)] == expected:
            plain = {key: value.value for key, value in metadata.items()}
            plain["tokenizer.ggml.pre"] = name
            if tokenizer_from_gguf(plain, where).encode(PRE_TOKENIZER_PROBE) != tokenizer.encode(PRE_TOKENIZER_PROBE):
                raise ValueError(f"{where}: the tokenizer rebuilt from the GGUF metadata (pre-tokenizer {name!r}) "
                                 "tokenizes differently from the model's own")
            return name
    raise ValueError(f"{where}: the tokenizer splits text in a way none of llama.cpp's pre-tokenizers minift knows "
                     f"({', '.join(sorted(PRE_TOKENIZER_SPLITS))}) reproduces")


def model_metadata(config, tokenizer, quant: str, name: str = "minift export") -> dict[str, Value]:
    """general.*, llama.* and tokenizer.ggml.* keys for a Llama-family config."""
    check_exportable(config)
    arch = ARCHITECTURES[config.model_type][0]
    head_dim = config.head_dim or config.dim // config.n_heads
    metadata = {
        "general.architecture": Value(STRING, arch),
        "general.name": Value(STRING, name),
        "general.file_type": Value(UINT32, FILE_TYPES[quant]),
        "general.quantization_version": Value(UINT32, 2),
        "general.alignment": Value(UINT32, DEFAULT_ALIGNMENT),
        f"{arch}.vocab_size": Value(UINT32, config.vocab_size),
        f"{arch}.context_length": Value(UINT32, config.max_seq_len),
        f"{arch}.embedding_length": Value(UINT32, config.dim),
        f"{arch}.block_count": Value(UINT32, config.n_layers),
        f"{arch}.feed_forward_length": Value(UINT32, config.hidden_dim),
        f"{arch}.attention.head_count": Value(UINT32, config.n_heads),
        f"{arch}.attention.head_count_kv": Value(UINT32, config.n_kv_heads or config.n_heads),
        f"{arch}.attention.key_length": Value(UINT32, head_dim),
        f"{arch}.attention.value_length": Value(UINT32, head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": Value(FLOAT32, float(config.norm_eps)),
        f"{arch}.rope.freq_base": Value(FLOAT32, float(config.rope_theta)),
        f"{arch}.rope.dimension_count": Value(UINT32, head_dim),
    }
    if arch == "phi3":  # partial rotary: only the first dims of each head turn
        metadata[f"{arch}.rope.dimension_count"] = Value(UINT32, int(head_dim * config.partial_rotary_factor))
        metadata[f"{arch}.rope.scaling.original_context_length"] = Value(UINT32, config.max_seq_len)
        metadata[f"{arch}.attention.sliding_window"] = Value(UINT32, config.sliding_window or 0)  # 0: none
    if arch in SLIDING_EVERY:
        for key, value in (("attn_logit_softcapping", config.attn_softcap),
                           ("final_logit_softcapping", config.final_softcap)):
            if value is not None:
                metadata[f"{arch}.{key}"] = Value(FLOAT32, float(value))
        if config.sliding_window is not None:
            metadata[f"{arch}.attention.sliding_window"] = Value(UINT32, config.sliding_window)
        if arch == "gemma3":  # rope.freq_base is the global layers' base, _swa the sliding layers'
            metadata[f"{arch}.rope.freq_base_swa"] = Value(FLOAT32, float(config.rope_local_theta or 10000.0))
    if config.rope_scaling:
        metadata[f"{arch}.rope.scaling.type"] = Value(STRING, "linear")
        metadata[f"{arch}.rope.scaling.factor"] = Value(FLOAT32, float(config.rope_scaling["factor"]))
    if tokenizer is None:
        raise ValueError("--format gguf: the model has no tokenizer; llama.cpp needs one in the file")
    tok = tokenizer_metadata(tokenizer)
    tokens = tok["tokenizer.ggml.tokens"].value
    if len(tokens) > config.vocab_size:
        raise ValueError(f"--format gguf: the tokenizer has {len(tokens)} tokens but the model only "
                         f"{config.vocab_size} embeddings")
    for index in range(len(tokens), config.vocab_size):  # llama.cpp needs one token per embedding row
        tokens.append(f"[PAD{index}]")
        tok["tokenizer.ggml.token_type"].value.append(USER_DEFINED)
    metadata.update(tok)
    return metadata


def export_gguf(model, tokenizer, path: str | Path, quant: str = "f16", name: str = "minift export") -> Path:
    """Write `model` (a dense Llama / Qwen / Gemma / Phi-3 Transformer: fold adapters first) and its tokenizer to `path`."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    metadata = model_metadata(model.config, tokenizer, quant, name)
    with torch.no_grad():
        return write_gguf(path, metadata, model_tensors(model, quant))
