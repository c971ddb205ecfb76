"""Phi-3 in the one Transformer: fused qkv_proj / gate_up_proj kept fused (fused_qkv, fused_gate_up), its
sliding window, LongRoPE and partial rotary embeddings, its config.json both ways, LoRA and PEFT files under
Phi-3's own module names (both directions), QLoRA over NF4 fused layers, and one-line errors for bad configs.

Every reference is transformers' Phi3ForCausalLM built here from a tiny random Phi3Config (2 layers, hidden 64,
vocab 128) with large random weights (initializer_range 0.2) and random norm weights, so that a window, a
rope factor or a fused split that was ignored would move the logits by far more than the 1e-4 allowed.
"""

import json

import pytest
import torch

import minift
from minift.config import ModelConfig
from minift.io import hf
from minift.peft import LoRAConfig, LoRALinear, add_lora, load_adapter, lora_layers, save_adapter
from minift.quant import NF4Linear
from minift.train.methods import prepare_method
from tests.train_helpers import save_random_reference
from tests.train_helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from tests.train_helpers import assert_bad_config_json_is_one_line

transformers = pytest.importorskip("transformers")

V = 128
IDS = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 tokens > window 4
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.5, 4.0, 9.0, 20.0]}  # 16 * 0.5 / 2 = 4 each


def phi3_config(**overrides):
    """Tiny: hidden 64, 4 query heads of 16, 2 key/value heads (GQA), MLP 96, window 4, untied head."""
    options = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, sliding_window=4,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.Phi3Config(**{**options, **overrides})


def longrope_config(**overrides):
    """LongRoPE switching to long_factor past 8 tokens, a quarter of a 32-token context: attention factor
    sqrt(1 + ln 4 / ln 8); half of each head rotated (partial_rotary_factor 0.5); no window."""
    return phi3_config(sliding_window=None, max_position_embeddings=32, original_max_position_embeddings=8,
                       rope_parameters=dict(LONGROPE), **overrides)


def reference(tmp_path, config=None, name="ref"):
    torch.manual_seed(0)
    return save_random_reference(transformers.Phi3ForCausalLM(config or phi3_config()), tmp_path / name)


def test_config_json_sets_the_switches_and_fused_names(tmp_path):
    reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    c = model.config
    assert (c.model_type, c.fused_qkv, c.fused_gate_up, c.qkv_bias, c.mlp_bias, c.sliding_window, c.layer_types) == \
        ("phi3", True, True, False, False, 4, None)
    assert (c.head_dim, c.norm_eps, c.partial_rotary_factor, c.rope_scaling, c.activation) == \
        (16, 1e-5, 1.0, None, "silu")
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    assert attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64) and not hasattr(attn, "q_proj")
    assert mlp.gate_up_proj.weight.shape == (2 * 96, 64) and not hasattr(mlp, "up_proj")
    assert hf.rename("model.layers.1.self_attn.qkv_proj.weight", "phi3", to_hf=False) == "blocks.1.attn.qkv_proj.weight"
    assert hf.rename("blocks.0.mlp.gate_up_proj.weight", "phi3", to_hf=True) == "model.layers.0.mlp.gate_up_proj.weight"
    assert hf.rename("model.layers.0.self_attn.q_proj.weight", "phi3", to_hf=False) is None  # not a Phi-3 tensor


