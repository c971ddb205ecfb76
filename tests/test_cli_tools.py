"""`minift quantize | merge | export` (minift/export.py, minift/io/nf4dir.py) on tiny models built here.

Round trips are checked against the reference libraries: a 4-bit directory holds the bytes transformers +
bitsandbytes write for the same weights and loads there with the same logits; a merged or exported
directory loads in transformers.AutoModelForCausalLM (or AutoModel for BERT) with the adapter model's
outputs, and a PEFT adapter exported from a run loads in peft with the run's outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minift
from minift.cli import main
from minift.peft import LoRAConfig, add_lora, load_adapter, save_adapter
from minift.quant import NF4Linear, quantize_model
from minift.io.nf4dir import load_quantized
from minift.train import load_trained
from tests.train_helpers import (SENTENCES, SENTIMENT, bitsandbytes_in_float32, save_tiny_decoder, save_tiny_encoder,
                                 write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

TOOLS = ["quantize", "merge", "export"]
TEXT = "the big cat sat on the blue mat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny decoder and encoder directory, and a LoRA adapter (B != 0) for the decoder in PEFT's format."""
    root = tmp_path_factory.mktemp("tools")
    decoder, encoder = save_tiny_decoder(root / "decoder"), save_tiny_encoder(root / "encoder")
    model, tokenizer = minift.load(decoder)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 would make the merge a no-op
    save_adapter(model, root / "adapter", base_model_name_or_path=str(decoder))
    return {"decoder": decoder, "encoder": encoder, "adapter": root / "adapter", "lora_model": model,
            "ids": torch.tensor([tokenizer.encode(TEXT)])}


def run(*args) -> int:
    return main([str(a) for a in args])


@torch.no_grad()
def hf_logits(directory, ids, **kwargs) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()(ids).logits


