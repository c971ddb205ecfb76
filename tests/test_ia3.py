"""(IA)^3 (minift/peft/ia3.py) against the real PEFT library, on tiny random transformers models built here.

Both directions of the file format (our save_adapter -> peft.PeftModel.from_pretrained; PEFT's save_pretrained ->
our load_adapter), outputs and gradients equal to PEFT's with the same vectors, merging, the ones-init and
disabled states giving the base model, and only the vectors training. float32 tolerances: 1e-5 (the same
products in a different order); the measured maximum differences are printed with -s.
"""

import json

import pytest
import torch
from safetensors import safe_open

import minift
from minift.adapter_interface import adapter_parameter_names, disabled_adapters, merge_adapters
from minift.peft import IA3Config, IA3Linear, LoRAConfig, add_ia3, add_lora, load_adapter, save_adapter
from minift.peft.ia3 import ia3_layers, remove_ia3
from tests.test_peft_files import IDS, build, output  # the tiny transformers models LoRA's parity tests use

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# The same layers in each library's names. Llama: PEFT's own default for the architecture (the paper's k, v, ff).
# BERT: keys, values and the FFN output layer; "dense" is ambiguous in Hugging Face BERT, so full paths.
TARGETS = {
    "llama": (dict(targets=["k_proj", "v_proj", "down_proj"], feedforward_targets=["down_proj"]),
              dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "bert": (dict(targets=["k_proj", "v_proj", "down_proj"], feedforward_targets=["down_proj"]),
             dict(target_modules=["key", "value"] + [f"encoder.layer.{i}.output.dense" for i in range(2)],
                  feedforward_modules=[f"encoder.layer.{i}.output.dense" for i in range(2)])),
}


def randomize(vectors, seed=1):
    """Vectors away from ones (1 + 0.3 N(0, 1)) so that every scaling matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vectors:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def report(label, ours, theirs):
    diff = (ours - theirs).abs().max().item()
    print(f"{label}: max |difference| {diff:.3g}")
    return diff


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_our_files_load_in_peft_with_equal_outputs_and_gradients(arch, tmp_path):
    ref, model = build(arch, tmp_path)
    ours_targets, _ = TARGETS[arch]
    add_ia3(model, IA3Config(**ours_targets))
    randomize([layer.ia3_l for layer in ia3_layers(model).values()])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-random")
    theirs_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter", is_trainable=True).eval()
    theirs_layers = {n: m for n, m in theirs_model.named_modules() if hasattr(m, "ia3_l")}
    assert len(theirs_layers) == len(ia3_layers(model)) == 6
    assert sum(m.is_feedforward for m in theirs_layers.values()) == 2  # down_proj scales its input there too
    ours, theirs = model(IDS), output(theirs_model)
    report(f"IA3 {arch} ours -> PEFT, outputs", ours, theirs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    mine = sorted((name, layer.ia3_l.grad) for name, layer in ia3_layers(model).items())
    their = [m.ia3_l["default"].grad.flatten() for m in theirs_layers.values()]
    assert len(mine) == len(their)
    grads = torch.cat([g for _, g in mine]), torch.cat([g for g in their])
    # the same layers in the same order (sorted minift names follow the HF order block by block)
    report(f"IA3 {arch} ours -> PEFT, vector gradients", *grads)
    torch.testing.assert_close(*grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_files_load_in_minift_with_equal_outputs(arch, tmp_path):
    ref, model = build(arch, tmp_path)
    # BERT: PEFT's defaults for the architecture (key, value, "output.dense" = both attention and FFN output
    # layers, scaling their inputs); Llama: k, v, down_proj.
    config = peft.IA3Config() if arch == "bert" else peft.IA3Config(**TARGETS[arch][1])
    peft_model = peft.get_peft_model(ref, config)
    randomize([p for n, p in peft_model.named_parameters() if "ia3_l" in n], seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = output(peft_model.eval())
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        ours = model(IDS)
    report(f"IA3 {arch} PEFT -> ours, outputs", ours, theirs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    expected = 8 if arch == "bert" else 6  # BERT's default also takes attention.output.dense (o_proj)
    assert len(ia3_layers(model)) == expected
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default
    if arch == "bert":
        assert {n.rsplit(".", 1)[-1] for n, layer in ia3_layers(model).items() if layer.feedforward} == \
            {"o_proj", "down_proj"}


def test_config_keys_and_tensor_names_match_peft(tmp_path):
    ref, model = build("llama", tmp_path)
    peft.get_peft_model(ref, peft.IA3Config(**TARGETS["llama"][1], task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "theirs")
    add_ia3(model, IA3Config(**TARGETS["llama"][0]))
    save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for key in ("peft_type", "task_type", "init_ia3_weights", "fan_in_fan_out"):
        assert ours[key] == theirs[key]
    for key in ("target_modules", "feedforward_modules"):  # PEFT writes a set: same entries, any order
        assert sorted(ours[key]) == sorted(theirs[key])
    tensors = {}
    for side in ("ours", "theirs"):
        with safe_open(tmp_path / side / "adapter_model.safetensors", "pt") as f:
            tensors[side] = {name: tuple(f.get_tensor(name).shape) for name in f.keys()}
    assert tensors["ours"] == tensors["theirs"]  # same names and (out, 1) / (1, in) shapes
    assert ("base_model.model.model.layers.0.mlp.down_proj.ia3_l", (1, 48)) in tensors["ours"].items()


def test_ones_is_the_base_model_and_disabled_gives_the_base(tmp_path):
    _, model = build("llama", tmp_path)
    with torch.no_grad():
        base = model(IDS)
        add_ia3(model)  # the paper's targets, vectors at ones
        assert torch.equal(model(IDS), base)
        randomize([layer.ia3_l for layer in ia3_layers(model).values()])
        adapted = model(IDS)
        assert (adapted - base).abs().max() > 1e-2
        with disabled_adapters(model):
            assert torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), adapted)
        remove_ia3(model)
        assert torch.equal(model(IDS), base) and not ia3_layers(model)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merge_equals_unmerged_and_saves_as_a_plain_model(arch, tmp_path):
    _, model = build(arch, tmp_path)
    names = set(model.state_dict())
    add_ia3(model, IA3Config(targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                             feedforward_targets=["o_proj", "down_proj"]))  # both kinds, with biases on BERT
    randomize([layer.ia3_l for layer in ia3_layers(model).values()])
    with torch.no_grad():
        adapted = model(IDS)
        merge_adapters(model)
        merged = model(IDS)
    report(f"IA3 {arch} merged vs unmerged", merged, adapted)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not ia3_layers(model) and set(model.state_dict()) == names
    minift.save(model, None, tmp_path / "merged")  # a plain model again: transformers reads it
    back = (transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM).from_pretrained(
        tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(back), adapted, atol=1e-5, rtol=1e-5)


def test_only_the_vectors_train(tmp_path):
    _, model = build("llama", tmp_path)
    count = add_ia3(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_parameter_names(model) == {
        f"blocks.{i}.{part}.ia3_l" for i in range(2) for part in ("attn.k_proj", "attn.v_proj", "mlp.down_proj")}
    assert count.trainable == 2 * (16 + 16 + 48)  # d_kv = 2 heads x 8, d_ff = 48
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(IDS).logsumexp(-1).mean().backward()
        optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_errors_are_clear_and_change_nothing(tmp_path):
    _, model = build("llama", tmp_path)
    with pytest.raises(ValueError, match="not in targets"):
        IA3Config(targets=["k_proj"], feedforward_targets=["down_proj"])
    with pytest.raises(ValueError, match="IA3 target 'nope' matches no module"):
        add_ia3(model, IA3Config(targets=["nope"], feedforward_targets=[]))
    add_lora(model, LoRAConfig(r=2, targets=["k_proj"]))
    with pytest.raises(ValueError, match="already is a lora adapter layer"):
        add_ia3(model)
    assert not ia3_layers(model)
    _, other = build("llama", tmp_path / "other")
    add_ia3(other)
    save_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already is an ia3 adapter layer"):
        add_ia3(other)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["feedforward_modules"] = []
    config_file.write_text(json.dumps(config))
    _, fresh = build("llama", tmp_path / "fresh")
    with pytest.raises(ValueError, match="feedforward_modules"):
        load_adapter(fresh, tmp_path / "adapter")
    assert not ia3_layers(fresh) and all(isinstance(m, torch.nn.Linear) for n, m in fresh.named_modules()
                                         if n.endswith("_proj"))
    assert not any(isinstance(m, IA3Linear) for m in fresh.modules())
