"""LoRALinear and add_lora: invariants on minift models, then ours vs PEFT on tiny random transformers models.

Invariants need no reference library: B = 0 is the base model, merge/unmerge is the identity, the merged
model computes what the adapter computed, frozen weights never move, adapters switch and disable.
Parity builds a tiny random transformers Llama / BERT, loads it into minift, puts the *same* non-zero A, B
(and DoRA magnitude) into minift and into peft.get_peft_model, and compares outputs and gradients (float32).
"""

import math

import pytest
import torch
import torch.nn as nn

import minift
from minift.peft import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    count_parameters,
    disabled_adapters,
    lora_layers,
    merge_lora,
    set_adapter,
)
from minift.peft.files import hf_module_path

V = 61
VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


def tiny_model(tie=False, seed=0) -> minift.Transformer:
    torch.manual_seed(seed)
    config = minift.ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                qkv_bias=True, out_bias=True, tie_embeddings=tie)
    return minift.Transformer(config).eval()


def randomize_adapters(model, name="default", seed=1):
    """Non-zero B (and a magnitude away from ||W||) so that an adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name not in layer.lora_A:
                continue
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if name in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[name]
                m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))


IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------------


def test_names_kept_base_frozen_and_report():
    model = tiny_model()
    before = dict(model.state_dict())
    count = add_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    state = model.state_dict()
    for name, tensor in before.items():  # every base tensor keeps its name, and is the very same storage
        assert state[name].data_ptr() == tensor.data_ptr()
    assert "blocks.1.attn.q_proj.lora_A.default.weight" in state
    assert state["blocks.1.mlp.down_proj.lora_B.default.weight"].shape == (32, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{m}.lora_{ab}.default.weight" for i in range(2)
                         for m in ("attn.q_proj", "mlp.down_proj") for ab in "AB"}
    expected = 2 * (4 * (32 + 32) + 4 * (48 + 32))
    assert (count.trainable, count.total) == (expected, sum(t.numel() for t in before.values()) + expected)
    assert "trainable params: 1,152" in str(count)


@pytest.mark.parametrize("variant", [*VARIANTS, "gaussian"])
def test_zero_B_is_the_base_model(variant):
    model = tiny_model()
    with torch.no_grad():
        reference = model(IDS)
    options = dict(init="gaussian") if variant == "gaussian" else VARIANTS[variant]
    add_lora(model, LoRAConfig(r=4, targets="all-linear", **options))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference, atol=1e-6, rtol=1e-6)


def test_init_and_scaling_rules():
    layer = LoRALinear(nn.Linear(400, 300))
    layer.add_adapter("kaiming", r=16, alpha=32)
    layer.add_adapter("gaussian", r=16, alpha=32, use_rslora=True, init="gaussian")
    A = layer.lora_A["kaiming"].weight
    assert A.abs().max() <= 1 / math.sqrt(400) and A.abs().max() > 0.9 / math.sqrt(400)  # kaiming, a=sqrt(5)
    assert abs(layer.lora_A["gaussian"].weight.std().item() - 1 / 16) < 0.005  # std 1/r
    assert layer.scaling == {"kaiming": 2.0, "gaussian": 8.0}  # alpha/r, alpha/sqrt(r)
    assert not layer.lora_B["kaiming"].weight.any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_and_merged_model(variant, tmp_path):
    model = tiny_model()
    add_lora(model, LoRAConfig(r=4, targets="all-linear", **VARIANTS[variant]))
    randomize_adapters(model)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    with torch.no_grad():
        adapted = model(IDS)
        for _, layer in lora_layers(model):
            layer.merge()
        torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)
        assert any(not torch.equal(layer.weight, weights[n]) for n, layer in lora_layers(model))
        for _, layer in lora_layers(model):
            layer.unmerge()
        for name, layer in lora_layers(model):
            torch.testing.assert_close(layer.weight, weights[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(IDS), adapted, atol=1e-6, rtol=1e-6)

    merge_lora(model)
    assert not list(lora_layers(model))
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)
    minift.save(model, None, tmp_path)  # a merged model is a plain model: minift.save accepts it
    back, _ = minift.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_base_weights_do_not_move_while_adapters_train(variant):
    model = tiny_model().train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, LoRAConfig(r=4, targets="all-linear", dropout=0.1, **VARIANTS[variant]))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params, on purpose
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
        else:
            assert not torch.equal(p, adapters[name]), name


def test_adapter_switching_and_disabling():
    model = tiny_model()
    with torch.no_grad():
        reference = model(IDS)
    add_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj"], adapter_name="first"))
    add_lora(model, LoRAConfig(r=2, targets="all-linear", adapter_name="second", use_dora=True))
    randomize_adapters(model, "first", seed=1)
    randomize_adapters(model, "second", seed=2)
    with torch.no_grad():
        second = model(IDS)  # add_lora activates what it adds
        set_adapter(model, "first")
        first = model(IDS)
        with disabled_adapters(model):
            torch.testing.assert_close(model(IDS), reference, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(IDS), first)
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(first, reference, atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".first." in n for n in trainable)
    # only the q/v layers have "first": the others run as their base layer
    assert model.blocks[0].mlp.up_proj.active == [] and model.blocks[0].attn.q_proj.active == ["first"]
    # a merged model still gives base outputs under disabled_adapters (layers unmerge first), like PEFT
    for _, layer in lora_layers(model):
        layer.merge()
    with torch.no_grad(), disabled_adapters(model):
        torch.testing.assert_close(model(IDS), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        set_adapter(model, "third")


def test_wraps_a_non_linear_base_module():
    """A quantized base (NF4Linear-like: in/out features, forward, dequantize) is kept as the child `base`."""

    class RoundedLinear(nn.Module):  # stands in for NF4Linear: stores a lossy weight, dequantizes on use
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("codes", torch.round(linear.weight.detach() * 64).to(torch.int8))
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

        def dequantize(self):
            return self.codes.float() / 64

        def forward(self, x):
            return nn.functional.linear(x, self.dequantize(), self.bias)

    torch.manual_seed(0)
    plain = nn.Linear(24, 16)
    quantized = RoundedLinear(plain)
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantize())
    for use_dora in (False, True):
        ours, reference = LoRALinear(quantized), LoRALinear(plain)
        for layer in (ours, reference):
            layer.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
            layer.set_adapter("default")
        with torch.no_grad():
            ours.lora_B["default"].weight.normal_()
            for part in ("lora_A", "lora_B"):
                getattr(reference, part)["default"].weight.copy_(getattr(ours, part)["default"].weight)
        x = torch.randn(3, 5, 24)
        torch.testing.assert_close(ours(x), reference(x))
        assert "base.codes" in ours.state_dict() and "weight" not in ours.state_dict()
        with pytest.raises(ValueError, match="use minift.peft.merge_lora"):
            ours.merge()
        merged = ours.merged_linear()
        assert type(merged) is nn.Linear
        torch.testing.assert_close(merged(x), reference(x), atol=1e-5, rtol=1e-5)


def test_bad_targets_and_configs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"target 'query' matches no module.*q_proj"):
        add_lora(model, LoRAConfig(targets=["q_proj", "query"]))
    with pytest.raises(ValueError, match=r"'attn' matches 'blocks.0.attn', a Attention, not a linear layer"):
        add_lora(model, LoRAConfig(targets=["attn"]))
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(model, LoRAConfig(targets=r"blocks\.9\..*"))
    assert not list(lora_layers(model))  # failed calls changed nothing
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(init="xavier"), dict(targets=[]),
                dict(targets="(unclosed"), dict(adapter_name="a.b")):
        with pytest.raises(ValueError, match="LoRAConfig"):
            LoRAConfig(**bad)
    add_lora(model, LoRAConfig(targets=r"blocks\.0\.attn\.(q|k)_proj"))  # regex: whole-name match
    assert [n for n, _ in lora_layers(model)] == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj"]
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_lora(model, LoRAConfig(targets=["q_proj"]))


def test_all_linear_skips_lm_head_and_tied_head_is_not_merged():
    model = tiny_model(tie=True)
    add_lora(model, LoRAConfig(targets="all-linear"))
    assert "lm_head" not in dict(lora_layers(model)) and len(list(lora_layers(model))) == 14
    model = tiny_model(tie=True)
    add_lora(model, LoRAConfig(targets=["lm_head"]))
    assert model.lm_head.weight is model.embed.weight  # the tie survives wrapping
    with pytest.raises(ValueError, match=r"lm_head: its weight is shared with \['embed.weight'\]"):
        merge_lora(model)


# ----------------------------------------------------------------------------------------------------
# Parity with PEFT
# ----------------------------------------------------------------------------------------------------


def reference_pair(arch, tmp_path):
    """A tiny random transformers model and the same weights loaded into minift."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          attention_bias=True)
        ref = transformers.AutoModelForCausalLM.from_config(config)
    else:
        config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        ref = transformers.BertModel(config, add_pooling_layer=False)
    ref.save_pretrained(tmp_path / "ref")
    model, _ = minift.load(tmp_path / "ref")
    return ref.eval(), model


