"""Corrupt, truncated and mistyped files get one line naming the file (and the key or tensor), never a traceback.

The table below is the whole test: each case names an artifact (a tiny valid one, built once for the module), a
file inside it, how that file is broken, and the words the error must contain. Every case runs twice:

    api   the public entry point: minift.load, load_adapter, setup(..., resume=True), load_task_model
          -> a ValueError or FileNotFoundError whose message is one line naming the file's full path
    cli   minift.cli.main([...]) in-process -> exit 2 and exactly one stderr line, "minift: error: ...",
          naming the file

Artifacts: a Hugging Face model directory (one file, and the same weights in two shards with an index), a 4-bit
directory, the four adapter kinds (LoRA and IA3 in PEFT's format, bottleneck, soft prompt), a 2-step run's
checkpoint, and a classifier written with its task.json and head.safetensors.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minift
from minift.cli import main
from minift.io.nf4dir import save_quantized
from minift.peft import IA3Config, LoRAConfig, add_ia3, add_lora, load_adapter, save_adapter
from minift.peft.bottleneck import AdapterConfig, add_adapters
from minift.peft.prompt_tuning import add_prompt_tuning
from minift.quant import quantize_model
from minift.train import fit, setup
from minift.train.tasks import build_task_model, load_task_model, save_head
from tests.train_helpers import SENTENCES, SENTIMENT, run_config, save_tiny_decoder, save_tiny_encoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

RUN_SETTINGS = ("train.max_steps=2", "train.save_every=2")
CHECKPOINT = "checkpoints/step-000002"
Q_PROJ = "model.layers.0.self_attn.q_proj"
LORA_A = f"base_model.model.{Q_PROJ}.lora_A.weight"
IA3_K = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


# ----------------------------------------------------------------------------------------------------
# The valid artifacts
# ----------------------------------------------------------------------------------------------------


def write_shards(source: Path, directory: Path) -> None:
    """The model of `source` with its tensors split over two shard files and an index."""
    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"model-0000{number}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, directory / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid")
    model_dir = save_tiny_decoder(root / "model")
    write_shards(model_dir, root / "shards")
    out = {"model": model_dir, "shards": root / "shards"}

    model, tokenizer = minift.load(model_dir)
    quantize_model(model)
    out["nf4"] = save_quantized(model, tokenizer, root / "nf4")

    adapters = {
        "lora": lambda m: add_lora(m, LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"])),
        "ia3": lambda m: add_ia3(m, IA3Config()),
        "bottleneck": lambda m: add_adapters(m, AdapterConfig(bottleneck=4)),
        "prompt": lambda m: add_prompt_tuning(m, 3, init="random"),
    }
    for kind, add in adapters.items():
        model, _ = minift.load(model_dir)
        add(model)
        out[kind] = save_adapter(model, root / kind)

    out["data"] = write_jsonl(root / "text.jsonl", [{"text": s} for s in SENTENCES])
    fit(setup(run_config(model_dir, out["data"], root / "run", *RUN_SETTINGS)))
    out["run"] = root / "run"

    task_dir = save_tiny_encoder(root / "task")
    backbone, _ = minift.load(task_dir)
    torch.manual_seed(0)
    save_head(build_task_model(backbone, "classification", num_labels=2), task_dir, ["negative", "positive"])
    out["task"] = task_dir
    out["labelled"] = write_jsonl(root / "labelled.jsonl", SENTIMENT)
    return out


# ----------------------------------------------------------------------------------------------------
# Ways to break a file
# ----------------------------------------------------------------------------------------------------


def truncate(fraction: float):
    def corrupt(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return corrupt


def keep_bytes(n: int):
    return lambda path: path.write_bytes(path.read_bytes()[:n])


def overwrite(data: bytes):
    return lambda path: path.write_bytes(data)


def overwrite_tail(path: Path) -> None:
    """Keep the header, replace the last byte range with fewer bytes of garbage (a partial download)."""
    data = path.read_bytes()
    path.write_bytes(data[:-16] + b"\x00" * 8)


def bad_header(path: Path) -> None:
    """A header length that fits the file, followed by text that is not JSON."""
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\x00" * 64)


def edit_tensors(change):
    """Rewrite a safetensors file after change(tensors) (metadata kept)."""
    def corrupt(path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=metadata)
    return corrupt


def retype(name: str, dtype: torch.dtype = torch.int64):
    def change(tensors):
        tensors[name] = tensors[name].to(dtype)
    return edit_tensors(change)


def replace_tensor(name: str, value: torch.Tensor):
    def change(tensors):
        tensors[name] = value
    return edit_tensors(change)


def drop_tensor(name: str):
    return edit_tensors(lambda tensors: tensors.pop(name))


DELETE = object()


def set_json(path_in_json: str, value):
    """Set (or with DELETE, remove) a key of a JSON file; "a.b" reaches into nested objects."""
    def corrupt(path: Path) -> None:
        data = json.loads(path.read_text())
        *parents, key = path_in_json.split(".")
        holder = data
        for parent in parents:
            holder = holder[parent]
        if value is DELETE:
            del holder[key]
        else:
            holder[key] = value
        path.write_text(json.dumps(data))
    return corrupt


def set_shard(value):
    """Point the first tensor of the index at another file name."""
    def corrupt(path: Path) -> None:
        index = json.loads(path.read_text())
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = value
        path.write_text(json.dumps(index))
    return corrupt


def set_metadata(key: str, value: str):
    def corrupt(path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        save_file(load_file(path), path, metadata={**metadata, key: value})
    return corrupt


# ----------------------------------------------------------------------------------------------------
# The table: (artifact, file inside it, corruption, words the error names besides the file's path)
# ----------------------------------------------------------------------------------------------------

SHARD_1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
QUANT_STATE = f"{Q_PROJ}.weight.quant_state.bitsandbytes__nf4"
BROKEN = "truncated or corrupt"

CASES = {
    # Hugging Face model directory, one file
    "model/truncated": ("model", "model.safetensors", truncate(0.5), [BROKEN]),
    "model/empty": ("model", "model.safetensors", truncate(0.0), [BROKEN]),
    "model/7-bytes": ("model", "model.safetensors", keep_bytes(7), [BROKEN]),
    "model/short-data": ("model", "model.safetensors", overwrite_tail, [BROKEN]),
    "model/garbage": ("model", "model.safetensors", overwrite(b"this is not a safetensors file" * 10), [BROKEN]),
    "model/binary-garbage": ("model", "model.safetensors", overwrite(bytes(range(256)) * 4), [BROKEN]),
    "model/header-not-json": ("model", "model.safetensors", bad_header, [BROKEN]),
    "model/int-embedding": ("model", "model.safetensors", retype("model.embed_tokens.weight"),
                            ["'model.embed_tokens.weight'", "int64", "floating point"]),
    "model/bool-norm": ("model", "model.safetensors", retype("model.norm.weight", torch.bool),
                        ["'model.norm.weight'", "bool"]),
    "model/int32-proj": ("model", "model.safetensors", retype(f"{Q_PROJ}.weight", torch.int32),
                         [f"'{Q_PROJ}.weight'", "int32"]),
    "config/hidden_size-string": ("model", "config.json", set_json("hidden_size", "32"), ["hidden_size", "'32'"]),
    "config/layers-list": ("model", "config.json", set_json("num_hidden_layers", [2]), ["num_hidden_layers"]),
    "config/layers-bool": ("model", "config.json", set_json("num_hidden_layers", True), ["num_hidden_layers"]),
    "config/hidden_size-zero": ("model", "config.json", set_json("hidden_size", 0), ["hidden_size", "positive"]),
    "config/heads-negative": ("model", "config.json", set_json("num_attention_heads", -4),
                              ["num_attention_heads", "positive"]),
    "config/vocab-float": ("model", "config.json", set_json("vocab_size", 52.5), ["vocab_size", "integer"]),
    "config/vocab-missing": ("model", "config.json", set_json("vocab_size", DELETE), ["missing key 'vocab_size'"]),
    "config/vocab-null": ("model", "config.json", set_json("vocab_size", None), ["vocab_size"]),
    "config/intermediate-object": ("model", "config.json", set_json("intermediate_size", {"a": 1}),
                                   ["intermediate_size"]),
    "config/eps-string": ("model", "config.json", set_json("rms_norm_eps", "1e-6"), ["rms_norm_eps"]),
    "config/eps-negative": ("model", "config.json", set_json("rms_norm_eps", -1e-6), ["rms_norm_eps"]),
    "config/theta-zero": ("model", "config.json", set_json("rope_theta", 0), ["rope_theta"]),
    "config/tie-string": ("model", "config.json", set_json("tie_word_embeddings", "yes"), ["tie_word_embeddings"]),
    "config/eos-string": ("model", "config.json", set_json("eos_token_id", "1"), ["eos_token_id"]),
    "config/model_type-list": ("model", "config.json", set_json("model_type", ["llama"]), ["model_type"]),
    "config/model_type-missing": ("model", "config.json", set_json("model_type", DELETE), ["model_type"]),
    "config/kv-heads-not-a-divisor": ("model", "config.json", set_json("num_key_value_heads", 3), ["multiple"]),
    "config/kv-heads-string": ("model", "config.json", set_json("num_key_value_heads", "2"),
                               ["num_key_value_heads"]),
    "config/rope-parameters-list": ("model", "config.json", set_json("rope_parameters", [1]), ["rope_parameters"]),
    "config/rope-scaling-factor-string": ("model", "config.json",
                                          set_json("rope_scaling", {"rope_type": "linear", "factor": "2"}),
                                          ["rope_scaling.factor"]),
    "config/rope-scaling-unknown-type": ("model", "config.json", set_json("rope_scaling", {"rope_type": "yarn"}),
                                         ["'yarn'"]),
    "config/rope-scaling-llama3-bands": ("model", "config.json", set_json("rope_scaling", {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
        ["high_freq_factor"]),
    "config/not-an-object": ("model", "config.json", overwrite(b"[1, 2]"), ["expected a JSON object"]),
    "config/not-utf8": ("model", "config.json", overwrite(b'{"model_type": "\xff"}'), ["invalid JSON"]),
    "tokenizer/not-json": ("model", "tokenizer.json", overwrite(b"{not json"), ["tokenizer.json"]),
    "tokenizer/empty": ("model", "tokenizer.json", truncate(0.0), ["tokenizer.json"]),
    "tokenizer/config-not-utf8": ("model", "tokenizer_config.json", overwrite(b'{"eos_token": "\xff"}'),
                                  ["invalid JSON"]),
    # the same weights in two shards
    "shards/truncated": ("shards", SHARD_1, truncate(0.5), [BROKEN]),
    "shards/garbage": ("shards", SHARD_1, overwrite(b"\x00" * 3), [BROKEN]),
    "shards/int-weight": ("shards", SHARD_1, retype("model.embed_tokens.weight"), ["'model.embed_tokens.weight'"]),
    "shards/tensor-not-in-shard": ("shards", SHARD_1, drop_tensor("model.embed_tokens.weight"),
                                   ["'model.embed_tokens.weight'", INDEX]),
    "index/parent-path": ("shards", INDEX, set_shard("../../etc/x.safetensors"), ["'../../etc/x.safetensors'",
                                                                                  "outside"]),
    "index/inner-parent-path": ("shards", INDEX, set_shard("sub/../../x.safetensors"), ["outside"]),
    "index/absolute-path": ("shards", INDEX, set_shard("/etc/passwd"), ["'/etc/passwd'", "outside"]),
    "index/windows-drive": ("shards", INDEX, set_shard("C:\\x.safetensors"), ["outside"]),
    "index/number": ("shards", INDEX, set_shard(7), ["weight_map"]),
    "index/empty-name": ("shards", INDEX, set_shard(""), ["weight_map"]),
    "index/missing-shard": ("shards", INDEX, set_shard("model-00003-of-00002.safetensors"),
                            ["missing"]),
    # a 4-bit directory (its packed weights are uint8 by design: the untouched directory loads)
    "nf4/truncated": ("nf4", "model.safetensors", truncate(0.5), [BROKEN]),
    "nf4/garbage": ("nf4", "model.safetensors", overwrite(b"garbage"), [BROKEN]),
    "nf4/int-dense-weight": ("nf4", "model.safetensors", retype("model.norm.weight"), ["'model.norm.weight'"]),
    "nf4/quant-state-not-json": ("nf4", "model.safetensors",
                                 replace_tensor(QUANT_STATE, torch.tensor(list(b"{not json"), dtype=torch.uint8)),
                                 [Q_PROJ]),
    "nf4/quant-state-list": ("nf4", "model.safetensors",
                             replace_tensor(QUANT_STATE, torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
                             [Q_PROJ]),
    "nf4/quant-state-floats": ("nf4", "model.safetensors",
                               replace_tensor(QUANT_STATE, torch.tensor([0.5, 1.5])), [Q_PROJ]),
    "nf4/packed-as-float": ("nf4", "model.safetensors", retype(f"{Q_PROJ}.weight", torch.float32), [Q_PROJ]),
    "nf4/packed-cut": ("nf4", "model.safetensors",
                       replace_tensor(f"{Q_PROJ}.weight", torch.zeros(10, 1, dtype=torch.uint8)), [Q_PROJ]),
    "nf4/absmax-float64": ("nf4", "model.safetensors", retype(f"{Q_PROJ}.weight.absmax", torch.float64), [Q_PROJ]),
    "nf4/quant-map-missing": ("nf4", "model.safetensors", drop_tensor(f"{Q_PROJ}.weight.quant_map"), [Q_PROJ]),
    "nf4/load_in_4bit-string": ("nf4", "config.json", set_json("quantization_config.load_in_4bit", "yes"),
                                ["quantization_config.load_in_4bit"]),
    "nf4/double-quant-number": ("nf4", "config.json", set_json("quantization_config.bnb_4bit_use_double_quant", 1),
                                ["quantization_config.bnb_4bit_use_double_quant"]),
    "nf4/skip-modules-string": ("nf4", "config.json", set_json("quantization_config.llm_int8_skip_modules", 5),
                                ["quantization_config.llm_int8_skip_modules"]),
    "nf4/config-list": ("nf4", "config.json", set_json("quantization_config", ["nf4"]), ["quantization_config"]),
    "nf4/hidden_size-string": ("nf4", "config.json", set_json("hidden_size", "32"), ["hidden_size"]),
    # LoRA in PEFT's format
    "lora/truncated": ("lora", "adapter_model.safetensors", truncate(0.5), [BROKEN]),
    "lora/empty": ("lora", "adapter_model.safetensors", truncate(0.0), [BROKEN]),
    "lora/garbage": ("lora", "adapter_model.safetensors", overwrite(b"PK\x03\x04 a zip file?"), [BROKEN]),
    "lora/int-tensor": ("lora", "adapter_model.safetensors", retype(LORA_A), [f"'{LORA_A}'", "int64"]),
    "lora/r-string": ("lora", "adapter_config.json", set_json("r", "8"), ["r must be"]),
    "lora/r-zero": ("lora", "adapter_config.json", set_json("r", 0), ["r must be"]),
    "lora/r-float": ("lora", "adapter_config.json", set_json("r", 2.5), ["r must be"]),
    "lora/r-missing": ("lora", "adapter_config.json", set_json("r", DELETE), ["missing key 'r'"]),
    "lora/alpha-list": ("lora", "adapter_config.json", set_json("lora_alpha", [4]), ["lora_alpha"]),
    "lora/alpha-negative": ("lora", "adapter_config.json", set_json("lora_alpha", -4), ["lora_alpha"]),
    "lora/targets-number": ("lora", "adapter_config.json", set_json("target_modules", 3), ["target_modules"]),
    "lora/targets-mixed": ("lora", "adapter_config.json", set_json("target_modules", ["q_proj", 1]),
                           ["target_modules"]),
    "lora/dropout-above-one": ("lora", "adapter_config.json", set_json("lora_dropout", 1.5), ["lora_dropout"]),
    "lora/dora-string": ("lora", "adapter_config.json", set_json("use_dora", "false"), ["use_dora"]),
    "lora/peft-type-list": ("lora", "adapter_config.json", set_json("peft_type", ["LORA"]), ["peft_type"]),
    # (IA)^3 in PEFT's format
    "ia3/truncated": ("ia3", "adapter_model.safetensors", truncate(0.5), [BROKEN]),
    "ia3/int-tensor": ("ia3", "adapter_model.safetensors", retype(IA3_K), [f"'{IA3_K}'"]),
    "ia3/feedforward-number": ("ia3", "adapter_config.json", set_json("feedforward_modules", 2),
                               ["feedforward_modules"]),
    "ia3/targets-object": ("ia3", "adapter_config.json", set_json("target_modules", {"k_proj": 1}),
                           ["target_modules"]),
    # bottleneck adapters (minift's format)
    "bottleneck/truncated": ("bottleneck", "adapter_model.safetensors", truncate(0.5), [BROKEN]),
    "bottleneck/garbage": ("bottleneck", "adapter_model.safetensors", bad_header, [BROKEN]),
    "bottleneck/int-tensor": ("bottleneck", "adapter_model.safetensors", retype("blocks.0.attn_adapter.down.weight"),
                              ["'blocks.0.attn_adapter.down.weight'"]),
    "bottleneck/size-string": ("bottleneck", "adapter_config.json", set_json("bottleneck", "4"), ["bottleneck"]),
    "bottleneck/size-zero": ("bottleneck", "adapter_config.json", set_json("bottleneck", 0), ["bottleneck"]),
    "bottleneck/unknown-key": ("bottleneck", "adapter_config.json", set_json("rank", 4), ["'rank'"]),
    "bottleneck/norms-string": ("bottleneck", "adapter_config.json", set_json("train_norms", "yes"), ["train_norms"]),
    "bottleneck/init-string": ("bottleneck", "adapter_config.json", set_json("init_std", "0.01"), ["init_std"]),
    "bottleneck/placement-unknown": ("bottleneck", "adapter_config.json", set_json("placement", "everywhere"),
                                     ["placement"]),
    # soft prompt
    "prompt/truncated": ("prompt", "soft_prompt.safetensors", truncate(0.5), [BROKEN]),
    "prompt/garbage": ("prompt", "soft_prompt.safetensors", overwrite(b"\xff" * 100), [BROKEN]),
    "prompt/int-tensor": ("prompt", "soft_prompt.safetensors", retype("soft_prompt.weight"), ["'soft_prompt.weight'"]),
    "prompt/metadata": ("prompt", "soft_prompt.safetensors", set_metadata("keep_virtual_outputs", "maybe"),
                        ["keep_virtual_outputs"]),
    # a run's checkpoint
    "checkpoint/weights-truncated": ("run", f"{CHECKPOINT}/weights.safetensors", truncate(0.5), [BROKEN]),
    "checkpoint/weights-int": ("run", f"{CHECKPOINT}/weights.safetensors", retype("backbone.embed.weight"),
                               ["'backbone.embed.weight'"]),
    "checkpoint/optimizer-truncated": ("run", f"{CHECKPOINT}/optimizer.safetensors", truncate(0.9), [BROKEN]),
    "checkpoint/optimizer-garbage": ("run", f"{CHECKPOINT}/optimizer.safetensors", overwrite(b"{}"), [BROKEN]),
    "checkpoint/optimizer-int": ("run", f"{CHECKPOINT}/optimizer.safetensors",
                                 retype("backbone.embed.weight/exp_avg"), ["'backbone.embed.weight/exp_avg'"]),
    "checkpoint/rng-truncated": ("run", f"{CHECKPOINT}/rng.safetensors", truncate(0.5), [BROKEN]),
    "checkpoint/rng-missing-tensor": ("run", f"{CHECKPOINT}/rng.safetensors", drop_tensor("torch_cpu"),
                                      ["'torch_cpu'"]),
    "checkpoint/rng-float": ("run", f"{CHECKPOINT}/rng.safetensors", retype("torch_cpu", torch.float32),
                             ["random generator"]),
    "checkpoint/rng-short-keys": ("run", f"{CHECKPOINT}/rng.safetensors",
                                  replace_tensor("numpy_keys", torch.zeros(3, dtype=torch.int64)), ["random generator"]),
    "checkpoint/optimizer-key-without-slash": ("run", f"{CHECKPOINT}/optimizer.safetensors",
                                               replace_tensor("exp_avg", torch.zeros(2)), ["'exp_avg'"]),
    "checkpoint/optimizer-wrong-size": ("run", f"{CHECKPOINT}/optimizer.safetensors",
                                        replace_tensor("backbone.embed.weight/step", torch.zeros(2, 2)),
                                        ["'backbone.embed.weight/step'", "shape"]),
    "checkpoint/optimizer-moment-shape": ("run", f"{CHECKPOINT}/optimizer.safetensors",
                                          replace_tensor("backbone.embed.weight/exp_avg", torch.zeros(3, 32)),
                                          ["'backbone.embed.weight/exp_avg'", "shape"]),
    "checkpoint/state-param-group-number": ("run", f"{CHECKPOINT}/state.json", set_json("optimizer.param_groups", [5]),
                                            ["optimizer.param_groups[0]"]),
    "checkpoint/state-scalar-unknown": ("run", f"{CHECKPOINT}/state.json", set_json("optimizer.scalars", {"x/y": 1}),
                                        ["'x/y'"]),
    "checkpoint/state-loop-unknown-key": ("run", f"{CHECKPOINT}/state.json", set_json("loop.epochs_done", 1),
                                          ["loop"]),
    "checkpoint/state-loop-step-string": ("run", f"{CHECKPOINT}/state.json", set_json("loop.step", "2"), ["loop"]),
    "checkpoint/state-scheduler-list": ("run", f"{CHECKPOINT}/state.json", set_json("scheduler", [1]), ["scheduler"]),
    "checkpoint/state-step-string": ("run", f"{CHECKPOINT}/state.json", set_json("step", "2"), ["step"]),
    "checkpoint/state-no-optimizer": ("run", f"{CHECKPOINT}/state.json", set_json("optimizer", DELETE),
                                      ["'optimizer'"]),
    "checkpoint/state-rng-short": ("run", f"{CHECKPOINT}/state.json", set_json("rng.python", [3]), ["rng.python"]),
    "latest/parent-path": ("run", "checkpoints/latest.json", set_json("directory", "../../elsewhere"),
                           ["'../../elsewhere'", "outside"]),
    "latest/absolute-path": ("run", "checkpoints/latest.json", set_json("directory", "/tmp"), ["'/tmp'", "outside"]),
    "latest/directory-number": ("run", "checkpoints/latest.json", set_json("directory", 2), ["directory"]),
    "latest/directory-missing": ("run", "checkpoints/latest.json", set_json("directory", DELETE), ["'directory'"]),
    "latest/step-string": ("run", "checkpoints/latest.json", set_json("step", "2"), ["step"]),
    "latest/list": ("run", "checkpoints/latest.json", overwrite(b'["step-000002"]'), ["JSON object"]),
    "latest/not-utf8": ("run", "checkpoints/latest.json", overwrite(b"\xff\xfe"), ["invalid JSON"]),
    # a classifier: task.json + head.safetensors beside the backbone
    "task/head-truncated": ("task", "head.safetensors", truncate(0.5), [BROKEN]),
    "task/head-int": ("task", "head.safetensors", retype("linear.weight"), ["'linear.weight'"]),
    "task/head-shape": ("task", "head.safetensors", replace_tensor("linear.weight", torch.zeros(3, 32)),
                        ["'linear.weight'", "shape"]),
    "task/kind-number": ("task", "task.json", set_json("kind", 5), ["kind"]),
    "task/kind-unknown": ("task", "task.json", set_json("kind", "regression"), ["'regression'"]),
    "task/labels-string": ("task", "task.json", set_json("labels", "negative,positive"), ["labels"]),
    "task/labels-numbers": ("task", "task.json", set_json("labels", [0, 1]), ["labels"]),
    "task/pooling-number": ("task", "task.json", set_json("pooling", 3), ["pooling"]),
    "task/pooling-unknown": ("task", "task.json", set_json("pooling", "max"), ["pooling"]),
}


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def call_api(kind: str, target: Path, artifacts: dict[str, Path]) -> None:
    if kind in ("model", "shards", "nf4"):
        minift.load(target)
    elif kind in ("lora", "ia3", "bottleneck", "prompt"):
        load_adapter(minift.load(artifacts["model"])[0], target)
    elif kind == "run":
        setup(run_config(artifacts["model"], artifacts["data"], target, *RUN_SETTINGS), resume=True)
    else:
        load_task_model(target)


def cli_arguments(kind: str, target: Path, artifacts: dict[str, Path], out: Path) -> list[str]:
    if kind in ("model", "shards", "nf4"):
        return ["export", "--model", str(target), "--out", str(out)]
    if kind in ("lora", "ia3", "bottleneck", "prompt"):
        return ["merge", "--model", str(artifacts["model"]), "--adapter", str(target), "--out", str(out)]
    if kind == "run":
        return ["finetune", "--resume", str(target)]
    return ["eval", "--model", str(target), "--data", str(artifacts["labelled"]), "--device", "cpu"]


def broken_copy(case: str, artifacts: dict[str, Path], tmp_path: Path) -> tuple[str, Path, Path, list[str]]:
    """Copy the case's artifact, break its file; returns (kind, the copy, the file the error must name, words)."""
    kind, relative, corrupt, words = CASES[case]
    target = tmp_path / kind
    shutil.copytree(artifacts[kind], target)
    corrupt(target / relative)
    named = target / ("model-00003-of-00002.safetensors" if case == "index/missing-shard" else relative)
    return kind, target, named, words


