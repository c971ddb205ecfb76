"""The method registry (minift/train/methods.py): one list of names, typed options, each method's own defaults.

What a user meets first is the [method] table, so these tests read it the way `minift finetune` does
(`load_run_config` with a TOML file and `--set` overrides) and check that a bad table fails before any
model is loaded, with an error that names the field and the method it belongs to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from minift.train.methods import METHODS, method_names, parse_method_options
from minift.train.run_config import load_run_config, to_toml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def write_config(tmp_path, method_table: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\ntrain = "tweet-sentiment"\n[method]\n{method_table}\n')
    return path


def test_one_list_of_names_with_a_dataclass_each():
    assert method_names() == list(METHODS)
    assert {"full", "lora", "qlora", "ia3", "adapters", "prompt_tuning", "partial", "output_only",
            "features"} == set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name and dataclasses.is_dataclass(method.options), name
        assert method.summary, name


def test_set_converts_to_the_declared_types(tmp_path):
    path = write_config(tmp_path, 'name = "lora"')
    config = load_run_config(path, ["method.r=16", "method.alpha=32", "method.use_rslora=true",
                                    'method.targets=["q_proj", "k_proj"]', "method.dropout=0"])
    assert config.method.options == {"r": 16, "alpha": 32.0, "use_rslora": True, "targets": ["q_proj", "k_proj"],
                                     "dropout": 0.0}
    assert type(config.method.options["alpha"]) is float
    regex = load_run_config(path, [r"method.targets=blocks\.[01]\..*"])
    assert regex.method.options["targets"] == r"blocks\.[01]\..*"  # a single string stays a regex
    again = tmp_path / "again.toml"
    again.write_text(to_toml(config))
    assert load_run_config(again).method.options == config.method.options  # the run directory's copy reads back


@pytest.mark.parametrize("table, overrides, message", [
    ('name = "lora"\nalpah = 8', [], r"method\.alpah \(did you mean 'alpha'\?\)"),
    ('name = "lora"', ["method.r=eight"], r"--set method\.r=eight: expected int, got 'eight'"),
    ('name = "lora"', ["method.r=0"], r"method 'lora': LoRAConfig\.r must be a positive integer"),
    ('name = "lora"', ["method.blocksize=64"], r"unknown field method\.blocksize"),  # a QLoRA option, not LoRA's
    ('name = "qlora"', ["method.compute_dtype=fp8"], r"method\.compute_dtype = 'fp8'"),
    ('name = "lorra"', [], r"'lorra' is not a known method \(did you mean 'lora'\?\)"),
    ('name = "adapters"', ["method.bottleneck=-1"], r"method 'adapters': AdapterConfig\.bottleneck"),
    ('name = "partial"', [], r"method 'partial': .*frozen_blocks"),
    ('name = "prompt_tuning"', ["method.init=text"], r"init_token_ids"),
    ('name = "full"', ["method.r=4"], r"unknown field method\.r; \[method\] takes no options"),
])
def test_bad_method_tables_fail_when_the_file_is_read(tmp_path, table, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(write_config(tmp_path, table), overrides)


def test_lora_and_qlora_errors_name_their_own_method():
    with pytest.raises(ValueError, match="method 'lora'") as error:
        parse_method_options("lora", {"dropout": 1.5})
    assert "qlora" not in str(error.value)
    assert parse_method_options("lora", {}).targets == ["q_proj", "v_proj"]
    assert parse_method_options("qlora", {}).targets == "all-linear"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bundled_config_has_a_valid_method_table(path):
    config = load_run_config(path)
    assert config.method.name in METHODS
    parse_method_options(config.method.name, config.method.options)
