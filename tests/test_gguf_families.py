"""Gemma 1/2/3 and Phi-3 GGUF files: converted here as llama.cpp's convert_hf_to_gguf.py converts them, loaded by
minift, logits equal to the transformers model they came from.

The conversion follows the converter's rules for each architecture: tensor names from the gguf package's own
name map (gguf.get_tensor_name_map, what the converter calls), every Gemma RMSNorm weight (names ending in
"norm.weight", the q/k norms included) written as 1 + w, no lm_head for Gemma (tied), Phi-3's fused qkv_proj and
gate_up_proj kept whole (attn_qkv, ffn_up), no Q/K permutation for any of them (llama.cpp rotates them NeoX-style),
and the metadata keys the converter writes (Gemma 2: both soft-caps and the sliding window; Gemma 3: global
rope.freq_base, sliding window, no pattern key; Phi-3: rope.dimension_count, sliding_window 0 for none). The
vocabulary is a hand-made SentencePiece one ("llama": tokens, scores, types, byte tokens).

Tolerance: 1e-4 (the norm weights go through w + 1 - 1 in float32; everything else is the same float32 math).
"""

import numpy as np
import pytest
import torch

from minift.io.gguf import load_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

DIM, LAYERS, HEADS, KV, FFN = 64, 2, 4, 2, 96


def spm_vocab():
    """<pad> <eos> <bos> <unk>, 256 byte tokens, then letters and a few joined pieces (scores rank the merges)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a", "in", "▁in"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_hf(arch: str):
    n_tokens = len(spm_vocab()[0])
    kw = dict(vocab_size=n_tokens, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-6, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    if arch == "gemma":  # head_dim independent of hidden / heads
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**kw, head_dim=24))
    elif arch == "gemma2":  # caps small enough to bite, a window shorter than the test's sequence
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **kw, head_dim=24, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=2.0,
            sliding_window=4))
    elif arch == "gemma3":  # 6 layers: 5 local (window 4, RoPE base 10k), then 1 global (RoPE base 1M)
        kw["num_hidden_layers"] = 6
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **kw, head_dim=24, query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=3.0))
    else:
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw, tie_word_embeddings=False))
    with torch.no_grad():  # norms start at 0 (Gemma) or 1; randomize so a missing "- 1" or a swap would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch.startswith("gemma") else p.uniform_(0.5, 1.5)
    return model.eval()


def convert(model, arch: str, path):
    """What convert_hf_to_gguf.py does for these architectures (F32 tensors)."""
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or DIM // HEADS
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(DIM)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(cfg.max_position_embeddings)
        writer.add_rope_dimension_count(int(cfg.rope_parameters.get("partial_rotary_factor", 1.0) * DIM) // HEADS)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window or 0)
    tokens, scores, types = spm_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    if arch.startswith("gemma"):
        writer.add_add_space_prefix(False)
    for name, p in model.state_dict().items():
        if arch.startswith("gemma") and name == "lm_head.weight":
            continue  # the converter skips it: Gemma ties the head to the embedding
        data = p.detach().float()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        writer.add_tensor(new, data.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "phi3"])
def test_family_gguf_logits_equal_transformers(tmp_path, arch):
    import minift

    ref = tiny_hf(arch)
    path = convert(ref, arch, tmp_path / f"{arch}.gguf")
    config, state, tokenizer = load_gguf(path)
    assert config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert config.norm_plus_one == arch.startswith("gemma") and config.fused_qkv == (arch == "phi3")
    if arch == "gemma3":
        assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    model, tok = minift.load(path)
    pieces = ("t", "he", "▁t", "in") if arch.startswith("gemma") else ("▁the", "▁t", "in")  # Gemma: no "▁" prefix
    assert tok.encode("the tin") == [tokenizer.token_to_id(t) for t in pieces]
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_phi3_longrope_factors_refused(tmp_path):
    ref = tiny_hf("phi3")
    path = convert(ref, "phi3", tmp_path / "phi3.gguf")
    reader_tensors = {}  # same file plus rope_factors_long: a LongRoPE checkpoint
    writer = gguf.GGUFWriter(str(tmp_path / "long.gguf"), "phi3")
    opened = gguf.GGUFReader(path)
    for field in opened.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, vtype)
    for t in opened.tensors:
        reader_tensors[t.name] = np.array(t.data)
        writer.add_tensor(t.name, reader_tensors[t.name])
    writer.add_tensor("rope_factors_long.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(ValueError, match="rope_factors_long"):
        load_gguf(tmp_path / "long.gguf")


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "phi3"])
def test_family_gguf_export_round_trips(tmp_path, arch):
    """minift export --format gguf of each family: the file is read back by minift and by gguf.GGUFReader, the
    config comes back the same, f16 weights are the source's rounded to float16 (norms F32, Gemma's through
    w + 1 - 1), logits within fp16 error of transformers, q8_0 within its error; the vocabulary tokenizes alike."""
    import minift
    from minift.cli import main

    ref = tiny_hf(arch)
    model, tok = minift.load(convert(ref, arch, tmp_path / "in.gguf"))
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    for quant, tolerance in (("f16", 3e-3), ("q8_0", 5e-2)):
        out = tmp_path / f"{quant}.gguf"
        main(["export", "--model", str(tmp_path / "in.gguf"), "--format", "gguf", "--quant", quant, "--out", str(out)])
        theirs = gguf.GGUFReader(out)
        assert str(theirs.fields["general.architecture"].contents()) == arch
        types = {t.name: t.tensor_type.name for t in theirs.tensors}
        assert "output.weight" not in types if arch.startswith("gemma") else types["output.weight"] == quant.upper()
        assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
        back, back_tok = minift.load(out)
        assert back.config == model.config
        if quant == "f16":
            source, loaded = model.state_dict(), back.state_dict()
            for name, weight in source.items():
                rounded = weight if weight.dim() == 1 else weight.half().float()
                torch.testing.assert_close(loaded[name], rounded, atol=1e-6, rtol=0, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(back(ids), expected, atol=tolerance, rtol=0)
        for text in ("the tin then", "x é 東", "he  in the"):
            assert back_tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)


def test_phi3_longrope_export_refused(tmp_path):
    import minift
    from minift.io.gguf_write import export_gguf

    model, tok = minift.load(convert(tiny_hf("phi3"), "phi3", tmp_path / "in.gguf"))
    model.config.rope_scaling = {"rope_type": "longrope", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}
    with pytest.raises(ValueError, match="LongRoPE"):
        export_gguf(model, tok, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("change, words", [
    (dict(layer_types=None), "layer_types"),  # None: minift slides every layer, llama.cpp alternates
    (dict(query_pre_attn_scalar=32.0), "query_pre_attn_scalar"),  # llama.cpp would scale by 1/sqrt(head_dim)
    (dict(tie_embeddings=False), "tie_embeddings"),
], ids=["all-layers-slide", "query-scalar", "untied"])
def test_gemma2_export_refuses_what_llama_cpp_would_compute_differently(tmp_path, change, words):
    import minift
    from minift.io.gguf_write import export_gguf

    model, tok = minift.load(convert(tiny_hf("gemma2"), "gemma2", tmp_path / "in.gguf"))
    for field, value in change.items():
        setattr(model.config, field, value)
    with pytest.raises(ValueError, match=words):
        export_gguf(model, tok, tmp_path / "out.gguf")
