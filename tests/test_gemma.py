"""Gemma 1, 2, 3 and sliding windows in the one Transformer: what each config.json key switches, that the
switches are live, the KV-cache path through a window, Gemma 3's two RoPE bases, LoRA and QLoRA, bad input.

The logits / padding / greedy-generation / save-round-trip parity against transformers on the plain configs runs
in tests/test_model_parity.py ("gemma_mqa_headdim", "gemma2_window_softcaps", "gemma3_local_global_linear_rope",
"mistral_window", "qwen2_window_from_layer_1"). Here the reference models get larger random weights
(initializer_range 0.2) so that windows, soft caps and RoPE bases change the logits by far more than 1e-4: a
test that passed with the switch ignored would fail.
"""

import json

import pytest
import torch

import minift
from minift.config import ModelConfig
from minift.io import hf
from minift.peft import LoRAConfig, LoRALinear, add_lora, save_adapter
from minift.quant import NF4Linear
from minift.train.methods import prepare_method
from tests.train_helpers import assert_bad_config_json_is_one_line, save_random_reference

transformers = pytest.importorskip("transformers")

V = 128
IDS = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 tokens > window 4
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


def gemma2_config(**overrides):
    options = dict(COMMON, num_hidden_layers=2, sliding_window=4, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=5.0, attn_implementation="eager")
    return transformers.Gemma2Config(**{**options, **overrides})


def gemma3_config(**overrides):
    options = dict(COMMON, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=16, sliding_window_pattern=3,
                   final_logit_softcapping=5.0, rope_theta=10000.0, rope_local_base_freq=50.0,
                   rope_scaling={"rope_type": "linear", "factor": 4.0})
    return transformers.Gemma3TextConfig(**{**options, **overrides})


def reference(tmp_path, config, name="ref"):
    """A random transformers model with random (not all-zero) Gemma norm offsets, saved as tmp_path / name."""
    torch.manual_seed(0)
    return save_random_reference(transformers.AutoModelForCausalLM.from_config(config), tmp_path / name)


