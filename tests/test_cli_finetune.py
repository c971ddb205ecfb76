"""`minift finetune` and `minift eval`, the TOML configs and `--set` overrides (minift/train/run_config.py).

Every example config in configs/ runs here for two steps with a tiny model swapped in via --set (the
bundled 135M model's checkpoints would be 1.6 GB each); tests/test_train.py trains the bundled model itself.
"""

import json
from pathlib import Path

import pytest
import torch

import minift
from minift.cli import main
from minift.losses import token_loss_sum
from minift.train.run_config import RunConfig, apply_override, from_dict, load_run_config, to_toml
from minift.train import read_metrics
from tests.train_helpers import (COMMON_WORDS, SENTENCES, SENTIMENT, save_tiny_decoder, save_tiny_encoder,
                                 write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

# The preference and RL configs ({reward,dpo,ppo,grpo}_tweets.toml) need a reward model or pairs from another
# run first; tests/test_align_engine.py runs them in that order.
ALIGN_CONFIGS = ("reward_tweets", "dpo_tweets", "ppo_tweets", "grpo_tweets")
CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.toml")
                 if p.stem not in ALIGN_CONFIGS)
# Settings that must shrink with the 2-block test model (the configs are written for the real ones).
TINY_MODEL_OVERRIDES = {"partial": ["method.frozen_blocks=1"]}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    words = [COMMON_WORDS]  # the bundled corpora are real English: keep most of their words known
    return {"decoder": save_tiny_decoder(root / "decoder", words), "encoder": save_tiny_encoder(root / "encoder", words)}


def finetune(*args) -> int:
    return main(["finetune", *[str(a) for a in args]])


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_runs(config_path, tiny_models, tmp_path, capsys):
    config = load_run_config(config_path)
    model = tiny_models["decoder" if config.task.kind == "causal_lm" else "encoder"]
    out = tmp_path / "run"
    sets = [f"model.source={model}", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4",
            "train.grad_accum_steps=1", "train.eval_every=2", "train.save_every=1", "data.max_examples=16",
            "data.max_eval_examples=8", "data.max_length=64", "train.progress_bar=false", "train.device=cpu",
            *TINY_MODEL_OVERRIDES.get(config.method.name, [])]
    assert finetune(config_path, *[x for s in sets for x in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert f"task {config.task.kind}" in printed and "done: step 2" in printed
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2] and any("eval_loss" in r for r in metrics)
    assert (out / "final" / "task.json").is_file() and (out / "checkpoints" / "step-000002").is_dir()
    saved = load_run_config(out / "config.toml")  # the resolved config, written into the run
    assert saved.train.max_steps == 2 and saved.model.source == str(model)
    if config.method.name in ("lora", "ia3"):  # the export is a PEFT adapter directory, adapter tensors only
        assert (out / "final" / "adapter_config.json").is_file()


def test_every_method_has_an_example_config():
    from minift.train.methods import METHODS

    covered = {load_run_config(path).method.name for path in CONFIGS}
    assert set(METHODS) <= covered, f"no example config in configs/ for {sorted(set(METHODS) - covered)}"


def test_finetune_resume_and_eval_from_the_command_line(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    config = tmp_path / "cls.toml"
    config.write_text(f"""
[model]
source = "{tiny_models['encoder']}"
[task]
kind = "classification"
[data]
train = "sentiment.jsonl"
validation = "sentiment.jsonl"
[train]
output_dir = "{tmp_path / 'run'}"
max_steps = 20
batch_size = 8
lr = 1e-2
save_every = 10
progress_bar = false
""")
    assert finetune(config, "--set", "train.max_steps=10") == 0  # stop early at step 10 ...
    assert finetune("--resume", tmp_path / "run") == 0  # ... the saved config (max_steps 10) is done: no-op
    assert finetune(config, "--resume", tmp_path / "run") == 0  # the TOML says 20: continue to 20
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 21))

    assert main(["eval", "--model", str(tmp_path / "run" / "final"), "--data", str(data)]) == 0
    from_final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["eval", "--run", str(tmp_path / "run"), "--data", str(data)]) == 0
    from_run = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert from_final == from_run and from_final["eval_accuracy"] == 1.0 and from_final["eval_targets"] == 8


