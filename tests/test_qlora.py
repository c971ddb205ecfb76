"""QLoRA (minift/peft/qlora.py): LoRA on a frozen NF4 base, training, merging, export, and the CLI method.

What is checked, on a tiny Llama-style model built here:
  * a few AdamW steps lower the loss; the NF4 base (codes and scales), the embedding and the norms do not
    move and get no gradient; only lora_A / lora_B are trainable, checkpointed and written to adapter files;
  * the outputs equal PEFT's LoRA over bitsandbytes' Linear4bit, reading the adapter files we write;
  * merging into float32 reproduces the adapter model's logits (tolerance 1e-5: float32 rounding of
    W + s B A against W x + s B (A x)), and transformers loads the exported directory with the same logits;
    a bfloat16 export agrees within bf16 rounding (stated below);
  * merging back into 4 bits (re-quantizing W + s B A) changes the logits measurably, by far more than the
    16-bit merge does; a small update is erased outright (every weight rounds back to its old code);
  * `minift finetune` with configs/qlora_tweets_lm.toml runs two steps on a tiny model, checkpoints only the
    adapters, and exports a merged directory whose logits equal the trained QLoRA model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import minift
from minift.config import ModelConfig
from minift.peft import LoRALinear, save_adapter
from minift.peft.qlora import export_merged, merge_qlora, merge_qlora_into_nf4
from minift.quant import NF4Linear
from minift.train.methods import METHODS, parse_method_options, prepare_method
from tests.train_helpers import bitsandbytes_in_float32, save_tiny_decoder
from tests.train_helpers import single_thread  # noqa: F401  (autouse: one torch thread)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "qlora_tweets_lm.toml"
VOCAB = 64


def tiny_model(seed: int = 0) -> minift.Transformer:
    """2 layers, width 64: every weight row is one whole NF4 block of 64."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=128, max_seq_len=64, tie_embeddings=True)
    return minift.Transformer(config)


