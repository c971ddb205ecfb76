"""GGUF: read llama.cpp's single-file checkpoints (metadata, quantized tensors, tokenizer) with numpy + torch.

Lesson
------
A GGUF file is a header, a list of key/value pairs, a table of tensors, then the raw tensor bytes.
Everything is little-endian; strings are a uint64 length followed by UTF-8 bytes:

    +--------------------------------------------------------------------------+
    | "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64                   |
    | n_kv x   key: string | value type u32 | value (scalar, string or array)    |
    | n_tensors x  name: string | n_dims u32 | dims u64 x n_dims | type u32 |   |
    |                offset u64 (relative to the start of the data section)    |
    | padding up to `general.alignment` (default 32)                           |
    | data section: each tensor's bytes at its offset                          |
    +--------------------------------------------------------------------------+

`dims` are ggml's order, fastest-varying first: a Linear weight (out, in) in PyTorch is stored with
dims [in, out]. We reverse them, so `TensorInfo.shape` is the PyTorch shape.

Quantized types cut the innermost dimension into blocks, each with its own scale. The simple ones
use blocks of 32 values (d, m are float16; q are the stored integers):

    Q8_0  [d][q: 32 x int8]                          value = d * q
    Q4_0  [d][16 bytes: 32 x 4-bit]                  value = d * (q - 8)
    Q4_1  [d][m][16 bytes: 32 x 4-bit]               value = d * q + m
    Q5_0  [d][qh: 4 bytes][16 bytes: 32 x 4-bit]     value = d * (q - 16),  q = nibble | (bit << 4)
    Q5_1  [d][m][qh: 4 bytes][16 bytes]              value = d * q + m,     q = nibble | (bit << 4)

    4-bit packing: byte j holds element j in its low nibble, element j + 16 in its high one. Q5's fifth
    bits are one little-endian uint32: bit i belongs to element i.

The K-quants ("k" for the k-means-like search llama.cpp's quantizer runs) use super-blocks of 256 values
cut into sub-blocks of 16 or 32. Each sub-block has a small integer scale (and min); one float16 `d`
(and `dmin`) per super-block scales those integers. Two levels of scales cost fewer bits than a float16
per sub-block: Q4_K spends 4.5 bits per weight where Q4_1 spends 5.

    Q4_K  144 bytes  [d][dmin][scales: 12 bytes][qs: 128 bytes]            8 sub-blocks of 32
          value = (d * sc_s) * q - (dmin * m_s),  q in 0..15, sc_s and m_s 6-bit integers
    Q5_K  176 bytes  [d][dmin][scales: 12][qh: 32][qs: 128]                as Q4_K, q = nibble | (hbit << 4)
    Q6_K  210 bytes  [ql: 128][qh: 64][scales: 16 x int8][d]               16 sub-blocks of 16
          value = (d * sc_s) * (q - 32),  q = ql nibble | (qh 2 bits << 4), in 0..63
    Q3_K  110 bytes  [hmask: 32][qs: 64][scales: 12][d]                    16 sub-blocks of 16
          value = (d * (sc_s - 32)) * (q - 4 * (1 - hbit)),  q 2 bits, sc_s 6 bits stored + 32
    Q2_K   84 bytes  [scales: 16][qs: 64][d][dmin]                         16 sub-blocks of 16
          value = (d * (byte_s & 15)) * q - (dmin * (byte_s >> 4)),  q 2 bits: a 4-bit scale and min per byte

    The 12 scale bytes of Q4_K / Q5_K hold 8 six-bit scales and 8 six-bit mins. Bytes 0-3: scales 0-3 in
    their low 6 bits; bytes 4-7: mins 0-3 likewise; bytes 8-11: scale 4+j in the low nibble and min 4+j in
    the high nibble of byte 8+j, whose missing top 2 bits sit in the spare top bits of byte j (scale) and
    byte 4+j (min). Q3_K packs 16 six-bit scales in 12 bytes: the low 4 bits as nibbles of bytes 0-7
    (scale j and j+8 in byte j), the top 2 bits as four 2-bit fields of bytes 8-11 (scale 4f+j in field f
    of byte 8+j).

    Bit planes inside a super-block follow one pattern: a run of `width` bytes is read `8 / bits` times,
    lowest bits first, each pass giving the next `width` values. Q4_K's 128 qs bytes are 4 runs of 32
    (low nibbles = values 0-31, high = 32-63, next run 64-127...); Q2_K / Q3_K's 64 qs bytes are 2 runs
    of 32 read 4 times (2 bits each); Q6_K's ql is 2 runs of 64 read twice, its qh 2 runs of 32 read 4
    times; the 32 bytes of Q3_K's hmask and Q5_K's qh are one run read 8 times (bit b of byte j is value
    32b + j). `_unpack` below is that one pattern; every type is a few calls to it.

    The order of float32 operations matters for bit-exactness: (d * sc) first, then times q, then minus
    (dmin * m), as ggml and the `gguf` package do; tests/test_gguf.py checks every type byte for byte.

The file is memory-mapped (numpy memmap): reading the header touches only the first megabytes, and
`tensor(name)` copies and dequantizes one tensor at a time into float32.

Llama checkpoints need one more step. llama.cpp's converter permutes the rows of W_q and W_k so its
RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ... Hugging Face (and minift, `rotate_half`) rotates
pairs (x_i, x_{i + hd/2}). Within each head the converter maps row s * hd/2 + j to row 2j + s; `unpermute_rope`
maps it back. Qwen2 and Qwen3 files are written without the permutation (llama.cpp uses the "NeoX" rotation,
which is rotate_half, for them). Qwen3 adds one tensor pair per layer, blk.{i}.attn_q_norm / attn_k_norm (the
per-head RMSNorm weights, width head_dim, stored as they are: no +1 and no permutation), and its head_dim
comes from `qwen3.attention.key_length`, not from embedding_length / head_count.

Gemma 1/2/3 and Phi-3 differ from Llama's table in these ways (llama.cpp's convert_hf_to_gguf.py):

    Gemma 1/2/3  every RMSNorm weight (names ending in norm.weight, Gemma 3's attn_q_norm / attn_k_norm too)
                 is stored as 1 + w, so llama.cpp's plain RMSNorm computes Gemma's (1 + w) scaling: we
                 subtract 1 to get minift's norm_plus_one weights. No lm_head (tied to token_embd); no Q/K
                 permutation; head_dim from attention.key_length; GeGLU with the tanh GELU and embeddings
                 times sqrt(dim) are implied by the architecture name, not written. Gemma 1 and 2 write no
                 rope.freq_base (llama.cpp's default 10000 applies).
    Gemma 2, 3   HF post_attention_layernorm -> blk.N.post_attention_norm (after the attention branch; in
                 Gemma 1 and Llama that HF name is ffn_norm), pre_feedforward_layernorm -> ffn_norm,
                 post_feedforward_layernorm -> post_ffw_norm. Soft-caps in <arch>.attn_logit_softcapping
                 (Gemma 2 only) and <arch>.final_logit_softcapping; the window in attention.sliding_window.
                 Neither query_pre_attn_scalar nor the local/global pattern is written: llama.cpp scales
                 queries by 1/sqrt(head_dim) (1/sqrt(dim / heads) for the 27B models, recognised by their
                 46 / 62 layers) and makes every 2nd (Gemma 2) or 6th (Gemma 3) layer global, the rest sliding.
    Gemma 3      rope.freq_base is the global layers' base; the local layers' base is rope.freq_base_swa
                 when written, else 10000.
    Phi-3        blk.N.attn_qkv holds qkv_proj as is (rows [q; k; v]) and blk.N.ffn_up holds gate_up_proj
                 (rows [gate; up], twice feed_forward_length), no Q/K permutation (NeoX rotation);
                 attention.sliding_window 0 means none. LongRoPE checkpoints carry rope_factors_long /
                 rope_factors_short tensors: refused (load the Hugging Face directory).

tests/test_gguf_families.py converts tiny transformers models of each family this way and compares logits.

Two kinds of vocabulary. tokenizer.ggml.model "gpt2" is byte-level BPE: tokens plus an explicit merge list,
text split by the regexes tokenizer.ggml.pre names. "llama" is SentencePiece BPE (Llama 1/2, Gemma, Phi-3):
tokens, one float score each and a token type (1 normal, 2 unknown, 3 control such as <s>, 4 user-defined,
5 unused, 6 byte <0xNN>), and no merge list: SentencePiece merges the adjacent pair whose joined piece has the
highest score. We derive ranked merges from that (each normal token's every split into two tokens, ranked by
its score), replace spaces by "▁" (with one "▁" in front when tokenizer.ggml.add_space_prefix, default true;
Gemma sets it false), and spell characters the vocabulary lacks as their UTF-8 byte tokens (byte fallback).
add_bos_token says whether encode(..., add_special_tokens=True) starts with bos. tests/test_gguf_sentencepiece.py
checks the result id for id against the sentencepiece library.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from minift.config import ModelConfig
from minift.io.files import json_field
from minift.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml tensor types: id -> (name, values per block, bytes per block). Sizes are listed for more types than we
# dequantize, so a file with K-quants still opens, its metadata reads, and the error names the tensor's type.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# metadata value types: id -> struct format of a scalar (8 = string and 9 = array are handled apart)
VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY, FLOAT32 = 8, 9, 6


@dataclass
class TensorInfo:
    """Where one tensor lives in the file. `shape` is in PyTorch order (outermost dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str  # "Q4_1", ... or "type 17" for a type minift does not know
    offset: int  # absolute byte offset in the file
    n_bytes: int | None  # None when the type's block size is unknown

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Reads little-endian values from a byte buffer; running off the end names what was being read."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buffer):
            raise ValueError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {start}, "
                             f"but the file has {len(self.buffer)} bytes")
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        start = self.take(length, what)
        try:
            return bytes(self.buffer[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 (offset {start})") from None

    def string_array(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: the vocabulary and merges, ~100k of them, so a tight loop."""
        buffer, pos, end, out = self.buffer, self.pos, len(self.buffer), []
        for index in range(count):
            length = struct.unpack_from("<Q", buffer, pos)[0] if pos + 8 <= end else None
            if length is None or pos + 8 + length > end:
                raise ValueError(f"{self.path}: truncated file: {what} (string {index} of {count}) runs past "
                                 f"the end of the file ({end} bytes)")
            try:
                out.append(str(buffer[pos + 8:pos + 8 + length], "utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{self.path}: {what} (string {index}) is not valid UTF-8") from None
            pos += 8 + length
        self.pos = pos
        return out

    def value(self, value_type: int, what: str) -> Any:
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY:
            item_type, count = self.scalar("<I", what), self.scalar("<Q", what)
            if item_type == STRING:
                return self.string_array(count, what)
            if item_type == ARRAY:
                return [self.value(item_type, what) for _ in range(count)]
            if item_type not in VALUE_FORMATS:
                raise ValueError(f"{self.path}: {what} is an array of unknown value type {item_type}")
            dtype = np.dtype(VALUE_FORMATS[item_type].replace("?", "u1"))
            start = self.take(count * dtype.itemsize, what)
            items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start)
            return items.astype(bool).tolist() if item_type == 7 else items.tolist()
        if value_type not in VALUE_FORMATS:
            raise ValueError(f"{self.path}: {what} has unknown value type {value_type}")
        value = self.scalar(VALUE_FORMATS[value_type], what)
        if value_type == FLOAT32:  # the shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06
            value = float(str(np.float32(value)))
        return value


class GGUFFile:
    """An opened GGUF file: `.metadata` (key -> value, arrays as lists), `.tensors` (name -> TensorInfo),
    `.tensor(name)` (a float32 torch.Tensor, dequantized). Use `read_gguf(path)` to open one."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], tensors: dict[str, TensorInfo],
                 data: np.memmap) -> None:
        self.path, self.version, self.metadata, self.tensors = path, version, metadata, tensors
        self._data = data

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (tensors already returned are copies and stay valid)."""
        self._data = None

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as float32 in its PyTorch shape, dequantized from the file's storage type."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if self._data is None:
            raise ValueError(f"{self.path}: file is closed")
        info = self.tensors[name]
        if info.type_name not in SUPPORTED_TYPES:
            raise ValueError(
                f"{self.path}: tensor {name!r} is stored as {info.type_name} (ggml type {info.ggml_type}), which "
                f"minift cannot dequantize; supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of "
                "them (llama-quantize), or load a Hugging Face directory instead")
        raw = np.frombuffer(self._data, dtype=np.uint8, count=info.n_bytes, offset=info.offset).copy()
        values = dequantize(torch.from_numpy(raw), info.type_name, info.numel)  # (numel,)
        return values.reshape(info.shape)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: parse its header, metadata and tensor table; tensor bytes are read on demand."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes; the header alone is 24)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data), path)
    magic = bytes(data[:4])
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    cursor.pos = 4
    version = cursor.scalar("<I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ValueError(f"{path}: GGUF version {version}{hint} is not supported; minift reads versions 2 and 3")
    n_tensors, n_keys = cursor.scalar("<Q", "the tensor count"), cursor.scalar("<Q", "the key count")

    metadata: dict[str, Any] = {}
    for index in range(n_keys):
        key = cursor.string(f"metadata key #{index}")
        value_type = cursor.scalar("<I", f"key {key!r}")
        metadata[key] = cursor.value(value_type, f"key {key!r}")

    raw_infos = []
    for index in range(n_tensors):
        name = cursor.string(f"tensor #{index}'s name")
        what = f"tensor {name!r}"
        n_dims = cursor.scalar("<I", what)
        if n_dims > 4:
            raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows at most 4")
        dims = [cursor.scalar("<Q", what) for _ in range(n_dims)]
        if 0 in dims:
            raise ValueError(f"{path}: tensor {name!r} has a dimension of 0 (dims {dims}); a weight holds values")
        raw_infos.append((name, tuple(reversed(dims)), cursor.scalar("<I", what), cursor.scalar("<Q", what)))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment  # round up to the alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, relative in raw_infos:
        type_name, block, block_bytes = GGML_TYPES.get(ggml_type, (f"type {ggml_type}", None, None))
        numel = int(np.prod(shape, dtype=np.int64))
        n_bytes = None
        if block is not None:
            if shape and shape[-1] % block:
                raise ValueError(f"{path}: tensor {name!r} ({type_name}) has a last dimension of {shape[-1]}, "
                                 f"not a multiple of its block size {block}")
            n_bytes = numel // block * block_bytes
            if data_start + relative + n_bytes > len(data):
                end = data_start + relative + n_bytes
                raise ValueError(f"{path}: tensor {name!r} ({type_name}) ends at byte {end}, past the end of the "
                                 f"file ({len(data)} bytes): the file is truncated")
        if relative % alignment:
            raise ValueError(f"{path}: tensor {name!r} ({type_name}) starts at data offset {relative}, not a multiple "
                             f"of general.alignment {alignment}: the tensor table is corrupt")
        tensors[name] = TensorInfo(name, shape, ggml_type, type_name, data_start + relative, n_bytes)
    # tensors must not overlap: a wrong type (or shape) makes one tensor run into the next one's bytes
    placed = sorted((t for t in tensors.values() if t.n_bytes is not None), key=lambda t: t.offset)
    for first, second in zip(placed, placed[1:]):
        if first.offset + first.n_bytes > second.offset:
            raise ValueError(f"{path}: tensor {first.name!r} ({first.type_name}, shape {first.shape}) needs "
                             f"{first.n_bytes} bytes but tensor {second.name!r} starts {second.offset - first.offset} "
                             "bytes after it: its type or shape in the tensor table is wrong")
    return GGUFFile(path, version, metadata, tensors, data)


# ----------------------------------------------------------------------------------------------------
# Dequantization: raw bytes -> float32, one vectorized pass per type
# ----------------------------------------------------------------------------------------------------


def dequantize(raw: torch.Tensor, type_name: str, numel: int) -> torch.Tensor:
    """Decode `raw` (uint8, the tensor's bytes) stored as `type_name` into `numel` float32 values."""
    if type_name == "F32":
        return raw.view(torch.float32)
    if type_name == "F16":
        return raw.view(torch.float16).float()
    if type_name == "BF16":
        return raw.view(torch.bfloat16).float()
    block_bytes = BLOCK_BYTES[type_name]
    blocks = raw.view(-1, block_bytes)  # (n_blocks, bytes per block)
    return DEQUANTIZERS[type_name](blocks).reshape(numel)


BLOCK_BYTES = {name: size for name, _, size in GGML_TYPES.values()}


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte `at` of every block, as float32: (n_blocks, 1)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of `packed` (n, groups, width) into 8 / bits fields, lowest bits first.

    Returns (n, groups * 8/bits * width) in the order (group, field, byte): field f of byte j in group g
    is element g * (8/bits) * width + f * width + j. Every ggml bit layout below is this pattern with some
    (groups, width, bits): e.g. Q4_0's 16 bytes are (1 group, width 16, 4 bits): byte j's low nibble is
    element j, its high nibble element 16 + j.
    """
    n, groups, width = packed.shape
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(1, 1, -1, 1)  # (1, 1, fields, 1)
    fields = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # (n, groups, fields, width)
    return fields.reshape(n, -1)


def _q8_0(blocks):  # [d][32 x int8]
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks):  # [d][16 bytes of nibbles]                        d * (q - 8)
    q = _unpack(blocks[:, 2:18].reshape(-1, 1, 16), 4).float()
    return (q - 8) * _f16(blocks, 0)


def _q4_1(blocks):  # [d][m][16 bytes of nibbles]                     d * q + m
    q = _unpack(blocks[:, 4:20].reshape(-1, 1, 16), 4).float()
    return q * _f16(blocks, 0) + _f16(blocks, 2)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 4 bytes of high bits (a little-endian uint32: bit i belongs to element i) -> (n, 32) of 0/1."""
    return _unpack(qh.reshape(-1, 4, 1), 1)


def _q5_0(blocks):  # [d][qh: 4 bytes][16 bytes of nibbles]          d * (q - 16), q = nibble | bit << 4
    q = _unpack(blocks[:, 6:22].reshape(-1, 1, 16), 4) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return (q.float() - 16) * _f16(blocks, 0)


def _q5_1(blocks):  # [d][m][qh: 4 bytes][16 bytes of nibbles]       d * q + m
    q = _unpack(blocks[:, 8:24].reshape(-1, 1, 16), 4) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return q.float() * _f16(blocks, 0) + _f16(blocks, 2)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) float32.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 the same way. Scales and mins 4-7
    have their low 4 bits in the nibbles of bytes 8-11 (scale low, min high) and their top 2 bits in the
    spare top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # (n, 4) each
    scales = torch.cat([low & 63, (high & 15) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _sub_blocks(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, size: int) -> torch.Tensor:
    """(n, 256) quants -> values, sub-block s of `size` values getting scale[:, s] (and - offset[:, s])."""
    n = q.shape[0]
    values = q.float().view(n, -1, size) * scale.unsqueeze(-1)  # (n, 256/size, size)
    if offset is not None:
        values = values - offset.unsqueeze(-1)
    return values.reshape(n, 256)


def _q2_k(blocks):  # [scales: 16][qs: 64][d][dmin]        (d * sc) * q - (dmin * m), q in 0..3
    scales = blocks[:, 0:16]
    q = _unpack(blocks[:, 16:80].reshape(-1, 2, 32), 2)  # (n, 256)
    return _sub_blocks(q, _f16(blocks, 80) * (scales & 15).float(), _f16(blocks, 82) * (scales >> 4).float(), 16)


def _q3_k(blocks):  # [hmask: 32][qs: 64][scales: 12][d]   (d * (sc - 32)) * (q - 4 * (1 - hbit))
    low = _unpack(blocks[:, 32:96].reshape(-1, 2, 32), 2).to(torch.int16)  # (n, 256) 0..3
    high = _unpack(blocks[:, 0:32].reshape(-1, 1, 32), 1).to(torch.int16)  # (n, 256) 0/1
    q = low - 4 * (1 - high)  # -4..3: a set bit means "no offset"
    packed = blocks[:, 96:108]
    scale_low = _unpack(packed[:, 0:8].reshape(-1, 1, 8), 4)  # (n, 16): nibbles of bytes 0-7
    scale_high = _unpack(packed[:, 8:12].reshape(-1, 1, 4), 2)  # (n, 16): 2-bit fields of bytes 8-11
    scales = (scale_low | (scale_high << 4)).float() - 32  # six bits, stored +32
    return _sub_blocks(q, _f16(blocks, 108) * scales, None, 16)


def _q4_k(blocks):  # [d][dmin][scales: 12][qs: 128]       (d * sc) * q - (dmin * m), q in 0..15
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _unpack(blocks[:, 16:144].reshape(-1, 4, 32), 4)  # (n, 256)
    return _sub_blocks(q, _f16(blocks, 0) * scales, _f16(blocks, 2) * mins, 32)


def _q5_k(blocks):  # [d][dmin][scales: 12][qh: 32][qs: 128]   q = nibble | hbit << 4, in 0..31
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _unpack(blocks[:, 48:176].reshape(-1, 4, 32), 4) | (_unpack(blocks[:, 16:48].reshape(-1, 1, 32), 1) << 4)
    return _sub_blocks(q, _f16(blocks, 0) * scales, _f16(blocks, 2) * mins, 32)


def _q6_k(blocks):  # [ql: 128][qh: 64][scales: 16 x int8][d]   (d * sc) * (q - 32), q in 0..63
    low = _unpack(blocks[:, 0:128].reshape(-1, 2, 64), 4)  # (n, 256): half h uses bytes 64h..64h+63
    high = _unpack(blocks[:, 128:192].reshape(-1, 2, 32), 2)  # (n, 256): half h uses bytes 32h..32h+31
    q = (low | (high << 4)).to(torch.int16) - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    return _sub_blocks(q, _f16(blocks, 208) * scales, None, 16)


DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
                "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of W_q / W_k (or their biases) for `n_heads` heads.

    GGUF row 2j + s of a head holds Hugging Face row s * hd/2 + j (s in {0, 1}, j < hd/2).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    per_head = weight.reshape(n_heads, head_dim // 2, 2, *rest)  # (H, hd/2, 2, in): llama.cpp's pairs
    return per_head.transpose(1, 2).reshape(rows, *rest)  # (H * hd, in): halves, as rotate_half expects


# ----------------------------------------------------------------------------------------------------
# load_gguf: a GGUF file -> (ModelConfig, state dict with minift names, Tokenizer)
# ----------------------------------------------------------------------------------------------------

NAME_MAP = [  # GGUF tensor name -> minift parameter name ({i} = layer index)
    (r"token_embd\.weight", "embed.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(?P<i>\d+)\.attn_norm\.weight", "blocks.{i}.attn_norm.weight"),
    (r"blk\.(?P<i>\d+)\.attn_q\.(?P<p>weight|bias)", "blocks.{i}.attn.q_proj.{p}"),
    (r"blk\.(?P<i>\d+)\.attn_k\.(?P<p>weight|bias)", "blocks.{i}.attn.k_proj.{p}"),
    (r"blk\.(?P<i>\d+)\.attn_v\.(?P<p>weight|bias)", "blocks.{i}.attn.v_proj.{p}"),
    (r"blk\.(?P<i>\d+)\.attn_output\.(?P<p>weight|bias)", "blocks.{i}.attn.o_proj.{p}"),
    (r"blk\.(?P<i>\d+)\.attn_q_norm\.weight", "blocks.{i}.attn.q_norm.weight"),
    (r"blk\.(?P<i>\d+)\.attn_k_norm\.weight", "blocks.{i}.attn.k_norm.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_norm\.weight", "blocks.{i}.mlp_norm.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_gate\.weight", "blocks.{i}.mlp.gate_proj.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_up\.weight", "blocks.{i}.mlp.up_proj.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_down\.weight", "blocks.{i}.mlp.down_proj.weight"),
    (r"blk\.(?P<i>\d+)\.post_attention_norm\.weight", "blocks.{i}.attn_post_norm.weight"),  # Gemma 2, 3
    (r"blk\.(?P<i>\d+)\.post_ffw_norm\.weight", "blocks.{i}.mlp_post_norm.weight"),  # Gemma 2, 3
    (r"blk\.(?P<i>\d+)\.attn_qkv\.weight", "blocks.{i}.attn.qkv_proj.weight"),  # Phi-3: rows [q; k; v]
]
FUSED_UP = (r"blk\.(?P<i>\d+)\.ffn_up\.weight", "blocks.{i}.mlp.gate_up_proj.weight")  # Phi-3: rows [gate; up]
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
GEMMAS = ("gemma", "gemma2", "gemma3")
MODEL_TYPES = {"gemma3": "gemma3_text"}  # GGUF architecture -> minift / Hugging Face model_type, where they differ
# Gemma 2 and 3 write no query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B
# models (found by their layer count), which use 1/sqrt(embedding_length / head_count) as their config.json says.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}  # every n-th layer global, the rest sliding (llama.cpp's defaults)


def minift_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The minift parameter name of a GGUF tensor, None if it has none."""
    for pattern, target in ([FUSED_UP] if arch == "phi3" else []) + NAME_MAP:
        match = re.fullmatch(pattern, gguf_name)
        if match:
            return target.format(**match.groupdict())
    return None


def config_from_gguf(metadata: dict[str, Any], where: str = "GGUF file") -> ModelConfig:
    """Translate `<arch>.*` and `tokenizer.ggml.*` metadata into a ModelConfig (tie_embeddings set by the caller)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: general.architecture is {arch!r}; minift reads GGUF files of {ARCHITECTURES}")

    def need(key: str, kind: str = "positive int"):  # every value checked for type and range, naming the key
        return json_field(metadata, f"{arch}.{key}", where, kind)

    def get(key: str, default, kind: str = "positive int"):
        return json_field(metadata, f"{arch}.{key}", where, kind, default=default)

    n_heads, dim = need("attention.head_count"), need("embedding_length")
    head_dim = get("attention.key_length", dim // n_heads)
    rope_dims = get("rope.dimension_count", head_dim)
    partial = 1.0
    if rope_dims != head_dim and arch == "phi3" and rope_dims < head_dim and rope_dims % 2 == 0:
        partial = rope_dims / head_dim  # Phi-4-mini turns only the first dims of each head
    elif rope_dims != head_dim:
        raise ValueError(f"{where}: rope.dimension_count={rope_dims} != head_dim={head_dim}; "
                         "partial RoPE is not supported")
    scaling_type = get("rope.scaling.type", "none", "str")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"{where}: rope.scaling.type {scaling_type!r} is not supported (supported: none, linear)")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": need("rope.scaling.factor", "positive number")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{where}: metadata key 'tokenizer.ggml.tokens' is missing (needed for the vocabulary size)")
    if isinstance(metadata["tokenizer.ggml.tokens"], (str, bytes)) or not hasattr(metadata["tokenizer.ggml.tokens"],
                                                                                 "__len__"):
        raise ValueError(f"{where}: tokenizer.ggml.tokens must be an array of strings")
    special = {ours: json_field(metadata, f"tokenizer.ggml.{theirs}", where, "int >= 0", default=None)
               for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                    ("pad_token_id", "padding_token_id"))}
    fields = dict(
        model_type=arch, vocab_size=len(metadata["tokenizer.ggml.tokens"]), dim=dim, n_layers=need("block_count"),
        n_heads=n_heads, n_kv_heads=get("attention.head_count_kv", n_heads), head_dim=head_dim,
        hidden_dim=need("feed_forward_length"), max_seq_len=need("context_length"),
        norm="rms", norm_eps=need("attention.layer_norm_rms_epsilon", "positive number"), positions="rope",
        rope_theta=get("rope.freq_base", 10000.0, "positive number"), rope_scaling=rope_scaling,
        mlp="swiglu", activation="silu", qkv_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "gemma3"),
        partial_rotary_factor=partial, **special,
    )
    fields["model_type"] = MODEL_TYPES.get(arch, arch)
    if arch in GEMMAS:
        fields.update(norm_plus_one=True, embed_scale=True, activation="gelu_tanh", branch_post_norms=arch != "gemma")
    if arch in ("gemma2", "gemma3"):
        fields["query_pre_attn_scalar"] = float(dim // n_heads if fields["n_layers"] == GEMMA_27B_LAYERS[arch]
                                                else head_dim)
        fields["final_softcap"] = get("final_logit_softcapping", None, "positive number")
        fields["attn_softcap"] = get("attn_logit_softcapping", None, "positive number") if arch == "gemma2" else None
        window = get("attention.sliding_window", None)
        if window is not None:
            every = get("attention.sliding_window_pattern", SLIDING_PATTERN[arch])
            fields["sliding_window"] = window
            fields["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                     for i in range(fields["n_layers"])]
        if arch == "gemma3":
            fields["rope_local_theta"] = get("rope.freq_base_swa", 10000.0, "positive number")
    if arch == "phi3":
        fields.update(fused_qkv=True, fused_gate_up=True)
        window = get("attention.sliding_window", 0, "int >= 0")  # 0: none (Phi-4-mini)
        fields["sliding_window"] = window or None
    try:
        return ModelConfig(**fields)
    except ValueError as error:  # e.g. head_count not a multiple of head_count_kv
        raise ValueError(f"{where}: {error}") from None


def load_gguf(path: str | Path):
    """(ModelConfig, state dict of float32 tensors with minift names, Tokenizer) from a Llama, Qwen2, Qwen3,
    Gemma 1/2/3 or Phi-3 file."""
    gguf = read_gguf(path)
    where = str(gguf.path)
    config = config_from_gguf(gguf.metadata, where)
    config.tie_embeddings = "output.weight" not in gguf.tensors  # no separate head: it reuses token_embd
    arch = gguf.metadata["general.architecture"]
    unmapped = [name for name in gguf.tensors if minift_name(name, arch) is None]
    if unmapped:
        raise ValueError(f"{where}: tensors {unmapped[:5]} have no minift equivalent (rope_freqs means Llama-3.1 "
                         "RoPE scaling, rope_factors_long / _short Phi-3's LongRoPE: not supported from GGUF)")
    has_bias = any(name.endswith("attn_q.bias") for name in gguf.tensors)
    if has_bias != config.qkv_bias:
        config.qkv_bias = has_bias  # a Llama file with q/k/v biases, or a Qwen2 file without
    config.out_bias = any(name.endswith("attn_output.bias") for name in gguf.tensors)
    tokenizer = tokenizer_from_gguf(gguf.metadata, where)  # before the slow part: a bad tokenizer fails fast
    state = {}
    for name in gguf.tensors:
        tensor = gguf.tensor(name)
        if config.model_type == "llama" and re.search(r"\.attn_q\.", name):
            tensor = unpermute_rope(tensor, config.n_heads)
        elif config.model_type == "llama" and re.search(r"\.attn_k\.", name):
            tensor = unpermute_rope(tensor, config.n_kv_heads)
        elif arch in GEMMAS and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # stored as 1 + w: back to the offset minift's norm_plus_one RMSNorm holds
        state[minift_name(name, arch)] = tensor
    gguf.close()
    return config, state, tokenizer


# ----------------------------------------------------------------------------------------------------
# The tokenizer stored in the metadata (tokenizer.ggml.*)
# ----------------------------------------------------------------------------------------------------

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> the regexes llama.cpp splits text with before BPE, applied in order (llama-vocab.cpp)
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT], "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT], "starcoder": [r"\p{N}", GPT2_SPLIT], "refact": [r"\p{N}", GPT2_SPLIT],
    "codeshell": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT], "qwen2": [QWEN2_SPLIT],
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special and added tokens


NORMAL, UNKNOWN, BYTE = 1, 2, 6  # the other token_type values a SentencePiece ("llama") vocabulary uses
SPACE = "\u2581"  # "▁": SentencePiece writes every space as this character, inside the tokens too


def tokenizer_from_gguf(metadata: dict[str, Any], where: str = "GGUF file"):
    """Build the tokenizer the metadata describes: byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(metadata, where)
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model is {kind!r}; minift builds byte-level BPE ('gpt2') and "
                         "SentencePiece BPE ('llama') tokenizers from GGUF. Load the model's Hugging Face directory "
                         "(tokenizer.json) instead")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {sorted(PRE_TOKENIZER_SPLITS)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens has duplicate entries; cannot build a vocabulary")
    merges = []
    for number, merge in enumerate(metadata.get("tokenizer.ggml.merges", [])):
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else ()
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or "".join(pair) not in vocab:
            raise ValueError(f"{where}: tokenizer.ggml.merges[{number}] = {merge!r} is not two tokens of "
                             "tokenizer.ggml.tokens whose join is a token too")
        merges.append(pair)
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    # llama.cpp's regexes, in order, each isolating its matches; then bytes -> the printable byte alphabet
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_TOKENIZER_SPLITS[pre]]
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    inner.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [])
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, token_type in zip(tokens, types) if token_type == CONTROL])
    inner.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, token_type in zip(tokens, types) if token_type == USER_DEFINED])

    def special(key):
        return metadata.get(f"tokenizer.ggml.{key}")

    return Tokenizer(inner, bos_token_id=special("bos_token_id"), eos_token_id=special("eos_token_id"),
                     pad_token_id=special("padding_token_id"), chat_template=metadata.get("tokenizer.chat_template"),
                     unk_token_id=special("unknown_token_id"))


def _sentencepiece_tokenizer(metadata: dict[str, Any], where: str) -> Tokenizer:
    """SentencePiece BPE from tokens + scores + token types (Llama 1/2, Mistral v1, Gemma, Phi-3 files).

    A SentencePiece BPE model stores no merge list: it merges, at each step, the adjacent pair whose joined
    piece has the highest score. `tokenizers`' BPE wants ranked merges, so we derive them: every normal token
    that splits into two tokens of the vocabulary gives one merge per split, ranked by the joined token's score
    (highest first). Text is not split into words; spaces become "▁" (with one "▁" put in front of the text
    when tokenizer.ggml.add_space_prefix is true, the default), and a character with no token is spelled as its
    UTF-8 bytes <0xNN> (byte fallback). Decoding reverses both: "▁" -> " ", byte tokens fused back into text,
    and the leading space dropped.
    """
    from tokenizers import normalizers, processors

    tokens = metadata["tokenizer.ggml.tokens"]
    n = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    types = metadata.get("tokenizer.ggml.token_type")
    if scores is None or len(scores) != n:
        raise ValueError(f"{where}: tokenizer.ggml.scores is missing or not one score per token "
                         "(a SentencePiece vocabulary ranks its merges by score)")
    if types is None or len(types) != n:
        raise ValueError(f"{where}: tokenizer.ggml.token_type is missing or not one type per token")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != n:
        raise ValueError(f"{where}: tokenizer.ggml.tokens has duplicate entries; cannot build a vocabulary")
    merges = []  # (score of the joined token, its id, left, right)
    for index, token in enumerate(tokens):
        if int(types[index]) != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-float(scores[index]), index, vocab[left], vocab[right], left, right))
    merges.sort()  # highest score first; ties by the token's id, then by the pieces' ids
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < n else None
    model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                       byte_fallback=True)
    inner = HFTokenizer(model)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    inner.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    inner.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                       *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, token_type in zip(tokens, types) if int(token_type) in (CONTROL, UNKNOWN)])
    inner.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, token_type in zip(tokens, types) if int(token_type) == USER_DEFINED])

    def special(key):
        value = metadata.get(f"tokenizer.ggml.{key}")
        return int(value) if isinstance(value, int) and 0 <= value < n else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:  # encode(..., add_special_tokens=True) puts them around the text, as llama.cpp does
        head, tail = ([tokens[bos]] if add_bos else []), ([tokens[eos]] if add_eos else [])
        inner.post_processor = processors.TemplateProcessing(
            single=[*head, "$A", *tail], pair=[*head, "$A", *tail, "$B", *tail],
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)])
    return Tokenizer(inner, bos_token_id=bos, eos_token_id=eos, pad_token_id=special("padding_token_id"),
                     chat_template=metadata.get("tokenizer.chat_template"), unk_token_id=special("unknown_token_id"))
