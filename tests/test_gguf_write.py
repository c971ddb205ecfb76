"""GGUF export (minift/io/gguf_write.py, `minift export --format gguf`) against the `gguf` package.

- Q8_0, Q4_0, Q5_0: our quantizers' bytes equal gguf.quants.quantize (ggml's reference algorithms) on
  random rows and edge rows (zeros, constants, ties, a single spike);
- Q4_K (gguf has no quantizer for it): equal to a scalar transcription of ggml's quantize_row_q4_K_ref
  written here loop by loop in numpy float32; and every decoded value is the nearest point of its
  sub-block's grid;
- a tiny random Llama with a byte-level BPE tokenizer, exported at f16 / q8_0 / q4_0 / q4_k, reads back
  through gguf.GGUFReader and minift's reader to the same tensors; f16 and q8_0 (and q4_0) tensors are
  exactly what gguf's quantize writes for the permuted weights; the reloaded model's logits equal the
  original model with its weights rounded the same way; the tokenizer, special ids and chat template
  round-trip;
- `minift export --run RUN --format gguf` merges a LoRA run first; bad input gets one-line errors.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import minift
from minift.cli import main
from minift.config import ModelConfig
from minift.io.gguf import config_from_gguf, read_gguf, unpermute_rope
from minift.io.gguf_write import export_gguf, permute_rope, quantize
from minift.tokenizer import Tokenizer
from tests.train_helpers import SENTENCES, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def sample_rows(width: int, seed: int = 0) -> np.ndarray:
    """Random rows of varied scale, plus rows that hit the quantizers' special cases."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((12, width)).astype(np.float32) * rng.uniform(1e-3, 5, (12, 1)).astype(np.float32)
    rows[0] = 0  # all zero: d = 0
    rows[1] = 0.75  # constant
    rows[2, :] = rng.standard_normal(width) * 1e-3
    rows[2, 5] = 4.0  # one spike per row
    rows[3] = np.abs(rows[3])  # all positive (Q4_K: min clamps to 0)
    rows[4] = -np.abs(rows[4])  # all negative
    rows[5, :32] = np.float32(0.5) * np.arange(32, dtype=np.float32) - 8  # exact ties at .5 steps
    rows[6, 0], rows[6, 1] = 3.0, -3.0  # +max and -max tie: the first wins
    return rows


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0"])
def test_quantizers_equal_gguf_bytes(type_name):
    x = sample_rows(256)
    ours = quantize(torch.from_numpy(x), type_name).numpy()
    assert np.array_equal(ours, gguf.quants.quantize(x, Q[type_name]).reshape(-1))


# ----------------------------------------------------------------------------------------------------
# Q4_K: a scalar transcription of ggml's reference quantizer, one loop iteration at a time
# ----------------------------------------------------------------------------------------------------


def nearest_int(v) -> int:  # ggml's nearest_int: round half to even
    return int(np.rint(np.float32(v)))