def peft_output(peft_model, arch, ids):
    out = peft_model(input_ids=ids)
    return out.logits if arch == "llama" else out.last_hidden_state


def share_adapters(model, peft_model, seed=1):
    """Random non-zero A, B, m into minift; the same tensors into PEFT's matching layers."""
    randomize_adapters(model, seed=seed)
    pairs = []
    with torch.no_grad():
        for name, layer in lora_layers(model):
            theirs = peft_model.base_model.model.get_submodule(hf_module_path(name, model.config.model_type))
            for part in ("lora_A", "lora_B"):
                getattr(theirs, part)["default"].weight.copy_(getattr(layer, part)["default"].weight)
                pairs.append((getattr(layer, part)["default"].weight, getattr(theirs, part)["default"].weight))
            if "default" in layer.lora_magnitude_vector:
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"])
                pairs.append((layer.lora_magnitude_vector["default"], theirs.lora_magnitude_vector["default"].weight))
    return pairs


PEFT_TARGETS = {  # the same layers in each library's names
    "llama": ("all-linear", "all-linear"),
    "bert": (["q_proj", "v_proj", "o_proj", "up_proj"],
             ["query", "value", "attention.output.dense", "intermediate.dense"]),
}


# float32: outputs to 1e-5; gradients to 5e-5 + 1e-4 relative, because the libraries add the same products in a
# different order (minift accumulates scaling * h B^T into the base output with one addmm). float64 shows that
# the math itself is identical. Why 5e-5 absolute: a gradient element here is a sum of hundreds of products that
# can cancel. Worst case measured (rsLoRA, Llama, lora_A of blocks.0 v_proj, element (3, 19)): 288 products whose
# absolute values sum to 59.3 add up to -0.0933, so one float32 unit roundoff (6e-8) at that scale is 3.5e-6, and
# the upstream gradient already carries float32 error (up to 1e-5 at the v_proj output, against float64). Ours vs
# PEFT there: 2.4e-5 with torch's AVX-512 kernels, 1.9e-5 with ATEN_CPU_CAPABILITY=avx2; merely swapping the two
# sequences of the batch moves minift's own value by 1.1e-5 (and its gradients by up to 4.6e-5 elsewhere). Over all
# variants the worst float32 difference uses 40% of this tolerance; the batch swap alone used 55% of the old 1e-5.
TOLERANCES = {torch.float32: dict(atol=5e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_and_gradients_match_peft(arch, variant, tmp_path):
    peft = pytest.importorskip("peft")
    ref, model = reference_pair(arch, tmp_path)
    ours_targets, their_targets = PEFT_TARGETS[arch]
    options = VARIANTS[variant]
    add_lora(model, LoRAConfig(r=4, alpha=6, targets=ours_targets, **options))
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=6, target_modules=their_targets, **options))
    share_adapters(model, peft_model)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    for dtype, tolerance in TOLERANCES.items():
        model.to(dtype)
        peft_model.to(dtype)
        pairs = share_adapters(model, peft_model)  # the same values again, now in this dtype
        assert len(pairs) == sum(p.numel() > 0 for p in peft_model.parameters() if p.requires_grad)  # same layers
        ours, theirs = model(ids), peft_output(peft_model, arch, ids)
        torch.testing.assert_close(ours, theirs, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)
        weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        for mine, their in pairs:
            assert mine.grad is not None and mine.grad.abs().sum() > 0
            torch.testing.assert_close(mine.grad, their.grad, **tolerance)
            mine.grad = their.grad = None


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_mode_with_lora_dropout_matches_peft(variant, tmp_path):
    """Same seed, same dropout masks: DoRA's dropout branch (base output recomputed on dropped x) included."""
    peft = pytest.importorskip("peft")
    ref, model = reference_pair("llama", tmp_path)
    add_lora(model, LoRAConfig(r=4, alpha=6, dropout=0.3, targets="all-linear", **VARIANTS[variant]))
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.3,
                                                          target_modules="all-linear", **VARIANTS[variant]))
    pairs = share_adapters(model, peft_model)
    model.train()
    peft_model.train()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    ours = model(ids)
    torch.manual_seed(7)
    theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_parameter_count_smollm2_shape_matches_peft(use_dora):
    """Full SmolLM2-135M shape (30 layers), built on the meta device: shapes only, no memory, no time."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = minift.ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                tie_embeddings=True)
    hf_config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = minift.Transformer(config)
        ours = add_lora(model, LoRAConfig(r=8, targets="all-linear", use_dora=use_dora))
        ref = transformers.AutoModelForCausalLM.from_config(hf_config)
        peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total)
    per_layer = 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert ours.trainable == 30 * (per_layer + (576 + 192 * 2 + 576 + 1536 * 2 + 576 if use_dora else 0))
    assert count_parameters(model).trainable == ours.trainable


def test_qlora_on_minift_nf4_linear():
    """LoRA over minift.quant's NF4Linear equals LoRA over an nn.Linear holding the dequantized weight."""
    from minift.quant import quantize_model

    model = tiny_model()
    quantize_model(model)
    dense = tiny_model()
    with torch.no_grad():  # the dense twin gets exactly the weights the NF4 model computes with
        for name, module in model.named_modules():
            if hasattr(module, "dequantize"):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    for m in (model, dense):
        count = add_lora(m, LoRAConfig(r=4, targets="all-linear", use_dora=True))
        randomize_adapters(m)
    assert count_parameters(model) == count_parameters(dense) == count  # NF4 weights count with their shape
    with torch.no_grad():
        expected = dense(IDS)
        torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
    assert "blocks.0.attn.q_proj.base.weight.absmax" in model.state_dict()
    model.train()
    model(IDS).sum().backward()
    assert model.blocks[0].attn.q_proj.lora_A["default"].weight.grad is not None
    merge_lora(model)  # dequantize + merge into float32 layers, never back into 4 bits
    assert type(model.blocks[0].mlp.up_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