@pytest.mark.parametrize("name", TOOLS)
def test_help_shows_an_example_of_the_command(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "example" in help_text and f"minift {name} --" in help_text.split("example")[-1]


# ----------------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_quantize_writes_what_bitsandbytes_writes_and_reads_back_exactly(tiny, tmp_path, capsys):
    # 64 wide: every weight row is whole NF4 blocks. bitsandbytes 0.50's CPU dequantize (its AVX-512 C++ branch)
    # mislocates block scales when a row is shorter than a block, so a 32-wide model cannot be its reference.
    source, out, ids = save_tiny_decoder(tmp_path / "dense", dim=64), tmp_path / "nf4", tiny["ids"]
    assert run("quantize", "--model", source, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 linear layers" in printed and "weight error" in printed and "NF4 vs dense" in printed

    expected, _ = minift.load(source)  # the same quantization in memory
    quantize_model(expected)
    model, tokenizer = minift.load(out)  # minift.load sees the quantization_config and keeps the 4-bit bytes
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14 and tokenizer is not None
    for name, layer in layers.items():
        assert torch.equal(layer.weight.packed, expected.get_submodule(name).weight.packed)
    assert torch.equal(model(ids), expected(ids))

    # The reference: transformers quantizes the dense directory with bitsandbytes and saves it.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes compiles some CPU helpers otherwise
        reference = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config,
                                                                      device_map="cpu")
        reference = bitsandbytes_in_float32(reference.eval())
        reference.save_pretrained(tmp_path / "bnb")
        theirs, ours = load_file(tmp_path / "bnb" / "model.safetensors"), load_file(out / "model.safetensors")
        assert sorted(theirs) == sorted(ours)
        for key, tensor in theirs.items():
            assert tensor.dtype == ours[key].dtype and tensor.shape == ours[key].shape, key
            if key.endswith(".absmax"):  # 8-bit codes of the scales: bitsandbytes' CPU rounding may be one off
                assert (tensor.int() - ours[key].int()).abs().max() <= 1, key  # (REFERENCE.md, double quant)
            else:  # packed 4-bit codes, nested scales, code tables, quant_state JSON, dense tensors
                assert torch.equal(tensor, ours[key]), key
        their_config = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
        our_config = json.loads((out / "config.json").read_text())["quantization_config"]
        for key in ("quant_method", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
            assert our_config[key] == their_config[key], key
        # minift reads transformers' directory with the outputs of their model (their nested scale codes may be
        # one step off ours, so the reference is their model, not ours) ...
        from_bnb, _ = minift.load(tmp_path / "bnb")
        torch.testing.assert_close(from_bnb(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)
        # ... and transformers + bitsandbytes read ours with our logits.
        theirs_of_ours = bitsandbytes_in_float32(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
        torch.testing.assert_close(theirs_of_ours.eval()(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_quantize_options_and_generate_from_the_4bit_directory(tiny, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert run("quantize", "--model", tiny["decoder"], "--out", out, "--block-size", "128", "--no-double-quant") == 0
    model, _ = load_quantized(out)
    weight = model.blocks[0].attn.q_proj.weight
    assert weight.blocksize == 128 and not weight.double_quant and weight.absmax.dtype == torch.float32
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings["bnb_4bit_use_double_quant"] is False and settings["llm_int8_skip_modules"] == ["lm_head"]
    capsys.readouterr()
    assert run("generate", "--model", out, "--prompt", "the big", "--max-new-tokens", "4") == 0
    assert capsys.readouterr().out.strip()


def test_quantize_an_encoder_round_trips(tiny, tmp_path):
    out = tmp_path / "nf4"
    assert run("quantize", "--model", tiny["encoder"], "--out", out) == 0
    expected, tokenizer = minift.load(tiny["encoder"])
    quantize_model(expected)
    model, _ = load_quantized(out)
    ids = torch.tensor([tokenizer.encode(SENTIMENT[0]["text"])])
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))


# ----------------------------------------------------------------------------------------------------
# merge, and export --model
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_merge_matches_the_adapter_model_in_transformers_and_peft(tiny, tmp_path, capsys):
    out, ids = tmp_path / "merged", tiny["ids"]
    assert run("merge", "--model", tiny["decoder"], "--adapter", tiny["adapter"], "--out", out) == 0
    assert "read back vs before: max |output difference|" in capsys.readouterr().out
    ours = tiny["lora_model"](ids)
    assert (hf_logits(tiny["decoder"], ids) - ours).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["decoder"])
    theirs = peft.PeftModel.from_pretrained(base, tiny["adapter"]).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # export --model --adapter is the same operation, and --dtype bfloat16 writes bf16 weights
    assert run("export", "--model", tiny["decoder"], "--adapter", tiny["adapter"], "--out", tmp_path / "e") == 0
    merged, exported = load_file(out / "model.safetensors"), load_file(tmp_path / "e" / "model.safetensors")
    assert merged.keys() == exported.keys() and all(torch.equal(merged[k], exported[k]) for k in merged)
    assert run("merge", "--model", tiny["decoder"], "--adapter", tiny["adapter"], "--out", tmp_path / "bf16",
               "--dtype", "bfloat16") == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


@torch.no_grad()
def test_merge_into_a_4bit_base_dequantizes_and_matches(tiny, tmp_path):
    ids = tiny["ids"]
    assert run("quantize", "--model", tiny["decoder"], "--out", tmp_path / "nf4") == 0
    assert run("merge", "--model", tmp_path / "nf4", "--adapter", tiny["adapter"], "--out", tmp_path / "m") == 0
    qlora, _ = load_quantized(tmp_path / "nf4")
    load_adapter(qlora, tiny["adapter"])  # LoRA over NF4Linear: the QLoRA model
    torch.testing.assert_close(hf_logits(tmp_path / "m", ids), qlora(ids), atol=1e-5, rtol=1e-5)
    # export --model on a 4-bit directory alone: the dequantized model
    assert run("export", "--model", tmp_path / "nf4", "--out", tmp_path / "deq") == 0
    quantized, _ = load_quantized(tmp_path / "nf4")
    torch.testing.assert_close(hf_logits(tmp_path / "deq", ids), quantized(ids), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# export --run
# ----------------------------------------------------------------------------------------------------


def finetune_run(tmp_path: Path, model: Path, method: list[str], task: str = "causal_lm") -> Path:
    """Two optimizer steps of a tiny run; returns its directory."""
    if task == "classification":
        data = write_jsonl(tmp_path / "data.jsonl", SENTIMENT)
    else:
        data = write_jsonl(tmp_path / "data.jsonl", [{"text": s} for s in SENTENCES])
    out = tmp_path / "run"
    sets = [f"model.source={model}", f"data.train={data}", f"task.kind={task}", f"train.output_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "train.lr=5e-2", "data.validation_fraction=0",
            "train.device=cpu", *method]
    config = tmp_path / "run.toml"
    config.write_text("[train]\nprogress_bar = false\n")  # the rest comes from --set
    assert main(["finetune", str(config), *[x for s in sets for x in ("--set", s)]]) == 0
    return out


def test_export_a_lora_run_as_merged_model_and_as_peft_adapter(tiny, tmp_path, capsys):
    run_dir = finetune_run(tmp_path, tiny["decoder"], ["method.name=lora", "method.r=4"])
    trained, ids = load_trained(run_dir)[0].backbone.requires_grad_(False), tiny["ids"]
    base, _ = minift.load(tiny["decoder"])
    with torch.no_grad():
        assert (base(ids) - trained(ids)).abs().max() > 1e-3  # two steps moved the adapter away from B = 0
    assert run("export", "--run", run_dir, "--out", tmp_path / "hf") == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), trained(ids), atol=1e-5, rtol=1e-5)
    assert run("export", "--run", run_dir, "--out", tmp_path / "adapter", "--format", "peft") == 0
    assert "read back vs the run: max |output difference| 0 " in capsys.readouterr().out
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["decoder"])
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
    torch.testing.assert_close(theirs, trained(ids), atol=1e-5, rtol=1e-5)


def test_export_a_qlora_run_merges_into_float32(tiny, tmp_path):
    run_dir = finetune_run(tmp_path, tiny["decoder"], ["method.name=qlora", "method.r=4",
                                                       "method.export_dtype=float32"])
    trained = load_trained(run_dir)[0].backbone.requires_grad_(False)
    assert run("export", "--run", run_dir, "--out", tmp_path / "hf") == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tiny["ids"]), trained(tiny["ids"]), atol=1e-5, rtol=1e-5)