@pytest.mark.parametrize("kind", ["model", "shards", "nf4", "lora", "ia3", "bottleneck", "prompt", "run", "task"])
def test_valid_artifacts_load(kind, artifacts, tmp_path):
    """The untouched artifacts load: every error below comes from the corruption alone."""
    target = tmp_path / kind
    shutil.copytree(artifacts[kind], target)
    call_api(kind, target, artifacts)


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_error_names_the_file(case, artifacts, tmp_path):
    kind, target, file, words = broken_copy(case, artifacts, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        call_api(kind, target, artifacts)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(str(file)) and message.count(str(file)) == 1, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_gives_one_line(case, artifacts, tmp_path, capsys):
    kind, target, file, words = broken_copy(case, artifacts, tmp_path)
    capsys.readouterr()
    code = main(cli_arguments(kind, target, artifacts, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("minift: error:"), err
    assert str(file) in err[0], err[0]
    for word in words:
        assert word in err[0], (word, err[0])


def test_shard_names_inside_subfolders_and_symlinks_still_load(artifacts, tmp_path):
    """The path check is on names only: a shard in a subfolder, or a symlink (Hugging Face's cache), is fine."""
    target = tmp_path / "shards"
    shutil.copytree(artifacts["shards"], target)
    (target / "parts").mkdir()
    (target / SHARD_1).rename(target / "parts" / SHARD_1)
    blob = tmp_path / "blob.safetensors"
    (target / "model-00002-of-00002.safetensors").rename(blob)
    (target / "model-00002-of-00002.safetensors").symlink_to(blob)
    index = json.loads((target / INDEX).read_text())
    index["weight_map"] = {n: ("parts/" + s if s == SHARD_1 else s) for n, s in index["weight_map"].items()}
    (target / INDEX).write_text(json.dumps(index))
    model, _ = minift.load(target)
    reference, _ = minift.load(artifacts["model"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# ----------------------------------------------------------------------------------------------------
# GGUF metadata: the same type and range checks as config.json (truncated GGUF files: tests/test_gguf.py)
# ----------------------------------------------------------------------------------------------------

GGUF_METADATA = {
    "general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": 64,
    "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0, "tokenizer.ggml.tokens": ["a", "b", "c"], "tokenizer.ggml.eos_token_id": 2,
}


@pytest.mark.parametrize("key, value, words", [
    ("llama.embedding_length", "64", "llama.embedding_length must be a positive integer"),
    ("llama.attention.head_count", 0, "llama.attention.head_count must be a positive integer"),
    ("llama.block_count", -2, "llama.block_count must be a positive integer"),
    ("llama.block_count", DELETE, "missing key 'llama.block_count'"),
    ("llama.attention.head_count_kv", 3, "multiple"),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", "llama.attention.layer_norm_rms_epsilon"),
    ("llama.rope.freq_base", -1.0, "llama.rope.freq_base"),
    ("tokenizer.ggml.eos_token_id", "2", "tokenizer.ggml.eos_token_id"),
    ("tokenizer.ggml.tokens", 3, "tokenizer.ggml.tokens"),
])
def test_gguf_metadata_types(key, value, words):
    from minift.io.gguf import config_from_gguf

    assert config_from_gguf(dict(GGUF_METADATA), "m.gguf").dim == 64
    metadata = dict(GGUF_METADATA)
    if value is DELETE:
        del metadata[key]
    else:
        metadata[key] = value
    with pytest.raises(ValueError) as caught:
        config_from_gguf(metadata, "m.gguf")
    message = str(caught.value)
    assert message.startswith("m.gguf: ") and words in message and "\n" not in message, message


def test_integer_buffers_and_half_precision_weights_still_load(tmp_path):
    """Only weights must be floating point: an int64 position_ids buffer (older BERT exports) is skipped as before,
    and bfloat16 / float16 weights are weights."""
    encoder = save_tiny_encoder(tmp_path / "encoder")
    tensors = load_file(encoder / "model.safetensors")
    tensors["embeddings.position_ids"] = torch.arange(128, dtype=torch.int64)[None]
    save_file(tensors, encoder / "model.safetensors", metadata={"format": "pt"})
    minift.load(encoder)

    decoder = save_tiny_decoder(tmp_path / "decoder")
    tensors = load_file(decoder / "model.safetensors")
    half = {n: t.to(torch.bfloat16 if i % 2 else torch.float16) for i, (n, t) in enumerate(sorted(tensors.items()))}
    save_file(half, decoder / "model.safetensors", metadata={"format": "pt"})
    model, _ = minift.load(decoder)
    assert {p.dtype for p in model.parameters()} <= {torch.bfloat16, torch.float16}


def test_truncated_retrieval_index_names_the_file(tmp_path):
    from minift.icl.retrieval import VectorIndex

    path = tmp_path / "index.safetensors"
    save_file({"embeddings": torch.zeros(4, 8)}, path, metadata={"format": "minift-index"})
    truncate(0.5)(path)
    with pytest.raises(ValueError) as caught:
        VectorIndex.load(path)
    assert str(caught.value).startswith(f"{path}: not a readable safetensors file"), caught.value
