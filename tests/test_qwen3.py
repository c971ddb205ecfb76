"""Qwen3 in the one Transformer: the q/k RMSNorm per head, its names, its config.json, LoRA and QLoRA on it.

The logits / padding / greedy-generation / save-round-trip parity against transformers runs in
tests/test_model_parity.py (configs "qwen3_gqa_headdim" and "qwen3_tied_bias"); this file checks what is
Qwen3's own: where the norms sit, that they matter, that the file names and config keys survive a round trip,
that PEFT reads a LoRA adapter trained on it, and that a sliding-window config is honoured, not ignored.
"""

import json

import pytest
import torch

import minift
from minift.config import ModelConfig
from minift.io import hf
from minift.peft import LoRAConfig, LoRALinear, add_lora, lora_layers, save_adapter
from minift.quant import NF4Linear
from minift.train.methods import prepare_method
from tests.train_helpers import save_random_reference

transformers = pytest.importorskip("transformers")

V = 97
IDS = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))


def qwen3_config(**overrides):
    """Tiny: hidden 64, 4 query heads of head_dim 24 (not 64 / 4 = 16), 2 key/value heads, untied head."""
    options = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False,
                   rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    return transformers.Qwen3Config(**{**options, **overrides})


def reference(tmp_path, **overrides):
    """A random transformers Qwen3 with random (not all-ones) norm weights, saved as tmp_path / "ref"."""
    torch.manual_seed(0)
    return save_random_reference(transformers.Qwen3ForCausalLM(qwen3_config(**overrides)), tmp_path / "ref",
                                 also_biases=True)


def test_config_and_q_k_norm_weights(tmp_path):
    reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    c = model.config
    assert (c.model_type, c.qk_norm, c.head_dim, c.qkv_bias, c.out_bias, c.tie_embeddings) == \
        ("qwen3", True, 24, False, False, False)
    attn = model.blocks[1].attn
    assert attn.q_proj.weight.shape == (4 * 24, 64) and attn.k_proj.weight.shape == (2 * 24, 64)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (24,)  # one per head width, shared by heads
    assert attn.q_norm.eps == attn.k_norm.eps == 1e-6  # rms_norm_eps, as for the block norms
    assert hf.rename("blocks.1.attn.k_norm.weight", "qwen3", to_hf=True) == "model.layers.1.self_attn.k_norm.weight"
    assert hf.rename("model.layers.0.self_attn.q_norm.weight", "qwen3", to_hf=False) == "blocks.0.attn.q_norm.weight"


def test_logits_depend_on_the_q_k_norms_and_match_transformers(tmp_path):
    """The norms are live: scaling one head-dim coordinate of k_norm changes our logits and theirs identically."""
    ref = reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    with torch.no_grad():
        ours, theirs = model(IDS), ref(IDS).logits
        assert (ours - theirs).abs().max() < 1e-4
        model.blocks[0].attn.k_norm.weight[5] *= 3.0
        ref.model.layers[0].self_attn.k_norm.weight[5] *= 3.0
        changed, theirs_changed = model(IDS), ref(IDS).logits
    assert (changed - ours).abs().max() > 1e-3
    assert (changed - theirs_changed).abs().max() < 1e-4