def batch(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 16), generator=generator)  # (B, T)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def nf4_state(model) -> dict[str, torch.Tensor]:
    """Every stored tensor of every NF4 weight (codes, absmax codes, nested absmax, offset), cloned."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            q = module.weight
            for field in ("packed", "absmax", "nested_absmax", "offset"):
                state[f"{name}.{field}"] = getattr(q, field).clone()
    return state


@pytest.fixture(scope="module")
def trained():
    """A QLoRA model after 25 AdamW steps on one fixed batch, with its losses and the state before training."""
    model = tiny_model()
    plan = prepare_method("qlora", model, {"r": 8, "alpha": 16})
    ids = batch()
    before = {"nf4": nf4_state(model),
              "dense": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = lm_loss(model, ids)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lm_loss(model, ids).backward()  # leave one set of gradients in place for the checks
    return {"model": model, "plan": plan, "ids": ids, "losses": losses, "before": before}


# ------------------------------------------------------------------------------------------ training


def test_loss_goes_down(trained):
    losses = trained["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_base_weights_do_not_move_and_get_no_gradient(trained):
    model, before = trained["model"], trained["before"]
    nf4 = nf4_state(model)
    assert nf4.keys() == before["nf4"].keys() and len(nf4) == 4 * 14  # 7 linear layers per block, 2 blocks
    for key, tensor in before["nf4"].items():
        assert torch.equal(nf4[key], tensor), f"{key} changed"
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, before["dense"][name]), f"{name} moved"
    for module in model.modules():
        if isinstance(module, NF4Linear):
            assert not isinstance(module.weight, torch.nn.Parameter)  # nothing for autograd to attach a grad to
            assert list(module.parameters()) == []  # no bias in this model, and no dense weight


def test_gradient_flows_through_frozen_nf4_layers(trained):
    """Adapters of the *first* block train: the backward passes grad_y @ W through every frozen NF4 layer."""
    model = trained["model"]
    first = model.blocks[0].attn.q_proj
    assert isinstance(first, LoRALinear) and isinstance(first.base, NF4Linear)
    assert first.lora_A["default"].weight.grad.abs().sum() > 0
    assert first.lora_B["default"].weight.abs().sum() > 0  # B started at zero and has moved


def test_only_lora_tensors_are_trainable_checkpointed_and_saved(trained, tmp_path):
    model, plan = trained["model"], trained["plan"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(plan.checkpoint_names) == sorted(trainable)
    assert len(trainable) == 2 * 14 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "QLoRA: 14 linear layers in NF4" in plan.description
    save_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 14 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def test_options_are_checked_before_the_model_changes():
    model = tiny_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"unknown field method\.blocksiz \(did you mean 'blocksize'\?\)"):
        prepare_method("qlora", model, {"blocksiz": 8})
    with pytest.raises(ValueError, match="method.compute_dtype = 'fp8'; expected one of float32, bfloat16, float16"):
        prepare_method("qlora", model, {"compute_dtype": "fp8"})
    with pytest.raises(ValueError, match="method.double_quant: expected bool, got 'maybe'"):
        prepare_method("qlora", model, {"double_quant": "maybe"})
    with pytest.raises(ValueError, match="LoRAConfig.r must be a positive integer"):
        prepare_method("qlora", model, {"r": 0})
    with pytest.raises(ValueError, match="blocksize=48 is not supported"):
        prepare_method("qlora", model, {"blocksize": 48})
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # untouched by a bad config


def test_qlora_and_lora_keep_their_own_defaults():
    lora, qlora = parse_method_options("lora", {}), parse_method_options("qlora", {})
    assert lora.targets == ["q_proj", "v_proj"]  # Hu et al. 2021, section 7.1
    assert qlora.targets == "all-linear"  # Dettmers et al. 2023, section 4


@torch.no_grad()
def test_outputs_equal_peft_lora_over_bitsandbytes_linear4bit(trained, tmp_path):
    """The reference QLoRA stack: transformers model, bitsandbytes Linear4bit (nf4, double quantization)
    quantized from the same weights, PEFT loading *our* adapter files. Same NF4 bytes (bitsandbytes-exact
    quantization) and float32 arithmetic on both sides; 1e-5 allows for a different order of additions."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    model, ids = trained["model"], trained["ids"]
    model.eval()
    minift.save(tiny_model(), None, tmp_path / "base")  # the weights the fixture quantized (same seed)
    save_adapter(model, tmp_path / "adapter")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes compiles some CPU helpers otherwise
        for name, linear in list(reference.named_modules()):
            if isinstance(linear, torch.nn.Linear) and not name.endswith("lm_head"):
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compress_statistics=True, quant_type="nf4", compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, module=layer)
                reference.set_submodule(name, layer.to("cpu"))  # quantized here, on the CPU
        peft_model = bitsandbytes_in_float32(peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval())
        theirs = peft_model(ids).logits
    torch.testing.assert_close(model(ids), theirs, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ merging


@torch.no_grad()
def test_float32_merge_matches_the_adapter_model_and_transformers(trained, tmp_path):
    model, ids = trained["model"], trained["ids"]
    model.eval()
    expected = model(ids)  # (B, T, V) NF4 base + adapters
    export_merged(model, None, tmp_path / "merged", torch.float32)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # export merged a copy
    merged, _ = minift.load(tmp_path / "merged")
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in merged.modules())
    torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=1e-5)

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reference(ids).logits, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bfloat16_merge_agrees_within_bf16_rounding(trained):
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 per weight and activation); through two blocks
    the logits stay within 3% of their largest magnitude, while a wrong merge is off by the whole update."""
    model, ids = trained["model"], trained["ids"]
    model.eval()
    expected = model(ids)  # (B, T, V) float32
    merged = merge_qlora(copy.deepcopy(model), torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    error = (merged(ids).float() - expected).abs().max()
    assert error <= 0.03 * expected.abs().max()


@torch.no_grad()
def test_merging_back_into_nf4_changes_outputs(trained):
    """Re-quantizing W + s B A moves weights across code boundaries: measurable, unlike the 16-bit merge."""
    model, ids = trained["model"], trained["ids"]
    model.eval()
    expected = model(ids)  # (B, T, V)
    dense_error = (merge_qlora(copy.deepcopy(model), torch.float32)(ids) - expected).abs().max()
    requantized = copy.deepcopy(model)
    report = merge_qlora_into_nf4(requantized)
    assert len(report.quantized) == 14 and not any(isinstance(m, LoRALinear) for m in requantized.modules())
    assert all(isinstance(requantized.get_submodule(name), NF4Linear) for name in report.quantized)
    nf4_error = (requantized(ids) - expected).abs().max()
    assert nf4_error > 1e-3 * expected.abs().max()  # measurable
    assert nf4_error > 100 * dense_error  # and far beyond float32 rounding


def code_agreement(before: dict, after: dict) -> float:
    """Share of 4-bit codes that are the same in two nf4_state() snapshots of the same layers."""
    same = total = 0
    for key in (k for k in before if k.endswith(".packed")):
        old = before[key].reshape(-1)  # (n/2,) two codes per byte
        new = after[key.replace(".base.packed", ".packed")].reshape(-1)
        same += ((old >> 4) == (new >> 4)).sum().item() + ((old & 15) == (new & 15)).sum().item()
        total += 2 * old.numel()
    return same / total


@torch.no_grad()
def test_a_small_update_is_erased_by_requantization():
    """10 steps at lr 1e-4 move weights by well under half a code step: every weight rounds back to its old
    code, so the re-quantized model is the *base* model again, not the fine-tuned one."""
    from minift.peft import disabled_adapters

    model = tiny_model(seed=3)
    prepare_method("qlora", model, {"r": 8, "alpha": 16})
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(10):
        with torch.enable_grad():
            lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    tuned = model(ids)  # (B, T, V)
    with disabled_adapters(model):
        base = model(ids)
    assert (tuned - base).abs().max() > 1e-3  # the adapters did change the model
    before = nf4_state(model)
    requantized = copy.deepcopy(model)
    merge_qlora_into_nf4(requantized)
    assert code_agreement(before, nf4_state(requantized)) > 0.99
    outputs = requantized(ids)
    assert (outputs - base).abs().max() < 0.5 * (outputs - tuned).abs().max()  # closer to base than to tuned


# ------------------------------------------------------------------------------------------ CLI


def test_qlora_is_a_trainer_method():
    assert "qlora" in METHODS, "register qlora in minift/train/methods.py (METHODS['qlora'])"


def test_finetune_command_with_the_qlora_config(tmp_path, capsys):
    from minift.cli import main
    from minift.train import load_trained

    model_dir = save_tiny_decoder(tmp_path / "tiny")
    out = tmp_path / "run"
    sets = [f"model.source={model_dir}", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4",
            "train.eval_every=2", "train.save_every=2", "data.max_examples=16", "data.max_eval_examples=8",
            "data.max_length=32", "train.progress_bar=false", "train.device=cpu", "method.r=4",
            "method.export_dtype=float32"]
    assert main(["finetune", str(CONFIG), *[x for s in sets for x in ("--set", s)]]) == 0
    assert "QLoRA:" in capsys.readouterr().out

    checkpoint = out / "checkpoints" / "step-000002" / "weights.safetensors"
    with safe_open(checkpoint, "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)

    trained_model, tokenizer, _, _ = load_trained(out)  # rebuilt from config.toml + the adapter checkpoint
    exported, _ = minift.load(out / "final")
    ids = torch.tensor([tokenizer.encode("the big cat sat on the blue mat")])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), trained_model.backbone(ids), atol=1e-5, rtol=1e-5)