def test_logits_window_and_greedy_generation_match_transformers(tmp_path):
    ref = reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    with torch.no_grad():
        ours = model(IDS)
        torch.testing.assert_close(ours, ref(IDS).logits, atol=1e-4, rtol=1e-4)
        model.config.sliding_window = None  # the window is live: without it the logits move
        assert (model(IDS) - ours).abs().max() > 1e-2
        model.config.sliding_window = 4
    prompt = IDS[:1, :5]
    greedy = model.generate(prompt, max_new_tokens=10)  # KV cache through the window
    theirs = ref.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    assert torch.equal(greedy, theirs)
    batch, mask = IDS[:, :6].clone(), torch.ones(2, 6, dtype=torch.long)
    batch[1, :2], mask[1, :2] = 0, 0  # left padding
    ours = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    theirs = ref.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_save_round_trip_transformers_loads_equal_logits(tmp_path):
    for name, config in (("window", phi3_config(tie_word_embeddings=True)), ("longrope", longrope_config())):
        ref = reference(tmp_path, config, name)
        model, _ = minift.load(tmp_path / name)
        minift.save(model, None, tmp_path / f"{name}_ours")
        written = json.loads((tmp_path / f"{name}_ours" / "config.json").read_text())
        assert written["architectures"] == ["Phi3ForCausalLM"] and "attention_bias" not in written
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_ours").eval()
        assert isinstance(back, transformers.Phi3ForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(back(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)
        again, _ = minift.load(tmp_path / f"{name}_ours")
        assert again.config == model.config


def test_longrope_and_partial_rotary_match_transformers(tmp_path):
    """Short factors up to 8 positions, long ones past them, cos/sin times the attention factor, half of each
    head rotated: logits equal at lengths on both sides of the switch, and greedy generation across it equal
    (transformers recomputes the cache when the sequence first passes 8 tokens; so does minift)."""
    ref = reference(tmp_path, longrope_config())
    model, _ = minift.load(tmp_path / "ref")
    scaling = model.config.rope_scaling
    assert (scaling["rope_type"], scaling["original_max_position_embeddings"], model.config.partial_rotary_factor) \
        == ("longrope", 8, 0.5)
    with torch.no_grad():
        for length in (6, 8, 9, 12):
            torch.testing.assert_close(model(IDS[:, :length]), ref(IDS[:, :length]).logits, atol=1e-4, rtol=1e-4)
        long_logits = model(IDS)
        model.config.rope_scaling = {**scaling, "long_factor": scaling["short_factor"]}
        model.reset_rope("cpu")
        assert (model(IDS) - long_logits).abs().max() > 1e-2  # the long factors are live past 8 tokens
        model.config.rope_scaling = scaling
        model.reset_rope("cpu")
        # why generation must recompute: keys cached while <= 8 tokens turned with the short factors
        cache = minift.model.KVCache(model.config, 2, 9, torch.float32, "cpu")
        model(IDS[:, :8], cache=cache)
        stale = model(IDS[:, 8:9], cache=cache)[:, -1]
        assert (stale - model(IDS[:, :9])[:, -1]).abs().max() > 1e-3
    prompt = IDS[:1, :5]
    ours = model.generate(prompt, max_new_tokens=8)  # crosses 8 tokens at the 4th new one
    theirs = ref.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs) and torch.equal(ours, model.generate(prompt, 8, use_cache=False))


def test_legacy_su_rope_scaling_is_longrope(tmp_path):
    """Older Phi-3 long-context files: rope_scaling {"type": "su"} and original_max_position_embeddings at the
    top level (which wins over a value inside the dict, as in Phi3Config)."""
    ref = reference(tmp_path, longrope_config())
    config_file = tmp_path / "ref" / "config.json"
    raw = json.loads(config_file.read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=10000.0, partial_rotary_factor=0.5, rope_scaling={
        "type": "su", "short_factor": LONGROPE["short_factor"], "long_factor": LONGROPE["long_factor"],
        "original_max_position_embeddings": 1000})
    config_file.write_text(json.dumps(raw))
    model, _ = minift.load(tmp_path / "ref")
    assert model.config.rope_scaling["original_max_position_embeddings"] == 8
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, atol=1e-4, rtol=1e-4)


