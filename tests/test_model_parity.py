"""Ours vs theirs: minift's Transformer against transformers on tiny random configs built here.

Each test builds a random transformers model, saves it as a Hugging Face directory, loads that directory
with minift.load, and compares outputs (float32, 1e-4) — with and without a padding mask — and greedy
generation token for token. Then minift.save writes it back and transformers must agree again.
"""

import pytest
import torch

import minift

transformers = pytest.importorskip("transformers")

V = 97  # vocabulary of the tiny models

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64, n_inner=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    ),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rope_theta=500.0,
        bos_token_id=1, eos_token_id=2,
    ),
    "llama_mqa_tied_headdim": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32, "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3_gqa_headdim": lambda: transformers.Qwen3Config(  # head_dim 24 != 64 / 4
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "qwen3_tied_bias": lambda: transformers.Qwen3Config(  # attention_bias: q, k, v and o all get one
        vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
        attention_bias=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, bos_token_id=1, eos_token_id=2,
    ),
    # Bias keys transformers ignores for these model types: Qwen2 always has q/k/v biases, Mistral none
    "qwen2_ignores_bias_keys": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=False, mlp_bias=True, bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral_ignores_bias_keys": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, attention_bias=True, mlp_bias=True,
        bos_token_id=1, eos_token_id=2,
    ),
    # Sliding windows of 4 positions: the 11-token inputs and 6 + 12 generated tokens run past them (tests/test_gemma.py)
    "mistral_window": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=4, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2_window_from_layer_1": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, bos_token_id=1, eos_token_id=2,
    ),
    "gemma_mqa_headdim": lambda: transformers.GemmaConfig(  # head_dim 24 != 64 / 4; tied head; sqrt(d) embeddings
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    ),
    "gemma2_window_softcaps": lambda: transformers.Gemma2Config(  # layer 0 local, layer 1 global; caps that bite
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=0.05, final_logit_softcapping=0.1, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    ),
    "gemma3_local_global_linear_rope": lambda: transformers.Gemma3TextConfig(  # q/k norms; local base 100
        vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    ),
}


def build_reference(name, tmp_path):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random, non-trivial biases and norms so a swapped tensor cannot hide
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "ref")
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_lm_logits_and_generation(name, tmp_path):
    ref = build_reference(name, tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    ids = torch.randint(3, V, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
        # right padding: the real tokens' logits must not depend on the padding after them
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        ours, theirs = model(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)

    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=12)
    uncached = model.generate(prompt, max_new_tokens=12, use_cache=False)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)

    # save round trip: transformers loads what minift writes and agrees
    minift.save(model, None, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_batched_left_padded_generation_matches_single_rows(tmp_path):
    build_reference("llama_gqa_untied", tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, V, (5,), generator=g), torch.randint(3, V, (9,), generator=g)
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:], mask[0, 4:] = a, 1  # left padding
    batch[1], mask[1] = b, 1
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    alone_a = model.generate(a[None], max_new_tokens=8)
    alone_b = model.generate(b[None], max_new_tokens=8)
    assert torch.equal(out[0, 4:], alone_a[0])
    assert torch.equal(out[1], alone_b[0])


def test_generation_stops_at_eos(tmp_path):
    build_reference("llama_gqa_untied", tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    prompt = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(3))
    free = model.generate(prompt, max_new_tokens=10)
    stop_token = int(free[0, 7])  # pretend the third generated token is EOS
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=stop_token)
    first = (out[0, 5:] == stop_token).nonzero()[0].item()
    assert out.shape[1] == 5 + first + 1


def test_sampling_filters():
    from minift.model import sample_next_token

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {3, 4}
    # probabilities ~ [.01, .03, .09, .24, .64]: top_p=0.7 keeps {4, 3}, top_p=0.5 keeps only {4}
    assert {int(sample_next_token(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)} == {3, 4}
    assert {int(sample_next_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {4}


def test_bert_encoder_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, pad_token_id=0)
    ref = transformers.BertModel(config).eval()
    ref.save_pretrained(tmp_path / "ref")
    model, _ = minift.load(tmp_path / "ref")
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(1))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
        theirs = ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    minift.save(model, None, tmp_path / "ours")
    back = transformers.AutoModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_and_new_rope_parameters_key(tmp_path):
    ref = build_reference("llama_gqa_untied", tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = minift.load(tmp_path / "sharded")
    ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert model.config.rope_theta == 500.0  # read from whichever key this transformers version wrote


def test_dtype_casts_keep_rope_frequencies_float32(tmp_path):
    """model.to(bfloat16) must not round theta^(-2i/d): late positions' angles would drift (transformers keeps
    them float32 too). The weights do change dtype."""
    from minift.model import rope_frequencies

    build_reference("llama3_rope_scaling", tmp_path)
    model, _ = minift.load(tmp_path / "ref", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_frequencies(model.config))
    model.half()
    assert model.blocks[0].attn.q_proj.weight.dtype == torch.float16 and model.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                                        "gemma3_text"])
def test_missing_config_keys_mean_what_transformers_reads(model_type):
    """A config.json with only the required keys: every optional one minift fills in (hf.DEFAULTS and the
    per-type readers) must be the value the model_type's transformers config class fills in."""
    from minift.io import hf

    raw = dict(model_type=model_type, vocab_size=V, hidden_size=128, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=64)  # divisible by every default num_key_value_heads (4, 8, 16, 32)
    ours = hf.config_from_hf(raw)
    theirs = transformers.AutoConfig.for_model(**raw)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.n_kv_heads, ours.head_dim, ours.max_seq_len, ours.norm_eps, ours.tie_embeddings) == \
        (theirs.num_key_value_heads, head_dim, theirs.max_position_embeddings, theirs.rms_norm_eps,
         theirs.tie_word_embeddings)
    kinds = getattr(theirs, "layer_types", None)
    if ours.sliding_window is None:  # no layer slides (transformers may still carry a window nobody uses)
        assert kinds is None or "sliding_attention" not in kinds
    else:
        assert (ours.sliding_window, [ours.is_sliding(i) for i in range(2)]) == \
            (theirs.sliding_window, [kinds is None or kind == "sliding_attention" for kind in (kinds or [None] * 2)])