def test_eval_perplexity_of_a_text_file(tiny_models, tmp_path, capsys):
    text = " ".join(SENTENCES[:3])
    (tmp_path / "notes.txt").write_text(text)
    model, tokenizer = minift.load(tiny_models["decoder"])
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model(ids), ids)
    assert main(["eval", "--model", str(tiny_models["decoder"]), "--text", str(tmp_path / "notes.txt"),
                 "--max-length", "64", "--stride", "32"]) == 0
    one_window = json.loads(capsys.readouterr().out)
    assert one_window["eval_targets"] == n == ids.size(1) - 1
    assert one_window["eval_loss"] == pytest.approx(float(loss_sum) / n, rel=1e-5)
    assert main(["eval", "--model", str(tiny_models["decoder"]), "--text", str(tmp_path / "notes.txt"),
                 "--max-length", "8", "--stride", "4"]) == 0
    windows = json.loads(capsys.readouterr().out)
    assert windows["eval_targets"] == n and windows["eval_loss"] != one_window["eval_loss"]  # less context


def test_cli_errors_are_one_line(tiny_models, tmp_path, capsys):
    assert finetune() == 2
    assert "needs a CONFIG.toml, or --resume RUN_DIR" in capsys.readouterr().err
    assert finetune(tmp_path / "nope.toml") == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err
    assert finetune(CONFIGS[0], "--set", "train.lr=fast") == 2
    assert "--set train.lr=fast: expected float, got 'fast'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_models["encoder"]), "--text", str(tmp_path / "x.txt")]) == 2


# ----------------------------------------------------------------------------------------------------
# TOML and --set
# ----------------------------------------------------------------------------------------------------


def test_overrides_convert_types_and_name_unknown_keys():
    config = RunConfig()
    for item in ["train.lr=3e-4", "train.max_steps=100", "train.gradient_checkpointing=yes", "train.max_grad_norm=none",
                 "task.labels=neg,pos", 'task.labels=["a", "b", "c"]', "method.name=lora", "method.r=16",
                 'method.targets=["q_proj", "v_proj"]', "data.max_examples=none"]:
        apply_override(config, item)
    assert config.train.lr == 3e-4 and config.train.max_steps == 100 and config.train.gradient_checkpointing is True
    assert config.train.max_grad_norm is None and config.task.labels == ["a", "b", "c"]
    assert config.method.name == "lora" and config.method.options == {"r": 16, "targets": ["q_proj", "v_proj"]}
    with pytest.raises(ValueError, match=r"unknown field train\.learning_rate.*\[train\] has output_dir"):
        apply_override(config, "train.learning_rate=1")
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        apply_override(config, "train.batchsize=1")
    with pytest.raises(ValueError, match="unknown section 'trian' \\(did you mean 'train'\\?\\)"):
        apply_override(config, "trian.lr=1")
    with pytest.raises(ValueError, match="expected int or none, got '1.5'"):
        apply_override(config, "train.max_steps=1.5")
    with pytest.raises(ValueError, match="expected bool"):
        apply_override(config, "train.progress_bar=maybe")
    with pytest.raises(ValueError, match="expected section.field=value"):
        apply_override(config, "train.lr")


def test_toml_paths_tables_and_round_trip(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.toml"
    path.write_text('[data]\ntrain = "data/x.jsonl"\n[model]\nsource = "smollm2-135m"\n'
                    '[method]\nname = "lora"\nr = 4\n[train]\nlr = 1e-3\nmax_grad_norm = 0.5\n')
    config = load_run_config(path, ["train.seed=7", f"train.output_dir={tmp_path / 'out'}"])
    assert config.data.train == str(tmp_path / "sub" / "data" / "x.jsonl")  # relative to the TOML file
    assert config.model.source == "smollm2-135m" and config.train.seed == 7 and config.method.options == {"r": 4}
    again = tmp_path / "again.toml"
    again.write_text(to_toml(config))
    assert load_run_config(again) == config

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = \n")
    with pytest.raises(ValueError, match="bad.toml: invalid TOML"):
        load_run_config(bad)
    with pytest.raises(ValueError, match=r"x.toml: unknown table \[optim\]"):
        from_dict({"optim": {"lr": 1}}, where="x.toml")
    with pytest.raises(ValueError, match=r"x.toml: train.batch_size: expected int, got 'eight'"):
        from_dict({"train": {"batch_size": "eight"}}, where="x.toml")