def test_config_json_keys_set_the_switches(tmp_path):
    """The table in hf.decoder_fields, checked on the directories transformers writes."""
    reference(tmp_path, transformers.GemmaConfig(**COMMON, num_hidden_layers=1), "g1")
    reference(tmp_path, gemma2_config(num_hidden_layers=4), "g2")
    g3_options = {k: v for k, v in gemma3_config().to_dict().items() if k not in ("layer_types", "rope_parameters", "sliding_window_pattern")}
    g3_options.update(num_hidden_layers=4, rope_theta=10000.0, rope_local_base_freq=50.0,
                      rope_scaling={"rope_type": "linear", "factor": 4.0})  # no pattern given: every 6th is global
    reference(tmp_path, transformers.Gemma3TextConfig(**g3_options), "g3")
    g1_file = tmp_path / "g1" / "config.json"  # early Gemma configs: "gelu", which transformers reads as tanh-GELU
    g1_file.write_text(json.dumps({**json.loads(g1_file.read_text()), "hidden_act": "gelu"}))
    g1, g2, g3 = (minift.load(tmp_path / name)[0].config for name in ("g1", "g2", "g3"))
    assert (g1.norm_plus_one, g1.embed_scale, g1.branch_post_norms, g1.qk_norm, g1.tie_embeddings) == \
        (True, True, False, False, True)
    assert (g1.mlp, g1.activation, g1.head_dim, g1.sliding_window) == ("swiglu", "gelu_tanh", 16, None)  # legacy
    assert (g2.branch_post_norms, g2.qk_norm, g2.query_pre_attn_scalar, g2.attn_softcap, g2.final_softcap) == \
        (True, False, 24, 2.0, 5.0)
    assert g2.sliding_window == 4 and [g2.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert (g3.qk_norm, g3.attn_softcap, g3.final_softcap, g3.rope_theta, g3.rope_local_theta) == \
        (True, None, 5.0, 10000.0, 50.0)
    assert g3.rope_scaling["rope_type"] == "linear" and g3.rope_scaling["factor"] == 4.0
    assert [g3.is_sliding(i) for i in range(4)] == [True] * 4  # every 6th layer is global: none of 4
    assert hf.rename("model.layers.1.post_attention_layernorm.weight", "gemma2", to_hf=False) == \
        "blocks.1.attn_post_norm.weight"
    assert hf.rename("blocks.1.mlp_norm.weight", "gemma3_text", to_hf=True) == \
        "model.layers.1.pre_feedforward_layernorm.weight"
    assert hf.rename("blocks.1.mlp_norm.weight", "gemma", to_hf=True) == \
        "model.layers.1.post_attention_layernorm.weight"  # Gemma 1 names its norms as Llama does


def switched_off(model: minift.Transformer, **changes) -> minift.Transformer:
    """The same weights under a config with some switches changed."""
    import dataclasses

    other = minift.Transformer(dataclasses.replace(model.config, **changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_gemma2_window_and_soft_caps_are_live_and_match(tmp_path):
    ref = reference(tmp_path, gemma2_config())
    model, _ = minift.load(tmp_path / "ref")
    with torch.no_grad():
        ours = model(IDS)
        torch.testing.assert_close(ours, ref(IDS).logits, atol=1e-4, rtol=1e-4)
        assert ours.abs().max() <= 5.0  # the final cap bounds every logit
        unwindowed = switched_off(model, sliding_window=None, layer_types=None)(IDS)
        assert (unwindowed[:, :4] - ours[:, :4]).abs().max() < 1e-5  # the first 4 positions see the same keys
        assert (unwindowed[:, 4:] - ours[:, 4:]).abs().max() > 1e-2  # later ones lose the keys outside the window
        for cap in ("attn_softcap", "final_softcap"):
            assert (switched_off(model, **{cap: None})(IDS) - ours).abs().max() > 1e-2, cap


def test_training_loss_sees_the_final_soft_cap(tmp_path):
    """The trainer projects only the labelled rows (Transformer.logits' job, or the fused loss with the cap): its
    mean next-token loss is transformers' loss with labels."""
    from minift.train.tasks import build_task_model

    ref = reference(tmp_path, gemma2_config())
    model, _ = minift.load(tmp_path / "ref")
    out = build_task_model(model, "causal_lm")({"input_ids": IDS, "labels": IDS})
    with torch.no_grad():
        torch.testing.assert_close(out.loss_sum.detach() / out.n_targets, ref(IDS, labels=IDS).loss, atol=1e-5,
                                   rtol=1e-5)


def test_gemma3_rope_bases_and_legacy_config_keys(tmp_path):
    """Local layers turn at rope_local_base_freq, global ones at rope_theta with linear scaling; a config.json in
    the released checkpoints' spelling (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    means the same to transformers and to minift."""
    reference(tmp_path, gemma3_config())
    raw = json.loads((tmp_path / "ref" / "config.json").read_text())
    legacy = {k: v for k, v in raw.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=10000.0, rope_local_base_freq=50.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                  sliding_window_pattern=3)
    (tmp_path / "ref" / "config.json").write_text(json.dumps(legacy))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref").eval()
    model, _ = minift.load(tmp_path / "ref")
    assert [model.config.is_sliding(i) for i in range(3)] == [True, True, False]
    with torch.no_grad():
        ours = model(IDS)
        torch.testing.assert_close(ours, theirs(IDS).logits, atol=1e-4, rtol=1e-4)
        assert (switched_off(model, rope_local_theta=10000.0)(IDS) - ours).abs().max() > 1e-2  # local base matters
        assert (switched_off(model, rope_scaling=None)(IDS) - ours).abs().max() > 1e-2  # global scaling matters


def test_kv_cache_generation_through_the_window_left_padded(tmp_path):
    """Greedy tokens through a 4-position window: KV cache = no cache = transformers, in a left-padded batch too
    (the window counts columns, as transformers does, so padding shifts it the same way)."""
    ref = reference(tmp_path, gemma2_config())
    model, _ = minift.load(tmp_path / "ref")
    batch = torch.tensor([[0, 0, 0, 5, 9, 17, 33], [7, 11, 13, 21, 40, 50, 61]])
    mask = (batch != 0).long()
    ours = model.generate(batch, max_new_tokens=10, attention_mask=mask)
    assert torch.equal(ours, model.generate(batch, max_new_tokens=10, attention_mask=mask, use_cache=False))
    theirs = ref.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert torch.equal(ours, theirs)
    alone = model.generate(batch[1:], max_new_tokens=10)
    assert torch.equal(ours[1:], alone)


def test_save_round_trip_keeps_every_switch(tmp_path):
    for name, config in (("g2", gemma2_config()), ("g3", gemma3_config())):
        ref = reference(tmp_path, config, name)
        model, _ = minift.load(tmp_path / name)
        minift.save(model, None, tmp_path / f"{name}_ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_ours").eval()
        assert type(back) is type(ref)
        with torch.no_grad():
            torch.testing.assert_close(back(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)
        again, _ = minift.load(tmp_path / f"{name}_ours")
        assert again.config == model.config


def test_nf4_directory_round_trip(tmp_path):
    """minift quantize's 4-bit directory names Gemma 3's four block norms and q/k norms and reads them back."""
    from minift.io.nf4dir import save_quantized
    from minift.quant import quantize_model

    reference(tmp_path, gemma3_config())
    model, _ = minift.load(tmp_path / "ref")
    quantize_model(model)
    save_quantized(model, None, tmp_path / "nf4")
    back, _ = minift.load(tmp_path / "nf4")
    assert isinstance(back.blocks[2].mlp.down_proj, NF4Linear) and back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=0, rtol=0)


def test_embedding_scale_is_rounded_to_the_weights_dtype(tmp_path):
    """bfloat16: sqrt(48) = 6.93 becomes 6.9375 before it multiplies, in transformers and here."""
    config = transformers.GemmaConfig(**{**COMMON, "hidden_size": 48}, num_hidden_layers=1)
    ref = reference(tmp_path, config).to(torch.bfloat16)
    model, _ = minift.load(tmp_path / "ref", dtype=torch.bfloat16)
    assert torch.equal(model.embed(IDS), ref.model.embed_tokens(IDS))
    assert not torch.equal(model.embed(IDS), (model.embed.weight[IDS].float() * 48 ** 0.5).bfloat16())


def test_lora_on_gemma3_and_peft_loads_the_file(tmp_path):
    peft = pytest.importorskip("peft")
    ref = reference(tmp_path, gemma3_config())
    model, _ = minift.load(tmp_path / "ref")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    assert not any(isinstance(m, LoRALinear) for n, m in model.named_modules() if "norm" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(IDS[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), IDS[:, 1:].reshape(-1)).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved) and any("lora_B" in n for n in moved)

    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_qlora_on_gemma2(tmp_path):
    reference(tmp_path, gemma2_config())
    model, _ = minift.load(tmp_path / "ref")
    prepare_method("qlora", model, {"r": 4, "alpha": 8})
    block = model.blocks[0]
    assert isinstance(block.attn.q_proj, LoRALinear) and isinstance(block.attn.q_proj.base, NF4Linear)
    assert not isinstance(block.attn_post_norm, (NF4Linear, LoRALinear))  # the sandwich norms stay dense
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).reshape(-1, V), IDS[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_prompt_tuning_on_gemma_matches_peft(tmp_path):
    """The sqrt(d) scale lives inside the embedding module, so (as in PEFT) the soft prompt's vectors go in
    unscaled after the scaled token rows, and a text init copies the scaled rows PEFT copies."""
    peft = pytest.importorskip("peft")
    from minift.peft.prompt_tuning import add_prompt_tuning, initial_prompt

    ref = reference(tmp_path, transformers.GemmaConfig(**COMMON, num_hidden_layers=2))
    model, _ = minift.load(tmp_path / "ref")
    with torch.no_grad():
        torch.testing.assert_close(initial_prompt(model, 3, "text", token_ids=[5, 6, 7]),
                                   ref.model.embed_tokens(torch.tensor([5, 6, 7])), atol=0, rtol=0)
    add_prompt_tuning(model, 4, init="random", generator=torch.Generator().manual_seed(0))
    theirs = peft.get_peft_model(ref, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(model.soft_prompt.weight)
        torch.testing.assert_close(model(IDS), theirs(input_ids=IDS).logits[:, 4:], atol=1e-4, rtol=1e-4)


BAD_CONFIGS = [  # (model_type's extra keys, the start of the one-line error after "config.json: ")
    ("gemma3_text", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type = 'yarn' is not"),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention.rope_type = 'linear' is not supported"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0 is not supported"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention = true"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation = 'relu' is not supported for gemma2"),
    ("gemma2", {"layer_types": ["full_attention"]}, "layer_types must list 2 entries"),
    ("gemma2", {"sliding_window": None}, "layer_types has sliding_attention layers but sliding_window is null"),
    ("gemma2", {"attn_logit_softcapping": "50"}, "attn_logit_softcapping must be a positive number"),
    ("gemma3", {}, "unknown model_type 'gemma3'; minift supports"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported for mistral (its MLP is SwiGLU"),
]


@pytest.mark.parametrize("model_type,extra,message", BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_file_and_key(tmp_path, capsys, model_type, extra, message):
    raw = {"model_type": model_type, "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, **extra}
    assert_bad_config_json_is_one_line(tmp_path / "m", raw, message, capsys)


def test_switches_a_model_type_cannot_write_are_refused():
    base = dict(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    cases = [
        (ModelConfig(model_type="llama", sliding_window=4, **base), "'llama' cannot express sliding_window=4"),
        (ModelConfig(model_type="mistral", sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                     **base), "Mistral slides on every layer or none"),
        (ModelConfig(model_type="llama", final_softcap=30.0, **base), "cannot express final_softcap=30.0"),
        (ModelConfig(model_type="gemma", norm_plus_one=True, embed_scale=True, activation="gelu_tanh", **base),
         None),
        (ModelConfig(model_type="gemma", norm_plus_one=True, embed_scale=True, activation="gelu_tanh",
                     attn_softcap=50.0, **base), "cannot express attn_softcap=50.0"),
        (ModelConfig(model_type="gemma2", norm_plus_one=True, embed_scale=True, activation="gelu_tanh", **base),
         "branch_post_norms=False \\(gemma2 always has branch_post_norms=True\\)"),
        # biases and MLPs that transformers would build differently (it ignores these keys for these types)
        (ModelConfig(model_type="mistral", qkv_bias=True, out_bias=True, **base), "Mistral has none"),
        (ModelConfig(model_type="qwen3", qk_norm=True, mlp_bias=True, **base), "only llama reads mlp_bias"),
        (ModelConfig(model_type="llama", activation="gelu", **base), "its MLP is SwiGLU"),
    ]
    for config, message in cases:
        if message is None:
            assert hf.config_to_hf(config)["architectures"] == ["GemmaForCausalLM"]
        else:
            with pytest.raises(ValueError, match=message):
                hf.config_to_hf(config)
