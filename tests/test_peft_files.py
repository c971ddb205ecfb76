"""PEFT adapter files: what minift writes, PEFT reads (same logits), and what PEFT writes, minift reads.

Tiny random transformers models are built here, loaded into minift, and given the same adapters. Each round
trip compares outputs in float32 (1e-5). Bad directories must fail with errors that name the file and tensor.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minift
from minift.peft import LoRAConfig, add_lora, load_adapter, lora_layers, save_adapter, save_merged

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 61
IDS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
VARIANTS = {"lora": dict(), "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}


def build(arch, tmp_path, hidden=32, layers=2):
    """Save a tiny random transformers model to tmp_path/arch; return (fresh transformers model, minift model)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=48,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)
        ref = transformers.AutoModelForCausalLM.from_config(config)
    elif arch == "bert":
        config = transformers.BertConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        ref = transformers.BertModel(config)
    else:
        config = transformers.GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
        ref = transformers.AutoModelForCausalLM.from_config(config)
    directory = tmp_path / f"{arch}{hidden}x{layers}"
    ref.save_pretrained(directory)
    model, _ = minift.load(directory)
    fresh = (transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM).from_pretrained(directory)
    return fresh.eval(), model.eval()


def output(peft_model, ids=IDS):
    """Logits of a causal LM, last hidden states of an encoder."""
    out = peft_model(input_ids=ids)
    return out.logits if "logits" in out else out.last_hidden_state


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if "default" in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector["default"].mul_(1.2)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_minift_adapter_loads_in_peft(arch, variant, tmp_path):
    ref, model = build(arch, tmp_path)
    targets = "all-linear" if arch == "llama" else ["q_proj", "v_proj", "o_proj", "down_proj"]
    add_lora(model, LoRAConfig(r=4, alpha=6, targets=targets, **VARIANTS[variant]))
    randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-random")
    with torch.no_grad():
        ours = model(IDS)
    theirs_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(theirs_model), ours, atol=1e-5, rtol=1e-5)
    # PEFT put LoRA on exactly our layers (BERT: "dense" is ambiguous, so full paths were written)
    theirs_layers = {n for n, m in theirs_model.named_modules() if hasattr(m, "lora_A")}
    assert len(theirs_layers) == len(list(lora_layers(model)))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == ("CAUSAL_LM" if arch == "llama" else "FEATURE_EXTRACTION")
    if arch == "llama":
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    else:
        assert "query" in config["target_modules"] and "encoder.layer.1.output.dense" in config["target_modules"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_minift(arch, variant, tmp_path):
    ref, model = build(arch, tmp_path)
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=6, target_modules="all-linear",
                                                          init_lora_weights="gaussian", **VARIANTS[variant]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = output(peft_model.eval())
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default


def test_config_has_every_key_peft_writes_and_only_adapter_tensors(tmp_path):
    ref, model = build("llama", tmp_path)
    peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                             task_type="CAUSAL_LM")).save_pretrained(tmp_path / "theirs")
    add_lora(model, LoRAConfig(r=4, targets=["q_proj"], use_dora=True, init="gaussian"))
    save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    assert {k: ours[k] for k in ("peft_type", "r", "lora_alpha", "use_dora", "target_modules", "init_lora_weights")} \
        == dict(peft_type="LORA", r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj"],
                init_lora_weights="gaussian")
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        ours_names = set(f.keys())
    with safe_open(tmp_path / "theirs" / "adapter_model.safetensors", "pt") as f:
        assert ours_names == set(f.keys())  # same names, adapter tensors only
    assert len(ours_names) == 2 * 3 and all(".lora_" in n for n in ours_names)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]  # no .tmp left


def test_merged_export_loads_in_transformers(tmp_path):
    ref, model = build("llama", tmp_path)
    add_lora(model, LoRAConfig(r=4, targets="all-linear", use_dora=True))
    randomize(model)
    with torch.no_grad():
        adapted = model(IDS)
    save_merged(model, None, tmp_path / "merged")
    assert list(lora_layers(model))  # the model passed in still has its adapters
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_round_trip_through_minift_keeps_trainability(tmp_path):
    _, model = build("llama", tmp_path)
    add_lora(model, LoRAConfig(r=2, targets=["v_proj"], use_rslora=True))
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    _, fresh = build("llama", tmp_path)
    load_adapter(fresh, tmp_path / "adapter", adapter_name="mine", trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.attn.v_proj.lora_{ab}.mine.weight" for i in range(2) for ab in "AB"}


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def saved_adapter(tmp_path, arch="llama", hidden=32, layers=2, r=4):
    _, model = build(arch, tmp_path, hidden=hidden, layers=layers)
    add_lora(model, LoRAConfig(r=r, targets=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / f"adapter_{arch}_{hidden}_{layers}_{r}")


def test_gpt2_is_refused_clearly(tmp_path):
    _, model = build("gpt2", tmp_path)
    add_lora(model, LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="GPT-2 fuses q, k and v into one Conv1D"):
        save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="GPT-2"):
        load_adapter(build("gpt2", tmp_path)[1], saved_adapter(tmp_path))


def test_missing_files(tmp_path):
    _, model = build("llama", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_adapter(model, tmp_path / "nowhere")
    directory = saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing"):
        load_adapter(model, directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_adapter(model, directory)


def test_adapter_of_another_architecture(tmp_path):
    bert_adapter = saved_adapter(tmp_path, arch="bert")
    _, llama = build("llama", tmp_path)
    with pytest.raises(ValueError, match=r"names module 'encoder.layer.0.attention.self.query', which a llama model"):
        load_adapter(llama, bert_adapter)
    deeper = saved_adapter(tmp_path, layers=3)
    with pytest.raises(ValueError, match=r"model.layers.2.self_attn.q_proj: the model has no linear layer"):
        load_adapter(llama, deeper)
    assert not list(lora_layers(llama))  # nothing was changed by the failed loads


def test_rank_and_shape_mismatch(tmp_path):
    _, model = build("llama", tmp_path)
    wider = saved_adapter(tmp_path, hidden=64)
    with pytest.raises(ValueError, match=r"q_proj.lora_A: shape \(4, 64\), but this model's blocks.0.attn.q_proj "
                                         r"\(32 -> 32\) needs \(4, 32\)"):
        load_adapter(model, wider)
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"shape \(4, 32\).*needs \(8, 32\) \(adapter_config.json says r=8\)"):
        load_adapter(model, directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="expected .*lora_magnitude_vector.* \\(use_dora=True"):
        load_adapter(model, directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\] is not supported"):
        load_adapter(model, directory)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)},
              str(directory / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is not a LoRA tensor"):
        load_adapter(model, directory)
    assert not list(lora_layers(model))
