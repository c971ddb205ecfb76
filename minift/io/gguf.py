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

Quantized types cut the innermost dimension into blocks of 32 values, each with its own scale:

    Q8_0  [d: f16][q: 32 x int8]                   value = d * q
    Q4_0  [d: f16][16 bytes: 32 x 4-bit]           value = d * (q - 8)
    Q4_1  [d: f16][m: f16][16 bytes: 32 x 4-bit]   value = d * q + m
    4-bit packing inside one block: byte j holds element j in its low nibble, element j + 16 in its high one.

The file is memory-mapped (numpy memmap): reading the header touches only the first megabytes, and
`tensor(name)` copies and dequantizes one tensor at a time into float32.

Llama checkpoints need one more step. llama.cpp's converter permutes the rows of W_q and W_k so its
RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ... Hugging Face (and minift, `rotate_half`) rotates
pairs (x_i, x_{i + hd/2}). Within each head the converter maps row s * hd/2 + j to row 2j + s; `unpermute_rope`
maps it back. Qwen2 files are written without the permutation (llama.cpp uses the "NeoX" rotation for them).
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
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

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
                f"minift cannot dequantize; supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to Q8_0 "
                "or Q4_0 (llama-quantize), or load a Hugging Face directory instead")
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
                raise ValueError(f"{path}: tensor {name!r} ends at byte {data_start + relative + n_bytes}, past the "
                                 f"end of the file ({len(data)} bytes): the file is truncated")
        tensors[name] = TensorInfo(name, shape, ggml_type, type_name, data_start + relative, n_bytes)
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
    block_bytes = GGML_TYPES[{"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}[type_name]][2]
    blocks = raw.view(-1, block_bytes)  # (n_blocks, bytes per block)
    n_blocks = blocks.shape[0]
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if type_name == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n_blocks, 32)
        return q.mul_(scale).reshape(numel)
    packed = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]  # (n_blocks, 16)
    q = torch.empty(n_blocks, 32)  # (n_blocks, 32) float32
    q[:, :16] = packed & 0x0F  # low nibbles: elements 0..15
    q[:, 16:] = packed >> 4  # high nibbles: elements 16..31
    if type_name == "Q4_0":
        return q.sub_(8).mul_(scale).reshape(numel)  # d * (q - 8)
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    return q.mul_(scale).add_(minimum).reshape(numel)  # d * q + m


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
    (r"blk\.(?P<i>\d+)\.ffn_norm\.weight", "blocks.{i}.mlp_norm.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_gate\.weight", "blocks.{i}.mlp.gate_proj.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_up\.weight", "blocks.{i}.mlp.up_proj.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_down\.weight", "blocks.{i}.mlp.down_proj.weight"),
]
ARCHITECTURES = ("llama", "qwen2")


def minift_name(gguf_name: str) -> str | None:
    """The minift parameter name of a GGUF tensor, None if it has none."""
    for pattern, target in NAME_MAP:
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
    if rope_dims != head_dim:
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
        mlp="swiglu", activation="silu", qkv_bias=arch == "qwen2", **special,
    )
    try:
        return ModelConfig(**fields)
    except ValueError as error:  # e.g. head_count not a multiple of head_count_kv
        raise ValueError(f"{where}: {error}") from None


def load_gguf(path: str | Path):
    """(ModelConfig, state dict of float32 tensors with minift names, Tokenizer) from a Llama or Qwen2 GGUF file."""
    gguf = read_gguf(path)
    where = str(gguf.path)
    config = config_from_gguf(gguf.metadata, where)
    config.tie_embeddings = "output.weight" not in gguf.tensors  # no separate head: it reuses token_embd
    unmapped = [name for name in gguf.tensors if minift_name(name) is None]
    if unmapped:
        raise ValueError(f"{where}: tensors {unmapped[:5]} have no minift equivalent "
                         f"(rope_freqs means Llama-3.1 RoPE scaling, not supported from GGUF)")
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
        state[minift_name(name)] = tensor
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


def tokenizer_from_gguf(metadata: dict[str, Any], where: str = "GGUF file"):
    """Build the byte-level BPE tokenizer ("gpt2" in llama.cpp's terms) described by the metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model is {kind!r}; minift builds byte-level BPE ('gpt2') tokenizers "
                         "from GGUF. Load the model's Hugging Face directory (tokenizer.json) instead")
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