def test_greedy_generation_equal_and_save_round_trip(tmp_path):
    ref = reference(tmp_path, tie_word_embeddings=True)
    model, _ = minift.load(tmp_path / "ref")
    prompt = IDS[:1, :5]
    ours = model.generate(prompt, max_new_tokens=10)
    theirs = ref.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)

    minift.save(model, None, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    assert (written["head_dim"], written["attention_bias"], written["use_sliding_window"]) == (24, False, False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert isinstance(back, transformers.Qwen3ForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)
    again, _ = minift.load(tmp_path / "ours")  # and minift reads its own directory back
    assert again.config.qk_norm and torch.equal(again.blocks[1].attn.q_norm.weight, model.blocks[1].attn.q_norm.weight)


def test_lora_all_linear_trains_only_adapters_and_peft_loads_the_file(tmp_path):
    peft = pytest.importorskip("peft")
    ref = reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    wrapped = {name for name, _ in lora_layers(model)}
    assert {"blocks.0.attn.q_proj", "blocks.1.attn.o_proj", "blocks.1.mlp.gate_proj"} <= wrapped
    assert not any("norm" in name for name in wrapped)  # q_norm / k_norm are norms, not linear layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(IDS[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), IDS[:, 1:].reshape(-1)).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)  # B starts at zero; after one step the adapter does something
    assert torch.equal(model.blocks[0].attn.q_norm.weight, before["blocks.0.attn.q_norm.weight"])

    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_qlora_forward_backward(tmp_path):
    reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    plan = prepare_method("qlora", model, {"r": 4, "alpha": 8})
    assert plan is not None
    for name in ("attn.q_proj", "attn.k_proj", "attn.o_proj", "mlp.down_proj"):  # 4-bit base under each adapter
        layer = model.blocks[1].get_submodule(name)
        assert isinstance(layer, LoRALinear) and isinstance(layer.base, NF4Linear), name
    assert not isinstance(model.blocks[1].attn.q_norm, NF4Linear)  # norms stay dense
    logits = model(IDS[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), IDS[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def test_sliding_window_config_is_honoured(tmp_path):
    """use_sliding_window = true: the layers layer_types marks (or those from max_window_layers on) attend to the
    last sliding_window positions only, as in transformers, which reads the same edited config.json."""
    reference(tmp_path)
    config_file = tmp_path / "ref" / "config.json"
    raw = json.loads(config_file.read_text())
    for extra in ({"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1, "layer_types": None},
                  {"use_sliding_window": True, "sliding_window": 3,
                   "layer_types": ["full_attention", "sliding_attention"]}):
        config_file.write_text(json.dumps({**raw, **extra}))
        model, _ = minift.load(tmp_path / "ref")
        assert (model.config.sliding_window, model.config.layer_types) == (3, ["full_attention", "sliding_attention"])
        theirs = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "ref").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), theirs(IDS).logits, atol=1e-4, rtol=1e-4)
    # the released checkpoints' setting: window fields present, switched off -> every layer sees everything
    config_file.write_text(json.dumps({**raw, "use_sliding_window": False, "sliding_window": None,
                                       "max_window_layers": 28}))
    assert minift.load(tmp_path / "ref")[0].config.sliding_window is None


def test_head_dim_defaults_as_transformers_does():
    """A Qwen3 config.json without head_dim means 128 (Qwen3Config's default), not hidden_size / heads."""
    raw = qwen3_config().to_dict()
    del raw["head_dim"]
    assert hf.config_from_hf(raw).head_dim == transformers.Qwen3Config(**raw).head_dim == 128
    llama = {**raw, "model_type": "llama"}
    assert hf.config_from_hf(llama).head_dim == 16  # Llama: hidden_size / num_attention_heads


def test_nf4_directory_round_trip(tmp_path):
    """minift quantize's 4-bit directory keeps the q/k norms dense and loads back with the same outputs."""
    from minift.io.nf4dir import save_quantized
    from minift.quant import quantize_model

    reference(tmp_path)
    model, _ = minift.load(tmp_path / "ref")
    quantize_model(model)
    save_quantized(model, None, tmp_path / "nf4")
    back, _ = minift.load(tmp_path / "nf4")
    assert isinstance(back.blocks[0].attn.q_proj, NF4Linear) and back.config.qk_norm
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=0, rtol=0)


def test_qk_norm_only_saves_as_qwen3():
    llama = ModelConfig(model_type="llama", vocab_size=V, dim=32, n_layers=1, n_heads=2, hidden_dim=64, qk_norm=True)
    with pytest.raises(ValueError, match=r"'llama' cannot express qk_norm=True .*llama always has qk_norm=False"):
        hf.config_to_hf(llama)
    qwen3 = ModelConfig(model_type="qwen3", vocab_size=V, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    with pytest.raises(ValueError, match=r"'qwen3' cannot express qk_norm=False .*qwen3 always has qk_norm=True"):
        hf.config_to_hf(qwen3)