def test_lora_uses_phi3_names_and_peft_files_work_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    ref = reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    plan = prepare_method("lora", model, {"r": 4, "alpha": 8})  # default q_proj, v_proj -> the fused qkv_proj
    assert {n for n, _ in lora_layers(model)} == {"blocks.0.attn.qkv_proj", "blocks.1.attn.qkv_proj"}
    assert "on qkv_proj" in plan.description
    with pytest.raises(ValueError, match="target 'q_proj' matches no module; this model fuses it into qkv_proj"):
        add_lora(minift.load(tmp_path / "ref")[0], LoRAConfig(targets=["q_proj"]))

    model, _ = minift.load(tmp_path / "ref")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).reshape(-1, V), IDS[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    save_adapter(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)

    # the other way: an adapter PEFT made on transformers' Phi-3 (random, nonzero B) loads into minift
    torch.manual_seed(3)
    base = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "ref").eval()
    trained = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["qkv_proj", "gate_up_proj"])).eval()
    trained.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(minift.load(tmp_path / "ref")[0], tmp_path / "theirs")
    assert isinstance(loaded.blocks[1].mlp.gate_up_proj, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), trained(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_qlora_on_fused_layers_matches_the_dequantized_reference(tmp_path):
    """NF4 under the fused layers, quantized as bitsandbytes quantizes them; after a training step the logits
    equal PEFT's LoRA (our adapter file) over transformers' Phi-3 holding the dequantized weights, and the
    float32 merge that transformers loads."""
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    ref = reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    plan = prepare_method("qlora", model, {"r": 4, "alpha": 8})
    for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = model.blocks[1].get_submodule(name)
        assert isinstance(layer, LoRALinear) and isinstance(layer.base, NF4Linear), name
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes compiles some CPU helpers otherwise
        for theirs, ours in ((ref.model.layers[1].self_attn.qkv_proj, model.blocks[1].attn.qkv_proj),
                             (ref.model.layers[0].mlp.gate_up_proj, model.blocks[0].mlp.gate_up_proj)):
            packed, state = bnb.functional.quantize_4bit(theirs.weight.detach(), blocksize=64,
                                                         compress_statistics=True, quant_type="nf4")
            assert torch.equal(ours.base.weight.packed.reshape(-1), packed.reshape(-1))  # every 4-bit code
            assert torch.equal(ours.base.weight.absmax, state.absmax)  # every 8-bit code of the block scales
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).reshape(-1, V), IDS[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        ours = model(IDS)
        for name, layer in lora_layers(model):  # the reference base: the weights the NF4 codes stand for
            ref.get_submodule(hf.rename(name + ".weight", "phi3", to_hf=True)[:-len(".weight")]).weight.copy_(
                layer.base.dequantize())
        theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
        torch.testing.assert_close(ours, theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
        plan.export(model, None, tmp_path / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(IDS).logits, ours, atol=1e-4, rtol=1e-4)


def test_nf4_directory_round_trip(tmp_path):
    from minift.io.nf4dir import save_quantized
    from minift.quant import quantize_model

    reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    quantize_model(model)
    save_quantized(model, None, tmp_path / "nf4")
    back, _ = minift.load(tmp_path / "nf4")
    assert isinstance(back.blocks[0].attn.qkv_proj, NF4Linear) and back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=0, rtol=0)


BAD_CONFIGS = [  # (extra config.json keys, the start of the one-line error after "config.json: ")
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type = 'dynamic' is not supported for phi3"),
    ({"rope_scaling": {**LONGROPE, "short_factor": [1.0, 2.0]}}, "rope_scaling.short_factor must list 4 positive"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}}, "missing key 'rope_scaling.long_factor'"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor = 1.5 must be in (0, 1]"),
    ({"hidden_act": "relu"}, "hidden_act = 'relu' is not supported for phi3"),
    ({"sliding_window": "4"}, "sliding_window must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_file_and_key(tmp_path, capsys, extra, message):
    raw = {"model_type": "phi3", "vocab_size": V, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **extra}
    assert_bad_config_json_is_one_line(tmp_path / "m", raw, message, capsys)


def test_switches_other_model_types_cannot_write_are_refused():
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=96)
    phi3 = dict(model_type="phi3", fused_qkv=True, fused_gate_up=True, **base)
    assert hf.config_to_hf(ModelConfig(**phi3, partial_rotary_factor=0.5))["partial_rotary_factor"] == 0.5
    cases = [
        (ModelConfig(model_type="llama", fused_qkv=True, **base), "'llama' cannot express fused_qkv=True"),
        (ModelConfig(model_type="phi3", **base), "'phi3' cannot express fused_qkv=False"),
        (ModelConfig(**phi3, qkv_bias=True, out_bias=True), "Phi-3 has none"),
        (ModelConfig(model_type="llama", partial_rotary_factor=0.5, **base), "cannot express partial_rotary_factor"),
        (ModelConfig(model_type="llama", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                       "long_factor": [1.0] * 8,
                                                       "original_max_position_embeddings": 8}, **base),
         "LongRoPE rope_scaling"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            hf.config_to_hf(config)
