"""K-quants and Q5_0 / Q5_1 in minift's GGUF reader, byte for byte against the `gguf` package.

The gguf package can dequantize every K-quant but quantize none of them, so the blocks are random bytes:
every bit pattern is a valid block once its float16 fields (d, dmin, m) hold finite numbers. Random bytes
exercise every scale, min and high bit, which quantized real data would not (a quantizer never emits some
patterns). Q5_0 / Q5_1 also go through gguf.quants.quantize on real-valued data.

Tolerance: exact equality. Both sides compute in float32 with the same order of operations per type.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from minift.io.gguf import GGML_TYPES, dequantize, read_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# type -> byte offsets of its float16 fields inside a block (the rest of a block is any bytes)
FLOAT16_FIELDS = {"Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2],
                  "Q6_K": [208], "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2]}
NEW_TYPES = ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(type_name: str, n_blocks: int, seed: int) -> np.ndarray:
    """(n_blocks, block bytes) uint8: random bytes with finite float16 fields of mixed sign and size."""
    rng = np.random.default_rng(seed)
    block_bytes = GGML_TYPES[int(Q[type_name])][2]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in FLOAT16_FIELDS[type_name]:
        values = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-4, 2, n_blocks)).astype(np.float16)
        raw[:, at:at + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("type_name", NEW_TYPES + ["Q8_0", "Q4_0", "Q4_1"])
def test_random_blocks_equal_gguf(type_name):
    raw = random_blocks(type_name, 300, seed=len(type_name) + int(Q[type_name]))
    block = GGML_TYPES[int(Q[type_name])][1]
    expected = np.ascontiguousarray(gguf.quants.dequantize(raw, Q[type_name]), dtype=np.float32).reshape(-1)
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), type_name, 300 * block)
    assert got.dtype == torch.float32 and got.shape == (300 * block,)
    assert torch.equal(got, torch.from_numpy(expected)), type_name


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_quantized_data_equals_gguf_and_is_close(type_name):
    data = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    raw = gguf.quants.quantize(data, Q[type_name])  # (8, 3 * block bytes)
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), type_name, data.size).reshape(data.shape)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, Q[type_name]).astype(np.float32)))
    # 5 bits over a block's range: the error is at most half a step, range / 31 / 2 (Q5_1) or max / 16 / 2 (Q5_0)
    step = np.abs(data).reshape(-1, 32).max(1) / 16 if type_name == "Q5_0" else np.ptp(data.reshape(-1, 32), 1) / 31
    error = np.abs(got.numpy() - data).reshape(-1, 32).max(1)
    assert (error <= step / 2 * 1.01 + 1e-3).all()


def write_raw(path: Path, tensors: dict[str, tuple[np.ndarray, tuple[int, ...], str]]) -> Path:
    """tensors: name -> (raw blocks, PyTorch shape, type name), written byte for byte with gguf.GGUFWriter."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, shape, type_name) in tensors.items():
        block_bytes = GGML_TYPES[int(Q[type_name])][2]
        writer.add_tensor(name, raw.reshape(*shape[:-1], -1), raw_shape=raw.reshape(*shape[:-1], -1).shape,
                          raw_dtype=Q[type_name])
        assert raw.size % block_bytes == 0
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_file_with_every_k_quant_reads_like_gguf_reader(tmp_path):
    shapes = {"Q2_K": (3, 256), "Q3_K": (2, 2, 256), "Q4_K": (5, 512), "Q5_K": (1, 256), "Q6_K": (4, 768),
              "Q5_0": (3, 64), "Q5_1": (2, 32)}
    tensors = {}
    for index, (type_name, shape) in enumerate(shapes.items()):
        block = GGML_TYPES[int(Q[type_name])][1]
        tensors[f"t.{type_name}"] = (random_blocks(type_name, int(np.prod(shape)) // block, index), shape, type_name)
    path = write_raw(tmp_path / "k.gguf", tensors)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for t in ref.tensors:
        shape = tensors[t.name][1]
        assert ours.tensors[t.name].shape == shape and ours.tensors[t.name].type_name == t.tensor_type.name
        expected = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert torch.equal(ours.tensor(t.name), torch.from_numpy(expected.reshape(shape))), t.name


def test_truncated_k_quant_names_tensor_and_type(tmp_path):
    path = write_raw(tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (random_blocks("Q6_K", 4, 0), (2, 512), "Q6_K")})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated") as info:
        read_gguf(cut)
    message = str(info.value)
    assert "\n" not in message and "'blk.0.ffn_up.weight' (Q6_K)" in message and str(cut) in message


def patched(path: Path, tmp_path: Path, name: str, field: str, fmt: str, value) -> Path:
    """A copy of `path` with one field of tensor `name`'s table entry (2 dims) overwritten."""
    import struct

    data = bytearray(path.read_bytes())
    encoded = name.encode()
    start = bytes(data).index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    at = {"dim1": start + 12, "type": start + 20, "offset": start + 24}[field]
    struct.pack_into(fmt, data, at, value)
    out = tmp_path / f"{field}.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("field,fmt,value,words", [
    ("type", "<I", 14, ["needs", "its type or shape in the tensor table is wrong"]),  # Q4_K bytes read as Q6_K
    ("offset", "<Q", 3, ["not a multiple of general.alignment"]),
    ("dim1", "<Q", 0, ["dimension of 0"]),
])
def test_a_garbled_tensor_table_names_the_tensor(tmp_path, field, fmt, value, words):
    first, second = "blk.0.ffn_down.weight", "blk.1.ffn_down.weight"
    path = write_raw(tmp_path / "two.gguf", {first: (random_blocks("Q4_K", 4, 0), (2, 512), "Q4_K"),
                                             second: (random_blocks("Q4_K", 4, 1), (2, 512), "Q4_K")})
    read_gguf(path)  # the untouched file reads
    with pytest.raises(ValueError) as info:
        read_gguf(patched(path, tmp_path, first, field, fmt, value))
    message = str(info.value)
    assert "\n" not in message and repr(first) in message and all(word in message for word in words), message