def make_qkx2_quants(x, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    f = np.float32
    n = len(x)
    low, high = x[0], x[0]
    sum_w = weights[0]
    sum_x = f(sum_w * x[0])
    for i in range(1, n):
        low, high = min(low, x[i]), max(high, x[i])
        sum_w = f(sum_w + weights[i])
        sum_x = f(sum_x + f(weights[i] * x[i]))
    low = min(low, f(0))
    if high == low:
        return f(0), f(-low), [0] * n
    iscale = f(f(nmax) / f(high - low))
    scale = f(f(1) / iscale)
    levels = [max(0, min(nmax, nearest_int(f(iscale * f(x[i] - low))))) for i in range(n)]
    best = f(0)
    for i in range(n):
        diff = f(f(f(scale * f(levels[i])) + low) - x[i])
        best = f(best + f(weights[i] * f(diff * diff)))
    for step in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(step))) + f(nmax)) / f(high - low))
        trial = [max(0, min(nmax, nearest_int(f(iscale * f(x[i] - low))))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = f(0)
        for i in range(n):
            wl = f(weights[i] * f(trial[i]))
            sum_l, sum_l2, sum_xl = f(sum_l + wl), f(sum_l2 + f(wl * f(trial[i]))), f(sum_xl + f(wl * x[i]))
        det = f(f(sum_w * sum_l2) - f(sum_l * sum_l))
        if det > 0:
            this_scale = f(f(f(sum_w * sum_xl) - f(sum_x * sum_l)) / det)
            this_min = f(f(f(sum_l2 * sum_x) - f(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = f(0), f(sum_xl / sum_l2)
            error = f(0)
            for i in range(n):
                diff = f(f(f(this_scale * f(trial[i])) + this_min) - x[i])
                error = f(error + f(weights[i] * f(diff * diff)))
            if error < best:
                levels, best, scale, low = trial, error, this_scale, this_min
    return scale, f(-low), levels


def q4_k_reference(block: np.ndarray) -> bytes:
    """ggml's quantize_row_q4_K_ref on one super-block of 256 float32 values."""
    f = np.float32
    scales, mins, levels = [], [], []
    for j in range(8):
        x = block[32 * j:32 * j + 32]
        sum_x2 = f(0)
        for v in x:
            sum_x2 = f(sum_x2 + f(v * v))
        av_x = f(np.sqrt(f(sum_x2 / f(32))))
        scale, the_min, sub_levels = make_qkx2_quants(x, np.array([f(av_x + abs(v)) for v in x], dtype=f))
        scales.append(scale), mins.append(the_min), levels.extend(sub_levels)
    max_scale, max_min = max([f(0)] + scales), max([f(0)] + mins)
    inv_scale = f(f(63) / max_scale) if max_scale > 0 else f(0)
    inv_min = f(f(63) / max_min) if max_min > 0 else f(0)
    packed = [0] * 12
    sc = [min(63, nearest_int(f(inv_scale * s)) % 256) for s in scales]
    mn = [min(63, nearest_int(f(inv_min * m)) % 256) for m in mins]
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = sc[j], mn[j]
        else:
            packed[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4)
            packed[j - 4] |= (sc[j] >> 4) << 6
            packed[j] |= (mn[j] >> 4) << 6
    d, dmin = np.float16(max_scale / f(63)), np.float16(max_min / f(63))
    for j in range(8):
        dj = f(f(d) * f(sc[j]))
        if dj == 0:
            continue
        dm = f(f(dmin) * f(mn[j]))
        for i in range(32):
            levels[32 * j + i] = max(0, min(15, nearest_int(f(f(block[32 * j + i] + dm) / dj))))
    qs = [levels[64 * c + i] | (levels[64 * c + 32 + i] << 4) for c in range(4) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def test_q4_k_equals_ggml_reference_transcription():
    x = sample_rows(256, seed=3)[:10]  # 10 super-blocks, the edge rows included
    ours = quantize(torch.from_numpy(x), "Q4_K").numpy().reshape(10, 144)
    for row in range(10):
        assert ours[row].tobytes() == q4_k_reference(x[row]), row


def test_q4_k_decodes_to_nearest_grid_points_and_beats_q4_0():
    x = np.random.default_rng(5).standard_normal((16, 512)).astype(np.float32)
    raw = quantize(torch.from_numpy(x), "Q4_K").numpy().reshape(-1, 144)
    decoded = gguf.quants.dequantize(raw, Q.Q4_K).reshape(-1, 32)  # sub-blocks of 32
    # each sub-block's grid: the 16 values (d * sc) * l - (dmin * m); read d*sc, dmin*m from levels 0 and 1
    values = x.reshape(-1, 32)
    blocks = raw.copy()
    blocks[:, 16:] = 0  # every level 0: each sub-block decodes to -(dmin * m)
    offset = gguf.quants.dequantize(blocks, Q.Q4_K).reshape(-1, 32)[:, :1]
    blocks[:, 16:] = 0x11  # every level 1: (d * sc) - (dmin * m)
    step = gguf.quants.dequantize(blocks, Q.Q4_K).reshape(-1, 32)[:, :1] - offset
    candidates = step * np.arange(16, dtype=np.float32) + offset  # (n_sub, 16)
    nearest = np.abs(values[:, :, None] - candidates[:, None, :]).min(-1)
    assert np.allclose(np.abs(values - decoded), nearest, atol=1e-6)
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q4_0), Q.Q4_0).reshape(-1, 32)
    assert np.sqrt(((decoded - values) ** 2).mean()) < np.sqrt(((q4_0 - values) ** 2).mean())


def test_permute_rope_is_llama_cpp_converters_and_the_readers_inverse():
    from tests.test_gguf import llama_cpp_permute

    weight = torch.randn(4 * 16, 24)
    assert torch.equal(permute_rope(weight, 4), torch.from_numpy(llama_cpp_permute(weight.numpy(), 4)))
    assert torch.equal(unpermute_rope(permute_rope(weight, 4), 4), weight)
    bias = torch.randn(2 * 8)
    assert torch.equal(unpermute_rope(permute_rope(bias, 2), 2), bias)


# ----------------------------------------------------------------------------------------------------
# A tiny Llama with a byte-level BPE tokenizer, exported and read back
# ----------------------------------------------------------------------------------------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bpe_tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-2's regex, so tokenizer.ggml.pre must come out 'gpt2') trained on SENTENCES."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator(SENTENCES * 3, trainer)
    return Tokenizer(inner, bos_token_id=1, eos_token_id=2, chat_template=CHATML)


def tiny_llama(vocab: int, tie: bool, seed: int = 0) -> minift.Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=256, max_seq_len=128, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=tie)
    model = minift.Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # so a swapped norm would show
    return model


def rounded_like_file(model: minift.Transformer, path: Path) -> minift.Transformer:
    """A copy of `model` whose weights are what the file holds, decoded by the gguf package (the reference)."""
    import copy

    reference = copy.deepcopy(model)
    names = {t.name: t for t in gguf.GGUFReader(path).tensors}
    config = model.config
    with torch.no_grad():
        for name, p in reference.named_parameters():
            from minift.io.gguf_write import gguf_name

            t = names.get(gguf_name(name))
            if t is None:  # tied head
                continue
            value = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            value = value.reshape(p.shape)
            if config.model_type not in ("llama", "mistral"):
                pass  # Qwen: rows as they are
            elif ".attn_q." in t.name:
                value = unpermute_rope(value, config.n_heads)
            elif ".attn_k." in t.name:
                value = unpermute_rope(value, config.n_kv_heads)
            p.copy_(value)
    return reference


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.mark.parametrize("quant,tie", [("f16", True), ("f16", False), ("q8_0", True), ("q4_0", False),
                                       ("q4_k", True)])
def test_export_round_trips_through_both_readers(tmp_path, tokenizer, quant, tie):
    model = tiny_llama(tokenizer.vocab_size, tie)
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", quant)
    ref, ours = gguf.GGUFReader(path), read_gguf(path)
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    expected_types = {"f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}, "q4_0": {"Q4_0", "Q8_0", "F32"},
                      "q4_k": {"Q4_K", "Q5_0", "Q8_0", "F32"}}[quant]
    assert {t.tensor_type.name for t in ref.tensors} == expected_types
    assert ("output.weight" in ours.tensors) == (not tie)
    state = {name: p.detach() for name, p in model.named_parameters()}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        decoded = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(info.shape)
        assert torch.equal(ours.tensor(t.name), torch.from_numpy(decoded)), t.name  # the two readers agree
        from minift.io.gguf_write import gguf_name

        source = next(v for n, v in state.items() if gguf_name(n) == t.name)
        if ".attn_q." in t.name:
            source = permute_rope(source, 4)
        elif ".attn_k." in t.name:
            source = permute_rope(source, 2)
        kind = t.tensor_type
        if kind in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q5_0):  # exactly what gguf's own quantizer writes
            expected = gguf.quants.quantize(source.numpy(), kind)
            assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                  np.ascontiguousarray(expected).reshape(-1).view(np.uint8)), t.name
        else:  # Q4_K: within one grid step of its sub-block
            spread = source.reshape(-1, 32).amax(1) - source.reshape(-1, 32).amin(1).clamp(max=0)
            error = (torch.from_numpy(decoded) - source).reshape(-1, 32).abs().amax(1)
            assert (error <= spread / 15 + 1e-6).all(), t.name

    # metadata and tokenizer
    config = config_from_gguf(ours.metadata)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len",
                  "rope_theta", "norm_eps"):
        assert getattr(config, field) == getattr(model.config, field), field
    assert ours.metadata["tokenizer.ggml.pre"] == "gpt2" and ours.metadata["general.architecture"] == "llama"
    assert ref.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    reloaded, tok = minift.load(path)
    text = "the big cat sat on the mat, 42 times! ünï"
    assert tok.encode(text) == tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template) == (1, 2, CHATML)
    assert tok.encode("<|im_start|>user") == tokenizer.encode("<|im_start|>user")

    # logits: the reloaded model computes what the original does with the file's rounded weights
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        got, original = reloaded(ids), model(ids)
        torch.testing.assert_close(got, rounded_like_file(model, path)(ids), atol=1e-5, rtol=1e-5)
    if quant == "f16":
        torch.testing.assert_close(got, original, atol=2e-3, rtol=2e-3)  # fp16 rounding of the weights


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_exports_keep_rotate_half_rows_biases_and_qk_norms(tmp_path, tokenizer, arch):
    torch.manual_seed(2)
    config = ModelConfig(model_type=arch, vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=24 if arch == "qwen3" else None, hidden_dim=96, max_seq_len=128,
                         qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", tie_embeddings=arch == "qwen3")
    model = minift.Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    path = export_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", "f16")
    ref = gguf.GGUFReader(path)
    assert str(ref.fields["general.architecture"].contents()) == arch
    tensors = {t.name: t for t in ref.tensors}
    q = model.blocks[0].attn.q_proj.weight.detach()
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), q.half().numpy())  # not permuted
    if arch == "qwen2":
        assert np.array_equal(np.asarray(tensors["blk.1.attn_k.bias"].data), model.blocks[1].attn.k_proj.bias.detach().numpy())
    else:
        assert np.array_equal(np.asarray(tensors["blk.1.attn_q_norm.weight"].data),
                              model.blocks[1].attn.q_norm.weight.detach().numpy())
        assert ref.fields["qwen3.attention.key_length"].contents() == 24
    reloaded, _ = minift.load(path)
    assert reloaded.config.model_type == arch and reloaded.config.qk_norm == (arch == "qwen3")
    ids = torch.tensor([tokenizer.encode("the big cat sat on the mat")])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), rounded_like_file(model, path)(ids), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The command: a LoRA run exported directly; bad input