def test_export_an_encoder_classifier_run_keeps_its_head(tiny, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run_dir = finetune_run(tmp_path, tiny["encoder"], ["method.name=lora", "method.r=4", "method.targets=all-linear"],
                           task="classification")
    out = tmp_path / "hf"
    assert run("export", "--run", run_dir, "--out", out) == 0
    assert (out / "task.json").is_file() and (out / "head.safetensors").is_file()
    trained, tokenizer = load_trained(run_dir)[:2]
    ids = torch.tensor([tokenizer.encode(SENTIMENT[0]["text"])])
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(out).eval()(ids).last_hidden_state
        torch.testing.assert_close(hidden, trained.backbone(ids), atol=1e-5, rtol=1e-5)
    data = write_jsonl(tmp_path / "eval.jsonl", SENTIMENT)
    capsys.readouterr()
    assert run("eval", "--model", out, "--data", data) == 0
    from_export = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert run("eval", "--run", run_dir, "--data", data) == 0
    from_run = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert from_export["eval_loss"] == pytest.approx(from_run["eval_loss"], abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr that says what is wrong
# ----------------------------------------------------------------------------------------------------


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error:"), err
    return err[0]


def test_bad_input_exits_2_with_a_clear_message(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("merge", "--model", tiny["decoder"], "--adapter", tmp_path / "missing", "--out", out) == 2
    assert "missing: not a directory (expected a PEFT adapter directory" in error_of(capsys)
    assert run("merge", "--model", tiny["encoder"], "--adapter", tiny["adapter"], "--out", out) == 2
    assert "different architecture" in error_of(capsys)
    assert run("merge", "--model", tiny["decoder"], "--adapter", tiny["adapter"], "--out", tiny["adapter"]) == 2
    assert "is also an input" in error_of(capsys)
    assert run("export", "--run", tmp_path / "no_run", "--out", out) == 2
    assert "no_run: not a directory" in error_of(capsys)
    assert run("export", "--model", tiny["decoder"], "--out", out, "--format", "peft") == 2
    assert "--format peft exports the LoRA adapter of a fine-tuning run" in error_of(capsys)
    assert run("export", "--run", tmp_path, "--adapter", tiny["adapter"], "--out", out) == 2
    assert "--adapter goes with --model" in error_of(capsys)
    assert not out.exists()

    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: one line too (cli.OneLineParser)
        run("export", "--model", tiny["decoder"], "--out", out, "--format", "onnx")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("minift: error: export: argument --format: invalid choice: 'onnx'")


def test_bad_4bit_input_is_refused(tiny, tmp_path, capsys):
    nf4 = tmp_path / "nf4"
    assert run("quantize", "--model", tiny["decoder"], "--out", nf4) == 0
    capsys.readouterr()
    assert run("quantize", "--model", nf4, "--out", tmp_path / "again") == 2
    assert "already quantized" in error_of(capsys)
    config = json.loads((nf4 / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (nf4 / "config.json").write_text(json.dumps(config))
    assert run("generate", "--model", nf4, "--prompt", "the") == 2
    assert "bnb_4bit_quant_type = 'fp4'; minift reads NF4 only" in error_of(capsys)


def test_a_bottleneck_adapter_run_cannot_become_a_hugging_face_model(tiny, tmp_path, capsys):
    run_dir = finetune_run(tmp_path, tiny["decoder"], ["method.name=adapters", "method.bottleneck=4"])
    capsys.readouterr()
    assert run("export", "--run", run_dir, "--out", tmp_path / "hf") == 2
    assert "no Hugging Face equivalent" in error_of(capsys)
    assert run("export", "--run", run_dir, "--out", tmp_path / "hf", "--format", "peft") == 2
    assert "has no LoRA or (IA)^3 adapter" in error_of(capsys)