# ----------------------------------------------------------------------------------------------------


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_export_a_lora_run_as_gguf_merges_first(tmp_path, tokenizer, capsys, method):
    base = tmp_path / "base"
    minift.save(tiny_llama(tokenizer.vocab_size, tie=True), tokenizer, base)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": s} for s in SENTENCES])
    out = tmp_path / "run"
    sets = [f"model.source={base}", f"data.train={data}", f"train.output_dir={out}", "train.max_steps=2",
            "train.batch_size=4", "train.lr=5e-2", "data.validation_fraction=0", "train.device=cpu",
            f"method.name={method}", "method.r=4"]
    config = tmp_path / "run.toml"
    config.write_text("[train]\nprogress_bar = false\n")  # the rest comes from --set
    assert main(["finetune", str(config), *[x for s in sets for x in ("--set", s)]]) == 0
    assert run("export", "--run", out, "--out", tmp_path / "merged") == 0
    assert run("export", "--run", out, "--format", "gguf", "--quant", "f16", "--out", tmp_path / "run.gguf") == 0
    printed = capsys.readouterr().out
    assert "run.gguf read back vs before" in printed
    merged, _ = minift.load(tmp_path / "merged")
    from_gguf, _ = minift.load(tmp_path / "run.gguf")
    ids = torch.tensor([tokenizer.encode(SENTENCES[0])])
    with torch.no_grad():
        assert not torch.allclose(merged(ids), minift.load(base)[0](ids), atol=1e-3)  # the run changed the model
        torch.testing.assert_close(from_gguf(ids), merged(ids), atol=2e-3, rtol=2e-3)


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error:"), err
    return err[0]


def test_bad_export_input_gets_one_line(tmp_path, tokenizer, capsys):
    base = tmp_path / "base"
    minift.save(tiny_llama(tokenizer.vocab_size, tie=True), tokenizer, base)
    assert run("export", "--model", base, "--format", "gguf", "--out", tmp_path / "x.bin") == 2
    assert "name it *.gguf" in error_of(capsys)
    assert run("export", "--model", base, "--format", "gguf", "--out", tmp_path / "nope" / "x.gguf") == 2
    assert "does not exist" in error_of(capsys)
    gpt2 = tmp_path / "gpt2"
    config = ModelConfig(model_type="gpt2", vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4,
                         hidden_dim=64, norm="layer", positions="learned", mlp="gelu", activation="gelu_tanh",
                         qkv_bias=True, out_bias=True, mlp_bias=True)
    minift.save(minift.Transformer(config), tokenizer, gpt2)
    assert run("export", "--model", gpt2, "--format", "gguf", "--out", tmp_path / "g.gguf") == 2
    assert "model_type 'gpt2' is not supported" in error_of(capsys)
    sliding = tmp_path / "sliding"
    config = ModelConfig(model_type="mistral", vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4,
                         n_kv_heads=2, hidden_dim=64, sliding_window=8)
    minift.save(minift.Transformer(config), tokenizer, sliding)
    assert run("export", "--model", sliding, "--format", "gguf", "--out", tmp_path / "s.gguf") == 2
    assert "sliding_window=8" in error_of(capsys)
    from tests.train_helpers import save_tiny_decoder

    words = save_tiny_decoder(tmp_path / "words")  # a word-level tokenizer: llama.cpp has no such vocabulary
    assert run("export", "--model", words, "--format", "gguf", "--out", tmp_path / "w.gguf") == 2
    assert "WordLevel" in error_of(capsys)
    assert not any(tmp_path.glob("*.gguf*"))
    assert run("export", "--model", base, "--quant", "q4_k", "--out", tmp_path / "hf") == 2
    assert "--quant q4_k goes with --format gguf" in error_of(capsys)
    assert run("export", "--model", base, "--format", "gguf", "--dtype", "bfloat16", "--out", tmp_path / "x.gguf") == 2
    assert "--dtype bfloat16 does not apply to --format gguf" in error_of(capsys)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit):
        run("export", "--model", base, "--format", "gguf", "--quant", "q3_k", "--out", tmp_path / "x.gguf")
    assert "invalid choice: 'q3_k'" in capsys.readouterr().err
